"""What every stage shares: the canonical config and its `cpu` / `smoke`
shrinking. A stage file starts from `base(variant)` and sets only what differs.

Variants: `smoke` (tests, seconds), `cpu` (laptop demo, minutes on 2 cores),
`canonical` (25M parameters, pods).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from data_pipelines import augment as augment_lib
from data_pipelines import mixtures

VARIANTS = ("smoke", "cpu", "canonical")


def by_variant(variant: str, *, canonical, cpu, smoke):
  """One value per variant, e.g. `total_steps=by_variant(v, canonical=...)`."""
  return {"canonical": canonical, "cpu": cpu, "smoke": smoke}[variant]


def _data() -> dict:
  """Stream settings; every `MixtureConfig` field is settable here."""
  mixture = dataclasses.asdict(mixtures.MixtureConfig())
  mixture.update(clip_seconds=4.0, k_min=1, k_max=3,
                 p_mixture=0.5,          # Single clips and mixtures.
                 gain_db=5.0)
  # Room / noise / channel augmentation (data_pipelines/augment.py), on for
  # training: a model that never heard a room learns the corpus, not speech.
  augment = dataclasses.asdict(augment_lib.AugmentConfig(enabled=True))
  return dict(manifest="",               # "" = the embedded default corpus.
              corpus_size="default",     # Embedded corpus size then.
              batch_size=256, num_workers=16,
              # How batches carry the waveforms; see mixtures.
              wire_dtype=mixtures.DEFAULT_WIRE_DTYPE,
              augment=augment, **mixture)


def base(variant: str | None) -> ml_collections.ConfigDict:
  """The shared config of `variant` (unlocked; the stage file locks it)."""
  variant = variant or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.stage = ""
  c.seed = 0
  c.total_steps = 100_000
  c.log_every = 50
  c.progress = ml_collections.FieldReference(None, field_type=bool)
  c.data = _data()
  c.model = dict(
      encoder=dict(width=512, depth=8, num_heads=8, mlp_dim=2048,
                   patch_frames=2),            # 20 ms tokens, 50 Hz.
      predictor=dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
      n_mels=80,
      # Fixed affine on log-mel (log(power + 1e-6) of [-1, 1] audio) that
      # keeps inputs O(1); measured on speech, not learned.
      mel_mean=-6.0, mel_std=4.0,
      # Matmuls only (16-bit inputs and products, float32 accumulation);
      # norms, softmax, losses, params, EMA and optimizer stay float32.
      # "auto": whichever of float32 / bfloat16 a cached block benchmark
      # finds faster on the backend in use (echo_jax/models/auto_dtype.py).
      compute_dtype="auto",
      # Per-block rematerialisation: "none" | "full" | "dots". At batch 256
      # on an H200 (2026-11-27), none peaked at 18 GB, dots at 11 GB (+12%
      # step time), full at 3.3 GB (+14%): none while activations fit.
      remat="none",
      # "auto": cuDNN's fused attention on GPUs with 16-bit compute (-14%
      # step time at batch 256 on an H200), XLA's elsewhere; "xla" | "cudnn".
      attention="auto",
      # Storage dtype of the residual stream between a block's ops:
      # "float32" | "compute" (the compute dtype; LayerNorm statistics and
      # the residual adds still compute in float32).
      residual_dtype="float32",
      rwse_heads=8, speaker_embed_dim=256,
      # Speech-activity head: hidden width (0: one linear layer per token)
      # and its temporal convolution in tokens (about 350 ms).
      activity_hidden=128, activity_kernel=17,
      heads=())                  # Names in echo_jax/heads.py.
  # Terms by name (echo_jax/terms); a stage lists the ones it trains.
  c.objective = dict(
      jepa=dict(weight=1.0, mask_fraction=0.6,
                span_tokens=(10,),     # 200 ms at 20 ms tokens.
                loss="smooth_l1", target_layers=4,
                sigreg_weight=0.0, sigreg_directions=256,
                clean_targets=True),   # Targets see the dry mixture.
      # Clip-level JEPA: a half's pooled embedding predicts the other half's
      # (see jepa.cross_crop_loss); the context half gets a random +-6 dB
      # smooth equaliser, a generic channel change.
      crop=dict(weight=1.0, sigreg_weight=0.05, sigreg_directions=256,
                equalizer_db=6.0))
  c.optim = dict(lr=1e-3, end_lr=1e-6, warmup_steps=10_000, b1=0.9, b2=0.95,
                 weight_decay=0.05, clip_norm=10.0,
                 lr_mult=(),           # ((regex, multiplier), ...)
                 freeze=())            # (regex, ...) over param paths.
  c.ema = dict(start=0.996, end=1.0)
  c.mesh = dict(data=-1, fsdp=1)
  # `{parent}` is the parent of this run's workdir, so a stage finds its
  # predecessor beside it whatever the current directory.
  c.init_from = dict(workdir="", trees=("params/encoder", "params/predictor",
                                        "target"))
  c.checkpoint = dict(every=1000, keep=3)
  c.evals = dict(speaker=dict(type="speaker", every=5000, seconds=4.0,
                              batch_size=64, max_utterances_per_speaker=40,
                              random_floor=True,
                              # *_best_layer is chosen on this many train
                              # speakers, not on the held-out ones reported.
                              layer_select_speakers=40),
                 # At the end only: clean / noisy / reverberant / telephone
                 # speaker ID and noise false alarm (see robustness.py).
                 robustness=dict(type="robustness", every=10**9, seconds=4.0,
                                 batch_size=64, max_utterances_per_speaker=16,
                                 conditions=augment_lib.CONDITIONS,
                                 noise_only_clips=96, noise_dir="",
                                 rir_dir=""))
  if variant == "cpu":
    c.total_steps = 2000
    c.log_every = 25
    c.data.update(batch_size=32, num_workers=0, clip_seconds=3.0)
    c.model.update(compute_dtype="float32", rwse_heads=4, activity_kernel=9)
    c.model.encoder.update(width=192, depth=4, num_heads=4, mlp_dim=768,
                           patch_frames=4)     # 40 ms tokens: 4x fewer.
    c.model.predictor.update(width=96, depth=2, num_heads=4, mlp_dim=384)
    # Still 200 ms spans. SIGReg on: without it the target features' effective
    # rank fell from 80 to 37 (of 192) within 700 steps at this scale; with it
    # the rank held at 84-89 (runs of 2026-11-22).
    c.objective.jepa.update(span_tokens=(5,), sigreg_weight=0.02)
    c.optim.update(warmup_steps=100)
    c.checkpoint.every = 200
    c.evals.speaker.update(every=500, seconds=3.0, batch_size=32)
    c.evals.robustness.update(seconds=3.0, batch_size=32)
  elif variant == "smoke":
    c.total_steps = 6
    c.log_every = 2
    c.data.update(corpus_size="tiny", batch_size=8, num_workers=0,
                  clip_seconds=2.0)
    c.data.augment.update(num_rooms=2, bank_clips=2)  # Banks in milliseconds.
    c.model.update(compute_dtype="float32", rwse_heads=2,
                   speaker_embed_dim=32, activity_hidden=16, activity_kernel=3)
    c.model.encoder.update(width=64, depth=2, num_heads=2, mlp_dim=128,
                           patch_frames=4)
    c.model.predictor.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.objective.jepa.update(span_tokens=(3,), target_layers=2)
    c.optim.update(warmup_steps=2)
    c.checkpoint.every = 3
    c.evals.speaker.update(every=6, seconds=2.0, batch_size=8,
                           max_utterances_per_speaker=4)
    c.evals.robustness.update(seconds=2.0, batch_size=8,
                              max_utterances_per_speaker=3,
                              conditions=("clean", "snr10"),
                              noise_only_clips=4)
  return c


def single_speaker_clips(c: ml_collections.ConfigDict) -> None:
  """Clips of one train speaker (K = 1: speakers[:, 0] is the ArcFace label
  and a clip has one phonetic content), half of them a "mixture" of one
  source: a 1 s to full-length crop at a random onset, the rest of the clip
  silence (noise once augmented).

  Full-length clips alone are 80-94% speech, so the activity head rarely
  hears a talker stop and the noise go on; after stage 2 on them it took
  32% of a noisy pause after speech for speech, against 0% of the same
  noise alone. Stage 3 once drew full-length clips only (1.5% of frames in
  pauses of 0.5 s or more, against 13.5% with the crops): frames more than
  0.5 s from a talker in 10 dB SNR mixtures of train speakers were called
  speech on 4.0% of them after it, against 2.7% after stage 2 and 1.9%
  after stage 3 with the crops.
  """
  c.data.update(p_mixture=0.5, k_max=1)


def train_speech_activity(c: ml_collections.ConfigDict) -> None:
  """Speech activity for diarization as stage 2 trains it; later stages keep
  it, or their lighter settings undo it (after stage 3 with the base's weight
  0.1 and 10% noise-only clips, babble 1 in 3, held-out babble alone was
  taken for speech on 59% of its frames, against 23% after stage 2).

  Weight 1 (the speaker term's), with 20% noise-only clips: a quiet babble-,
  noise- or hum-only stretch is not speech. Measured on 50 held-out 10 s
  mixtures at 10 dB SNR, with the labels' -10 dB rule
  (augment.min_local_snr_db): blind DER 56.8% against 58.4% at weight 0.1
  and 10% with the 0 dB rule, the clean DER unchanged. Babble is the noise
  the detector confuses with speech (coloured noise and hum alone are
  rejected), so 3/5 of the noise-only clips are babble. Alone this moved
  little (babble-only false alarm 65% -> 60%); babble summed from the whole
  train split rather than a pool of 64 utterances is what helped (-> 23%),
  measured together with this weight.
  """
  c.objective.activity = dict(weight=1.0)
  c.data.augment.update(p_noise_only=0.2, noise_only_babble=3.0)
