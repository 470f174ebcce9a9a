"""Speaker perturbation of log-mel frames, for content invariance (ContentVec,
SPIN): a pitch/formant shift as a warp of the mel axis plus a random smooth
equaliser. No resynthesis and no new dependency: it acts on the features the
encoder reads, inside the jitted step.

A shift of `s` semitones scales every frequency by `a = 2 ** (s / 12)`, moving
harmonics (pitch) and the spectral envelope (formants, vocal-tract length)
together, like a VTLN warp: output bin m reads the input at frequency
`f_m / a`, located on the mel bins' centre frequencies and linearly
interpolated. At s = 0 every bin reads itself, so the warp is the identity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from data_pipelines import framing
from echo_jax import audio


@functools.lru_cache(maxsize=None)
def mel_centres(n_mels: int, sample_rate: int = framing.SAMPLE_RATE
                ) -> np.ndarray:
  """Centre frequencies (Hz) of `audio.mel_basis`'s bins, `[n_mels]`."""
  return librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=sample_rate / 2
                                 )[1:-1].astype(np.float64)


def warp_mel(mel: jax.Array, semitones: jax.Array) -> jax.Array:
  """Frequency-scales log-mel `[B, F, M]` by `2 ** (semitones / 12)`, one
  shift per example (`semitones` `[B]`). Bins that read outside the range
  repeat the edge bin."""
  centres = mel_centres(mel.shape[-1])
  factor = jnp.exp2(semitones.astype(jnp.float32) / 12.0)[:, None]  # [B, 1]
  # Fractional source bin of each output bin, via the centre frequencies.
  # float64 knots then float32: at factor 1 the positions are exact integers.
  source_hz = jnp.asarray(centres, jnp.float32)[None, :] / factor
  position = jnp.interp(source_hz, jnp.asarray(centres, jnp.float32),
                        jnp.arange(len(centres), dtype=jnp.float32))
  lower = jnp.clip(jnp.floor(position), 0, len(centres) - 1).astype(jnp.int32)
  upper = jnp.minimum(lower + 1, len(centres) - 1)
  frac = (position - lower)[:, None, :]                       # [B, 1, M]
  take = jax.vmap(lambda m, i: jnp.take(m, i, axis=-1))
  return (1.0 - frac) * take(mel, lower) + frac * take(mel, upper)


def speaker_perturb(rng: jax.Array, mel: jax.Array, *, max_semitones: float,
                    equalizer_db: float, mel_std: float,
                    prob: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Random perturbation of normalised log-mel `[B, F, M]`.

  Each example is perturbed with probability `prob`: a shift uniform in
  +-`max_semitones`, then a smooth random equaliser within +-`equalizer_db`
  (`audio.random_equalizer_db`, in the normalised units: / `mel_std`).
  Returns (perturbed mel, the shifts `[B]` in semitones, 0 where untouched).
  """
  b, _, m = mel.shape
  shift_rng, eq_rng, coin_rng = jax.random.split(rng, 3)
  on = jax.random.uniform(coin_rng, (b,)) < prob
  shift = jnp.where(on, jax.random.uniform(shift_rng, (b,), jnp.float32,
                                           -max_semitones, max_semitones), 0.0)
  eq = audio.db_to_log_power(audio.random_equalizer_db(
      eq_rng, b, m, equalizer_db)) / mel_std if equalizer_db > 0 else 0.0
  eq = jnp.where(on[:, None, None], eq, 0.0)
  return warp_mel(mel, shift) + eq, shift
