"""Stage-3 losses and the speaker perturbation: soft cross-entropy by hand and
at its minimum, the cross-correlation penalty, the invariance loss, and the mel-axis warp (identity
at zero shift, measured pitch / formant shift otherwise)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax import audio, perturb
from echo_jax.objectives import content

SR = 16000


def test_soft_cross_entropy_hand_case():
  p = jnp.array([[0.5, 0.25, 0.25]])
  logits = jnp.log(jnp.array([[0.25, 0.25, 0.5]]))
  # -(0.5 log .25 + .25 log .25 + .25 log .5) = 1.25 log 2 + 0.25 log 2.
  expected = -(0.5 * np.log(0.25) + 0.25 * np.log(0.25) + 0.25 * np.log(0.5))
  np.testing.assert_allclose(content.soft_cross_entropy(p, logits), expected,
                             rtol=1e-6)
  # Weights pick positions: the zero-weighted row does not count.
  p2 = jnp.concatenate([p, jnp.array([[1.0, 0.0, 0.0]])])
  l2 = jnp.concatenate([logits, jnp.zeros((1, 3))])
  np.testing.assert_allclose(
      content.soft_cross_entropy(p2, l2, jnp.array([1.0, 0.0])), expected,
      rtol=1e-6)


def test_soft_cross_entropy_is_minimal_at_the_posterior():
  rng = np.random.default_rng(0)
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 6)) * 2))
  at_p = content.soft_cross_entropy(p, jnp.log(p))
  np.testing.assert_allclose(at_p, content.entropy(p), rtol=1e-5)  # = H(p).
  grad = jax.grad(lambda l: content.soft_cross_entropy(p, l))(jnp.log(p))
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)
  for seed in range(5):
    other = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(4, 6)))
    assert content.soft_cross_entropy(p, other) > at_p


def test_cross_correlation_penalty():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(4096, 3)))
  independent = jnp.asarray(rng.normal(size=(4096, 2)))
  assert content.cross_correlation_penalty(a, independent) < 1e-3
  # b = 5 a[:, :1] (any scale): one pair fully correlated, of 3 x 1 pairs.
  np.testing.assert_allclose(
      content.cross_correlation_penalty(a, 5.0 * a[:, :1]), 1 / 3, atol=2e-3)


def test_invariance_loss_hand_cases_and_stop_gradient():
  a = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
  np.testing.assert_allclose(content.invariance_loss(a, 5.0 * a), 0.0,
                             atol=1e-6)                  # Same directions.
  b = jnp.array([[0.0, 1.0], [-1.0, 0.0], [-1.0, -1.0]])
  # Orthogonal, orthogonal, opposite: (1 + 1 + 2) / 3; weights pick rows.
  np.testing.assert_allclose(content.invariance_loss(a, b), 4 / 3, rtol=1e-6)
  np.testing.assert_allclose(
      content.invariance_loss(a, b, jnp.array([0.0, 0.0, 1.0])), 2.0,
      rtol=1e-6)
  grad_anchor = jax.grad(lambda y: content.invariance_loss(a, y))(b)
  np.testing.assert_array_equal(grad_anchor, 0.0)
  assert float(jnp.abs(jax.grad(
      lambda x: content.invariance_loss(x, b))(a)).sum()) > 0


def _voice(f0: float, formants=(500.0, 1500.0, 2500.0), seconds=0.5):
  """Harmonics of f0 under a formant envelope (a crude vowel)."""
  t = np.arange(int(seconds * SR)) / SR
  wave = np.zeros_like(t)
  for h in range(1, int(7000 / f0)):
    f = h * f0
    amp = sum(np.exp(-0.5 * ((f - fc) / 120.0) ** 2) for fc in formants) + 0.01
    wave += amp * np.sin(2 * np.pi * f * t)
  return (0.1 * wave / np.abs(wave).max()).astype(np.float32)


def _mel(wave):
  return audio.log_mel(jnp.asarray(wave)[None])


def _centroid_hz(log_mel):
  """Power-weighted mean of the mel bins' centre frequencies."""
  power = np.exp(np.asarray(log_mel)).mean((0, 1))
  return float((power * perturb.mel_centres(power.shape[-1])).sum()
               / power.sum())


def _lowest_peak_hz(log_mel):
  """Centre frequency of the first local maximum of the mean spectrum above
  60 Hz (the fundamental at this resolution)."""
  s = np.asarray(log_mel).mean((0, 1))
  centres = perturb.mel_centres(len(s))
  for m in range(1, len(s) - 1):
    if centres[m] > 60 and s[m] >= s[m - 1] and s[m] > s[m + 1]:
      return float(centres[m])
  raise AssertionError("no peak")


def test_warp_is_identity_at_zero_shift():
  mel = jnp.asarray(np.random.default_rng(0).normal(size=(2, 30, 80)),
                    jnp.float32)
  np.testing.assert_array_equal(perturb.warp_mel(mel, jnp.zeros(2)), mel)
  out, shift = perturb.speaker_perturb(jax.random.PRNGKey(0), mel,
                                       max_semitones=4.0, equalizer_db=6.0,
                                       mel_std=4.0, prob=0.0)
  np.testing.assert_array_equal(out, mel)
  np.testing.assert_array_equal(shift, 0.0)


@pytest.mark.parametrize("semitones", [3.0, -3.0])
def test_warp_shifts_pitch_and_formants_measured(semitones):
  factor = 2 ** (semitones / 12)
  source = _mel(_voice(150.0))
  warped = perturb.warp_mel(source, jnp.array([semitones]))
  shifted_voice = _mel(_voice(150.0 * factor,
                              tuple(f * factor for f in (500, 1500, 2500))))
  # Formants: the spectral centroid moves where that of really shifted
  # speech is (within 4%), well away from the source's.
  centroid = _centroid_hz(warped)
  np.testing.assert_allclose(centroid, _centroid_hz(shifted_voice), rtol=0.04)
  assert abs(np.log(centroid / _centroid_hz(source))) > 0.5 * abs(
      np.log(factor))
  # Pitch: the fundamental's peak lands on the mel bin of the really shifted
  # fundamental, a factor away from the source's (one mel bin of slack).
  np.testing.assert_allclose(_lowest_peak_hz(warped),
                             _lowest_peak_hz(shifted_voice), rtol=1e-6)
  np.testing.assert_allclose(_lowest_peak_hz(warped) / _lowest_peak_hz(source),
                             factor, rtol=0.12)
  # And the warped frames are closer to really shifted speech than the
  # source frames are.
  err = lambda a, b: float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))
  assert err(warped, shifted_voice) < 0.5 * err(source, shifted_voice)


def test_perturb_draws_shifts_in_range_and_equalises():
  mel = jnp.zeros((64, 10, 80))
  out, shift = perturb.speaker_perturb(jax.random.PRNGKey(1), mel,
                                       max_semitones=4.0, equalizer_db=6.0,
                                       mel_std=4.0, prob=1.0)
  assert np.all(np.abs(shift) <= 4.0) and np.std(shift) > 1.0
  # On a flat (zero) input only the equaliser shows: |gain| <= 6 dB.
  bound = audio.db_to_log_power(6.0) / 4.0
  assert 0 < np.abs(out).max() <= bound + 1e-6
