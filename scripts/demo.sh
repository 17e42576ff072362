#!/usr/bin/env bash
# Install (first time only) and run the demo experiment on SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The converted model lives in nnrun's one cache ($NNRUN_CACHE, default ~/.cache/nnrun),
# shared with a plain `nnrun run`, so the conversion happens once per machine.
# --overwrite: running the demo again replaces its output (nnrun refuses that by default).
.venv/bin/nnrun run examples/demo.yaml --overwrite "$@"
