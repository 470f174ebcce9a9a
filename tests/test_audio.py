"""log_mel against librosa (float32, CPU)."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from echo_jax import audio

# Max |difference| allowed between our log-mel and librosa's, in log units
# (= relative mel-power error). Where librosa's mel power >= 1e-3 (speech) we
# require 1e-5 (measured: 4e-6). Near-silent bins beside loud frames sit at the
# float32 FFT noise floor (power ~1e-6, i.e. 1e-9 of the loud frame), where both
# float32 implementations are only ~1e-4 exact (measured: 1.1e-4): 1e-3 there.
LOUD_LOG_POWER = np.log(1e-3)
LOUD_ATOL = 1e-5
QUIET_ATOL = 1e-3


def _librosa_log_mel(wave: np.ndarray) -> np.ndarray:
  mel = librosa.feature.melspectrogram(
      y=wave, sr=16000, n_fft=512, hop_length=160, win_length=400,
      window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=80)
  return np.log(mel + audio.LOG_EPS).T[:-1]  # [frames, mels], last dropped


def _test_waves(num_samples: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  t = np.arange(num_samples) / 16000
  chirp = 0.5 * np.sin(2 * np.pi * (100 + 2000 * t) * t)
  chirp[:3000] = 0.0  # exact silence hits the log floor
  noise = 0.1 * rng.standard_normal(num_samples)
  noise[5000:9000] *= 1e-4  # very quiet stretch
  return np.stack([chirp, noise]).astype(np.float32)


@pytest.mark.parametrize("num_samples", [16000, 2 * 16000 + 77])
def test_log_mel_matches_librosa(num_samples):
  waves = _test_waves(num_samples)
  ours = np.asarray(jax.jit(audio.log_mel)(jnp.asarray(waves)))
  assert ours.shape == (2, num_samples // 160, 80)
  assert ours.dtype == np.float32
  for b in range(2):
    ref = _librosa_log_mel(waves[b])
    loud = ref >= LOUD_LOG_POWER
    assert 0 < loud.sum() < loud.size  # both regimes are exercised
    np.testing.assert_allclose(ours[b][loud], ref[loud], atol=LOUD_ATOL, rtol=0)
    np.testing.assert_allclose(ours[b], ref, atol=QUIET_ATOL, rtol=0)


def test_log_mel_silence_is_log_floor():
  out = audio.log_mel(jnp.zeros((1, 1600)))
  np.testing.assert_allclose(out, np.log(audio.LOG_EPS), rtol=1e-6)


def test_log_mel_frames_are_aligned_to_hop():
  # An impulse at sample s is at the centre of frame s / hop.
  wave = np.zeros((1, 3200), np.float32)
  wave[0, 1600] = 1.0
  out = np.asarray(audio.log_mel(jnp.asarray(wave)))
  assert int(np.argmax(out[0].sum(-1))) == 10


def test_log_mel_rejects_unbatched_input():
  with pytest.raises(ValueError, match="batch"):
    audio.log_mel(jnp.zeros(1600))


def test_normalize_log_mel():
  x = jnp.array([[-5.0, 1.0]])
  np.testing.assert_allclose(audio.normalize_log_mel(x, -2.0, 3.0),
                             [[-1.0, 1.0]])
  with pytest.raises(ValueError, match="std"):
    audio.normalize_log_mel(x, 0.0, 0.0)


def test_random_equalizer_is_smooth_bounded_and_varied():
  curves = np.asarray(audio.random_equalizer_db(jax.random.key(0), 64, 80,
                                                max_db=6.0))
  assert curves.shape == (64, 1, 80)
  assert np.abs(curves).max() <= 6.0 + 1e-5
  assert np.abs(curves).max() > 2.0          # Not degenerate.
  assert np.std(curves[:, 0, 0]) > 0.5        # Differs between examples.
  # Smooth: a 4-term cosine series moves little between neighbouring bins.
  assert np.abs(np.diff(curves, axis=-1)).max() < 6.0 * np.pi * 4 / 79
  np.testing.assert_allclose(audio.db_to_log_power(10.0), np.log(10.0))
  zero = audio.random_equalizer_db(jax.random.key(0), 2, 80, max_db=0.0)
  assert not np.any(np.asarray(zero))


def test_windowed_dft_matches_numpy_rfft():
  frame = np.random.default_rng(0).normal(size=512)
  window = librosa.util.pad_center(
      librosa.filters.get_window("hann", 400, fftbins=True), size=512)
  expected = np.fft.rfft(frame * window)
  got = frame[56:456] @ audio.windowed_dft(400, 512).astype(np.float64)
  np.testing.assert_allclose(got[:257], expected.real, atol=1e-4)
  np.testing.assert_allclose(got[257:], expected.imag, atol=1e-4)
