"""The one audio reader: any audio file -> validated 16 kHz mono float32.

Corpus preparation (`prepare.py`), diarization (`tools/diarize.py`,
`echo_jax.diarization.pipeline.load_audio`) and everything else that reads an
audio file goes through `read_audio`, so a file is either read the same way
everywhere or refused everywhere with the same reason:

  decode     PyAV (FFmpeg) for AAC/MP4/MP3, soundfile (libsndfile) for
             WAV/FLAC/OGG; a decoder error is `BadAudio(UNREADABLE)`.
  validate   NaN or Inf samples: `BadAudio(NON_FINITE)` naming the file and
             where (never passed on: NaN silently blanks whole windows
             downstream); 0 bytes / 0 samples: `BadAudio(EMPTY)`.
  downmix    mean over channels.
  resample   to `framing.SAMPLE_RATE` with soxr (high quality).
  range      samples beyond [-1, 1] (a float file written at integer scale,
             codec or resampler overshoot) are peak-normalised to full scale
             and the gain logged; they are never clipped. Rescaling, not
             skipping: the waveform is intact, only its level is off, and
             nothing downstream depends on the absolute level (the mixture
             stream normalises every source's level, speaker embeddings are
             level-invariant), whereas clipping a file peaking at 1e6 stores
             a square wave.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from data_pipelines.framing import SAMPLE_RATE

log = logging.getLogger(__name__)

# Decoder per extension: compressed containers go through PyAV (FFmpeg), since
# libsndfile (and so soundfile/librosa) cannot read AAC.
PYAV_EXTS = frozenset({".m4a", ".aac", ".mp4", ".mp3"})
SOUNDFILE_EXTS = frozenset({".wav", ".flac", ".ogg"})
AUDIO_EXTS = PYAV_EXTS | SOUNDFILE_EXTS

# Reasons a file is refused (also skip reasons of corpus preparation).
UNREADABLE = "unreadable"            # Decoder error: corrupt, truncated, ...
NO_AUDIO_STREAM = "no_audio_stream"  # A container without an audio stream.
EMPTY = "empty"                      # Zero bytes or zero samples.
NON_FINITE = "non_finite"            # NaN or Inf samples.

# Peak after rescaling an out-of-range file: the largest level int16 storage
# holds (32767 / 32768), so storing it needs no clipping either.
FULL_SCALE = 32767 / 32768


class BadAudio(ValueError):
  """A file that cannot be used; `reason` is one of the reasons above (or a
  caller's own, e.g. preparation's `too_short`), `detail` says more."""

  def __init__(self, reason: str, detail: str = "", path: str = ""):
    super().__init__(f"{path}: {reason}: {detail}" if path
                     else f"{reason}: {detail}")
    self.reason, self.detail, self.path = reason, detail, path


@dataclasses.dataclass(frozen=True)
class Audio:
  """What `read_audio` returns."""
  samples: np.ndarray  # float32 [T] at SAMPLE_RATE, mono, within [-1, 1].
  source_rate: int     # Rate of the file.
  channels: int        # Channels of the file (before the downmix).
  peak: float          # max |sample| after downmix + resampling, before `gain`.
  gain: float = 1.0    # Applied to bring an out-of-range peak to FULL_SCALE.

  @property
  def converted(self) -> bool:
    """Downmixed and/or resampled."""
    return self.channels > 1 or self.source_rate != SAMPLE_RATE

  @property
  def rescaled(self) -> bool:
    return self.gain != 1.0


def extension(path: str) -> str:
  """Lower-case extension with its dot: "a/b.M4A" -> ".m4a"."""
  return os.path.splitext(path)[1].lower()


def _decode_pyav(path: str) -> tuple[np.ndarray, int]:
  """-> (float32 `[channels, time]`, sample rate) through FFmpeg."""
  import av  # Deferred: only compressed inputs need FFmpeg.
  with av.open(path) as container:
    if not container.streams.audio:
      raise BadAudio(NO_AUDIO_STREAM, f"streams: {list(container.streams)}")
    stream = container.streams.audio[0]
    # Converts only the sample format (s16, fltp, ...) to planar float; layout
    # and rate are kept so downmix and resampling are ours (soxr), not swr's.
    resampler = av.AudioResampler(format="fltp")
    blocks, rate = [], stream.rate
    for frame in container.decode(stream):
      rate = frame.sample_rate
      blocks += [f.to_ndarray() for f in resampler.resample(frame)]
    blocks += [f.to_ndarray() for f in resampler.resample(None)]
  if not blocks:
    raise BadAudio(EMPTY, "no decoded frames")
  return np.concatenate(blocks, axis=1), rate


def _decode_soundfile(path: str) -> tuple[np.ndarray, int]:
  """-> (float32 `[channels, time]`, sample rate) through libsndfile."""
  import soundfile
  audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
  return audio.T, rate


def decode(path: str) -> tuple[np.ndarray, int]:
  """Decodes a file as stored: (float32 `[channels, time]`, sample rate).

  Raises FileNotFoundError / IsADirectoryError for a path that is no file,
  `BadAudio` (without its path) for one that does not decode.
  """
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; expected an audio file "
                            f"({', '.join(sorted(AUDIO_EXTS))}).")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Audio file {path} does not exist.")
  if os.path.getsize(path) == 0:
    raise BadAudio(EMPTY, "0 bytes")
  reader = _decode_pyav if extension(path) in PYAV_EXTS else _decode_soundfile
  try:
    audio, rate = reader(path)
  except BadAudio:
    raise
  except Exception as e:  # noqa: BLE001
    # Decoders raise many types for damaged files (FFmpeg InvalidDataError,
    # LibsndfileError, EOFError, ...); all mean the same to a caller.
    raise BadAudio(UNREADABLE, f"{type(e).__name__}: {e}") from e
  return audio, rate


def read_audio(path: str) -> Audio:
  """Decodes, validates, downmixes, resamples and range-checks one file.

  Returns `Audio` (samples float32 [T] at 16 kHz, mono, within [-1, 1]).
  Raises `BadAudio` (a ValueError whose message names the file and reason)
  for an undecodable, empty or non-finite file; FileNotFoundError /
  IsADirectoryError for a path that is no file. See the module docstring.
  """
  try:
    audio, rate = decode(path)
  except BadAudio as e:
    if e.path:
      raise
    raise BadAudio(e.reason, e.detail, path) from e.__cause__
  return condition(audio, rate, path)


def condition(audio: np.ndarray, rate: int, name: str) -> Audio:
  """Validates, downmixes, resamples and range-checks decoded audio
  [channels, T] (or [T]) at `rate`; `name` (a path, "input 3") is what errors
  and warnings call it. What `read_audio` does after decoding, for arrays."""
  audio = np.asarray(audio, np.float32)
  audio = audio[None] if audio.ndim == 1 else audio
  if audio.ndim != 2:
    raise BadAudio(UNREADABLE, f"expected [samples] or [channels, samples], "
                   f"found shape {audio.shape}", name)
  if audio.size == 0:
    raise BadAudio(EMPTY, "0 samples", name)
  finite = np.isfinite(audio)
  if not finite.all():
    bad = np.flatnonzero(~finite.all(axis=0))
    raise BadAudio(NON_FINITE, f"{bad.size} of {audio.shape[1]} samples are "
                   f"NaN or Inf, the first at {bad[0] / rate:.3f} s", name)
  mono = audio.mean(axis=0, dtype=np.float32)
  if rate != SAMPLE_RATE:
    import librosa  # Deferred: heavy import, and 16 kHz inputs never need it.
    mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE,
                            res_type="soxr_hq")
  mono = np.ascontiguousarray(mono, dtype=np.float32)
  peak = float(np.abs(mono).max()) if mono.size else 0.0
  gain = 1.0
  if peak > 1.0:
    gain = FULL_SCALE / peak
    mono *= np.float32(gain)
    log.warning("%s: samples reach %.4g, beyond [-1, 1]; peak-normalised "
                "(gain %.4g) instead of clipping.", name, peak, gain)
  return Audio(mono, int(rate), int(audio.shape[0]), peak, gain)
