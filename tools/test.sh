#!/usr/bin/env bash
# Runs the test suite (sets up ./.venv first). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
# pytest exits 5 when no test ran: that must fail, so it is not masked here.
exec "$root/.venv/bin/python" -m pytest "$@"
