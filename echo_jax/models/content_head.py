"""Stage 3 (phonetic content): a frame-level content projection of the RWSE
features and a classifier over the anchor GMM's components on top of it.

The projection is what the content evaluators read (pooled for the
factorisation gap, per frame for the phoneme probes and the CTC phone head);
the classifier exists to be trained against the GMM posteriors. With
`adversary_classes` the head also holds a speaker classifier over the pooled
projection, the adversary of the content term's speaker-confusion loss.

With `speaker_conditioned` the classifier also reads the clip's speaker
embedding (ContentVec's speaker-conditioned prediction): the targets are
acoustic clusters and depend on the voice, and a classifier told the voice
lets the projection leave it out. Only the logits read it; the projection,
which is what the content evaluators use, never does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ContentHead(nn.Module):
  """[batch, time, width] (, speaker [batch, speaker_dim]) ->
  (projection [batch, time, dim], component logits [batch, time, K]);
  `speaker_logits`: pooled projection [batch, dim] -> [batch, classes]."""
  dim: int = 128
  num_components: int = 128
  adversary_classes: int = 0   # Train speakers; 0: no adversary.
  speaker_conditioned: bool = False

  def setup(self):
    self.norm = nn.LayerNorm()
    self.projection = nn.Dense(self.dim)
    self.classifier = nn.Dense(self.num_components)
    if self.adversary_classes:
      self.adversary = nn.Dense(self.adversary_classes)
    if self.speaker_conditioned:
      self.speaker_input = nn.Dense(self.dim)

  def __call__(self, features: jax.Array, speaker: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    projection = self.project(features)
    hidden = nn.gelu(projection)
    if self.speaker_conditioned:
      if speaker is None:
        raise ValueError("A speaker-conditioned content head needs the "
                         "speaker embedding for its logits.")
      hidden = hidden + self.speaker_input(
          speaker.astype(jnp.float32))[:, None, :]
    logits = self.classifier(hidden)
    if self.adversary_classes and self.is_initializing():
      self.speaker_logits(projection.mean(1))   # Creates its params.
    return projection, logits

  def project(self, features: jax.Array) -> jax.Array:
    """The projection alone (what needs no speaker embedding)."""
    return self.projection(self.norm(features.astype(jnp.float32)))

  def speaker_logits(self, pooled: jax.Array) -> jax.Array:
    return self.adversary(pooled)
