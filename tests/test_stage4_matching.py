"""Routing: slot matching against scipy's Hungarian solver, the null-target
loss (null slots get no latent gradient), and the router's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from echo_jax import matching
from echo_jax.models.router import SlotRouter
from echo_jax.objectives import routing


def _random_case(seed, batch, slots, sources):
  rng = np.random.default_rng(seed)
  cost = rng.normal(size=(batch, slots, sources)).astype(np.float32)
  k = rng.integers(0, sources + 1, size=batch)
  k[0], k[-1] = 0, sources          # K = 0 and a full mixture always.
  present = np.arange(sources)[None, :] < k[:, None]
  return cost, present


@pytest.mark.parametrize("slots,sources", [(4, 3), (3, 3), (6, 5), (8, 7),
                                           (7, 2)])
def test_matching_equals_linear_sum_assignment(slots, sources):
  """Enumerated (S <= 6) and Hungarian (S > 6) paths, S > K and K = 0."""
  cost, present = _random_case(slots * 10 + sources, 16, slots, sources)
  slot_of = np.asarray(jax.jit(matching.match)(cost, present))
  for b in range(len(cost)):
    assert len(set(slot_of[b])) == sources          # Injective, absent too.
    idx = np.flatnonzero(present[b])
    if not len(idx):
      continue
    rows, cols = linear_sum_assignment(cost[b][:, idx])   # slots x sources.
    expected = np.empty(len(idx), np.int64)
    expected[cols] = rows
    np.testing.assert_array_equal(slot_of[b][idx], expected)
    np.testing.assert_allclose(cost[b][slot_of[b][idx], idx].sum(),
                               cost[b][:, idx][rows, cols].sum(), rtol=1e-6)


def test_matching_rejects_more_sources_than_slots():
  with pytest.raises(ValueError, match="slots"):
    matching.match(jnp.zeros((1, 2, 3)), jnp.ones((1, 3), bool))


def _outputs(rng, b=3, s=4, t=6, c=5, k=3):
  keys = jax.random.split(rng, 5)
  latents = jax.random.normal(keys[0], (b, s, t, c))
  existence = jax.random.normal(keys[1], (b, s))
  activity = jax.random.normal(keys[2], (b, s, t))
  targets = jax.random.normal(keys[3], (b, k, t, c))
  target_activity = (jax.random.uniform(keys[4], (b, k, t)) > 0.5
                     ).astype(jnp.float32)
  present = jnp.array([[True, True, False], [True, False, False],
                       [False, False, False]])
  return latents, existence, activity, targets, target_activity, present


def test_null_slots_get_no_latent_gradient():
  lat, ex, act, tgt, tgt_act, present = _outputs(jax.random.PRNGKey(0))
  cost = routing.matching_cost(lat, ex, act, tgt, tgt_act)
  slot_of = matching.match(cost, present)
  grad = jax.grad(lambda l: routing.slot_losses(
      l, ex, act, tgt, tgt_act, present, slot_of)["latent"])(lat)
  matched = np.asarray(matching.matched_slots(slot_of, present, 4).sum(-1))
  norms = np.asarray(jnp.abs(grad).sum((-2, -1)))
  assert (norms[matched == 0] == 0).all()        # Null slots: exactly zero.
  assert (norms[matched == 1] > 0).all()         # Matched slots learn.
  assert matched.sum() == 3                      # The three present sources.
  # With the optional energy penalty, null slots are pulled towards 0 only.
  energy_grad = jax.grad(lambda l: routing.slot_losses(
      l, ex, act, tgt, tgt_act, present, slot_of,
      null_energy_weight=1.0)["null_energy"])(lat)
  energy_norms = np.asarray(jnp.abs(energy_grad).sum((-2, -1)))
  assert (energy_norms[matched == 1] == 0).all()
  assert (energy_norms[matched == 0] > 0).all()


def test_null_targets_for_existence_and_activity():
  lat, ex, act, tgt, tgt_act, present = _outputs(jax.random.PRNGKey(1))
  slot_of = matching.match(routing.matching_cost(lat, ex, act, tgt, tgt_act),
                           present)
  # A perfect prediction: matched slots exist with their sources' activity
  # and latents, null slots say "no" with silent activity.
  pairs = matching.matched_slots(slot_of, present, 4)
  exists = pairs.sum(-1)
  perfect_ex = jnp.where(exists > 0, 30.0, -30.0)
  perfect_act = jnp.where(jnp.einsum("bsk,bkt->bst", pairs, tgt_act) > 0,
                          30.0, -30.0)
  perfect_lat = jnp.einsum("bsk,bktc->bstc", pairs, tgt)
  parts = routing.slot_losses(perfect_lat, perfect_ex, perfect_act, tgt,
                              tgt_act, present, slot_of)
  for name in ("latent", "activity", "existence"):
    assert float(parts[name]) < 1e-6, name
  # Null slots that claim to exist cost 30 nats each at weight 0.1.
  all_exist = jnp.full_like(perfect_ex, 30.0)
  wrong = routing.slot_losses(perfect_lat, all_exist, perfect_act, tgt,
                              tgt_act, present, slot_of, null_weight=0.1)
  num_null = float((1 - exists).sum())
  np.testing.assert_allclose(float(wrong["existence"]),
                             30.0 * 0.1 * num_null / (3 + 0.1 * num_null),
                             rtol=1e-4)


def test_router_shapes_and_loss():
  router = SlotRouter(num_slots=4, width=16, depth=2, num_heads=2, mlp_dim=32,
                      latent_dim=8, latent_hidden=16, activity_dim=8)
  feats = jnp.ones((2, 10, 12))
  params = router.init(jax.random.PRNGKey(0), feats)
  out = router.apply(params, jax.random.normal(jax.random.PRNGKey(1),
                                               (2, 10, 12)))
  assert out["latents"].shape == (2, 2, 4, 10, 8)
  assert out["existence"].shape == (2, 2, 4)
  assert out["activity"].shape == (2, 2, 4, 10)
  targets = jnp.zeros((2, 3, 10, 8))
  loss, metrics = routing.routing_loss(
      out, targets, jnp.zeros((2, 3, 10)),
      jnp.array([[True, True, False], [False, False, False]]))
  assert np.isfinite(float(loss))
  assert 0.0 <= float(metrics["count_accuracy"]) <= 1.0


def test_residual_router_starts_every_slot_at_the_mixture_latent():
  router = SlotRouter(num_slots=3, width=16, depth=2, num_heads=2, mlp_dim=32,
                      latent_dim=8, latent_hidden=16, activity_dim=8,
                      residual_layers=2)
  feats = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 12))
  base = jax.random.normal(jax.random.PRNGKey(2), (2, 10, 8))
  params = router.init(jax.random.PRNGKey(0), feats, base)
  out = router.apply(params, feats, base)
  # Zero-initialised correction: every slot of every layer is the base.
  np.testing.assert_allclose(
      out["latents"], jnp.broadcast_to(base[None, :, None], (2, 2, 3, 10, 8)),
      atol=1e-6)
  # The correction still learns: the loss has a gradient on its kernel.
  targets = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 10, 8))

  def loss(p):
    return routing.routing_loss(router.apply(p, feats, base), targets,
                                jnp.ones((2, 2, 10)),
                                jnp.ones((2, 2), bool))[0]
  grad = jax.grad(loss)(params)["params"]["outputs"]["latent_out"]["kernel"]
  assert float(jnp.abs(grad).max()) > 0
  # Without a base (callers reading existence / activity only): the
  # corrections alone; the other outputs do not depend on the base.
  alone = router.apply(params, feats)
  np.testing.assert_allclose(alone["latents"], 0.0, atol=1e-6)
  np.testing.assert_allclose(alone["existence"], out["existence"])
  with pytest.raises(ValueError, match="base must be"):
    router.apply(params, feats, base[..., :4])


def test_token_activity():
  frames = jnp.array([[[0, 0, 1, 0, 0, 0, 0, 0, 1]]], jnp.float32)
  np.testing.assert_array_equal(routing.token_activity(frames, 4),
                                [[[1.0, 0.0]]])


def test_distinct_loss_hand_cases():
  rng = np.random.default_rng(0)
  targets = jnp.asarray(rng.standard_normal((1, 3, 5, 4)), jnp.float32)
  two = jnp.array([[True, True, False]])
  # Slots on their own sources: own MSE 0, other MSE d -> log(1 + e^(-d/tau)).
  d = float(np.mean(np.square(targets[0, 0] - targets[0, 1])))
  got = routing.distinct_loss(targets, targets, two, temperature=0.5)
  assert float(got) == pytest.approx(np.log1p(np.exp(-d / 0.5)), rel=1e-5)
  # Both slots at the mean of the two sources: equidistant, log 2.
  mean = jnp.broadcast_to((targets[:, :1] + targets[:, 1:2]) / 2,
                          targets.shape)
  assert float(routing.distinct_loss(mean, targets, two, 0.5)) == (
      pytest.approx(np.log(2.0), rel=1e-5))
  # A mixture of one source has nothing to tell apart.
  one = jnp.array([[True, False, False]])
  assert float(routing.distinct_loss(mean, targets, one, 0.5)) == 0.0
  # No source at all (noise-only mixtures): zero loss, finite gradient.
  none = jnp.zeros((1, 3), bool)
  grad = jax.grad(lambda m: routing.distinct_loss(m, targets, none, 0.5))(mean)
  assert np.isfinite(np.asarray(grad)).all()
