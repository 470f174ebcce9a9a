"""Room, noise and channel augmentation of mixture examples, on host.

Speaker and activity models trained on clean, digitally silent speech learn
the corpus, not speech: on real recordings their speaker space is no better
than a random encoder's and their speech detector fires on room noise. So the
training stream puts every example through what recordings go through, as the
Kaldi / WeSpeaker / SpeechBrain recipes do (MUSAN noise + room impulse
responses), in this order:

  room     with `p_reverb`, each source is convolved with its own RIR of one
           room (per-source positions), simulated with pyroomacoustics or read
           from a RIRS_NOISES-layout folder. The RIR is shifted so its direct
           path sits at lag 0: the activity labels of the dry source stay
           aligned, and the tail spills into the following frames unlabelled,
           as a diarization reference does.
  noise    with `p_noise`, one noise clip at an SNR drawn in `snr_db`, measured
           against the speech over its active frames: coloured noise
           (1/f^a, a in [0, 2]), babble (4-7 corpus utterances summed), hum
           (mains harmonics and tones), and clips from a MUSAN-layout folder
           when `noise_dir` is given. Babble is made fresh per example
           (`Banks.training_clip`) from utterances of the whole train
           split, the others cropped from a bank.
  channel  with `p_eq` a random smooth equaliser (a peaking biquad and a
           tilt), with `p_bandlimit` a low-pass at 3.4-7 kHz, with
           `p_telephone` a 300-3400 Hz, 8 kHz, 8-bit mu-law channel; then
           a gain in +-`gain_db` (peak-limited).
  noise-only  with `p_noise_only` the example holds no speech (K = 0, activity
           all 0) but noise of one kind (hum and babble made fresh) at a
           level in `noise_only_level_db` dBFS, so the activity head learns
           that noise is not speech. Babble (4-7 summed talkers, none
           followable) is background here, as in a diarization reference:
           without babble-only clips the detector called 74% of the babble
           between utterances speech (against 18% for coloured noise), since
           in training it only ever heard babble under a louder talker.
           `noise_only_babble` weighs babble against each other kind (1:
           as often; 0: never).

Activity labels follow what can be heard: where noise is added, a frame of a
source stays active only if the source is at most `-min_local_snr_db` (10 dB)
under the noise in that frame. The dry rule (within 35 dB of the source's
loudest frame) would otherwise label frames buried 10-35 dB under the noise
as speech and teach the detector to call noise speech. A 0 dB rule errs the
other way: it drops the quiet frames inside a turn that a reference keeps
(blind DER at 10 dB SNR lost 8 points to missed speech with it, against 1
with -10 dB, on held-out mixtures). Evaluation references keep the dry
labels: they are the truth a diarization is scored against. With
`bridge_buried_seconds`, buried frames inside a turn (audible frames of the
same source on both sides, at most that far apart) stay speech, as an
annotator who hears the talker before and after a noise burst marks it: at
0 dB SNR the -10 dB rule alone drops 32% of the reference's speaker time on
held-out mixtures, and a 0.3 s bridge leaves 3% dropped. It is off: after
the cpu stage 2 with 0.3 s, the development set's noisy gaps moved by less
than a point (README, "Rooms, noise and channels").

Everything random comes from the example's rng, so an augmented example is a
pure function of (seed, index) like the rest of the stream. The clip banks
(RIRs, noise) are built once per stream from `bank_seed`, in the process that
builds the stream, and shipped to the workers with the transform.

`sources` stay the reverberant images before noise and channel (what a
separation target is in the reverberant-separation literature); `clean` is the
dry mixture (sum of the dry sources), for terms that want denoising targets.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.signal

from data_pipelines import audio_io
from data_pipelines import framing

log = logging.getLogger(__name__)

NOISE_KINDS = ("coloured", "babble", "hum", "files")
SR = framing.SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation settings (`config.data.augment`); off unless `enabled`."""
  enabled: bool = False
  # Room.
  p_reverb: float = 0.25
  rt60: tuple[float, float] = (0.15, 0.9)   # Seconds (Sabine), simulated.
  rir_seconds: float = 0.5      # RIR kept after the direct path (faded out).
  num_rooms: int = 64           # Simulated rooms, `sources_per_room` each.
  sources_per_room: int = 4
  rir_dir: str = ""             # RIRS_NOISES layout: every .wav below is used.
  # Noise.
  p_noise: float = 0.8
  snr_db: tuple[float, float] = (0.0, 25.0)
  noise_kinds: tuple[str, ...] = ("coloured", "babble", "hum")
  noise_dir: str = ""           # MUSAN layout; adds the kind "files".
  noise_babble: float = 1.0     # Babble's weight among the other kinds.
  bank_clips: int = 16          # Clips per noise kind in the bank.
  bank_seconds: float = 6.0     # Length of each bank clip.
  p_noise_only: float = 0.1
  noise_only_babble: float = 1.0  # Babble's weight among noise-only kinds.
  min_local_snr_db: float = -10.0  # Frames buried deeper are not speech,
  bridge_buried_seconds: float = 0.0  # unless inside a turn (see above).
  noise_only_level_db: tuple[float, float] = (-55.0, -20.0)
  # Channel.
  p_eq: float = 0.4
  p_bandlimit: float = 0.1
  p_telephone: float = 0.05
  gain_db: float = 6.0
  bank_seed: int = 1234

  def __post_init__(self):
    for name in ("p_reverb", "p_noise", "p_noise_only", "p_eq", "p_bandlimit",
                 "p_telephone"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"augment.{name} must be in [0, 1], found "
                         f"{getattr(self, name)}.")
    unknown = set(self.noise_kinds) - set(NOISE_KINDS)
    if unknown:
      raise ValueError(f"augment.noise_kinds has unknown {sorted(unknown)}; "
                       f"known: {NOISE_KINDS}.")
    if self.bridge_buried_seconds < 0:
      raise ValueError("augment.bridge_buried_seconds must be >= 0, found "
                       f"{self.bridge_buried_seconds}.")
    for name in ("noise_babble", "noise_only_babble"):
      if getattr(self, name) < 0:
        raise ValueError(f"augment.{name} is a weight (>= 0), found "
                         f"{getattr(self, name)}.")
    for name in ("rt60", "snr_db", "noise_only_level_db"):
      lo, hi = getattr(self, name)
      if lo > hi:
        raise ValueError(f"augment.{name}=({lo}, {hi}) is not a range.")
    if self.rir_dir and not os.path.isdir(self.rir_dir):
      raise FileNotFoundError(f"augment.rir_dir={self.rir_dir} is not a "
                              "directory.")
    if self.noise_dir and not os.path.isdir(self.noise_dir):
      raise FileNotFoundError(f"augment.noise_dir={self.noise_dir} is not a "
                              "directory.")

  @property
  def kinds(self) -> tuple[str, ...]:
    kinds = tuple(k for k in self.noise_kinds if k != "files")
    return kinds + (("files",) if self.noise_dir else ())

  @property
  def noise_only_kinds(self) -> tuple[str, ...]:
    return tuple(k for k in self.kinds
                 if self.noise_only_babble > 0 or k != "babble")

  def pick_noise_kind(self, rng: np.random.Generator,
                      noise_only: bool = False) -> str:
    """A kind of `kinds` (or `noise_only_kinds`), babble weighted by
    `noise_babble` (or `noise_only_babble`) against 1 for each other kind."""
    kinds = self.noise_only_kinds if noise_only else self.kinds
    babble = self.noise_only_babble if noise_only else self.noise_babble
    weights = np.array([babble if k == "babble" else 1.0 for k in kinds])
    if np.all(weights == weights[0]):   # Uniform: one integer draw.
      return kinds[int(rng.integers(len(kinds)))]
    return kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]


