#!/usr/bin/env bash
# The canonical-size step on one GPU: bf16 step time, examples/s and MFU
# against the datasheet peak, remat policies and batch sizes, attention
# kernels, float32 for comparison, and what compute_dtype="auto" resolves to.
# The headline row is also traced: where its device time goes, by kernel kind
# (tools/profile_summary.py). SKIP_REMAT=1 leaves out the remat rows.
#
#   bash tools/bench_gpu.sh [OUT_DIR] [VARIANT]
#
# VARIANT defaults to canonical (use smoke to try the script on a CPU). Rows
# go to OUT_DIR/*.json; each command prints a table last. With OLD_TREE set to
# another checkout, the same headline row is also timed there (before/after).
# Each command has its own time limit, so one slow compile cannot eat the rest;
# the first on a fresh machine is the slowest (on an H100, over 110 s for the
# canonical step, against about 50 s of compilation for the ones after it).
# The jepa term runs without clean targets (as before that option), so the
# rows compare with OLD_TREE one to one.
set -uo pipefail
out=${1:-/tmp/bench_gpu}
variant=${2:-canonical}
limit=${BENCH_LIMIT_S:-240}
python=${PYTHON:-python3}
mkdir -p "$out"
config=experiments/stage1_jepa.py:$variant
if [[ $variant == canonical ]]; then big=256; bigger=512; else big=8; bigger=16; fi
bench() {  # name, then bench_step flags
  local name=$1; shift
  echo "=== $name: $*"
  PYTHONUNBUFFERED=1 timeout "$limit" "$python" -m tools.bench_step \
      --config="$config" --steps=10 --json="$out/$name.json" \
      --config.objective.jepa.clean_targets=False "$@" \
      2>&1 | grep -v -E "^(I|W)[0-9]{4} " | tail -25
}
# Headline: bf16, no remat, XLA attention (the model's default), and cuDNN's
# fused attention (a failure is reported in its row).
bench bf16_b${big} --config.model.compute_dtype=bfloat16 \
    --batch_sizes=$big --remat=none --attention=default,cudnn \
    --profile_dir="${PROFILE_DIR:-/tmp/echo_trace_$$}"
if [[ -n ${OLD_TREE:-} ]]; then
  echo "=== before (OLD_TREE=$OLD_TREE): bf16 batch $big"
  (cd "$OLD_TREE" && PYTHONUNBUFFERED=1 timeout "$limit" "$python" \
      -m tools.bench_step --config="$config" --batch_size=$big --steps=10 \
      --config.model.compute_dtype=bfloat16 2>&1 \
      | grep -v -E "^(I|W)[0-9]{4} " | tail -12 | tee "$out/old_bf16.txt")
fi
bench bf16_b${bigger} --config.model.compute_dtype=bfloat16 \
    --batch_sizes=$bigger --remat=none,full
bench bf16res_b${big} --config.model.compute_dtype=bfloat16 \
    --batch_sizes=$big --remat=none --config.model.residual_dtype=compute
bench fp32_b${big} --config.model.compute_dtype=float32 \
    --batch_sizes=$big --remat=none
if [[ -z ${SKIP_REMAT:-} ]]; then
  bench remat_b${big} --config.model.compute_dtype=bfloat16 \
      --batch_sizes=$big --remat=full,dots
fi
echo "=== compute_dtype=auto"
ECHO_JAX_CACHE="$out" timeout "$limit" "$python" -c "
import jax
from echo_jax.models import auto_dtype
print(jax.devices()[0].device_kind, auto_dtype.measure_block_seconds(['float32', 'bfloat16'], 512, 8, 2048))
print('auto ->', auto_dtype.resolve_compute_dtype('auto', 512, 8, 2048))
" 2>&1 | grep -v -E "^(I|W)[0-9]{4} " | tail -30
