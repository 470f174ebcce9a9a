r"""Stage 2: speaker identity (ArcFace) in the shared latent space.

Starts from stage 1's checkpoint (encoder, predictor, EMA target) and keeps
the JEPA loss on so the encoder does not forget. Run after stage 1:
  python -m echo_jax.main --config=experiments/stage2_speaker.py:cpu \
      --workdir=runs/cpu/stage2 --config.init_from.workdir=runs/cpu/stage1
Variants as stage 1 (`smoke`, `cpu`, `canonical`).
"""

import ml_collections

from experiments import stage1_jepa


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = stage1_jepa.get_config(arg)
  variant = c.variant
  with c.unlocked():
    c.stage = "stage2_speaker"
    c.init_from.workdir = f"runs/{variant}/stage1"
    # Single-speaker clips of train speakers; K = 1 so speakers[:, 0] is the
    # ArcFace label. Activity still varies: clips sit at random onsets.
    c.data.p_mixture = 0.0
    c.model.heads = ("rwse", "speaker", "arcface", "activity")
    c.objective.jepa.weight = 0.5          # Keep the JEPA skill alive,
    c.objective.crop.weight = 0.5          # both of its terms.
    c.objective.speaker.update(weight=1.0, scale=30.0, margin=0.2,
                               margin_ramp_steps=20_000)
    c.objective.activity.weight = 0.1      # Speech activity for diarization.
    c.total_steps = 50_000
    c.optim.update(lr=5e-4, warmup_steps=2_000,
                   # The shared encoder moves at half the heads' rate.
                   lr_mult=(("^encoder/", 0.5),))
    c.ema.start = 0.999                    # Targets already meaningful.
    if variant == "cpu":
      c.total_steps = 800
      c.objective.speaker.margin_ramp_steps = 400
      c.optim.warmup_steps = 80
    elif variant == "smoke":
      c.total_steps = 6
      c.objective.speaker.margin_ramp_steps = 4
      c.optim.warmup_steps = 2
  return c
