#!/usr/bin/env bash
# Builds the C++ tests with CMake and runs them with ctest.
#   RESNEXT_SANITIZE=address|thread   build them under ASan+UBSan or ThreadSanitizer
#   VENV                              the environment from scripts/setup.sh (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SANITIZE=${RESNEXT_SANITIZE:-}
BUILD=build/ctest${SANITIZE:+-$SANITIZE}
export PATH="$PWD/$VENV/bin:$PATH"  # ninja and cmake's Python come from the venv
mkdir -p build
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DPython3_EXECUTABLE="$PWD/$VENV/bin/python" -DRESNEXT_SANITIZE="$SANITIZE" >"$BUILD.log" 2>&1 \
  || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD" --target emu_tests async_tests count_tests conv_fwd_tests conv_bwd_tests
ctest --test-dir "$BUILD" --output-on-failure
