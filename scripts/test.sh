#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every test: pytest, the C++ tests
# (ctest) and the C++ tests under sanitizers. Extra arguments go to pytest, which
# lists its 25 slowest tests (CI has a 45-minute budget: the log says where it goes).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests; that is a failure here" >&2
fi
[ "$rc" -eq 0 ] || exit "$rc"
bash scripts/ctest.sh && bash scripts/sanitize.sh
