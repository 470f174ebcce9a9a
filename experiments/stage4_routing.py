r"""Stage 4: dynamic routing with null targets (unknown number of speakers).

`S = K_max + 1` slot queries decode the mixture's RWSE features; each slot
carries one source's latent sequence (the EMA encoder's JEPA targets of that
source alone), an existence logit and per-token activity, or is empty (the
null target). Starts from stage 3's checkpoint beside this run's workdir
(encoder, predictor, EMA target and the stage-2 heads by name); JEPA, crop
and speech activity stay on so earlier skills are kept:
  python -m echo_jax.main --config=experiments/stage4_routing.py:cpu \
      --workdir=runs/cpu/stage4        # reads runs/cpu/stage3
Start from another run with `--config.init_from.workdir=runs/cpu/stage2`.
K = 0 (all-silent or noise-only examples) by `--config.data.k_min=0`.
"""

import ml_collections

from experiments import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base(arg)
  v = c.variant
  c.stage = "stage4_routing"
  c.init_from.workdir = "{parent}/stage3"
  # The stage-2 heads diarization reads, by name (a later stage's extra heads
  # are not read).
  c.init_from.trees = tuple(c.init_from.trees) + tuple(
      f"params/heads/{h}" for h in ("rwse", "speaker", "activity"))
  c.data.p_mixture = 1.0                   # K drawn in [k_min, k_max].
  c.model.heads = ("rwse", "speaker", "activity", "router")
  c.model.router = dict(
      num_slots=c.data.k_max + 1,          # One slot more than sources.
      width=common.by_variant(v, canonical=256, cpu=128, smoke=32),
      depth=common.by_variant(v, canonical=3, cpu=2, smoke=2),
      num_heads=common.by_variant(v, canonical=8, cpu=4, smoke=2),
      mlp_dim=common.by_variant(v, canonical=1024, cpu=512, smoke=64),
      latent_hidden=common.by_variant(v, canonical=512, cpu=256, smoke=32),
      activity_dim=common.by_variant(v, canonical=128, cpu=64, smoke=16),
      # Slots correct the mixture's own latent (models/router.py).
      residual_layers=c.objective.jepa.target_layers)
  c.objective.jepa.weight = 0.5            # Keep the JEPA skill alive,
  c.objective.crop.weight = 0.5            # both of its terms,
  common.train_speech_activity(c)          # and speech activity, as stage 2.
  c.objective.routing = dict(
      weight=1.0,
      target_layers=c.objective.jepa.target_layers,  # The JEPA targets.
      latent_weight=1.0, activity_weight=1.0, existence_weight=1.0,
      null_weight=0.1,                     # DETR's no-object weight.
      null_energy_weight=0.0,
      # Matched slots nearer their own source than the others (0: off).
      distinct_weight=0.0, distinct_temperature=0.1,
      aux_weight=1.0)                      # Earlier decoder layers' losses.
  c.total_steps = common.by_variant(v, canonical=50_000, cpu=800, smoke=6)
  c.optim.update(lr=5e-4,
                 warmup_steps=common.by_variant(v, canonical=2_000, cpu=80,
                                                smoke=2),
                 # The shared encoder moves slowly: the speaker head (frozen
                 # here, with the RWSE it reads) must still fit it for
                 # diarization.
                 lr_mult=(("^encoder/", 0.25),),
                 freeze=("^heads/rwse/", "^heads/speaker/"))
  c.ema.start = 0.999                      # Targets already meaningful.
  c.evals.routing = dict(
      type="routing",
      every=common.by_variant(v, canonical=5000, cpu=400, smoke=6),
      num_mixtures=common.by_variant(v, canonical=500, cpu=200, smoke=4),
      seconds=c.data.clip_seconds,         # The positions the model saw.
      k_min=c.data.k_min, k_max=c.data.k_max,
      target_layers=c.objective.routing.target_layers,
      null_weight=c.objective.routing.get_ref("null_weight"),
      batch_size=common.by_variant(v, canonical=32, cpu=16, smoke=4))
  c.lock()
  return c
