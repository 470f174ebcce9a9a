"""Light heads over the shared encoder's RWSE features.

Stage 2 (speaker identity): `SpeakerHead` = ECAPA-style attentive statistics
pooling over time -> linear projection to the speaker embedding. There is no
separate speaker network: the trainer feeds it the RWSE features of the shared
encoder and trains it with ArcFace (`echo_jax/objectives/arcface.py`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Masked attention logits; finite so that an all-masked row gives zeros, not NaN.
_MASKED_LOGIT = -1e9


def _check_inputs(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Validates shapes; returns a [batch, time] bool mask (all True if None)."""
  if x.ndim != 3:
    raise ValueError(
        f"Expected features [batch, time, width]; found shape {x.shape}. "
        "Pool per-frame features, e.g. the RWSE output.")
  if mask is None:
    return jnp.ones(x.shape[:2], jnp.bool_)
  if mask.shape != x.shape[:2]:
    raise ValueError(
        f"Expected mask [batch, time] = {x.shape[:2]}; found {mask.shape}.")
  return mask.astype(jnp.bool_)


def weighted_mean_std(x: jax.Array, weights: jax.Array,
                      var_floor: float) -> tuple[jax.Array, jax.Array]:
  """Mean and std of x over time under normalised weights.

  Args:
    x: [batch, time, width].
    weights: [batch, time, width] or [batch, time, 1], summing to 1 (or 0 for
      an all-masked row) over time.
    var_floor: variance floor; std = sqrt(max(var, floor)) keeps the gradient
      finite when a channel is constant over time (var = 0).

  Returns:
    mean, std: [batch, width] each.
  """
  mean = jnp.sum(weights * x, axis=1)
  # Centred form: E[(x - mu)^2] does not cancel catastrophically like
  # E[x^2] - mu^2 does for large means.
  var = jnp.sum(weights * jnp.square(x - mean[:, None, :]), axis=1)
  return mean, jnp.sqrt(jnp.maximum(var, var_floor))


def with_clip_context(x: jax.Array, weights: jax.Array,
                      var_floor: float) -> jax.Array:
  """[x_t; mean; std] per frame: each frame beside the clip's statistics
  under `weights` (as in `weighted_mean_std`) -> [batch, time, 3 * width]."""
  mean, std = weighted_mean_std(x, weights, var_floor)
  context = jnp.concatenate([mean, std], axis=-1)[:, None, :]
  return jnp.concatenate(
      [x, jnp.broadcast_to(context, x.shape[:2] + context.shape[-1:])],
      axis=-1)


class AttentiveStatsPooling(nn.Module):
  """ECAPA-TDNN attentive statistics pooling (channel-wise, global context).

  Per channel c, attention over time t:
    e_tc = v_c . tanh(W [h_t; mean(h); std(h)] + b) + k_c,
    alpha_tc = softmax_t(e_tc) over unmasked frames,
  output = [sum_t alpha_tc h_tc ; sqrt(sum_t alpha_tc (h_tc - mu_c)^2)].
  Masked frames are left out of the context statistics and the softmax, so
  they cannot change the output. Statistics run in float32.
  """
  attention_dim: int = 128
  global_context: bool = True
  var_floor: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[batch, time, width], optional [batch, time] bool (True = keep) ->
    [batch, 2 * width] (attentive mean, then attentive std)."""
    mask = _check_inputs(x, mask)
    x = x.astype(jnp.float32)
    # Zero masked frames so that padding holding inf/NaN cannot leak in
    # through 0 * inf in the weighted sums.
    x = jnp.where(mask[..., None], x, 0.0)
    frame_weights = mask.astype(jnp.float32)[..., None]
    num_frames = jnp.maximum(jnp.sum(frame_weights, axis=1, keepdims=True), 1.0)

    attention_in = x
    if self.global_context:
      attention_in = with_clip_context(x, frame_weights / num_frames,
                                       self.var_floor)
    hidden = jnp.tanh(nn.Dense(self.attention_dim, name="attention_hidden")(
        attention_in))
    logits = nn.Dense(x.shape[-1], name="attention_logits")(hidden)
    logits = jnp.where(mask[..., None], logits, _MASKED_LOGIT)
    # Hand-rolled masked softmax: an all-masked row gives weights 0, not NaN.
    logits = logits - jax.lax.stop_gradient(
        jnp.max(logits, axis=1, keepdims=True))
    unnormalised = jnp.exp(logits) * frame_weights
    alpha = unnormalised / jnp.maximum(
        jnp.sum(unnormalised, axis=1, keepdims=True), 1e-30)
    mean, std = weighted_mean_std(x, alpha, self.var_floor)
    return jnp.concatenate([mean, std], axis=-1)


class SpeakerHead(nn.Module):
  """Attentive statistics pooling -> Dense -> (optional LayerNorm).

  No BatchNorm: the head must behave the same in training and evaluation and
  with per-host batches. ArcFace L2-normalises the output anyway, so the
  LayerNorm is off by default.
  """
  embed_dim: int = 256
  attention_dim: int = 128
  layer_norm: bool = False

  @nn.compact
  def __call__(self, features: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """[batch, time, width] RWSE features, optional [batch, time] bool mask ->
    [batch, embed_dim] speaker embeddings (not normalised)."""
    pooled = AttentiveStatsPooling(attention_dim=self.attention_dim,
                                   name="pooling")(features, mask)
    embedding = nn.Dense(self.embed_dim, name="projection")(pooled)
    if self.layer_norm:
      embedding = nn.LayerNorm(name="norm")(embedding)
    return embedding


class ActivityHead(nn.Module):
  """Per-token speech logit that sees its neighbours and the whole clip.

  [h_t; mean(h); std(h)] -> LayerNorm -> Dense -> GELU, then a residual
  temporal convolution (`kernel` tokens) -> Dense(1). A frame-wise linear
  head cannot tell a steady tone or talkers 10-20 dB under the foreground
  from the foreground voice; the clip statistics give it the level and
  timbre to compare against and the convolution the syllabic modulation of
  speech. On frozen stage-2 features this head halved the held-out error of
  the linear one (measured before it was adopted). Statistics are over the
  clip it is given: the training clip, and at inference a chunk of that
  length, padding included, as in training.
  """
  hidden: int = 128
  kernel: int = 9
  var_floor: float = 1e-5

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """[batch, time, width] -> [batch, time, 1] speech logits (float32)."""
    x = features.astype(jnp.float32)
    uniform = jnp.full(x.shape[:2] + (1,), 1.0 / x.shape[1], jnp.float32)
    x = with_clip_context(x, uniform, self.var_floor)
    h = nn.gelu(nn.Dense(self.hidden, name="hidden")(
        nn.LayerNorm(name="norm")(x)))
    h = h + nn.gelu(nn.Conv(self.hidden, (self.kernel,), padding="SAME",
                            name="temporal")(h))
    return nn.Dense(1, name="logit")(h)
