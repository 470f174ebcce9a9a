#!/usr/bin/env bash
# The main job on the embedded default corpus: set-up, then the whole stack
# of the cpu variant (every experiments/stage<N>_*.py in order, the
# evaluations, and the report runs/cpu/report/index.html; tools/stack.py).
# Resumable: a rerun skips finished stages and continues the others from
# their workdirs. Extra args (--config.<field>=<value>) go to every stage
# whose config has the field.
# Exit status: the stack's (75: a stage was preempted; rerun to resume).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
py="$root/.venv/bin/python"
runs="${ECHO_JAX_RUNS:-runs/cpu}"
"$py" -m data_pipelines.default_corpus
exec "$py" -m tools.stack --variant cpu --runs "$runs" "$@"
