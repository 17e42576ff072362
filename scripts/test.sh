#!/usr/bin/env bash
# Install (first time only) and run the whole test suite: fast tier and the
# real-model tier (SmolLM2 + nnsight oracles). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The builtin model is converted once into nnrun's cache ($NNRUN_CACHE, default
# ~/.cache/nnrun), the same place `nnrun run` and scripts/demo.sh use.
.venv/bin/python -m pytest "$@"
