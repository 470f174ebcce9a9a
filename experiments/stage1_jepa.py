r"""Stage 1: JEPA pretraining of the Echo encoder.

Run (laptop demo, minutes on 2 CPU cores, embedded corpus):
  python -m echo_jax.main --config=experiments/stage1_jepa.py:cpu \
      --workdir=runs/cpu/stage1
Variants: `smoke` (tests, seconds), `cpu` (laptop demo), `canonical` (25M
params, pods). Override anything: `--config.optim.lr=5e-4`.
Real data: `--config.data.manifest=/data/echo/vox2/manifest.tsv`.
"""

import ml_collections

VARIANTS = ("smoke", "cpu", "canonical")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.stage = "stage1_jepa"
  c.seed = 0
  c.total_steps = 100_000
  c.log_every = 50
  c.progress = ml_collections.FieldReference(None, field_type=bool)

  c.data = dict(
      manifest="",             # "" = the embedded default corpus.
      corpus_size="default",   # Embedded corpus size when manifest is "".
      clip_seconds=4.0, k_min=1, k_max=3,
      p_mixture=0.5,           # Stage 1 sees single clips and mixtures.
      gain_db=5.0, batch_size=256, num_workers=16)

  c.model = dict(
      encoder=dict(width=512, depth=8, num_heads=8, mlp_dim=2048,
                   patch_frames=2),            # 20 ms tokens, 50 Hz.
      predictor=dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
      n_mels=80,
      # Fixed affine on log-mel (log(power + 1e-6) of [-1, 1] audio) that
      # keeps inputs O(1); measured on speech, not learned.
      mel_mean=-6.0, mel_std=4.0,
      compute_dtype="bfloat16",  # Matmuls only; params/EMA stay float32.
      rwse_heads=8, speaker_embed_dim=256,
      heads=())                # Stage 1 trains no heads.

  c.objective = dict(
      jepa=dict(weight=1.0, mask_fraction=0.6,
                span_tokens=(10,),     # 200 ms at 20 ms tokens.
                loss="smooth_l1", target_layers=4,
                sigreg_weight=0.0, sigreg_directions=256),
      # Clip-level JEPA: a half's pooled embedding predicts the other half's
      # (see jepa.cross_crop_loss); the context half gets a random +-6 dB
      # smooth equaliser, a generic channel change.
      crop=dict(weight=1.0, sigreg_weight=0.05, equalizer_db=6.0),
      speaker=dict(weight=0.0, scale=30.0, margin=0.2, margin_ramp_steps=1),
      activity=dict(weight=0.0))

  c.optim = dict(lr=1e-3, end_lr=1e-6, warmup_steps=10_000, b1=0.9, b2=0.95,
                 weight_decay=0.05, clip_norm=10.0,
                 lr_mult=(),           # ((regex, multiplier), ...)
                 freeze=())            # (regex, ...) over param paths.
  c.ema = dict(start=0.996, end=1.0)
  c.mesh = dict(data=-1, fsdp=1)
  c.init_from = dict(workdir="", trees=("params/encoder", "params/predictor",
                                        "target"))
  c.checkpoint = dict(every=1000, keep=3)
  c.evals = dict(speaker=dict(type="speaker", every=5000, seconds=4.0,
                              batch_size=64, max_utterances_per_speaker=40,
                              random_floor=True))

  if variant == "cpu":
    # Held-out k-NN top-1 / EER of the target encoder (random init: 93.3% /
    # 16.3%): 93.3% / 11.3% after 1200 steps, 95.0% / 9.8% after 2000
    # (2026-11-22, see the stage-1 issue note).
    c.total_steps = 2000
    c.log_every = 25
    c.data.update(batch_size=32, num_workers=0, clip_seconds=3.0)
    c.model.update(compute_dtype="float32", rwse_heads=4)
    c.model.encoder.update(width=192, depth=4, num_heads=4, mlp_dim=768,
                           patch_frames=4)     # 40 ms tokens: 4x fewer.
    c.model.predictor.update(width=96, depth=2, num_heads=4, mlp_dim=384)
    # Still 200 ms spans. SIGReg on: without it the target features' effective
    # rank fell from 80 to 37 (of 192) within 700 steps at this scale; with it
    # the rank held at 84-89 (runs of 2026-11-22, see the stage-1 issue note).
    c.objective.jepa.update(span_tokens=(5,), sigreg_weight=0.02)
    c.optim.update(warmup_steps=100)
    c.checkpoint.every = 200
    c.evals.speaker.update(every=500, seconds=3.0, batch_size=32)
  elif variant == "smoke":
    c.total_steps = 6
    c.log_every = 2
    c.data.update(corpus_size="tiny", batch_size=8, num_workers=0,
                  clip_seconds=2.0)
    c.model.update(compute_dtype="float32", rwse_heads=2,
                   speaker_embed_dim=32)
    c.model.encoder.update(width=64, depth=2, num_heads=2, mlp_dim=128,
                           patch_frames=4)
    c.model.predictor.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.objective.jepa.update(span_tokens=(3,), target_layers=2)
    c.optim.update(warmup_steps=2)
    c.checkpoint.every = 3
    c.evals.speaker.update(every=6, seconds=2.0, batch_size=8,
                           max_utterances_per_speaker=4)
  c.lock()
  return c
