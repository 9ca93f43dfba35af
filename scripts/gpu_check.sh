#!/usr/bin/env bash
# One-shot check on a lent GPU machine (no network; torch, triton, pytest and the
# other dependencies are already installed there, see ../shared/NOTES.md §4):
# build for the visible GPU, run the GPU tests and the emulated kernel tests, print
# the kernels' resources and benchmark every ResNeXt-50 layer. Results go to $OUT
# (the device tool's output folder) or ./gpu-results.
#
#   bash scripts/gpu_check.sh          # about 5 minutes on an H200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0
step() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=$rc; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step python -m pip install --no-build-isolation --no-deps --editable .
step python -c "import resnext_kernels as rk; print(rk.build_info(), rk.available_backends())"
step python -m pytest -q -x tests/test_cuda_gpu.py tests/test_cuda_forward.py tests/test_backends.py \
     --junitxml "$OUT/pytest.xml"
step python -m resnext_kernels.bench kernels --check --json "$OUT/kernels.json"
parts=$(mktemp -d)  # the device tool returns at most 8 files: merge the parts
for layer in s2 s3-down s3 s4-down s4 s5-down s5; do
  for dtype in bfloat16 float16; do
    step python -m resnext_kernels.bench check --layer "$layer" --dtype "$dtype" --batch 256 \
         --repeats 20 --backends pytorch,cuda --json "$parts/$layer-$dtype.json"
  done
done
python - "$parts" "$OUT/checks.json" <<'PY'
import json, pathlib, sys
parts = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
json.dump({p.stem: json.loads(p.read_text()) for p in parts}, open(sys.argv[2], "w"), indent=1)
PY
echo "gpu_check: exit status $status"
exit "$status"
