#!/usr/bin/env bash
# Install (first time only) and run the whole test suite: fast tier and the
# real-model tier (SmolLM2 + nnsight oracles). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export NNRUN_CACHE=${NNRUN_CACHE:-$PWD/.cache/nnrun}
.venv/bin/python -m pytest "$@"
