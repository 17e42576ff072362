#!/usr/bin/env bash
# On a CUDA machine, in under 5 minutes: the conformance tests (tests/test_conformance.py,
# nnrun against hand-written hooks) with nnrun on cuda in fp32 and in bf16, then the
# quick benchmark table (benchmarks/run.py --quick) with the benchmarks on cuda.
#
#   bash benchmarks/gpu.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu.sh --dry-run   # the same steps on the CPU: checks the plumbing
#                                      # where there is no GPU (NNRUN_BENCH_DEVICE=cpu too)
#
# Uses .venv (scripts/bootstrap.sh makes it when missing; that needs PyPI) or the
# python in $NNRUN_PYTHON. The torch there must be a CUDA build. Exit status: 0 when
# every step passed, 1 when a step failed, 2 when torch sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

device=${NNRUN_BENCH_DEVICE:-cuda}
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu
fi
python=${NNRUN_PYTHON:-.venv/bin/python}
# nnrun from this tree even where $NNRUN_PYTHON has it not installed.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ ! -x "$python" ]; then
  echo "== no $python: bash scripts/bootstrap.sh"
  bash scripts/bootstrap.sh || exit 1
fi

echo "== machine ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi
else
  echo "nvidia-smi: not on PATH"
fi
"$python" - <<'EOF'
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU: {torch.cuda.get_device_name(0) if cuda else 'none visible to torch'}")
EOF
if [ "$device" != cpu ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "torch sees no CUDA GPU (a CPU build, or no driver): nothing run on $device." >&2
  echo "Use --dry-run to check the steps on the CPU." >&2
  exit 2
fi

status=0
step() {  # step SECONDS NAME COMMAND...: run one step under a time limit, remember failures
  local limit=$1 name=$2
  shift 2
  echo
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "-- $name: exit $rc, $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

for dtype in float32 bfloat16; do
  step 90 "conformance tests, nnrun on $device in $dtype" \
    env NNRUN_TEST_DEVICE="$device" NNRUN_TEST_DTYPE="$dtype" \
    "$python" -m pytest tests/test_conformance.py -q -p no:cacheprovider
done
step 150 "benchmarks/run.py --quick on $device" \
  env NNRUN_BENCH_DEVICE="$device" "$python" benchmarks/run.py --quick --timeout 120

echo
echo "== gpu.sh: $([ $status -eq 0 ] && echo 'every step passed' || echo 'a step FAILED (see above)')"
exit $status
