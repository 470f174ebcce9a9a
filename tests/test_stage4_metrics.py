"""Separation metrics against closed forms and hand-made cases: latent
SI-SDR, PIT accuracy, count accuracy (with the per-K confusion matrix) and
the trivial baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from echo_jax.evaluators import routing_metrics as rm
from echo_jax.objectives import routing


def _seq(seed, t=50, c=8):
  return np.random.default_rng(seed).normal(size=(t, c))


def test_si_sdr_of_a_scaled_copy_is_clipped_infinity():
  ref = _seq(0)
  assert rm.si_sdr(3.7 * ref, ref) == rm.SI_SDR_CLIP_DB
  # A per-channel offset is removed by the zero-meaning over time.
  assert rm.si_sdr(0.5 * ref + np.arange(8), ref) == rm.SI_SDR_CLIP_DB


def test_si_sdr_of_an_orthogonal_estimate_is_very_negative():
  ref = np.zeros((4, 2))
  ref[:, 0] = [1, -1, 1, -1]
  est = np.zeros((4, 2))
  est[:, 1] = [1, 1, -1, -1]              # Zero-mean and orthogonal to ref.
  assert rm.si_sdr(est, ref) < -60


def test_si_sdr_of_a_known_mixture():
  # est = ref + n with n orthogonal to ref and |n|^2 = |ref|^2 / 4:
  # SI-SDR = 10 log10(4) = 6.02 dB.
  ref = _seq(1)
  ref -= ref.mean(0)
  noise = _seq(2)
  noise -= noise.mean(0)
  r, n = ref.ravel(), noise.ravel()
  n = n - (n @ r) / (r @ r) * r
  n *= np.sqrt((r @ r) / 4 / (n @ n))
  est = (r + n).reshape(ref.shape)
  assert rm.si_sdr(est, ref) == pytest.approx(10 * np.log10(4), abs=1e-6)
  # Scaling the estimate does not change it (scale invariance).
  assert rm.si_sdr(-2 * est, ref) == pytest.approx(rm.si_sdr(est, ref))


def test_pit_accuracy_on_hand_made_cases():
  a, b, c = _seq(3), _seq(4), _seq(5)
  targets = np.stack([a, b])
  # Both slots close to their own source.
  assert rm.pit_correct(np.stack([a + 0.1, b - 0.1]), targets).tolist() == [
      True, True]
  # Slot 1 carries source 0 again: source 1's slot is closer to source 0.
  assert rm.pit_correct(np.stack([a, a]), targets).tolist() == [True, False]
  # Matching by MSE finds the permutation; the empty slot is left over.
  slots = np.stack([c, b + 0.01, a + 0.01, np.zeros_like(a)])
  np.testing.assert_array_equal(rm.match_by_mse(slots, targets), [2, 1])


def test_count_report_and_confusion():
  true_k = np.array([1, 2, 2, 3, 0, 3])
  pred = np.array([1, 2, 1, 4, 0, 3])
  r = rm.count_report(true_k, pred, k_max=3, num_slots=4)
  assert r["accuracy"] == pytest.approx(4 / 6)
  assert r["under"] == pytest.approx(1 / 6)
  assert r["over"] == pytest.approx(1 / 6)
  conf = np.array(r["confusion"])
  assert conf.shape == (4, 5) and conf.sum() == 6
  assert conf[2, 1] == 1 and conf[3, 4] == 1 and conf[0, 0] == 1
  assert r["accuracy_per_k"] == {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.5}


def test_scores_of_perfect_slots_and_of_the_baseline():
  a, b = _seq(6), _seq(7)
  mixture = a + b
  scores = rm.RoutingScores(k_max=3, num_slots=4)
  # Perfect slots (in a shuffled order) and one empty slot.
  slots = np.stack([np.zeros_like(a), b, a, np.zeros_like(a)])
  scores.add(slots, np.array([0.1, 0.9, 0.8, 0.2]), np.stack([a, b]), mixture)
  scores.add(np.stack([a, a, a, a]), np.array([0.9, 0.1, 0.1, 0.1]),
             np.stack([a]), a)
  s = scores.summary()
  assert s["count"]["accuracy"] == 1.0
  assert s["pit_accuracy"] == 1.0 and s["pit_sources"] == 2
  assert s["si_sdr"] == rm.SI_SDR_CLIP_DB
  # Baseline: the mixture latent of two equal-power sources is ~0 dB against
  # either (and a lone source's is a copy), and it cannot be closer to each
  # source than to the other.
  assert abs(s["baseline"]["si_sdr"] - rm.SI_SDR_CLIP_DB / 3) < 2
  assert s["baseline"]["pit_accuracy"] <= 0.5
  assert s["si_sdri"] > 0
  # Per K, the lone source's clipped copy no longer hides the K = 2 baseline.
  assert s["si_sdr_per_k"] == {1: rm.SI_SDR_CLIP_DB, 2: rm.SI_SDR_CLIP_DB}
  assert s["baseline"]["si_sdr_per_k"][1] == rm.SI_SDR_CLIP_DB
  assert abs(s["baseline"]["si_sdr_per_k"][2]) < 3


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_existence_probability_undoes_the_null_weight(p):
  # Fit one existence logit by gradient descent to labels that are 1 with
  # probability p, null slots weighted 0.1 as in training: the raw sigmoid
  # over-states p, the calibrated probability recovers it.
  w = 0.1

  def loss(z):
    pos = optax.sigmoid_binary_cross_entropy(z, 1.0)
    neg = optax.sigmoid_binary_cross_entropy(z, 0.0)
    return p * pos + (1 - p) * w * neg

  z = jax.jit(lambda z0: jax.lax.fori_loop(
      0, 3000, lambda _, z: z - 2.0 * jax.grad(loss)(z), z0))(jnp.float32(0))
  assert float(jax.nn.sigmoid(z)) > p + 0.05                 # Over-counts.
  assert float(routing.existence_probability(z, w)) == pytest.approx(p,
                                                                    abs=1e-3)
  assert float(routing.existence_probability(z, 1.0)) == float(
      jax.nn.sigmoid(z))
