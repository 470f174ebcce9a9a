r"""Stage 3: phonetic content in the shared latent space (soft GMM targets at
masked frames, speaker-perturbation invariance, a cross-correlation penalty
against the speaker projection), with every earlier term kept on.

Starts from stage 2's checkpoint beside this run's workdir (encoder,
predictor, EMA target and the rwse / speaker / arcface / activity heads):
  python -m echo_jax.main --config=experiments/stage3_content.py:cpu \
      --workdir=runs/cpu/stage3        # reads runs/cpu/stage2
The anchor GMM is fitted on the first step if its file is missing (beside the
manifest, keyed by its settings; or `tools/fit_anchor_gmm.py` beforehand).
Ablations: `--config.objective.content.perturb.prob=0`,
`--config.objective.content.cross_cov_weight=0`,
`--config.model.content_speaker_conditioned=False`,
`--config.objective.content.invariance_weight=1`. The speaker adversary:
`--config.objective.content.adversary_weight=1`
`--config.model.content_adversary=True`.
"""

import ml_collections

from experiments import common

STAGE2_HEADS = ("rwse", "speaker", "arcface", "activity")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base(arg)
  v = c.variant
  c.stage = "stage3_content"
  c.init_from.workdir = "{parent}/stage2"
  c.init_from.trees = (("params/encoder", "params/predictor", "target")
                       + tuple(f"params/heads/{h}" for h in STAGE2_HEADS))
  common.single_speaker_clips(c)           # As stage 2, crops included.
  c.model.heads = STAGE2_HEADS + ("content",)
  c.model.content_dim = common.by_variant(v, canonical=256, cpu=128, smoke=16)
  # S-JEPA uses 100 components; "a few hundred" at pod scale.
  c.model.content_components = common.by_variant(v, canonical=256, cpu=128,
                                                 smoke=16)
  c.model.content_adversary = False        # Speaker classifier (see below).
  # The component classifier also reads the speaker projection (ContentVec):
  # gap on train speakers +10.1 points against +6.9 without (cpu, 600 steps).
  c.model.content_speaker_conditioned = True
  c.objective.jepa.weight = 0.5            # Earlier skills stay on:
  c.objective.crop.weight = 0.5            # stage 1's terms,
  c.objective.speaker = dict(              # stage 2's ArcFace (its head is
      weight=1.0, scale=30.0, margin=0.2,  # restored: margin at once)
      margin_ramp_steps=1)
  common.train_speech_activity(c)          # As stage 2: kept, not undone.
  c.objective.content = dict(
      weight=1.0,
      # HuBERT-like masking of the input: half the tokens, 200 ms spans.
      mask_fraction=0.5,
      span_tokens=common.by_variant(v, canonical=(10,), cpu=(5,), smoke=(3,)),
      # Speaker-perturbed input (ContentVec); prob 0 turns it off.
      perturb=dict(prob=0.8, max_semitones=4.0, equalizer_db=6.0),
      cross_cov_weight=5.0,                # 0 turns the penalty off.
      # Perturbed-view projection agrees with the clean one (cosine).
      invariance_weight=0.0,
      # Speaker classifier on the pooled content projection and a confusion
      # loss against it (needs model.content_adversary); 0 turns it off.
      adversary_weight=0.0,
      anchor=dict(
          path="",                         # "" = beside the manifest.
          manifest=c.data.get_ref("manifest"),
          corpus_size=c.data.get_ref("corpus_size"),
          kind="mfcc", n_mels=c.model.get_ref("n_mels"), n_mfcc=13,
          # Per-clip CMVN over speech frames: on train speakers the pooled
          # posteriors name speakers less (77% vs 82% top-1) and phones
          # better (linear 36.6% vs 32.6%) than without.
          normalize="utterance",
          num_components=c.model.get_ref("content_components"),
          var_floor=1e-3,
          max_frames=common.by_variant(v, canonical=200_000, cpu=60_000,
                                       smoke=4_000),
          max_utterances=common.by_variant(v, canonical=5_000, cpu=600,
                                           smoke=40),
          max_iter=common.by_variant(v, canonical=100, cpu=50, smoke=10),
          seed=0))
  c.total_steps = common.by_variant(v, canonical=50_000, cpu=600, smoke=6)
  c.optim.update(lr=5e-4,
                 warmup_steps=common.by_variant(v, canonical=2_000, cpu=60,
                                                smoke=2),
                 lr_mult=(("^encoder/", 0.5),))
  c.ema.start = 0.999
  c.evals.content = dict(
      type="content", every=common.by_variant(v, canonical=5000, cpu=300,
                                              smoke=6),
      seconds=c.evals.speaker.get_ref("seconds"),
      batch_size=c.evals.speaker.get_ref("batch_size"),
      max_utterances_per_speaker=common.by_variant(v, canonical=40, cpu=30,
                                                   smoke=4),
      train_utterances=common.by_variant(v, canonical=2000, cpu=300,
                                         smoke=16),
      probe_frames=common.by_variant(v, canonical=50_000, cpu=15_000,
                                     smoke=2_000),
      ctc_steps=common.by_variant(v, canonical=2000, cpu=400, smoke=5),
      ctc_lr=5e-3, random_floor=True,
      # The anchor's own pooled posteriors as a content projection: how
      # often the targets themselves name held-out speakers.
      anchor=c.objective.content.anchor)
  c.lock()
  return c
