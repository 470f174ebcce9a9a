"""Residual weighted-sum encoding (RWSE, UME): how heads read the encoder.

`H_enc = sum_l softmax(w)_l * H_l + H_L`, with a separate softmax over layers
for each of `num_heads` channel groups. Zero-initialised logits make the
weights uniform, so at init `H_enc = mean_l H_l + H_L`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RWSE(nn.Module):
  """Per-group softmax layer weights; weighted sum added to the last layer."""
  num_heads: int = 1

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    """`[layers, batch, time, width] -> [batch, time, width]` float32."""
    num_layers, width = hidden.shape[0], hidden.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"RWSE: width {width} must be divisible by num_heads "
                       f"{self.num_heads}.")
    logits = self.param("layer_logits", nn.initializers.zeros,
                        (self.num_heads, num_layers), jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)  # [groups, layers]
    # Each group's weight repeated over its channels: [layers, width].
    per_channel = jnp.repeat(weights.T, width // self.num_heads, axis=1)
    hidden = hidden.astype(jnp.float32)
    # Elementwise product + sum (not einsum) keeps full float32 on TPU.
    mixed = jnp.sum(hidden * per_channel[:, None, None, :], axis=0)
    return mixed + hidden[-1]


def rwse_weights(params: dict) -> jax.Array:
  """Softmax layer weights `[groups, layers]` from RWSE params (probes)."""
  return jax.nn.softmax(params["layer_logits"], axis=-1)
