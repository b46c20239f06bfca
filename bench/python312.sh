#!/usr/bin/env bash
# The path of a Python 3.12, the GPU slot machine's: PYTHON312, else python3.12 on the
# PATH, else pyenv's 3.12; nothing (and exit status 1) where there is none.
for candidate in "${PYTHON312:-}" python3.12 \
  "$(command -v pyenv >/dev/null && pyenv prefix 3.12 2>/dev/null)/bin/python3.12"; do
  if [ -n "$candidate" ] &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    command -v "$candidate"
    exit 0
  fi
done
exit 1
