#!/usr/bin/env bash
# One-shot check on a lent GPU machine with no network (torch, triton, pytest and the
# other dependencies are already installed there; ../shared/NOTES.md §4): build in
# place for the visible GPU, run the GPU tests, compute-sanitizer on a small case,
# then resnext-bench validate, layers (bf16 channels_last, eval and train-backward)
# and model. Every step has a time limit and the whole run stays within 8 minutes.
#
#   bash scripts/gpu_check.sh [OUTDIR]      # OUTDIR defaults to $OUT, then ./gpu-results
#
# Writes at most 8 files (what the device tool brings back): log.txt, pytest.xml,
# validate.json, layers.json, layers.csv, layers-speedup.png, layers-roofline.png,
# model.json. Exits non-zero when any step failed; without a GPU it stops at once.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for everything, under the 8 minutes
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
status=0
summary=()

# step NAME LIMIT COMMAND...: run with a time limit (never past the budget), log it.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 10 ]; then
    summary+=("$(printf '%-22s %s' "$name" "SKIPPED (out of time)")")
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMED OUT"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (exit $rc)"
  fi
  [ "$rc" -eq 0 ] || status=1
  summary+=("$(printf '%-22s %-16s %4ss' "$name" "$verdict" $((SECONDS - start)))")
}

if ! "$PYTHON" -c "import torch" >>"$LOG" 2>&1; then
  echo "gpu_check: $PYTHON cannot import torch (set PYTHON=...). Nothing was run." | tee -a "$LOG" >&2
  exit 1
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this" \
       "script is for a GPU machine. Nothing was run." | tee -a "$LOG" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"

step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps --editable .
step build-info 60 "$PYTHON" -c \
  "import resnext_kernels as rk; print(rk.build_info()); print(rk.available_backends())"
step kernels 60 "$PYTHON" -m resnext_kernels.bench kernels --check
step gpu-tests 170 "$PYTHON" -m pytest -q tests/test_cuda_gpu.py tests/test_triton.py \
  --junitxml "$OUTDIR/pytest.xml"

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
SMALL_CASE='
import torch
from resnext_kernels import fused_group_conv_bn_relu
from resnext_kernels.testing import Problem, make_arguments
for stride in (1, 2):
    for dtype in (torch.float32, torch.bfloat16):
        p = Problem(2, 64, 64, 9, 7, 8, stride)
        x, w, g, b, rm, rv = make_arguments(p, dtype, "cuda", channels_last=True)
        leaves = [t.requires_grad_() for t in (x, w, g, b)]
        for training in (False, True):
            out = fused_group_conv_bn_relu(*leaves, rm, rv, stride=stride, groups=8,
                                           training=training, backend="cuda")
            out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("small case done")
'
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 90 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "$PYTHON" -c "$SMALL_CASE"
  done
else
  echo "compute-sanitizer: not found on this machine; skipped" | tee -a "$LOG"
  summary+=("$(printf '%-22s %s' sanitizer "not available here")")
fi

step validate 90 "$PYTHON" -m resnext_kernels.bench validate --device cuda \
  --dtype bfloat16 --batch 32 --json "$OUTDIR/validate.json"
# torch.compile's max-autotune searches every layer shape for minutes: the default
# mode keeps the run bounded (run `layers` alone for max-autotune).
step layers 170 "$PYTHON" -m resnext_kernels.bench layers --device cuda --dtype bfloat16 \
  --memory-format channels_last --batch 256 --mode eval,train-backward \
  --backends pytorch,compile,cuda,triton --compile-mode default \
  --json "$OUTDIR/layers.json" --csv "$OUTDIR/layers.csv" --plot "$OUTDIR/layers"
step model 90 "$PYTHON" -m resnext_kernels.bench model --device cuda --dtype bfloat16 \
  --batch 128 --backends cuda,triton --json "$OUTDIR/model.json"

{
  echo
  echo "== gpu_check summary ($SECONDS s in all)"
  printf '%s\n' "${summary[@]}"
  echo "exit status $status"
} | tee -a "$LOG"
exit "$status"
