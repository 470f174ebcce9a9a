"""Log-mel features computed on the accelerator, inside the jitted step.

Hosts only decode and mix waveforms; the step turns them into log-mel frames so
that feature extraction scales with the accelerators and stays bit-identical
across hosts. The mel filterbank comes from `librosa.filters.mel` (computed once
with NumPy and baked in as a constant), so `log_mel` matches

  librosa.feature.melspectrogram(y=w, sr=16000, n_fft=512, hop_length=160,
      win_length=400, window='hann', center=True, pad_mode='reflect', power=2.0,
      n_mels=80)

followed by `log(mel + LOG_EPS)`, with the last frame dropped (see `log_mel`).
Note librosa >= 0.10 defaults to `pad_mode='constant'`; we use reflect padding.
"""

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from data_pipelines import framing

# Floor inside the log: -13.8 for silence; small enough not to clip speech
# (typical mel power of normalised speech is 1e-4..1e2) and it keeps log finite.
LOG_EPS = 1e-6


@functools.lru_cache(maxsize=None)
def mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """Slaney-normalised mel filterbank `[n_mels, n_fft // 2 + 1]` (float32)."""
  return librosa.filters.mel(
      sr=sample_rate, n_fft=n_fft, n_mels=n_mels).astype(np.float32)


@functools.lru_cache(maxsize=None)
def windowed_dft(win_length: int, n_fft: int) -> np.ndarray:
  """`[win_length, 2 * (n_fft // 2 + 1)]`: x @ M = [Re, Im] of the `n_fft`-point
  real DFT of x times the window, for x the window's support (the centred
  `win_length` samples of an `n_fft` frame). Built in float64, stored float32.
  """
  window = librosa.filters.get_window("hann", win_length, fftbins=True)
  offset = (n_fft - win_length) // 2
  n = np.arange(win_length)[:, None] + offset
  k = np.arange(n_fft // 2 + 1)[None, :]
  phase = 2.0 * np.pi * n * k / n_fft
  return (window[:, None] * np.concatenate([np.cos(phase), -np.sin(phase)], 1)
          ).astype(np.float32)


def log_mel(waveform: jax.Array,
            *,
            sample_rate: int = framing.SAMPLE_RATE,
            n_fft: int = 512,
            win_length: int = 400,
            hop: int = framing.HOP,
            n_mels: int = 80) -> jax.Array:
  """Log-mel spectrogram `[batch, samples] -> [batch, samples // hop, n_mels]`.

  The real DFT is a matmul with a windowed DFT matrix rather than
  `jnp.fft.rfft`: XLA shards a matmul along the batch like any other, whereas
  jax 0.11's partitioner all-gathers the whole global batch onto every device
  for an FFT (and that program hung on 8 simulated CPU devices); matmuls also
  suit TPU/GPU matrix units. It costs ~0.4 MFLOP per frame, small next to the
  encoder.

  STFT with a periodic Hann window (`win_length` samples, zero-padded to
  `n_fft`), centred frames with reflect padding of `n_fft // 2`, power
  spectrum, librosa's mel basis, `log(mel + LOG_EPS)`. A centred STFT yields
  `samples // hop + 1` frames; the last one is dropped so that frame `t` starts
  at sample `t * hop`, aligned with the data stream's activity frames. Always
  computed in float32 (the FFT and the mel projection use full precision).
  """
  if waveform.ndim != 2:
    raise ValueError(f"log_mel expects waveforms [batch, samples]; found shape "
                     f"{waveform.shape}. Add a batch axis for one waveform.")
  num_samples = waveform.shape[1]
  pad = n_fft // 2
  if num_samples <= pad:
    raise ValueError(f"log_mel needs more than n_fft // 2 = {pad} samples for "
                     f"reflect padding; found {num_samples}.")
  num_frames = num_samples // hop
  waveform = waveform.astype(jnp.float32)
  padded = jnp.pad(waveform, ((0, 0), (pad, pad)), mode="reflect")
  # Static gather indices [frames, win_length]: the window's support inside
  # frame t, i.e. padded[t*hop + offset + 0..win_length).
  offset = (n_fft - win_length) // 2
  index = (np.arange(num_frames)[:, None] * hop + offset
           + np.arange(win_length)[None, :])
  spectrum = jnp.matmul(padded[:, index], windowed_dft(win_length, n_fft),
                        precision=jax.lax.Precision.HIGHEST)
  real, imag = jnp.split(spectrum, 2, axis=-1)
  power = real**2 + imag**2
  mel = jnp.einsum("btf,mf->btm", power, mel_basis(sample_rate, n_fft, n_mels),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log(mel + LOG_EPS)


def normalize_log_mel(x: jax.Array, mean: float, std: float) -> jax.Array:
  """Fixed affine `(x - mean) / std` from config, so encoder inputs are O(1)."""
  if isinstance(std, (int, float)) and std <= 0:
    raise ValueError(f"normalize_log_mel needs std > 0; found {std}. "
                     "Set config's log-mel std to a positive constant.")
  return (x - mean) / std


def random_equalizer_db(rng: jax.Array, batch: int, n_mels: int,
                        max_db: float, order: int = 4) -> jax.Array:
  """Smooth random gain curves over the mel axis, in dB: `[batch, 1, n_mels]`.

  Each curve is a cosine series of `order` terms (DC excluded: level is not a
  channel trait we need to model) with coefficients uniform in +-max_db/order,
  so |curve| <= max_db. It imitates a channel's tone colouring (microphone,
  room, codec), which is broad across frequency and changes between sessions,
  unlike a speaker's formants.
  """
  k = jnp.arange(1, order + 1, dtype=jnp.float32)[:, None]
  basis = jnp.cos(jnp.pi * k * jnp.linspace(0.0, 1.0, n_mels)[None, :])
  coef = jax.random.uniform(rng, (batch, order), jnp.float32,
                            -max_db / order, max_db / order)
  return (coef @ basis)[:, None, :]


def db_to_log_power(db: jax.Array | float) -> jax.Array | float:
  """A power gain in dB as a natural-log offset (log_mel's units)."""
  return db * (np.log(10.0) / 10.0)
