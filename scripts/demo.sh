#!/usr/bin/env bash
# Install (first time only) and run the demo experiment on SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Keep the converted model checkpoint inside the (ignored) project cache.
export NNRUN_CACHE=${NNRUN_CACHE:-$PWD/.cache/nnrun}
# --overwrite: running the demo again replaces its output (nnrun refuses that by default).
.venv/bin/nnrun run examples/demo.yaml --overwrite "$@"
