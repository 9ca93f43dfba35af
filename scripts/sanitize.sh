#!/usr/bin/env bash
# The C++ tests under ASan + UBSan (both emulator back-ends) and under ThreadSanitizer
# (the threads back-end). Run before every kernel change; CI runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
RESNEXT_SANITIZE=address bash scripts/ctest.sh
RESNEXT_SANITIZE=thread bash scripts/ctest.sh
