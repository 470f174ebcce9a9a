#!/usr/bin/env bash
# Creates ./.venv (Python 3.12) with the pinned dependencies, once; later calls
# return at once unless pyproject.toml or constraints.txt changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.echo_jax_installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
find_python() {
  for candidate in "${ECHO_JAX_PYTHON:-}" python3.12 \
      "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [[ -n "$candidate" ]] && "$candidate" -c \
        'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "setup_env: Python 3.12 not found; set ECHO_JAX_PYTHON=/path/to/python3.12" >&2
  return 1
}
if [[ ! -x "$venv/bin/python" ]]; then
  python="$(find_python)"
  echo "setup_env: creating $venv with $python" >&2
  "$python" -m venv "$venv"
fi
echo "setup_env: installing pinned dependencies (constraints.txt)" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  -c "$root/constraints.txt" -e "$root"
"$venv/bin/python" -c "import echo_jax, data_pipelines, jax, grain, orbax.checkpoint, librosa"
echo "$want" > "$stamp"
