#!/usr/bin/env bash
# Sets up a virtual environment with the pinned torch (requirements-dev.txt) and
# builds resnext_kernels into it (editable, against that torch). Idempotent: a
# second run only rebuilds what changed.
#
#   VENV      where the environment lives (default: .venv in the repository)
#   PYTHON    interpreter that creates it (default: python3; torch 2.14.1 wants 3.10-3.13)
#   TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME   passed on to setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  # The CUDA build of torch and its libraries take about 6 GB; pip fails half-way
  # with "No space left on device" otherwise.
  need_kb=$((8 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt "$need_kb" ]; then
    echo "setup.sh: $((free_kb / 1024)) MB free on $(pwd), the environment needs about 8 GB" >&2
    exit 1
  fi
  echo "== creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing the pinned dependencies (requirements-dev.txt)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
echo "== building resnext_kernels"
"$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps --editable .
"$VENV/bin/python" -c "import resnext_kernels as rk; print('built:', rk.build_info()); print('backends:', rk.available_backends())"
