#!/usr/bin/env bash
# The prepared check for a lent GPU machine (one H200, no network; torch, triton,
# pytest and the other dependencies are installed there): build, record the device
# and calibrate, test, measure. Everything, the build included, within 8 minutes.
#
#   bash scripts/gpu_check.sh [OUTDIR] [STEP ...]
#
# OUTDIR defaults to $OUT, then ./gpu-results. (The 470 s of step limits plus at
# most 15 s of kill-after and the few seconds of checks before the first step.) STEP names run only those steps, in
# the order below (a rerun after a fix: the build is incremental, so e.g.
# `bash scripts/gpu_check.sh "$OUT" build smoke` costs minutes, not the window).
#
# Steps, each with a time limit (the limits add up to the budget, GPU_CHECK_BUDGET,
# default 470 s); a step is stopped with SIGINT at its limit (pytest still writes
# its junit file and summary; the CLIs keep the rows they finished) and killed 15 s
# later if it hangs:
#   build     in place, _C only (no _C_emulated), TORCH_CUDA_ARCH_LIST=9.0; the
#             script stops here if it fails
#   device    the device's facts and ~30 s of calibration: copy bandwidth, launch
#             interval, mma.sync and cuBLAS GEMM rates (resnext-bench device)
#   smoke     one case per CUDA kernel family (tests/test_kernel_smoke.py), opcheck
#   sanitizer compute-sanitizer memcheck on a small case, the project's kernels only
#   predict   resnext-bench predict --measure: every pass and kernel of s2 (Cg 4,
#             CUDA cores) and s4-down (Cg 16, tensor cores, stride 2)
#             timed beside the committed modelled figures (calibrates the model)
#   layers    bf16 channels_last, eval + train-backward, pytorch vs auto vs cuda vs triton on
#             every layer
#   compile   the same against torch.compile on two layers only (cold compiles are
#             slow)
#   validate  the kernel backends on every layer against float64 (no model steps)
#   model     images/s of whole models
#   triton    the Triton GPU tests, last (they compile the most)
# Triton's autotuning is pinned to the fixed tile (RESNEXT_TRITON_AUTOTUNE=0) so
# that tuning compiles do not eat the window.
#
# Output (the device tool brings back at most 8 files): summary.json (written after
# every step: {"steps": [{"name", "status", "seconds", "files"}], ...}), log.txt (every
# step's output), device.json, predict.json, layers.json, validate.json, model.json, and
# steps.tar.gz with each step's own log, junit XML, CSV and plots (also refreshed
# after every step). Exit status 0 when every step that ran passed.
#
# GPU_CHECK_REHEARSAL=1 runs the same steps on the CPU with the stand-ins (the
# emulated CUDA kernels, the Triton interpreter, tiny shapes) and writes the same
# files, so the plumbing is proven before GPU minutes are spent; CI runs it
# (tests/test_gpu_check.py). There the build step only checks the extension that
# scripts/setup.sh built, and the sanitizer step runs its case without the tool.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
case "$REHEARSAL" in 0|1) ;; *) echo "gpu_check: GPU_CHECK_REHEARSAL must be 0 or 1; got '$REHEARSAL'" >&2; exit 2 ;; esac
OUTDIR=${1:-${OUT:-gpu-results}}
[ $# -gt 0 ] && shift
ALL_STEPS=(build device smoke sanitizer predict layers compile validate model triton)
declare -A LIMIT=([build]=150 [device]=40 [smoke]=45 [sanitizer]=35 [predict]=30 [layers]=55
                  [compile]=35 [validate]=30 [model]=20 [triton]=30)  # 470 s in all
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  if [ -z "${LIMIT[$s]+x}" ]; then
    echo "gpu_check: unknown step '$s'; choose from ${ALL_STEPS[*]}" >&2
    exit 2
  fi
done
BUDGET=${GPU_CHECK_BUDGET:-470}
if [ -z "${PYTHON:-}" ]; then
  if [ "$REHEARSAL" = 1 ] && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python  # the environment scripts/setup.sh built
  else
    PYTHON=$(command -v python3 || command -v python)
  fi
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# Per-step files live outside OUTDIR (the device tool brings back 8 files at most)
# and are packed into OUTDIR/steps.tar.gz after every step.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$OUTDIR/log.txt"
: >"$LOG"
: >"$WORK/steps.tsv"
export PYTHONUNBUFFERED=1 RESNEXT_TRITON_AUTOTUNE=0
status=0

# summary.json and steps.tar.gz from what has run so far.
write_summary() {
  "$PYTHON" - "$WORK/steps.tsv" "$OUTDIR/summary.json" "$REHEARSAL" "$BUDGET" "$SECONDS" <<'EOF'
import json, os, sys
tsv, path, rehearsal, budget, elapsed = sys.argv[1:]
steps = []
for line in open(tsv):
    name, status, seconds, files = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "seconds": int(seconds),
                  "files": files.split() if files else []})
