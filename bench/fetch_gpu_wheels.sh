#!/usr/bin/env bash
# Wheels of the pins that the GPU slot's machine lacks, into .whl/ (git-ignored), which a
# device command carries (bench/gpu_slot.py has the command). Which pins: CARRIED in
# bench/gpu_env.py, beside the machine's package list (gpu_image.txt); `gpu_env.py
# check` (a test) says that each package the slot imports is one or the other. That
# machine's python3 is 3.12 and reaches no registry. A command carries 64 MiB with the
# working tree: bitsandbytes (43 MB) travels only while that holds. Then, where a Python
# 3.12 is found, the wheels are installed as the slot installs them, into a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))

download() {
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
bytes() { du -cb "$@" | tail -1 | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

rm -rf .whl
mapfile -t carried < <("$PYTHON" bench/gpu_env.py carried)
download "${carried[@]}"
# What travels besides: tracked files still there, and untracked ones git does not ignore.
tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } |
  xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }' || true)
total=$((tree + $(bytes .whl)))
if ((total > LIMIT)); then
  bnb=$(ls .whl/bitsandbytes-*.whl)
  echo "bitsandbytes left out: its wheel is $(mib "$(bytes "$bnb")"), the total would be" \
    "$(mib "$total") of the 64 MiB a command carries (the slot's nf4 lines say it is absent)"
  rm "$bnb"
  total=$((tree + $(bytes .whl)))
fi
for wheel in .whl/*.whl; do echo "$(mib "$(bytes "$wheel")")  $wheel"; done
echo "wheels $(mib "$(bytes .whl)") + working tree $(mib "$tree") = $(mib "$total")" \
  "of the 64 MiB a command carries"

PYTHON312=$(bash bench/python312.sh || true)
if [ -n "$PYTHON312" ]; then
  site=$(mktemp -d)
  "$PYTHON312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  echo "installed as the slot installs them with $("$PYTHON312" --version): $(ls "$site" |
    grep -c dist-info) packages in $site"
  rm -rf "$site"
else
  echo "no Python 3.12 here: the install into the slot's Python was not rehearsed"
fi
