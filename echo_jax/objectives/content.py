"""Loss functions of the stage-3 content terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Mean of `values` over positions, weighted (None = all 1); no positions
  weighted leaves 0, not NaN."""
  if weights is None:
    return jnp.mean(values)
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_cross_entropy(target: jax.Array, logits: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
  """Mean over positions of -sum_k p_k log softmax(logits)_k.

  Equals KL(p || q) + H(p), so for a fixed target it is minimal, at H(p),
  exactly when q = softmax(logits) = p.

  Args:
    target: [..., K] distributions p (rows sum to 1).
    logits: [..., K].
    weights: [...] position weights (e.g. 1 at masked tokens); None = all 1.
  """
  ce = -jnp.sum(target * jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                axis=-1)
  return _weighted_mean(ce, weights)


def entropy(p: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean entropy (nats) of distributions [..., K] (weighted like above)."""
  h = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
  return _weighted_mean(h, weights)


def cross_correlation_penalty(a: jax.Array, b: jax.Array,
                              eps: float = 1e-5) -> jax.Array:
  """Mean squared cross-correlation over the batch between every dim of
  a [B, Da] and every dim of b [B, Db]: 0 when they are linearly unrelated.

  Correlations, not covariances, so neither side can lower it by shrinking.
  """
  def standardise(x):
    x = x.astype(jnp.float32)
    x = x - x.mean(0)
    return x / jnp.sqrt(jnp.mean(x * x, 0) + eps)
  corr = standardise(a).T @ standardise(b) / a.shape[0]
  return jnp.mean(corr * corr)


def invariance_loss(view: jax.Array, anchor: jax.Array,
                    weights: jax.Array | None = None) -> jax.Array:
  """Mean over positions of 1 - cos(view, anchor), the anchor behind a
  stop-gradient: 0 when the two agree in direction, 1 when orthogonal.

  Args:
    view: [..., D] (e.g. the content projection of a speaker-perturbed copy).
    anchor: [..., D] the same positions of the unperturbed copy.
    weights: [...] position weights; None = all 1.
  """
  def unit(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)
  cos = jnp.sum(unit(view) * unit(jax.lax.stop_gradient(anchor)), -1)
  return _weighted_mean(1.0 - cos, weights)
