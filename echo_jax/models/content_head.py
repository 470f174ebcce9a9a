"""Stage 3 (phonetic content): a frame-level content projection of the RWSE
features and a classifier over the anchor GMM's components on top of it.

The projection is what the content evaluators read (pooled for the
factorisation gap, per frame for the phoneme probes and the CTC phone head);
the classifier exists to be trained against the GMM posteriors. With
`adversary_classes` the head also holds a speaker classifier over the pooled
projection, the adversary of the content term's speaker-confusion loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ContentHead(nn.Module):
  """[batch, time, width] -> (projection [batch, time, dim],
  component logits [batch, time, num_components]);
  `speaker_logits`: pooled projection [batch, dim] -> [batch, classes]."""
  dim: int = 128
  num_components: int = 128
  adversary_classes: int = 0   # Train speakers; 0: no adversary.

  def setup(self):
    self.norm = nn.LayerNorm()
    self.projection = nn.Dense(self.dim)
    self.classifier = nn.Dense(self.num_components)
    if self.adversary_classes:
      self.adversary = nn.Dense(self.adversary_classes)

  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    projection = self.projection(self.norm(features.astype(jnp.float32)))
    logits = self.classifier(nn.gelu(projection))
    if self.adversary_classes and self.is_initializing():
      self.speaker_logits(projection.mean(1))   # Creates its params.
    return projection, logits

  def speaker_logits(self, pooled: jax.Array) -> jax.Array:
    return self.adversary(pooled)
