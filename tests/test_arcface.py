"""ArcFace logits/loss against hand computation; numerics at cos = +-1; ramp."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.objectives import arcface


def _hand_case():
  # Two 2-D embeddings, three classes at 0, 90 and 180 degrees (unit norm
  # after normalisation, raw norms differ on purpose).
  emb = np.array([[2.0, 0.0],                    # theta = 0, 90, 180 deg
                  [math.sqrt(3.0), 1.0]], np.float32)  # 30, 60, 150 deg
  weights = np.array([[3.0, 0.0], [0.0, 0.5], [-1.0, 0.0]], np.float32)
  labels = np.array([1, 0], np.int32)
  return emb, weights, labels


def test_logits_and_loss_match_hand_computation():
  emb, weights, labels = _hand_case()
  s, m = 30.0, 0.2
  # Example 0 (label 1): angles 0, pi/2, pi; target 1 gets cos(pi/2 + m).
  row0 = [s * 1.0, s * math.cos(math.pi / 2 + m), s * -1.0]
  # Example 1 (label 0): angles pi/6, pi/3, 5pi/6; target 0 gets cos(pi/6 + m).
  row1 = [s * math.cos(math.pi / 6 + m), s * math.cos(math.pi / 3),
          s * math.cos(5 * math.pi / 6)]
  expected = np.array([row0, row1])

  def ce(row, target):
    return math.log(sum(math.exp(v) for v in row)) - row[target]

  expected_loss = (ce(row0, 1) + ce(row1, 0)) / 2
  logits = arcface.arcface_logits(jnp.asarray(emb), jnp.asarray(weights),
                                  jnp.asarray(labels), scale=s, margin=m)
  # cos = 1 is clamped to 1 - 1e-7 (x 30 -> 3e-6 off), hence atol 1e-4.
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)
  loss, metrics = arcface.arcface_loss(jnp.asarray(emb), jnp.asarray(weights),
                                       jnp.asarray(labels), scale=s, margin=m)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  assert float(metrics["arcface/loss"]) == float(loss)
  # Plain-cosine argmax: example 0 -> class 0 (wrong), example 1 -> 0 (right).
  np.testing.assert_allclose(float(metrics["arcface/accuracy"]), 0.5)


def test_target_angle_plus_margin_is_capped_at_pi():
  # Example 0 is at pi from class 2: cos(pi + m) would rise above -1 again.
  emb, weights, _ = _hand_case()
  logits = arcface.arcface_logits(emb, weights, np.array([2, 0]), scale=30.0,
                                  margin=0.5)
  np.testing.assert_allclose(float(logits[0, 2]), -30.0, atol=1e-4)


def test_zero_margin_is_scaled_cosine_softmax():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 5)).astype(np.float32)
  weights = rng.normal(size=(4, 5)).astype(np.float32)
  labels = rng.integers(0, 4, size=6)
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      weights / np.linalg.norm(weights, axis=1, keepdims=True)).T
  logits = arcface.arcface_logits(emb, weights, labels, scale=30.0, margin=0.0)
  np.testing.assert_allclose(np.asarray(logits), 30.0 * cos, atol=1e-4)
  log_softmax = 30.0 * cos - np.log(np.exp(30.0 * cos).sum(1, keepdims=True))
  expected = -log_softmax[np.arange(6), labels].mean()
  loss, _ = arcface.arcface_loss(emb, weights, labels, scale=30.0, margin=0.0)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradients_finite_at_cos_plus_minus_one(sign):
  # Axis-aligned so that the normalised cosine is exactly +-1 in float32.
  weights = jnp.array([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  emb = sign * jnp.array([[0.5, 0.0, 0.0]])  # cos = sign with class 0.
  cos = arcface.cosine_similarity(emb, weights)
  assert float(cos[0, 0]) == sign  # Else this test would not test the clamp.

  def loss_fn(e, w):
    return arcface.arcface_loss(e, w, jnp.array([0]), margin=0.2)[0]

  grads = jax.grad(loss_fn, argnums=(0, 1))(emb, weights)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.isfinite(float(loss_fn(emb, weights)))


def test_negative_labels_are_ignored():
  emb, weights, labels = _hand_case()
  loss_one, _ = arcface.arcface_loss(emb[:1], weights, labels[:1])
  loss_masked, metrics = arcface.arcface_loss(emb, weights,
                                              np.array([labels[0], -1]))
  np.testing.assert_allclose(float(loss_masked), float(loss_one), rtol=1e-6)
  assert float(metrics["arcface/accuracy"]) == 0.0  # Only example 0 counts.


def test_margin_schedule_endpoints_and_jit():
  sched = jax.jit(lambda s: arcface.margin_schedule(
      s, ramp_steps=100, max_margin=0.2, start_step=10))
  np.testing.assert_allclose(
      [float(sched(s)) for s in (0, 10, 60, 110, 1000)],
      [0.0, 0.0, 0.1, 0.2, 0.2], atol=1e-7)
  step_up = [float(arcface.margin_schedule(s, ramp_steps=0, start_step=5))
             for s in (4, 5)]
  np.testing.assert_allclose(step_up, [0.0, 0.2], atol=1e-7)
  with pytest.raises(ValueError, match="ramp_steps"):
    arcface.margin_schedule(0, ramp_steps=-1)


def test_classifier_module_matches_functional():
  emb, _, labels = _hand_case()
  module = arcface.ArcFaceClassifier(num_classes=3, embed_dim=2)
  params = module.init(jax.random.key(0), emb, labels)
  weights = params["params"]["class_weights"]
  assert weights.shape == (3, 2)
  np.testing.assert_allclose(
      np.asarray(module.apply(params, emb, labels, margin=0.1)),
      np.asarray(arcface.arcface_logits(emb, weights, labels, margin=0.1)),
      rtol=1e-6)
  loss, _ = module.apply(params, emb, labels, margin=0.1,
                         method=arcface.ArcFaceClassifier.loss)
  np.testing.assert_allclose(
      float(loss),
      float(arcface.arcface_loss(emb, weights, labels, margin=0.1)[0]),
      rtol=1e-6)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="embed_dim"):
    arcface.arcface_logits(jnp.zeros((2, 3)), jnp.zeros((4, 5)),
                           jnp.zeros((2,), jnp.int32))
