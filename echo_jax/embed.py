"""Embedding audio with a trained Echo model: pooled per-layer features and
speaker embeddings, in fixed-size batches so one jit serves any corpus."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from data_pipelines.framing import HOP
from echo_jax.model import EchoModel


class Clips(NamedTuple):
  """What `load_clips` read: row i of `waves`/`lengths` is `utterances[i]`."""
  waves: np.ndarray    # [U', num_samples] float32, zero-padded.
  lengths: np.ndarray  # [U'] int32 valid samples.
  utterances: tuple[manifest_lib.Utterance, ...]  # The U' read, in order.


def load_clips(manifest_path: str, utterances: Sequence[manifest_lib.Utterance],
               num_samples: int, *, skips: collections.Counter | None = None,
               context: str = "load_clips") -> Clips:
  """First `num_samples` of each readable utterance, zero-padded.

  An utterance whose shard is missing, truncated or corrupt is left out
  (`storage.read_or_skip`: one warning line naming it, its shard file and the
  reason) and counted by reason in `skips`; the others are returned with the
  utterances they hold, so callers keep their labels aligned.
  """
  store = storage.AudioStore(manifest_path)
  waves = np.zeros((len(utterances), num_samples), np.float32)
  lengths = np.zeros(len(utterances), np.int32)
  kept = []
  for utt in utterances:
    n = min(num_samples, utt.num_samples)
    audio, _ = storage.read_or_skip(store, utt, 0, n, skips=skips,
                                    context=context)
    if audio is None:
      continue
    waves[len(kept), :n] = audio
    lengths[len(kept)] = n
    kept.append(utt)
  return Clips(waves[:len(kept)], lengths[:len(kept)], tuple(kept))


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


def speaker_embeddings(model: EchoModel, params: dict, waves: jax.Array,
                       lengths: jax.Array | None = None) -> jax.Array:
  """Speaker projection [B, D]; tokens past `lengths` (zero padding of a short
  utterance) are masked out of the pooling. None: every token is audio."""
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  mask = None if lengths is None else token_mask(model, lengths,
                                                 waves.shape[-1])
  return model.apply_head("speaker", params, feats, mask)


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
