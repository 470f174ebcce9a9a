"""Blind diarization of one recording: speech activity -> windows -> PLDA ->
AHC -> VBx -> RTTM segments. Model-agnostic: the embedding extractor and the
speech-activity detector come in as callables.

Cost on long recordings: windows W ~ 4 per second of detected speech (0.25 s
shift). AHC is O(W^2) in time and memory, so it runs on at most
`max_ahc_windows` (5000, ~21 min of speech, ~100 MB of pair distances); beyond
that on an evenly spaced subsample, the rest joining the nearest centroid.
VBx is O(W * S * d) per iteration (S = AHC clusters) with O(W * S) memory; its
forward-backward is a Python loop over windows (~10 us per window per
iteration: ~10 s for one hour of speech at 40 iterations). Audio is embedded
`batch_windows` windows at a time and only the PLDA-space vectors are kept
([W, d] float64: ~150 MB for 10 h of speech at d = 128).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.ndimage

from data_pipelines import audio_io
from data_pipelines import augment
# Speech-activity frames and output resolution: the shared 10 ms hop.
from data_pipelines.framing import FRAME_SECONDS, SAMPLE_RATE
from data_pipelines.framing import HOP as _SAMPLES_PER_FRAME
from echo_jax.diarization import plda as plda_lib
from echo_jax.diarization import rttm
from echo_jax.diarization import vbx as vbx_lib


def mono_waveform(waveform) -> np.ndarray:
  """`waveform` as float32 [N], or a ValueError naming its shape."""
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be [N] mono 16 kHz; found shape"
                     f" {waveform.shape}. Use load_audio() to downmix.")
  return waveform


def pad_to(waveform: np.ndarray, length: int) -> np.ndarray:
  """Non-empty `waveform` extended to `length` samples by mirroring its end.

  Not zeros: an edge from a recording's noise floor to digital silence is
  something training never shows the model, and it calls the noise before
  such an edge speech (the cpu model: 97% of the last second of steady noise
  before 0.5 s of zeros, none of the same noise without them).
  """
  extra = length - len(waveform)
  return np.pad(waveform, (0, extra), mode="reflect") if extra > 0 else waveform


# NIST RT convention: a speaker's pauses shorter than 0.3 s do not end a turn.
# Without it, frame-level activity (stop closures, word gaps) splits turns
# into many short pieces, and a +-0.25 s collar then hides most of the speech.
# References are scored with it, so hypotheses follow it too.
MIN_PAUSE_SECONDS = 0.3


@dataclasses.dataclass
class DiarizationConfig(vbx_lib.ClusteringConfig):
  """Window/activity settings on top of the AHC + VBx ones (ClusteringConfig:
  ahc_threshold, ahc_calibrate, max_ahc_windows, Fa, Fb, loop_prob, max_iters,
  epsilon, init_smoothing, min_speaker_prior)."""
  window_seconds: float = 1.5
  shift_seconds: float = 0.25
  activity_threshold: float = 0.5       # Speech where probability > this.
  median_filter_frames: int = 11        # Odd; smooths the 0/1 speech mask.
  min_speech_seconds: float = 0.1       # Shorter speech regions are dropped.
  min_pause_seconds: float = MIN_PAUSE_SECONDS  # Shorter pauses are filled.
  min_segment_seconds: float = 0.0      # Shorter output segments are dropped.
  batch_windows: int = 64               # Windows per embed_windows call.
  lda_dim: int = 128                    # Used when fitting the PLDA.


def fit_plda(embeddings: np.ndarray, labels: np.ndarray,
             cfg: DiarizationConfig) -> plda_lib.PLDABackend:
  """PLDA back-end from train-speaker embeddings [N, D] and labels [N]."""
  return plda_lib.PLDABackend().fit(embeddings, labels, lda_dim=cfg.lda_dim)


def load_audio(path: str) -> np.ndarray:
  """Any audio file (wav, flac, ogg, m4a, mp3, ...) -> [N] float32 16 kHz mono.

  The one audio reader (`data_pipelines.audio_io.read_audio`, as corpus
  preparation uses): NaN/Inf samples raise `BadAudio` (a ValueError naming the
  file) rather than blanking the speech around them; samples beyond [-1, 1]
  are peak-normalised, with a warning.
  """
  return audio_io.read_audio(path).samples


def fill_short_pauses(activity: np.ndarray, max_pause_frames: int
                      ) -> np.ndarray:
  """[K, F] activity with each row's inner inactive runs shorter than
  `max_pause_frames` set active (leading/trailing silence is kept)."""
  return augment.bridge_gaps(np.asarray(activity) > 0.5,
                             max_pause_frames - 1).astype(np.float32)


def speech_regions(probs: np.ndarray, cfg: DiarizationConfig
                   ) -> list[tuple[int, int]]:
  """[F] speech probabilities -> [(start_frame, end_frame)) speech regions."""
  speech = (np.asarray(probs) > cfg.activity_threshold).astype(np.uint8)
  if cfg.median_filter_frames > 1:
    if cfg.median_filter_frames % 2 == 0:
      raise ValueError(f"median_filter_frames must be odd; found"
                       f" {cfg.median_filter_frames}.")
    speech = scipy.ndimage.median_filter(
        speech, size=cfg.median_filter_frames, mode="nearest")
  speech = fill_short_pauses(
      speech[None], round(cfg.min_pause_seconds / FRAME_SECONDS))[0]
  edges = np.diff(np.concatenate([[0], speech, [0]]).astype(np.int8))
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  min_frames = cfg.min_speech_seconds / FRAME_SECONDS
  return [(int(a), int(b)) for a, b in zip(starts, ends) if b - a >= min_frames]


def window_starts(region: tuple[int, int], window_frames: int,
                  shift_frames: int, num_frames: int) -> np.ndarray:
  """Window start frames covering a region [a, b).

  A region shorter than a window gets one window centred on it (clipped to
  the recording; it then also sees some neighbouring audio). Longer regions
  get windows every `shift_frames`, the last one aligned to the region end.
  """
  a, b = region
  if b - a <= window_frames:
    centred = a + (b - a) // 2 - window_frames // 2
    return np.array([min(max(centred, 0), max(num_frames - window_frames, 0))])
  starts = np.arange(a, b - window_frames + 1, shift_frames)
  if starts[-1] + window_frames < b:
    starts = np.append(starts, b - window_frames)
  return starts


def diarize(waveform: np.ndarray, *,
            embed_windows: Callable[[np.ndarray], np.ndarray],
            speech_activity: Callable[[np.ndarray], np.ndarray],
            plda: plda_lib.PLDABackend,
            cfg: DiarizationConfig | None = None,
            file_id: str = "file") -> list[rttm.Segment]:
  """Blind diarization (no oracle speaker count or activity).

  Args:
    waveform: [N] float32 at 16 kHz.
    embed_windows: [W, window_samples] float32 -> [W, D] speaker embeddings.
    speech_activity: [N] waveform -> [F] speech probabilities, one per 10 ms.
    plda: fitted back-end (`fit_plda` / `PLDABackend.load`).
    cfg: settings; defaults to `DiarizationConfig()`.
    file_id: RTTM file id of the returned segments.
  Returns:
    Segments sorted by start; speakers named spk0, spk1, ... Each speech frame
    gets the speaker with the largest posterior summed over the windows that
    cover it (one speaker per frame: no overlap).
  """
  cfg = cfg or DiarizationConfig()
  waveform = mono_waveform(waveform)
  if len(waveform) == 0:
    return []
  num_frames = int(np.ceil(len(waveform) / _SAMPLES_PER_FRAME))
  probs = np.asarray(speech_activity(waveform), np.float64)
  tolerance = max(5, int(0.02 * num_frames))
  if probs.ndim != 1 or abs(len(probs) - num_frames) > tolerance:
    raise ValueError(
        f"speech_activity must return [F ~ {num_frames}] probabilities at"
        f" 10 ms for {len(waveform)} samples; found shape {probs.shape}."
        " Resample the detector's output to 10 ms frames.")
  probs = probs[:num_frames]
  num_frames = len(probs)
  regions = speech_regions(probs, cfg)
  if not regions:
    return []

  window_frames = int(round(cfg.window_seconds / FRAME_SECONDS))
  shift_frames = max(1, int(round(cfg.shift_seconds / FRAME_SECONDS)))
  window_samples = window_frames * _SAMPLES_PER_FRAME
  per_region = [window_starts(r, window_frames, shift_frames, num_frames)
                for r in regions]
  starts = np.concatenate(per_region)
  # Padding lets a recording shorter than one window (or whose last frame
  # runs past the last sample) still be embedded.
  padded = pad_to(waveform, max(window_samples, num_frames * _SAMPLES_PER_FRAME))
  x = _embed_and_transform(padded, starts * _SAMPLES_PER_FRAME,
                           window_samples, embed_windows, plda,
                           cfg.batch_windows)
  _, posteriors = vbx_lib.cluster_with_posteriors(x, plda.phi, cfg)
  num_speakers = posteriors.shape[1]

  frame_speaker = np.full(num_frames, -1, np.int64)
  offset = 0
  for (a, b), region_starts in zip(regions, per_region):
    # Sum each window's posteriors over the region frames it covers, via a
    # difference array (O(frames + windows) per region).
    diff = np.zeros((b - a + 1, num_speakers))
    lo = np.clip(region_starts - a, 0, b - a)
    hi = np.clip(region_starts + window_frames - a, 0, b - a)
    region_post = posteriors[offset:offset + len(region_starts)]
    np.add.at(diff, lo, region_post)
    np.add.at(diff, hi, -region_post)
    frame_speaker[a:b] = np.argmax(np.cumsum(diff, axis=0)[:-1], axis=1)
    offset += len(region_starts)
  activity = frame_speaker[None, :] == np.arange(num_speakers)[:, None]
  segments = rttm.activity_to_segments(
      activity, FRAME_SECONDS, file_id,
      [f"spk{k}" for k in range(num_speakers)],
      min_duration=cfg.min_segment_seconds)
  duration = len(waveform) / SAMPLE_RATE  # Last frame may run past the end.
  return [s if s.end <= duration else
          dataclasses.replace(s, duration=round(float(duration - s.start), 6))
          for s in segments if s.start < duration]


def _embed_and_transform(padded: np.ndarray, start_samples: np.ndarray,
                         window_samples: int,
                         embed_windows: Callable[[np.ndarray], np.ndarray],
                         plda: plda_lib.PLDABackend, batch: int) -> np.ndarray:
  """Embeds windows `batch` at a time -> [W, d] PLDA-space vectors."""
  out = []
  for i in range(0, len(start_samples), batch):
    chunk = np.stack([padded[s:s + window_samples]
                      for s in start_samples[i:i + batch]])
    emb = np.asarray(embed_windows(chunk))
    if emb.ndim != 2 or len(emb) != len(chunk):
      raise ValueError(f"embed_windows must map [{len(chunk)}, samples] to"
                       f" [{len(chunk)}, D]; found {emb.shape}.")
    out.append(plda.transform(emb))
  return np.concatenate(out)
