"""`activity`: per-token speech / non-speech (blind diarization's detector).

A token is speech when any speaker is active in any of its frames.
"""

import jax
import jax.numpy as jnp
import optax

from echo_jax.terms.base import StepInputs, Term


def token_activity(activity: jax.Array, patch_frames: int) -> jax.Array:
  """Frame activity [B, K, F] -> any-speaker token activity [B, F // p]."""
  speech = jnp.max(activity, axis=1)
  b, f = speech.shape
  t = f // patch_frames
  return jnp.max(speech[:, :t * patch_frames].reshape(b, t, patch_frames), -1)


def loss(cfg, inputs: StepInputs, rng):
  del cfg, rng
  labels = token_activity(inputs.batch["activity"], inputs.model.patch_frames)
  logits = inputs.model.apply_head("activity", inputs.params,
                                   inputs.features)[..., 0]
  value = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
  return value, {"activity/loss": value,
                 "activity/accuracy": jnp.mean((logits > 0) == (labels > 0.5))}


TERM = Term(loss=loss, heads=("rwse", "activity"),
            batch_keys=("mixture", "activity"))
