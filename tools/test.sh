#!/usr/bin/env bash
# Runs the test suite (sets up ./.venv first). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
# Test files run in parallel processes (pytest-xdist), one per core up to 4,
# each file in one process so its module-scoped runs are trained once. The
# tests are mostly single-threaded tracing and compiling. Pass -n 0 for one
# process (or any -n / -p no:xdist of your own).
parallel=(-n "$(( $(nproc) < 4 ? $(nproc) : 4 ))" --dist loadfile)
for arg in "$@"; do
  case "$arg" in
    -n|-n*|--numprocesses*|no:xdist|-pno:xdist) parallel=() ;;
  esac
done
# pytest exits 5 when no test ran: that must fail, so it is not masked here.
exec "$root/.venv/bin/python" -m pytest "${parallel[@]}" "$@"