# --- Primitives (pure functions of their inputs; also used by evaluators) ---


def power(x: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Mean square of `x` (over the samples where `mask`, when given). A mask
  of `len(x) // HOP` entries is per activity frame (> 0: counted)."""
  if mask is None or mask.size == x.size:
    if mask is not None:
      x = x[mask]
    return float(np.dot(x, x)) / x.size if x.size else 0.0
  if x.size != mask.size * framing.HOP:
    raise ValueError(f"A mask of {mask.size} entries fits neither the "
                     f"{x.size} samples nor their frames.")
  # Sums of per-frame energies: no masked copy of the samples.
  count = np.count_nonzero(mask) * framing.HOP
  return float(frame_energy(x, mask.size)[mask > 0].sum()) / count if (
      count) else 0.0


def frame_mask(activity: np.ndarray, num_samples: int) -> np.ndarray:
  """Sample mask of frames where any source is active ([S, F] -> [N])."""
  any_active = activity.max(axis=0) > 0 if activity.ndim == 2 else activity > 0
  return np.repeat(any_active, framing.HOP)[:num_samples]


def scale_noise(speech: np.ndarray, noise: np.ndarray, snr_db: float,
                speech_mask: np.ndarray | None = None) -> np.ndarray:
  """`g * noise` with g set so that the speech-to-noise power ratio (speech
  over `speech_mask`, noise over the whole clip) is `snr_db`; zeros when
  either is silent."""
  p_speech = power(speech, speech_mask)
  p_noise = power(noise)
  if p_speech == 0.0 or p_noise == 0.0:
    return np.zeros_like(speech)
  g = np.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
  return (np.float32(g) * noise).astype(np.float32, copy=False)


def add_noise(speech: np.ndarray, noise: np.ndarray, snr_db: float,
              speech_mask: np.ndarray | None = None) -> np.ndarray:
  """`speech + g * noise` at `snr_db` (see `scale_noise`)."""
  return (speech + scale_noise(speech, noise, snr_db, speech_mask)
          ).astype(np.float32, copy=False)


def frame_energy(wave: np.ndarray, num_frames: int) -> np.ndarray:
  """Sum of squares per activity frame ([..., N] -> [..., num_frames]; a
  short tail is zero-padded)."""
  hop = framing.HOP
  if wave.shape[-1] == num_frames * hop:   # The usual case: no padded copy.
    frames = wave.reshape(wave.shape[:-1] + (num_frames, hop))
  else:
    padded = np.zeros(wave.shape[:-1] + (num_frames * hop,), np.float32)
    m = min(wave.shape[-1], padded.shape[-1])
    padded[..., :m] = wave[..., :m]
    frames = padded.reshape(wave.shape[:-1] + (num_frames, hop))
  return np.einsum("...h,...h->...", frames, frames)


def bridge_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
  """`mask` [..., F] with every run of at most `max_gap` False frames that
  has a True frame on both sides set True (runs at the edges stay)."""
  if max_gap <= 0:
    return mask
  f = mask.shape[-1]
  frames = np.arange(f)
  last_on = np.maximum.accumulate(np.where(mask, frames, -1), axis=-1)
  next_on = np.flip(np.minimum.accumulate(
      np.flip(np.where(mask, frames, f), axis=-1), axis=-1), axis=-1)
  return mask | ((last_on >= 0) & (next_on < f)
                 & (next_on - last_on - 1 <= max_gap))


def audible_activity(activity: np.ndarray, sources: np.ndarray,
                     noise: np.ndarray, min_local_snr_db: float,
                     bridge_frames: int = 0) -> np.ndarray:
  """Activity [S, F] with the frames where a source is more than
  `min_local_snr_db` under `noise` (same frame) set to 0, except buried
  frames in a gap of at most `bridge_frames` between audible ones."""
  f = activity.shape[-1]
  noise_e = frame_energy(noise, f) * 10.0 ** (min_local_snr_db / 10.0)
  out = np.zeros_like(activity)
  for s in np.flatnonzero(activity.any(axis=-1)):  # Absent slots stay 0.
    audible = (activity[s] > 0) & (frame_energy(sources[s], f) >= noise_e)
    out[s] = activity[s] * bridge_gaps(audible, bridge_frames)
  return out


def block_fft_len(rir_len: int) -> int:
  """FFT length of `convolve`'s overlap-add blocks for an RIR: a power of
  two >= 2 x the RIR (so a block's tail spills into the next block only),
  and >= 16384, which measured fastest for RIRs of 0.2-0.5 s (FFTs of
  48k+ points run out of cache and cost 3x the 16k points per sample)."""
  return max(16384, 1 << (2 * rir_len - 1).bit_length())


def rir_spectrum(rir: np.ndarray) -> np.ndarray:
  """`rfft` of `rir` at `block_fft_len` (what `convolve` multiplies by)."""
  return scipy.fft.rfft(rir.astype(np.float32, copy=False),
                        block_fft_len(len(rir)))


def convolve(source: np.ndarray, rir: np.ndarray,
             span: tuple[int, int] | None = None,
             spectrum: np.ndarray | None = None) -> np.ndarray:
  """`source` through `rir` (direct path at lag 0), cut to the source length.
  Only `span` [a, b), the source's non-zero samples (found when not given),
  is transformed: sources are mostly silence and the FFT is the cost. The
  span is cut into blocks, all transformed in one call, and overlap-added;
  `spectrum` (`rir_spectrum(rir)`, cached by the caller) saves an FFT."""
  n = len(source)
  if span is None:
    nz = np.flatnonzero(source)
    if not nz.size:
      return np.zeros_like(source)
    span = (nz[0], nz[-1] + 1)
  a, b = span
  if b <= a:
    return np.zeros_like(source)
  taps, m = len(rir), b - a
  nfft = block_fft_len(taps)
  step = nfft - taps + 1          # Block length; its tail is taps - 1 long.
  blocks, full = -(-m // step), m // step
  # The FFT transforms rows in SIMD groups of 4: 2 or 3 rows cost more than
  # 4 (measured), so such a count is padded with rows of zeros.
  x = np.zeros((blocks + (-blocks % 4 if blocks % 4 > 1 else 0), nfft),
               np.float32)
  x[:full, :step] = source[a:a + full * step].reshape(full, step)
  x[full:blocks, :m - full * step] = source[a + full * step:b]
  if spectrum is None:
    spectrum = rir_spectrum(rir)
  spec = scipy.fft.rfft(x, axis=-1)
  spec *= spectrum
  wet = scipy.fft.irfft(spec, nfft, axis=-1)
  # Overlap-add: block i lands at a + i * step, its tail on block i + 1.
  out = np.zeros(max(n, a + (blocks + 1) * step), source.dtype)
  out[a:a + blocks * step].reshape(blocks, step)[:] = wet[:blocks, :step]
  out[a + step:a + (blocks + 1) * step].reshape(blocks, step)[
      :, :taps - 1] += wet[:blocks, step:]
  out[b + taps - 1:] = 0.0        # FFT rounding past the tail's end.
  return out[:n]


def reverberate(source: np.ndarray, rir: np.ndarray,
                mask: np.ndarray | None = None,
                span: tuple[int, int] | None = None,
                spectrum: np.ndarray | None = None) -> np.ndarray:
  """`convolve`, rescaled to the dry source's power over `mask` (the level
  design of the stream stays: each source's gain is still the drawn one)."""
  wet = convolve(source, rir, span, spectrum)
  p_dry, p_wet = power(source, mask), power(wet, mask)
  if p_wet > 0:
    wet *= np.float32(np.sqrt(p_dry / p_wet))
  return wet


@functools.cache
def _butter(order: int, cutoff, btype: str = "lowpass") -> np.ndarray:
  # Designing a filter costs more than running it on a clip: cache them.
  return scipy.signal.butter(order, cutoff, btype, fs=SR, output="sos")


def mu_law(x: np.ndarray, peak: float, mu: float = 255.0,
           levels: int = 127) -> np.ndarray:
  """`x` (|x| <= peak) through an 8-bit mu-law (G.711) coder and back: the
  magnitude's code is rounded to `levels` steps and read from a table."""
  scale = levels / np.log1p(mu)   # A Python float: keeps x's precision.
  code = np.rint(np.log1p(np.abs(x) * (mu / peak)) * scale)
  table = np.expm1(np.arange(levels + 1) / scale) * (peak / mu)
  return np.copysign(table.astype(x.dtype)[code.astype(np.intp)], x)


def telephone(x: np.ndarray) -> np.ndarray:
  """Narrowband channel: 300-3400 Hz band-pass, 8 kHz round trip (decimate,
  then hold each sample twice: the imaging is what a cheap upsampler leaves),
  and 8-bit mu-law (G.711) quantisation."""
  band = _butter(4, (300, 3400), "bandpass")
  # float64 before the quantiser (as fast here: the recursion is the cost),
  # so that float32 rounding flips no code; float32 after it.
  narrow = scipy.signal.sosfilt(band, x)[::2]
  peak = max(float(np.max(np.abs(narrow))), 1e-9)
  # Back at 16 kHz through the same band-pass, which removes the images.
  wide = np.repeat(mu_law(narrow, peak).astype(np.float32), 2)[:len(x)]
  return scipy.signal.sosfilt(band.astype(np.float32), wide)


def lowpass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
  """4th-order Butterworth low-pass (cutoff rounded to 100 Hz: cached)."""
  sos = _butter(4, float(round(cutoff_hz, -2))).astype(np.float32)
  # float32 sections: the clip is filtered in float32, without copies.
  return scipy.signal.sosfilt(sos, x.astype(np.float32, copy=False))


def _peaking(f0: float, gain_db: float, q: float) -> np.ndarray:
  """One peaking-EQ biquad (RBJ audio-EQ cookbook) as an SOS row."""
  a = 10.0 ** (gain_db / 40.0)
  w0 = 2 * np.pi * f0 / SR
  alpha = np.sin(w0) / (2 * q)
  b = np.array([1 + alpha * a, -2 * np.cos(w0), 1 - alpha * a])
  den = np.array([1 + alpha / a, -2 * np.cos(w0), 1 - alpha / a])
  return np.concatenate([b / den[0], den / den[0]])


def equalise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random smooth equaliser: a peaking band of +-10 dB and a first-order
  tilt, i.e. the colouring of a cheap microphone or a codec (cheap enough
  for every example)."""
  peak = _peaking(rng.uniform(150, 6000), rng.uniform(-10, 10),
                  rng.uniform(0.5, 2.0))
  tilt = rng.uniform(-0.6, 0.6)       # x[n] - tilt x[n-1], normalised.
  b, a = eq_coefficients(peak, tilt)
  return scipy.signal.lfilter(b, a, x.astype(np.float32, copy=False))


def eq_coefficients(peak: np.ndarray, tilt: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """float32 (b, a) of the peaking biquad `peak` (SOS row) followed by the
  tilt FIR [1, -tilt] / (1 + |tilt|): the FIR folds into the numerator, so
  the equaliser is one pass of one filter."""
  b = np.convolve(peak[:3], (1.0, -tilt)) / (1 + abs(tilt))
  return b.astype(np.float32), peak[3:].astype(np.float32)


def coloured_noise(rng: np.random.Generator, n: int,
                   exponent: float) -> np.ndarray:
  """Gaussian noise with power spectrum ~ 1/f^exponent (0 white, 1 pink,
  2 brown), unit power."""
  spec = scipy.fft.rfft(rng.standard_normal(n))
  f = np.fft.rfftfreq(n, 1.0 / SR)
  f[0] = f[1]
  x = scipy.fft.irfft(spec * f ** (-exponent / 2.0), n)
  return (x / np.sqrt(np.mean(x ** 2))).astype(np.float32)


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
  """Mains hum (50 or 60 Hz and decaying harmonics) plus 0-2 steady tones."""
  base = rng.choice((50.0, 60.0))
  # The harmonics repeat every SR / gcd(SR, base) samples (320 at 50 Hz, 800
  # at 60 Hz): compute one period and tile it (seven sines over a whole clip
  # cost more than the rest of an augmented example).
  period = SR // np.gcd(SR, int(base))
  t = np.arange(period) / SR
  one = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * base * h * t
                                                + rng.uniform(0, 2 * np.pi))
            for h in range(1, 8))
  x = np.tile(one.astype(np.float32), -(-n // period))[:n]
  t = np.arange(n, dtype=np.float32) / np.float32(SR)  # float32: fast sines.
  for _ in range(rng.integers(0, 3)):
    x += np.float32(rng.uniform(0.05, 0.5)) * np.sin(
        np.float32(2 * np.pi * rng.uniform(200, 4000)) * t)
  return x / np.float32(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# --- Banks ---


def simulate_rirs(num_rooms: int, sources_per_room: int,
                  rt60: tuple[float, float], seconds: float,
                  seed: int) -> list[list[np.ndarray]]:
  """Per simulated shoebox room, the RIRs of `sources_per_room` positions to
  one microphone (pyroomacoustics image sources). Room 3-10 x 3-8 x 2.4-4 m;
  absorption from the drawn RT60 by Sabine's formula; image order capped at
  17 (the late tail beyond it is a statistical exponential decay of the same
  RT60: full-order image sources cost seconds per room)."""
  import pyroomacoustics as pra  # Only needed to build the bank.
  rng = np.random.default_rng(seed)
  rooms = []
  for _ in range(num_rooms):
    dims = rng.uniform((3.0, 3.0, 2.4), (10.0, 8.0, 4.0))
    target = rng.uniform(*rt60)
    try:
      absorption, max_order = pra.inverse_sabine(target, dims)
    except ValueError:   # RT60 too long for this room: the room's maximum.
      absorption, max_order = 0.01, 40
    room = pra.ShoeBox(dims, fs=SR, materials=pra.Material(absorption),
                       max_order=min(max_order, 17))
    room.add_microphone(rng.uniform(0.5, dims - 0.5))
    for _ in range(sources_per_room):
      room.add_source(rng.uniform(0.5, dims - 0.5))
    room.compute_rir()
    rooms.append([_late_tail(_align(np.asarray(h, np.float64), seconds),
                             target, rng) for h in room.rir[0]])
  return rooms


def _align(rir: np.ndarray, seconds: float) -> np.ndarray:
  """Direct path (the peak) to lag 0, cut to `seconds`, 10 ms fade-out."""
  rir = rir[int(np.argmax(np.abs(rir))):][:max(1, int(seconds * SR))]
  rir = rir / np.abs(rir[0])
  fade = min(len(rir), int(0.01 * SR))
  rir[len(rir) - fade:] *= np.linspace(1.0, 0.0, fade)
  return rir


def _late_tail(rir: np.ndarray, rt60: float,
               rng: np.random.Generator) -> np.ndarray:
  """Adds an exponentially decaying noise tail (60 dB per `rt60`) starting
  where the truncated image-source response thins out (its last 20%), at the
  energy the response has there."""
  n = len(rir)
  start = int(0.8 * np.flatnonzero(rir)[-1]) if np.any(rir[1:]) else 1
  start = max(start, 1)
  t = np.arange(n - start) / SR
  envelope = np.exp(-6.9 * t / rt60)
  level = np.sqrt(np.mean(rir[start:] ** 2)) if n > start else 0.0
  out = rir.astype(np.float32)
  out[start:] += (level * envelope * rng.standard_normal(n - start)
                  ).astype(np.float32)
  return out


def read_rirs(rir_dir: str, seconds: float) -> list[list[np.ndarray]]:
  """Every .wav below `rir_dir`, aligned and cut; one "room" per folder."""
  by_folder: dict[str, list[np.ndarray]] = {}
  skipped = 0
  for path in sorted(glob.glob(os.path.join(rir_dir, "**", "*.wav"),
                               recursive=True)):
    try:
      audio = audio_io.read_audio(path).samples
    except audio_io.BadAudio as e:
      skipped += 1
      log.warning("RIR %s skipped: %s", path, e)
      continue
    by_folder.setdefault(os.path.dirname(path), []).append(
        _align(audio.astype(np.float64), seconds).astype(np.float32))
  if not by_folder:
    raise ValueError(f"augment.rir_dir={rir_dir} holds no readable .wav "
                     f"({skipped} skipped).")
  log.info("RIR bank: %d rooms from %s (%d files skipped).", len(by_folder),
           rir_dir, skipped)
  return list(by_folder.values())


def read_noise_clips(noise_dir: str, count: int, seconds: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
  """`count` random crops of random audio files below `noise_dir`."""
  paths = sorted(p for ext in ("wav", "flac", "ogg")
                 for p in glob.glob(os.path.join(noise_dir, "**", f"*.{ext}"),
                                    recursive=True))
  if not paths:
    raise ValueError(f"augment.noise_dir={noise_dir} holds no audio file.")
  clips, n = [], int(seconds * SR)
  for path in rng.permutation(paths):
    if len(clips) == count:
      break
    try:
      audio = audio_io.read_audio(str(path)).samples
    except audio_io.BadAudio as e:
      log.warning("Noise file %s skipped: %s", path, e)
      continue
    if power(audio) == 0.0:
      continue
    start = int(rng.integers(max(1, len(audio) - n + 1)))
    clips.append(audio[start:start + n].astype(np.float32))
  if not clips:
    raise ValueError(f"augment.noise_dir={noise_dir}: no usable noise file.")
  return clips


def babble(utterances: Sequence[np.ndarray], rng: np.random.Generator,
           n: int) -> np.ndarray:
  """4-7 of `utterances` (any numeric dtype: the stream's are the stored
  int16), each looped over the whole clip from a random offset (so no
  stretch of the clip is without talkers), brought to unit power over the
  clip, summed.

  Each talker is looped into one float32 buffer straight from its stored
  type, measured and scaled there: no float copy of the whole utterance
  (that copy and its power were half of babble's cost)."""
  out = np.zeros(n, np.float32)
  talker = np.empty(n, np.float32)
  for i in rng.choice(len(utterances), size=min(len(utterances),
                                                int(rng.integers(4, 8))),
                      replace=False):
    u = utterances[i]
    if not len(u):
      continue
    pos, offset = 0, int(rng.integers(len(u)))
    while pos < n:  # The loop, slice by slice (no tiled copy).
      m = min(n - pos, len(u) - offset)
      talker[pos:pos + m] = u[offset:offset + m]
      pos, offset = pos + m, 0
    p = power(talker)
    if p == 0.0:
      continue
    talker *= np.float32(1.0 / np.sqrt(p))
    out += talker
  return out


@dataclasses.dataclass
class Banks:
  rooms: list[list[np.ndarray]]              # Room -> RIRs of its positions.
  noise: dict[str, list[np.ndarray]]         # Kind -> clips.
  speech: Sequence[np.ndarray] | None = None  # Utterances babble sums.
  # (room, position) -> `rir_spectrum`, filled as RIRs are used; not pickled
  # (each worker fills its own: shipping them would cost more than the FFTs).
  spectra: dict[tuple[int, int], np.ndarray] = dataclasses.field(
      default_factory=dict, repr=False, compare=False)

  def __getstate__(self):
    return {**self.__dict__, "spectra": {}}

  def rir(self, room: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """An RIR of the bank and its (cached) `rir_spectrum`."""
    rir = self.rooms[room][position]
    key = (room, position)
    if key not in self.spectra:
      self.spectra[key] = rir_spectrum(rir)
    return rir, self.spectra[key]

  @classmethod
  def build(cls, cfg: AugmentConfig,
            speech: Sequence[np.ndarray] | None = None) -> Banks:
    """`speech`: utterances for babble (the stream passes the whole train
    split, read on access)."""
    rng = np.random.default_rng(cfg.bank_seed)
    if cfg.rir_dir:
      rooms = read_rirs(cfg.rir_dir, cfg.rir_seconds)
    else:
      rooms = simulate_rirs(cfg.num_rooms, cfg.sources_per_room, cfg.rt60,
                            cfg.rir_seconds, cfg.bank_seed)
    n = int(cfg.bank_seconds * SR)
    noise: dict[str, list[np.ndarray]] = {}
    for kind in cfg.kinds:
      if kind == "coloured":
        noise[kind] = [coloured_noise(rng, n, rng.uniform(0.0, 2.0))
                       for _ in range(cfg.bank_clips)]
      elif kind == "hum":
        noise[kind] = [hum(rng, n) for _ in range(cfg.bank_clips)]
      elif kind == "babble":
        if not speech:
          raise ValueError("Babble noise needs speech utterances.")
        noise[kind] = [babble(speech, rng, n) for _ in range(cfg.bank_clips)]
      elif kind == "files":
        noise[kind] = read_noise_clips(cfg.noise_dir, cfg.bank_clips,
                                       cfg.bank_seconds, rng)
    return cls(rooms, noise, speech if "babble" in noise else None)

  def noise_clip(self, kind: str, n: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A random `n`-sample crop of a random clip of `kind` (tiled if short)."""
    clip = self.noise[kind][int(rng.integers(len(self.noise[kind])))]
    if len(clip) < n:
      clip = np.tile(clip, -(-n // len(clip)))
    start = int(rng.integers(len(clip) - n + 1))
    return clip[start:start + n]

  def training_clip(self, kind: str, n: int, rng: np.random.Generator, *,
                    noise_only: bool = False) -> np.ndarray:
    """A clip of `kind` for a training example: babble, and the hum of a
    noise-only example, made fresh from `rng`; otherwise a bank crop
    (evaluations always crop their own bank).

    Babble is summed per example from kept utterances, as Kaldi's recipe
    sums 3-7 MUSAN speech files per utterance, rather than cropped from a
    few bank clips. Noise-only hum is fresh too: a 16-clip bank is 16 sets
    of tones, and the head called the evaluation's other tones speech (7.7%
    false alarm on noise-only hum against 1.1% on coloured noise, whose
    random crops of Gaussian noise the bank covers); fresh hum moved that
    only to 6.8% after stage 2, so variety is not all that was missing.
    Under speech, bank hum is kept: a fresh hum costs about 0.7 ms, a third
    of an augmented example.
    """
    if kind == "hum" and noise_only:
      return hum(rng, n)
    if kind == "babble" and self.speech:
      return babble(self.speech, rng, n)
    return self.noise_clip(kind, n, rng)


# --- The example transform ---


def augment_example(ex: dict[str, np.ndarray], cfg: AugmentConfig,
                    banks: Banks, rng: np.random.Generator) -> None:
  """Augments a mixture example in place (keys: see `mixtures.py`); adds
  `clean`, the dry mixture."""
  mixture, sources, activity = ex["mixture"], ex["sources"], ex["activity"]
  n = len(mixture)
  k = int(ex["num_speakers"])
  # Every step below makes a new mixture array: the dry one needs no copy.
  ex["clean"] = mixture

  if k and rng.random() < cfg.p_reverb:
    room = int(rng.integers(len(banks.rooms)))
    picks = rng.permutation(len(banks.rooms[room]))
    for slot in range(k):
      rir, spectrum = banks.rir(room, int(picks[slot % len(picks)]))
      sources[slot] = reverberate(sources[slot], rir, activity[slot],
                                  tuple(ex["segments"][slot]), spectrum)
    mixture = sources[:k].sum(axis=0)

  if k == 0 and ex.get("noise_only", False) and cfg.noise_only_kinds:
    kind = cfg.pick_noise_kind(rng, noise_only=True)
    noise = banks.training_clip(kind, n, rng, noise_only=True)
    level = 10.0 ** (rng.uniform(*cfg.noise_only_level_db) / 20.0)
    mixture = (np.float32(level / np.sqrt(max(power(noise), 1e-20)))
               * noise).astype(np.float32, copy=False)
  elif k and rng.random() < cfg.p_noise:
    kind = cfg.pick_noise_kind(rng)
    # A per-frame mask: `power` sums frame energies, no masked copies.
    noise = scale_noise(mixture, banks.training_clip(kind, n, rng),
                        rng.uniform(*cfg.snr_db), activity.max(axis=0))
    mixture = mixture + noise
    ex["activity"] = audible_activity(
        activity, sources, noise, cfg.min_local_snr_db,
        round(cfg.bridge_buried_seconds / framing.FRAME_SECONDS))

  if rng.random() < cfg.p_eq:
    mixture = equalise(mixture, rng)
  if rng.random() < cfg.p_bandlimit:
    mixture = lowpass(mixture, rng.uniform(3400.0, 7000.0))
  if rng.random() < cfg.p_telephone:
    mixture = telephone(mixture)
  mixture = mixture * np.float32(10.0 ** (rng.uniform(-cfg.gain_db,
                                                      cfg.gain_db) / 20.0))
  peak = max(float(mixture.max()), -float(mixture.min())) if n else 0.0
  if peak > 0.99:
    mixture *= np.float32(0.99 / peak)
  ex["mixture"] = mixture.astype(np.float32, copy=False)
  ex.pop("noise_only", None)
  ex.pop("segments", None)


# --- Fixed evaluation conditions ---

# Name -> what is done to a clean clip. Evaluators report each one.
CONDITIONS = ("clean", "snr20", "snr10", "snr0", "reverb", "telephone")


def speech_samples(wave: np.ndarray, rel_db: float = -35.0,
                   floor_db: float = -60.0) -> np.ndarray:
  """Sample mask of the frames within `rel_db` of the loudest frame and above
  `floor_db` dBFS (the stream's activity rule, for a clip without labels)."""
  n = len(wave) // framing.HOP * framing.HOP
  energy = np.mean(np.square(wave[:n].reshape(-1, framing.HOP)), axis=1)
  if not energy.size or energy.max() == 0:
    return np.zeros(len(wave), bool)
  active = energy > max(energy.max() * 10 ** (rel_db / 10),
                        10 ** (floor_db / 10))
  mask = np.zeros(len(wave), bool)
  mask[:n] = np.repeat(active, framing.HOP)
  return mask


def condition_noise_kind(banks: Banks, rng: np.random.Generator) -> str:
  """The noise kind of a noisy condition: `apply_condition`'s first draw, so
  an rng seeded alike tells which kind a condition added."""
  kinds = sorted(banks.noise)
  return kinds[int(rng.integers(len(kinds)))]


def apply_condition(wave: np.ndarray, condition: str, banks: Banks,
                    rng: np.random.Generator,
                    speech_mask: np.ndarray | None = None) -> np.ndarray:
  """`wave` under one of `CONDITIONS` (noise: a random kind of `banks` at the
  condition's SNR against the speech in `speech_mask`, default
  `speech_samples`; reverb: a random RIR of `banks`)."""
  if condition == "clean":
    return wave
  if condition.startswith("snr"):
    noise = banks.noise_clip(condition_noise_kind(banks, rng), len(wave), rng)
    mask = speech_samples(wave) if speech_mask is None else speech_mask
    return add_noise(wave, noise, float(condition[3:]), mask)
  if condition == "reverb":
    room = banks.rooms[int(rng.integers(len(banks.rooms)))]
    rir = room[int(rng.integers(len(room)))]
    mask = speech_samples(wave) if speech_mask is None else speech_mask
    return reverberate(wave, rir, mask)
  if condition == "telephone":
    return telephone(wave)
  raise ValueError(f"Unknown condition {condition!r}; known: {CONDITIONS}.")