doc = {"rehearsal": rehearsal == "1", "budget_s": int(budget), "elapsed_s": int(elapsed),
       "steps": steps}
with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
os.replace(path + ".tmp", path)
EOF
  tar czf "$OUTDIR/steps.tar.gz.tmp" -C "$WORK" . && mv "$OUTDIR/steps.tar.gz.tmp" "$OUTDIR/steps.tar.gz"
}

record() {  # NAME STATUS SECONDS FILES
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/steps.tsv"
  write_summary
}

# step NAME FILES -- COMMAND...: run COMMAND under the step's limit (never past the
# budget) with its output in $WORK/NAME.log and log.txt; FILES are the step's outputs.
step() {
  local name=$1 files=$2
  shift 3
  local limit=${LIMIT[$name]} left=$((BUDGET - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, out of time" | tee -a "$LOG"
    record "$name" "skipped: out of time" 0 ""
    status=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout -s INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="timed out"
  elif [ "$rc" -ne 0 ]; then
    verdict="failed (exit $rc)"
  fi
  [ "$rc" -eq 0 ] || status=1
  record "$name" "$verdict" $((SECONDS - start)) "$name.log $files"
  [ "$rc" -eq 0 ]
}

skip() {  # NAME REASON
  echo "== $1: skipped, $2" | tee -a "$LOG"
  record "$1" "skipped: $2" 0 ""
}

selected() {
  local s
  for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

if ! "$PYTHON" -c "import torch" >>"$LOG" 2>&1; then
  echo "gpu_check: $PYTHON cannot import torch (set PYTHON=...). Nothing was run." | tee -a "$LOG" >&2
  exit 1
fi
if [ "$REHEARSAL" = 1 ]; then
  DEVICE=cpu
  echo "gpu_check: REHEARSAL on the CPU (emulated CUDA, Triton interpreter, tiny shapes)" | tee -a "$LOG"
  export TRITON_INTERPRET=1
else
  DEVICE=cuda
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this" \
         "script is for a GPU machine (GPU_CHECK_REHEARSAL=1 rehearses it on the CPU)." \
         "Nothing was run." | tee -a "$LOG" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
BENCH=("$PYTHON" -m resnext_kernels.bench)
PYTEST=("$PYTHON" -m pytest -v --tb=short -p no:cacheprovider)

# The build must leave the kernel backend the later steps run (setup.py builds _C
# without the CUDA sources, and says so, when it finds no toolkit).
KERNELS=$([ "$REHEARSAL" = 1 ] && echo cuda_emulated || echo cuda)
BUILT="import resnext_kernels as rk, sys; print(rk.build_info()); print(rk.available_backends());
sys.exit(0 if '$KERNELS' in rk.available_backends() else 'the $KERNELS backend is not available')"
if selected build; then
  if [ "$REHEARSAL" = 1 ]; then
    step build "" -- "$PYTHON" -c "$BUILT"
  else
    step build "" -- env RESNEXT_BUILD_EMULATED=0 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" bash -c '"$1" setup.py build_ext --inplace && "$1" -c "$2"' \
      _ "$PYTHON" "$BUILT"
  fi
  built=$?
  if [ "$built" -ne 0 ]; then
    echo "gpu_check: the build did not succeed; nothing else is run" | tee -a "$LOG"
    exit 1
  fi
fi

# What each step runs here: the GPU's shapes, or the CPU stand-ins of the rehearsal
# (float32 where the Triton interpreter takes part: it cannot load bf16).
if [ "$REHEARSAL" = 1 ]; then
  ON=(--device cpu --quick)
  HALF=float32
  LAYERS=(--image 64 --layers s2,s3-down --backends pytorch,cuda_emulated,triton)
  VALIDATE=(--image 64 --layers s2 --backends cuda_emulated,triton)
  MODEL=(--backends reference)
  TRITON_TESTS=(tests/test_triton.py -k "empty_batch or split_ops")
else
  ON=(--device cuda)
  HALF=bfloat16
  LAYERS=(--batch 256 --quick --backends pytorch,auto,cuda,triton)
  VALIDATE=(--batch 32 --backends cuda,triton)
  MODEL=(--batch 64 --backends cuda,triton --quick)
  TRITON_TESTS=(tests/test_triton.py -m gpu -k "not opcheck")  # opcheck ran in smoke
fi

selected device && step device "" -- "${BENCH[@]}" device "${ON[@]}" --json "$OUTDIR/device.json"

if selected smoke; then
  step smoke "smoke.xml" -- "${PYTEST[@]}" tests/test_kernel_smoke.py tests/test_cuda_gpu.py \
    tests/test_triton.py -k "test_kernel_smoke or opcheck" --junitxml "$WORK/smoke.xml"
fi

if selected sanitizer; then
  SMALL_CASE="
import torch
from resnext_kernels import fused_group_conv_bn_relu
from resnext_kernels.testing import Problem, make_arguments
device, backend = ('cpu', 'cuda_emulated') if '$DEVICE' == 'cpu' else ('cuda', 'cuda')
for stride in (1, 2):
    for dtype in (torch.float32, torch.bfloat16):
        p = Problem(2, 64, 64, 9, 7, 8, stride)
        x, w, g, b, rm, rv = make_arguments(p, dtype, device, channels_last=True)
        leaves = [t.requires_grad_() for t in (x, w, g, b)]
        for training in (False, True):
            out = fused_group_conv_bn_relu(*leaves, rm, rv, stride=stride, groups=8,
                                           training=training, backend=backend)
            out.backward(torch.randn_like(out))
print('small case done')
"
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
               /opt/nvidia/*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
  if [ "$REHEARSAL" = 1 ]; then
    step sanitizer "" -- "$PYTHON" -c "$SMALL_CASE"
  elif [ -n "$SANITIZER" ]; then
    # The caching allocator hides out-of-bounds accesses inside its blocks: off here.
    # Only the project's kernels (namespace rk::detail) are checked.
    step sanitizer "" -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
      --error-exitcode 1 --kernel-name kns=detail "$PYTHON" -c "$SMALL_CASE"
  else
    skip sanitizer "compute-sanitizer not found (looked on PATH and in /usr/local/cuda*/bin)"
  fi
fi

if selected predict; then
  # The committed modelled figures (counting them again takes the CPU many minutes);
  # on the GPU every pass and kernel is timed beside them.
  MODELLED=resnext_kernels/bench/modelled_h200.json
  if [ "$REHEARSAL" = 1 ]; then
    step predict "" -- "${BENCH[@]}" predict --modelled "$MODELLED" --layers s2,s4-down \
      --json "$OUTDIR/predict.json"
  else
    step predict "" -- "${BENCH[@]}" predict --measure --modelled "$MODELLED" \
      --layers s2,s4-down --backends cuda,triton --json "$OUTDIR/predict.json"
  fi
fi

if selected layers; then
  step layers "layers.csv layers-speedup.png layers-roofline.png" -- "${BENCH[@]}" layers \
    "${ON[@]}" --dtype "$HALF" --memory-format channels_last --mode eval,train-backward \
    "${LAYERS[@]}" --json "$OUTDIR/layers.json" --csv "$WORK/layers.csv" --plot "$WORK/layers"
fi

if selected compile; then
  if [ "$REHEARSAL" = 1 ]; then
    skip compile "the torch.compile provider of resnext-bench layers is GPU-only"
  else
    step compile "layers-compile.json" -- "${BENCH[@]}" layers --device cuda --dtype bfloat16 \
      --memory-format channels_last --mode eval,train-backward --batch 256 --quick --layers s2,s4 \
      --backends pytorch,compile --compile-mode default --json "$WORK/layers-compile.json"
  fi
fi

if selected validate; then
  step validate "" -- "${BENCH[@]}" validate "${ON[@]}" --dtype "$HALF" \
    --memory-format channels_last "${VALIDATE[@]}" --steps 0 --json "$OUTDIR/validate.json"
fi

selected model && step model "" -- "${BENCH[@]}" model "${ON[@]}" "${MODEL[@]}" \
  --json "$OUTDIR/model.json"

if selected triton; then
  step triton "triton.xml" -- "${PYTEST[@]}" "${TRITON_TESTS[@]}" --junitxml "$WORK/triton.xml"
fi

{
  echo
  echo "== gpu_check summary ($SECONDS s in all; budget $BUDGET s)"
  "$PYTHON" -c "
import json, sys
for s in json.load(open(sys.argv[1]))['steps']:
    print(f\"{s['name']:<10} {s['status']:<40} {s['seconds']:>4} s\")" "$OUTDIR/summary.json"
  echo "exit status $status"
} | tee -a "$LOG"
exit "$status"
