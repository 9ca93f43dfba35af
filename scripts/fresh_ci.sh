#!/usr/bin/env bash
# Runs .ci/run on a fresh clone of HEAD, as CI does, and removes the clone afterwards
# (each one holds a ~6 GB environment; left behind they fill the disk CI runs on).
# Prints the wall time and exits with .ci/run's status. Commit first: the clone
# sees only committed work.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
git clone -q . "$dir/repo" || exit 1
cd "$dir/repo"
start=$(date +%s)
CI=true bash .ci/run
rc=$?
echo "fresh_ci: $(git rev-parse --short HEAD) finished in $(( $(date +%s) - start )) s with exit code $rc"
exit "$rc"
