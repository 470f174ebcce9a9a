r"""Stage 2: speaker identity (ArcFace) and speech activity in the shared
latent space.

Starts from stage 1's checkpoint beside this run's workdir (encoder,
predictor, EMA target) and keeps both stage-1 terms on so the encoder does
not forget:
  python -m echo_jax.main --config=experiments/stage2_speaker.py:cpu \
      --workdir=runs/cpu/stage2        # reads runs/cpu/stage1
"""

import ml_collections

from experiments import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base(arg)
  v = c.variant
  c.stage = "stage2_speaker"
  c.init_from.workdir = "{parent}/stage1"
  common.single_speaker_clips(c)           # Half of them cropped.
  c.model.heads = ("rwse", "speaker", "arcface", "activity")
  c.objective.jepa.weight = 0.5            # Keep the JEPA skill alive,
  c.objective.crop.weight = 0.5            # both of its terms.
  c.objective.speaker = dict(
      weight=1.0, scale=30.0, margin=0.2,
      margin_ramp_steps=common.by_variant(v, canonical=20_000, cpu=400,
                                          smoke=4))
  common.train_speech_activity(c)          # Weight 1, noise-only clips.
  # cpu: at 1200 steps the unseen-variant speaker EER under reverb and the
  # telephone channel was only 9-21% below the MFCC floor's; at 2000, 35-41%.
  c.total_steps = common.by_variant(v, canonical=50_000, cpu=2000, smoke=6)
  c.optim.update(lr=5e-4,
                 warmup_steps=common.by_variant(v, canonical=2_000, cpu=80,
                                                smoke=2),
                 # The shared encoder moves at half the heads' rate.
                 lr_mult=(("^encoder/", 0.5),))
  c.ema.start = 0.999                      # Targets already meaningful.
  c.lock()
  return c
