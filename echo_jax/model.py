"""The Echo model as one object: modules built from config, their params as
plain pytrees in three trees (encoder, predictor, heads) plus the EMA target.

Heads are a dict built from `config.model.heads` (see `echo_jax/heads.py`), so
stage 1 carries no speaker classifier and a stage-2 checkpoint still restores
into a later stage that lists more heads.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.framing import HOP, SAMPLE_RATE
from echo_jax import audio
from echo_jax import heads as heads_registry
from echo_jax import xla_options as xla_options_lib
from echo_jax.models.auto_dtype import resolve_compute_dtype, xla_options_name
from echo_jax.models.precision import DTYPES
from echo_jax.models.vit import (Encoder, Predictor, resolve_attention,
                                 resolve_residual_dtype)

__all__ = ["DTYPES", "EchoModel", "build_model", "clip_samples",
           "param_count"]


@dataclasses.dataclass(frozen=True)
class EchoModel:
  """Flax modules of one stage, and the feature function they share."""
  encoder: Encoder
  predictor: Predictor
  heads: Mapping[str, nn.Module]
  speaker_dim: int
  n_mels: int
  mel_mean: float
  mel_std: float
  # The `xla_options.candidates` entry the train step is compiled with.
  xla_options: str = xla_options_lib.DEFAULT

  @property
  def jit_kwargs(self) -> dict:
    return xla_options_lib.jit_kwargs(self.xla_options)

  @property
  def patch_frames(self) -> int:
    return self.encoder.patch_frames

  def log_mel(self, waveform: jax.Array) -> jax.Array:
    """[B, N] 16 kHz -> normalised log-mel [B, N // HOP, n_mels]."""
    mel = audio.log_mel(waveform.astype(jnp.float32), n_mels=self.n_mels)
    return audio.normalize_log_mel(mel, self.mel_mean, self.mel_std)

  def num_tokens(self, num_samples: int) -> int:
    return (num_samples // HOP) // self.patch_frames

  def feature_shapes(self, num_samples: int) -> heads_registry.FeatureShapes:
    return heads_registry.FeatureShapes(
        layers=self.encoder.depth, tokens=self.num_tokens(num_samples),
        width=self.encoder.width, speaker_dim=self.speaker_dim)

  def init(self, rng: jax.Array, num_samples: int) -> dict:
    """Fresh params {'encoder', 'predictor', 'heads'} for clips of N samples.

    Each head's key is folded from its name, so adding a head to a stage does
    not change the others' initial values.
    """
    enc_rng, pred_rng, heads_rng = jax.random.split(rng, 3)
    mel = jnp.zeros((1, num_samples // HOP, self.n_mels))
    tokens = self.num_tokens(num_samples)
    enc = self.encoder.init(enc_rng, mel)["params"]
    ctx_idx = jnp.arange(tokens // 2, dtype=jnp.int32)[None]
    tgt_idx = jnp.arange(tokens // 2, tokens, dtype=jnp.int32)[None]
    pred = self.predictor.init(
        pred_rng, jnp.zeros((1, tokens // 2, self.encoder.width)), ctx_idx,
        tgt_idx, tokens)["params"]
    shapes = self.feature_shapes(num_samples)
    heads = {}
    for name, module in self.heads.items():
      key = jax.random.fold_in(heads_rng, zlib.crc32(name.encode()))
      inputs = heads_registry.HEADS[name].init_inputs(shapes)
      heads[name] = module.init(key, *inputs)["params"]
    return {"encoder": enc, "predictor": pred, "heads": heads}

  def apply_head(self, name: str, params: dict, *args, **kwargs):
    """Applies head `name` with its params from `params['heads']`."""
    if name not in self.heads:
      raise KeyError(f"This model has no {name!r} head; its heads are "
                     f"{list(self.heads)} (config.model.heads).")
    return self.heads[name].apply({"params": params["heads"][name]}, *args,
                                  **kwargs)

  def features(self, params: dict, encoder_params: dict, mel: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Full (unmasked) encoder pass.

    Returns (RWSE features [B, T, W] for heads, all layers [L, B, T, W]).
    """
    out = self.encoder.apply({"params": encoder_params}, mel)
    return self.apply_head("rwse", params, out["hidden"]), out["hidden"]


def build_model(config, num_classes: int = 0) -> EchoModel:
  """Modules from `config.model`; `num_classes` = train speakers (ArcFace).

  `compute_dtype="auto"` and the train step's XLA options are resolved
  here, by measurement on the backend in use (`auto_dtype`); `remat` is the
  blocks' policy;
  `attention="auto"` picks the fused cuDNN kernel where it applies
  (`vit.resolve_attention`).
  """
  m = config.model
  block = (m.compute_dtype, m.encoder.width, m.encoder.num_heads,
           m.encoder.mlp_dim)
  dtype = resolve_compute_dtype(*block)
  remat = m.get("remat", "none")
  attention = resolve_attention(m.get("attention", "auto"), dtype)
  residual = resolve_residual_dtype(m.get("residual_dtype", "float32"), dtype)
  encoder = Encoder(width=m.encoder.width, depth=m.encoder.depth,
                    num_heads=m.encoder.num_heads, mlp_dim=m.encoder.mlp_dim,
                    patch_frames=m.encoder.patch_frames, n_mels=m.n_mels,
                    dtype=dtype, remat=remat, attention_impl=attention,
                    residual_dtype=residual)
  predictor = Predictor(width=m.predictor.width, depth=m.predictor.depth,
                        num_heads=m.predictor.num_heads,
                        mlp_dim=m.predictor.mlp_dim, out_dim=m.encoder.width,
                        dtype=dtype, remat=remat, attention_impl=attention,
                        residual_dtype=residual)
  heads = heads_registry.build_heads(
      m, heads_registry.BuildInfo(num_classes=num_classes))
  return EchoModel(encoder=encoder, predictor=predictor, heads=heads,
                   speaker_dim=m.speaker_embed_dim, n_mels=m.n_mels,
                   mel_mean=m.mel_mean, mel_std=m.mel_std,
                   xla_options=xla_options_name(*block))


def clip_samples(config) -> int:
  """Training clip length in samples (the model's native input length)."""
  return int(round(config.data.clip_seconds * SAMPLE_RATE))


def param_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
