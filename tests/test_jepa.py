"""JEPA objective pieces against closed forms / NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from echo_jax.models import Encoder, Predictor
from echo_jax.objectives import jepa


def test_layer_targets_matches_numpy():
  hidden = np.random.default_rng(0).normal(3.0, 2.0, (6, 2, 5, 8)).astype(
      np.float32)
  top = hidden[-4:]
  normed = (top - top.mean(-1, keepdims=True)) / np.sqrt(
      top.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(jepa.layer_targets(jnp.asarray(hidden), 4),
                             normed.mean(0), atol=1e-5)
  grad = jax.grad(lambda h: jepa.layer_targets(h, 2).sum())(jnp.asarray(hidden))
  assert not np.any(np.asarray(grad))  # stop_gradient
  with pytest.raises(ValueError, match="num_layers"):
    jepa.layer_targets(jnp.asarray(hidden), 7)


def test_regression_loss_closed_form():
  pred = jnp.array([[0.0, 0.2, -3.0, 1.0]])
  target = jnp.array([[0.0, 0.0, 0.0, 0.25]])
  # PyTorch smooth_l1 with beta 0.5: |d| < 0.5 -> 0.5 d^2 / 0.5 else |d| - 0.25.
  expected = (0.0 + 0.04 + 2.75 + 0.5) / 4
  np.testing.assert_allclose(
      jepa.regression_loss(pred, target, "smooth_l1", beta=0.5), expected,
      rtol=1e-6)
  np.testing.assert_allclose(jepa.regression_loss(pred, target, "l2"),
                             (0.04 + 9.0 + 0.5625) / 4, rtol=1e-6)
  with pytest.raises(ValueError, match="kind"):
    jepa.regression_loss(pred, target, "l1")


def _sigreg_h0_expectation(num_points: int = 17) -> float:
  """E[SIGReg] for N(0,1) data: E|ecf - phi|^2 = (1 - phi^2) / N exactly."""
  t = np.linspace(-5, 5, num_points)
  phi = np.exp(-0.5 * t**2)
  return float(np.trapezoid((1 - phi**2) * phi, t))


def test_sigreg_gaussian_vs_degenerate():
  sig = jax.jit(jepa.sigreg)
  x = jax.random.normal(jax.random.key(0), (2048, 32))
  gaussian = float(sig(x, jax.random.key(1)))
  # The statistic is scaled by N: ~1.06 under H0 whatever N is.
  assert abs(gaussian - _sigreg_h0_expectation()) < 0.25, gaussian
  collapsed = float(sig(jnp.ones_like(x), jax.random.key(1)))
  shrunk = float(sig(0.05 * x, jax.random.key(1)))
  low_rank = float(sig(x.at[:, 2:].set(0.0) * 4.0, jax.random.key(1)))
  assert min(collapsed, shrunk, low_rank) > 50 * gaussian, (collapsed, shrunk,
                                                            low_rank)


def test_sigreg_gradient_is_finite_and_descends():
  x = 0.1 * jax.random.normal(jax.random.key(0), (256, 16))
  key = jax.random.key(1)
  before, grad = jax.value_and_grad(jepa.sigreg)(x, key)
  assert np.all(np.isfinite(grad)) and np.abs(np.asarray(grad)).max() > 0
  optimizer = optax.adam(0.05)

  @jax.jit
  def step(x, opt_state):
    grad = jax.grad(jepa.sigreg)(x, key)
    updates, opt_state = optimizer.update(grad, opt_state)
    return optax.apply_updates(x, updates), opt_state

  opt_state = optimizer.init(x)
  for _ in range(30):
    x, opt_state = step(x, opt_state)
  after = jepa.sigreg(x, key)
  assert after < 0.2 * before, (before, after)


def test_feature_std_and_effective_rank():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 40, 6)).astype(np.float32) * np.arange(1, 7)
  np.testing.assert_allclose(jepa.feature_std(jnp.asarray(x)),
                             x.reshape(-1, 6).std(0).mean(), rtol=1e-5)
  for shape in [(200, 16), (10, 16)]:  # Gram branch and SVD branch
    y = rng.standard_normal(shape).astype(np.float32) * np.linspace(0.1, 3, 16)
    s = np.linalg.svd(y.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    np.testing.assert_allclose(jepa.effective_rank(jnp.asarray(y)),
                               np.exp(-(p * np.log(p)).sum()), rtol=1e-3)
  # k equal singular values -> rank k.
  eye = np.zeros((50, 16), np.float32)
  eye[np.arange(5), np.arange(5)] = 2.0
  np.testing.assert_allclose(jepa.effective_rank(jnp.asarray(eye)), 5.0,
                             rtol=1e-4)


def test_ema_update_and_momentum():
  target = {"w": jnp.array([1.0, 2.0])}
  online = {"w": jnp.array([3.0, 0.0])}
  out = jepa.ema_update(target, online, 0.75)
  np.testing.assert_allclose(out["w"], [1.5, 1.5])
  assert float(jepa.ema_momentum(0, 100)) == pytest.approx(0.996)
  assert float(jepa.ema_momentum(50, 100)) == pytest.approx(0.998)
  assert float(jepa.ema_momentum(100, 100)) == pytest.approx(1.0)
  assert float(jepa.ema_momentum(500, 100)) == pytest.approx(1.0)
  assert float(jax.jit(jepa.ema_momentum, static_argnums=1)(
      jnp.int32(25), 100, 0.9, 1.0)) == pytest.approx(0.925)


ENCODER = Encoder(width=32, depth=2, num_heads=2, mlp_dim=64, patch_frames=2,
                  n_mels=16)
PREDICTOR = Predictor(width=16, depth=1, num_heads=2, mlp_dim=32, out_dim=32)
LOSS_KW = dict(mask_fraction=0.5, span_tokens=3, target_layers=2,
               sigreg_weight=0.02, sigreg_directions=16)


def _init(mel):
  num_tokens = ENCODER.num_tokens(mel.shape[1])
  enc = ENCODER.init(jax.random.key(0), mel)["params"]
  ctx = jnp.zeros((mel.shape[0], num_tokens // 2, 32))
  idx = jnp.zeros((mel.shape[0], num_tokens // 2), jnp.int32)
  pred = PREDICTOR.init(jax.random.key(1), ctx, idx, idx, num_tokens)["params"]
  return {"encoder": enc, "predictor": pred}


def test_jepa_loss_trains_on_a_fixed_batch():
  mel = jax.random.normal(jax.random.key(2), (4, 40, 16))
  params = jax.jit(_init)(mel)
  target_params = params["encoder"]
  rng = jax.random.key(3)

  def loss_fn(p, t):
    return jepa.jepa_loss(ENCODER, PREDICTOR, p, t, mel, rng, **LOSS_KW)

  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(p, opt_state):
    (loss, metrics), (grads, target_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(p, target_params)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    new_p = optax.apply_updates(p, updates)
    return new_p, opt_state, loss, metrics, grads, target_grads

  opt_state = optimizer.init(params)
  params, opt_state, loss, metrics, grads, target_grads = step(params,
                                                               opt_state)
  assert np.isfinite(loss)
  assert set(metrics) >= {"jepa/loss", "jepa/sigreg", "jepa/target_std",
                          "jepa/pred_std", "jepa/target_rank"}
  assert all(np.isfinite(v) and np.shape(v) == () for v in metrics.values())
  assert metrics["jepa/sigreg"] > 0
  np.testing.assert_allclose(
      loss, metrics["jepa/loss"] + 0.02 * metrics["jepa/sigreg"], rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(target_grads))
  assert np.abs(np.asarray(grads["encoder"]["patch_embed"]["kernel"])).max() > 0
  assert np.abs(np.asarray(grads["predictor"]["mask_token"])).max() > 0

  losses = [float(loss)]
  for _ in range(20):
    params, opt_state, loss, *_ = step(params, opt_state)
    losses.append(float(loss))
  # Fixed batch, fixed masks, fixed targets: plain regression must go down.
  assert losses[-1] < 0.7 * losses[0], losses


def test_crop_halves_are_disjoint_and_swapped_per_example():
  mel = jnp.arange(2 * 9 * 1, dtype=jnp.float32).reshape(2, 9, 1)
  for seed in range(8):
    a, b = jepa.crop_halves(mel, jax.random.key(seed))
    assert a.shape == b.shape == (2, 4, 1)
    for i in range(2):
      first, second = np.asarray(mel[i, :4]), np.asarray(mel[i, 5:])
      pair = (np.asarray(a[i]), np.asarray(b[i]))
      assert ((np.array_equal(pair[0], first) and np.array_equal(pair[1], second))
              or (np.array_equal(pair[0], second)
                  and np.array_equal(pair[1], first)))
  swapped = [bool(jnp.array_equal(jepa.crop_halves(mel, jax.random.key(s))[0][0],
                                  mel[0, 5:])) for s in range(32)]
  assert 0 < sum(swapped) < 32  # Both orders occur.


def test_cross_crop_loss_closed_form_and_gradients():
  params = jax.jit(_init)(jax.random.normal(jax.random.key(2), (4, 40, 16)))
  encoder_params = params["encoder"]
  half = jax.random.normal(jax.random.key(4), (4, 20, 16))
  rng = jax.random.key(5)
  # Identical halves and target == online: the prediction term is exactly 0.
  loss, metrics = jepa.cross_crop_loss(
      ENCODER, encoder_params, encoder_params,
      jnp.concatenate([half, half], 1), rng, sigreg_weight=0.0)
  assert float(metrics["crop/loss"]) < 1e-10
  # Different halves: mean squared difference of the pooled final embeddings.
  other = jax.random.normal(jax.random.key(6), (4, 20, 16))
  mel = jnp.concatenate([half, other], 1)
  loss, metrics = jepa.cross_crop_loss(ENCODER, encoder_params, encoder_params,
                                       mel, rng, sigreg_weight=0.5)
  pooled = lambda m: ENCODER.apply({"params": encoder_params}, m)["final"].mean(1)
  a, b = jepa.crop_halves(mel, jax.random.split(rng)[0])
  np.testing.assert_allclose(metrics["crop/loss"],
                             np.mean(np.square(pooled(a) - pooled(b))),
                             rtol=1e-5)
  np.testing.assert_allclose(
      loss, metrics["crop/loss"] + 0.5 * metrics["crop/sigreg"], rtol=1e-6)
  grads, target_grads = jax.grad(
      lambda p, t: jepa.cross_crop_loss(ENCODER, p, t, mel, rng,
                                        sigreg_weight=0.5)[0],
      argnums=(0, 1))(encoder_params, encoder_params)
  assert np.abs(np.asarray(grads["patch_embed"]["kernel"])).max() > 0
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(target_grads))


def test_target_rank_runs_only_when_asked():
  # The eigenvalue solve is skipped on steps whose metrics nobody reads; the
  # loss and the other metrics do not depend on it.
  mel = jax.random.normal(jax.random.key(2), (4, 40, 16))
  params = jax.jit(_init)(mel)
  rng = jax.random.key(3)

  @jax.jit
  def run(rank_now):
    return jepa.jepa_loss(ENCODER, PREDICTOR, params, params["encoder"], mel,
                          rng, rank_now=rank_now, **LOSS_KW)

  loss_on, on = run(jnp.bool_(True))
  loss_off, off = run(jnp.bool_(False))
  assert on["jepa/target_rank"] > 1.0 and off["jepa/target_rank"] == 0.0
  assert loss_on == loss_off
  assert on["jepa/loss"] == off["jepa/loss"]
