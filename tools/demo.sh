#!/usr/bin/env bash
# The main job on the embedded default corpus: set-up, stage 1 (JEPA) then
# stage 2 (speaker) with the cpu variants, then a summary. Resumable: a rerun
# continues each stage from its workdir. Extra args go to both stages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
py="$root/.venv/bin/python"
runs="${ECHO_JAX_RUNS:-runs/cpu}"
"$py" -m data_pipelines.default_corpus
"$py" -m echo_jax.main --config=experiments/stage1_jepa.py:cpu \
    --workdir="$runs/stage1" "$@"
# Stage 2 starts from the stage-1 workdir beside its own ({parent}/stage1).
"$py" -m echo_jax.main --config=experiments/stage2_speaker.py:cpu \
    --workdir="$runs/stage2" "$@"
"$py" -m tools.report "$runs/stage1" "$runs/stage2"
"$py" -m tools.eval_diarization --workdir "$runs/stage2" --num_mixtures 50 \
    --json "$runs/diarization.json" --out_dir "$runs/diarization"
