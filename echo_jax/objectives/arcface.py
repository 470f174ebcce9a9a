"""ArcFace (additive angular margin) speaker classification, stage 2.

Logit of class c for embedding x: `scale * cos(theta_c + m * [c == label])`,
where `theta_c` is the angle between the L2-normalised x and class weight w_c.
The margin only touches the target class, so it pushes each embedding closer
(in angle) to its own class centre than plain softmax would need.

Numerics (the reason this file exists rather than a one-liner):
- The cosine is clamped to `[-1 + eps, 1 - eps]` BEFORE `arccos`, because
  d/dx arccos(x) = -1/sqrt(1 - x^2) is infinite at |x| = 1 (an embedding equal
  to its class weight, or to its negation, would give NaN gradients).
- `theta + m` is capped at pi, so the target logit stays a monotone function of
  the angle (cos(theta + m) would rise again past pi and reward moving away
  from the class centre). This plays the role of InsightFace's `th`/`mm` branch.
- Examples with a negative label (the pipeline's "-1 = absent speaker") carry
  no margin and no loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

DEFAULT_SCALE = 30.0    # WeSpeaker / SpeechBrain.
DEFAULT_MARGIN = 0.2    # Final value of the margin ramp.
DEFAULT_EPS = 1e-7      # Cos clamp: +-(1 - eps).


def l2_normalise(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / ||x||` along `axis`; a zero vector stays zero (finite gradient)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def cosine_similarity(embeddings: jax.Array,
                      class_weights: jax.Array) -> jax.Array:
  """Cosine between every embedding and class weight.

  Args:
    embeddings: [batch, dim].
    class_weights: [classes, dim].

  Returns:
    [batch, classes] cosines (not clamped).
  """
  if embeddings.ndim != 2 or class_weights.ndim != 2:
    raise ValueError(
        "Expected embeddings [batch, dim] and class_weights [classes, dim]; "
        f"found shapes {embeddings.shape} and {class_weights.shape}.")
  if embeddings.shape[-1] != class_weights.shape[-1]:
    raise ValueError(
        f"Embedding dim {embeddings.shape[-1]} != class weight dim "
        f"{class_weights.shape[-1]}; the speaker head's embed_dim must match "
        "the classifier's.")
  return l2_normalise(embeddings) @ l2_normalise(class_weights).T


def arcface_logits(embeddings: jax.Array,
                   class_weights: jax.Array,
                   labels: jax.Array,
                   *,
                   scale: float = DEFAULT_SCALE,
                   margin: float | jax.Array = DEFAULT_MARGIN,
                   eps: float = DEFAULT_EPS) -> jax.Array:
  """ArcFace logits: `scale * cos(theta + margin)` on the target, `scale * cos` elsewhere.

  Args:
    embeddings: [batch, dim] speaker embeddings (any norm).
    class_weights: [classes, dim] class centres (any norm).
    labels: [batch] int class index; negative = no target (no margin).
    scale: logit scale s.
    margin: additive angular margin m in radians (may be a traced scalar, so
      the ramp from `margin_schedule` can be passed inside a jitted step).
    eps: the cosine is clamped to [-1 + eps, 1 - eps] before arccos.

  Returns:
    [batch, classes] float32 logits.
  """
  cos = cosine_similarity(embeddings.astype(jnp.float32),
                          class_weights.astype(jnp.float32))
  cos = jnp.clip(cos, -1.0 + eps, 1.0 - eps)
  theta = jnp.arccos(cos)
  target_cos = jnp.cos(jnp.minimum(theta + margin, jnp.pi))
  # one_hot of a negative label is all zeros: those rows get no margin.
  is_target = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return scale * jnp.where(is_target, target_cos, cos)


def arcface_loss(embeddings: jax.Array,
                 class_weights: jax.Array,
                 labels: jax.Array,
                 *,
                 scale: float = DEFAULT_SCALE,
                 margin: float | jax.Array = DEFAULT_MARGIN,
                 eps: float = DEFAULT_EPS,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean softmax cross-entropy over ArcFace logits.

  Args: as `arcface_logits`. Rows with a negative label are left out of the
    mean (loss is 0 if every row is left out).

  Returns:
    (loss scalar, metrics). `arcface/accuracy` is the argmax of the plain
    cosine (no margin), i.e. what nearest-class-centre identification would
    score; it is over the labelled rows only.
  """
  logits = arcface_logits(embeddings, class_weights, labels,
                          scale=scale, margin=margin, eps=eps)
  valid = labels >= 0
  safe_labels = jnp.where(valid, labels, 0)
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits, safe_labels)
  count = jnp.maximum(jnp.sum(valid), 1)
  loss = jnp.sum(jnp.where(valid, per_example, 0.0)) / count
  # Without margin the target logit is scale * cos; recover it for accuracy.
  cos = cosine_similarity(embeddings.astype(jnp.float32),
                          class_weights.astype(jnp.float32))
  correct = (jnp.argmax(cos, axis=-1) == labels) & valid
  accuracy = jnp.sum(correct) / count
  return loss, {"arcface/loss": loss, "arcface/accuracy": accuracy}


def margin_schedule(step: int | jax.Array,
                    *,
                    ramp_steps: int,
                    max_margin: float = DEFAULT_MARGIN,
                    start_step: int = 0) -> jax.Array:
  """Margin as a function of the step: 0 until `start_step`, then a linear
  ramp reaching `max_margin` at `start_step + ramp_steps` (jittable).

  A large margin from step 0 stalls training on random embeddings, hence the
  ramp. `ramp_steps=0` switches the full margin on at `start_step`.
  """
  if ramp_steps < 0 or start_step < 0:
    raise ValueError(
        f"Expected ramp_steps >= 0 and start_step >= 0; found {ramp_steps} "
        f"and {start_step}. Set them in the stage-2 config.")
  step = jnp.asarray(step)
  if ramp_steps == 0:
    # optax holds init_value when transition_steps <= 0; we want a step up.
    return jnp.where(step >= start_step, max_margin, 0.0).astype(jnp.float32)
  schedule = optax.linear_schedule(
      init_value=0.0, end_value=max_margin,
      transition_steps=ramp_steps, transition_begin=start_step)
  return jnp.asarray(schedule(step), jnp.float32)


class ArcFaceClassifier(nn.Module):
  """Holds the [num_classes, embed_dim] class centres (param `class_weights`).

  `__call__` gives ArcFace logits; `loss` gives `arcface_loss` (call it with
  `method=ArcFaceClassifier.loss` from `apply`).
  """
  num_classes: int
  embed_dim: int
  scale: float = DEFAULT_SCALE
  eps: float = DEFAULT_EPS

  def setup(self):
    self.class_weights = self.param(
        "class_weights", nn.initializers.xavier_uniform(),
        (self.num_classes, self.embed_dim), jnp.float32)

  def __call__(self, embeddings: jax.Array, labels: jax.Array, *,
               margin: float | jax.Array = DEFAULT_MARGIN) -> jax.Array:
    """[batch, embed_dim], [batch] -> [batch, num_classes] logits."""
    return arcface_logits(embeddings, self.class_weights, labels,
                          scale=self.scale, margin=margin, eps=self.eps)

  def loss(self, embeddings: jax.Array, labels: jax.Array, *,
           margin: float | jax.Array = DEFAULT_MARGIN,
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """[batch, embed_dim], [batch] -> (loss, metrics) as `arcface_loss`."""
    return arcface_loss(embeddings, self.class_weights, labels,
                        scale=self.scale, margin=margin, eps=self.eps)
