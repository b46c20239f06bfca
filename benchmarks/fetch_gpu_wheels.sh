#!/usr/bin/env bash
# Wheels of the pins that the GPU slot's machine lacks, into .whl/ (git-ignored), which a
# device command carries (benchmarks/gpu_slot.py has the command). That machine's python3
# is 3.12 with torch 2.11, transformers 5.17, tokenizers 0.23.2, accelerate 1.15.0,
# huggingface_hub 1.33.0 and safetensors 0.8.0, and neither bitsandbytes nor google-crc32c
# (which robovqa_ft imports); it reaches no registry. What transformers 5.23.0 and peft
# 0.21.2 require (their Requires-Dist) it has: huggingface-hub>=1.31, safetensors>=0.8,
# regex>=2025.10.22 (transformers 5.17 asks the same), typer, accelerate, torch>=2.6.
# A command carries 64 MiB with the working tree: bitsandbytes (43 MB) travels only
# while that holds. Then, where a Python 3.12 is found, the wheels are installed as the
# slot installs them, into a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))

pin() { grep -oE "\"$1==[^\"]+\"" pyproject.toml | tr -d '"'; }
download() {
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
bytes() { du -cb "$@" | tail -1 | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

rm -rf .whl
download "$(pin transformers)" "$(pin peft)" "$(pin tokenizers)" "$(pin google-crc32c)" \
  "$(pin bitsandbytes)"
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

# A Python 3.12: PYTHON312, else python3.12 on the PATH, else pyenv's.
PYTHON312=${PYTHON312:-python3.12}
if ! "$PYTHON312" --version &>/dev/null && command -v pyenv >/dev/null; then
  PYTHON312="$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12"
fi
if "$PYTHON312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  site=$(mktemp -d)
  "$PYTHON312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  echo "installed as the slot installs them with $("$PYTHON312" --version): $(ls "$site" |
    grep -c dist-info) packages in $site"
  rm -rf "$site"
else
  echo "no Python 3.12 here: the install into the slot's Python was not rehearsed"
fi
