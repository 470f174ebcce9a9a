"""The Echo model as one object: modules built from config, their params as
plain pytrees in three trees (encoder, predictor, heads) plus the EMA target.

Heads are built only when the stage's config lists them, so stage 1 carries
no speaker classifier and a stage-2 checkpoint still restores into stage 3.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.framing import HOP, SAMPLE_RATE
from echo_jax import audio
from echo_jax.models import heads as heads_lib
from echo_jax.models.rwse import RWSE
from echo_jax.models.vit import Encoder, Predictor
from echo_jax.objectives import arcface

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KNOWN_HEADS = ("rwse", "speaker", "arcface", "activity")


@dataclasses.dataclass(frozen=True)
class EchoModel:
  """Flax modules of one stage, and the feature function they share."""
  encoder: Encoder
  predictor: Predictor
  rwse: RWSE
  speaker: heads_lib.SpeakerHead
  arcface: arcface.ArcFaceClassifier | None
  activity: nn.Dense
  heads: tuple[str, ...]
  n_mels: int
  mel_mean: float
  mel_std: float

  @property
  def patch_frames(self) -> int:
    return self.encoder.patch_frames

  def log_mel(self, waveform: jax.Array) -> jax.Array:
    """[B, N] 16 kHz -> normalised log-mel [B, N // 160, n_mels]."""
    mel = audio.log_mel(waveform.astype(jnp.float32), n_mels=self.n_mels)
    return audio.normalize_log_mel(mel, self.mel_mean, self.mel_std)

  def num_tokens(self, num_samples: int) -> int:
    return (num_samples // HOP) // self.patch_frames

  def init(self, rng: jax.Array, num_samples: int) -> dict:
    """Fresh params {'encoder', 'predictor', 'heads'} for clips of N samples."""
    keys = dict(zip(("encoder", "predictor") + KNOWN_HEADS,
                    jax.random.split(rng, 2 + len(KNOWN_HEADS))))
    mel = jnp.zeros((1, num_samples // HOP, self.n_mels))
    tokens = self.num_tokens(num_samples)
    enc = self.encoder.init(keys["encoder"], mel)["params"]
    width = self.encoder.width
    ctx_idx = jnp.arange(tokens // 2, dtype=jnp.int32)[None]
    tgt_idx = jnp.arange(tokens // 2, tokens, dtype=jnp.int32)[None]
    pred = self.predictor.init(
        keys["predictor"], jnp.zeros((1, tokens // 2, width)), ctx_idx,
        tgt_idx, tokens)["params"]
    hidden = jnp.zeros((self.encoder.depth, 1, tokens, width))
    feats = jnp.zeros((1, tokens, width))
    heads = {}
    if "rwse" in self.heads:
      heads["rwse"] = self.rwse.init(keys["rwse"], hidden)["params"]
    if "speaker" in self.heads:
      heads["speaker"] = self.speaker.init(keys["speaker"], feats)["params"]
    if "arcface" in self.heads:
      emb = jnp.zeros((1, self.speaker.embed_dim))
      heads["arcface"] = self.arcface.init(
          keys["arcface"], emb, jnp.zeros((1,), jnp.int32))["params"]
    if "activity" in self.heads:
      heads["activity"] = self.activity.init(keys["activity"], feats)["params"]
    return {"encoder": enc, "predictor": pred, "heads": heads}

  def features(self, params: dict, encoder_params: dict, mel: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Full (unmasked) encoder pass.

    Returns (RWSE features [B, T, W] for heads, all layers [L, B, T, W]).
    """
    out = self.encoder.apply({"params": encoder_params}, mel)
    feats = self.rwse.apply({"params": params["heads"]["rwse"]}, out["hidden"])
    return feats, out["hidden"]

  def speaker_embedding(self, params: dict, feats: jax.Array) -> jax.Array:
    """[B, T, W] -> [B, embed_dim] (not normalised)."""
    return self.speaker.apply({"params": params["heads"]["speaker"]}, feats)

  def activity_logits(self, params: dict, feats: jax.Array) -> jax.Array:
    """[B, T, W] -> per-token speech logits [B, T]."""
    return self.activity.apply({"params": params["heads"]["activity"]},
                               feats)[..., 0]


def build_model(config, num_classes: int = 0) -> EchoModel:
  """Modules from `config.model`; `num_classes` = train speakers (ArcFace)."""
  m = config.model
  unknown = set(m.heads) - set(KNOWN_HEADS)
  if unknown:
    raise ValueError(f"config.model.heads has unknown heads {sorted(unknown)};"
                     f" known: {KNOWN_HEADS}.")
  dtype = DTYPES[m.compute_dtype]
  encoder = Encoder(width=m.encoder.width, depth=m.encoder.depth,
                    num_heads=m.encoder.num_heads, mlp_dim=m.encoder.mlp_dim,
                    patch_frames=m.encoder.patch_frames, n_mels=m.n_mels,
                    dtype=dtype)
  predictor = Predictor(width=m.predictor.width, depth=m.predictor.depth,
                        num_heads=m.predictor.num_heads,
                        mlp_dim=m.predictor.mlp_dim, out_dim=m.encoder.width,
                        dtype=dtype)
  classifier = None
  if "arcface" in m.heads:
    if num_classes < 2:
      raise ValueError(f"ArcFace needs >= 2 train speakers, got {num_classes}.")
    classifier = arcface.ArcFaceClassifier(num_classes=num_classes,
                                           embed_dim=m.speaker_embed_dim)
  return EchoModel(
      encoder=encoder, predictor=predictor,
      rwse=RWSE(num_heads=m.rwse_heads),
      speaker=heads_lib.SpeakerHead(embed_dim=m.speaker_embed_dim),
      arcface=classifier, activity=nn.Dense(1, name="activity"),
      heads=tuple(m.heads), n_mels=m.n_mels, mel_mean=m.mel_mean,
      mel_std=m.mel_std)


def clip_samples(config) -> int:
  """Training clip length in samples (the model's native input length)."""
  return int(round(config.data.clip_seconds * SAMPLE_RATE))


def token_activity(activity: jax.Array, patch_frames: int) -> jax.Array:
  """Frame activity [B, K, F] -> any-speaker token activity [B, F // p]."""
  speech = jnp.max(activity, axis=1)
  b, f = speech.shape
  t = f // patch_frames
  return jnp.max(speech[:, :t * patch_frames].reshape(b, t, patch_frames), -1)


def param_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
