r"""Stage 1: JEPA pretraining of the Echo encoder (terms `jepa` and `crop`).

Run (laptop demo, minutes on 2 CPU cores, embedded corpus):
  python -m echo_jax.main --config=experiments/stage1_jepa.py:cpu \
      --workdir=runs/cpu/stage1
Variants: `smoke`, `cpu`, `canonical` (experiments/common.py). Override
anything: `--config.optim.lr=5e-4`. Real data:
`--config.data.manifest=/data/echo/vox2/manifest.tsv`.
"""

import ml_collections

from experiments import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base(arg)
  c.stage = "stage1_jepa"
  # Held-out k-NN top-1 / EER of the cpu variant's target encoder (random
  # init: 93.3% / 16.3%): 93.3% / 11.3% after 1200 steps, 95.0% / 9.8% after
  # 2000 (2026-11-22).
  c.total_steps = common.by_variant(c.variant, canonical=100_000, cpu=2000,
                                    smoke=6)
  c.lock()
  return c
