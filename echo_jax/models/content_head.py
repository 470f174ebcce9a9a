"""Stage 3 (phonetic content): a frame-level content projection of the RWSE
features and a classifier over the anchor GMM's components on top of it.

The projection is what the content evaluators read (pooled for the
factorisation gap, per frame for the phoneme probes and the CTC phone head);
the classifier exists to be trained against the GMM posteriors.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ContentHead(nn.Module):
  """[batch, time, width] -> (projection [batch, time, dim],
  component logits [batch, time, num_components])."""
  dim: int = 128
  num_components: int = 128

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = features.astype(jnp.float32)
    projection = nn.Dense(self.dim, name="projection")(
        nn.LayerNorm(name="norm")(features))
    logits = nn.Dense(self.num_components, name="classifier")(
        nn.gelu(projection))
    return projection, logits
