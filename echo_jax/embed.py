"""Embedding audio with a trained Echo model: pooled per-layer features and
speaker embeddings, in fixed-size batches so one jit serves any corpus."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from data_pipelines.framing import HOP
from echo_jax.model import EchoModel


def load_clips(manifest_path: str, utterances: Sequence[manifest_lib.Utterance],
               num_samples: int) -> tuple[np.ndarray, np.ndarray]:
  """First `num_samples` of each utterance, zero-padded.

  Returns (waves [U, num_samples] float32, valid samples [U] int32).
  """
  store = storage.AudioStore(manifest_path)
  waves = np.zeros((len(utterances), num_samples), np.float32)
  lengths = np.zeros(len(utterances), np.int32)
  for i, utt in enumerate(utterances):
    n = min(num_samples, utt.num_samples)
    waves[i, :n] = store.read(utt, 0, n)
    lengths[i] = n
  return waves, lengths


def token_mask(model: EchoModel, lengths: jax.Array, num_samples: int
               ) -> jax.Array:
  """[B] valid samples -> [B, T] True for tokens fully inside the audio."""
  tokens = model.num_tokens(num_samples)
  valid = lengths // (HOP * model.patch_frames)
  return jnp.arange(tokens)[None, :] < jnp.maximum(valid, 1)[:, None]


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x [..., B, T, W], mask [B, T] -> [..., B, W]."""
  w = mask.astype(x.dtype)[..., None]
  return (x * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)


def pooled_layers(model: EchoModel, encoder_params: dict, waves: jax.Array,
                  lengths: jax.Array) -> jax.Array:
  """Mean-pooled output of every encoder block: [L, B, W]."""
  hidden = model.encoder.apply({"params": encoder_params},
                               model.log_mel(waves))["hidden"]
  return _masked_mean(hidden, token_mask(model, lengths, waves.shape[-1]))


def speaker_embeddings(model: EchoModel, params: dict, waves: jax.Array
                       ) -> jax.Array:
  """Stage-2 speaker projection [B, D] (pooling over the whole clip)."""
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  return model.speaker_embedding(params, feats)


def batched(fn: Callable, *arrays: np.ndarray, batch_size: int,
            axis: int = 0) -> np.ndarray:
  """Runs jitted `fn(*rows)` over fixed-size batches of the arrays' leading
  dim (the last batch zero-padded, so one compilation serves any count); the
  outputs are concatenated along `axis`."""
  outputs = []
  for start in range(0, len(arrays[0]), batch_size):
    rows = [a[start:start + batch_size] for a in arrays]
    real = len(rows[0])
    rows = [np.pad(r, [(0, batch_size - real)] + [(0, 0)] * (r.ndim - 1))
            for r in rows]
    out = np.asarray(fn(*rows))
    outputs.append(np.take(out, np.arange(real), axis=axis))
  return np.concatenate(outputs, axis=axis)


def jit_with_model(fn: Callable, model: EchoModel) -> Callable:
  """`fn(model, params, waves, lengths)` as a jitted `(params, waves, lengths)`.

  Params stay an argument, not baked-in constants, so one compilation serves
  every evaluation step.
  """
  return jax.jit(functools.partial(fn, model))
