"""Overlap-aware diarization (local-global, as EEND-VC and pyannote do):
model-agnostic NumPy back-end.

1. Local: windows of several seconds with 50% hop; in each, a router gives
   per-slot existence, frame activity and a speaker embedding per slot.
2. Global: the embeddings of every existing, active slot go to the PLDA
   space and are clustered by AHC-initialised VBx (`loop_prob` 0 by
   default: slots are not a time sequence, so VBx acts as a Bayesian GMM).
3. Cannot-link: within a window, slots are assigned to distinct clusters by
   a least-cost assignment on -log posteriors (two slots of one window are
   two speakers).
4. Activities are overlap-added per cluster (averaged over the windows that
   cover a frame), thresholded and turned into segments, so overlapped speech
   gets two labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.ndimage
from scipy.optimize import linear_sum_assignment

from data_pipelines.framing import FRAME_SECONDS, HOP, SAMPLE_RATE
from echo_jax.diarization import pipeline
from echo_jax.diarization import plda as plda_lib
from echo_jax.diarization import rttm
from echo_jax.diarization import vbx as vbx_lib

# [W, window_samples] -> (existence [W, S], frame activity [W, S, F_w],
# embeddings [W, S, D]); probabilities in [0, 1], frames at 10 ms.
RouteWindows = Callable[[np.ndarray],
                        tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclasses.dataclass
class OverlapConfig(vbx_lib.ClusteringConfig):
  """Local-global settings on top of the AHC + VBx ones."""
  window_seconds: float = 4.0         # The router's training clip length.
  hop_fraction: float = 0.5
  existence_threshold: float = 0.5
  activity_threshold: float = 0.5
  min_slot_seconds: float = 0.2       # Slots active less are dropped.
  median_filter_frames: int = 11      # Odd; smooths each speaker's track.
  min_pause_seconds: float = pipeline.MIN_PAUSE_SECONDS  # Filled if shorter.
  min_segment_seconds: float = 0.0
  loop_prob: float = 0.0              # Slot embeddings are not a sequence.


def window_starts(num_frames: int, window_frames: int, hop_frames: int
                  ) -> np.ndarray:
  """Window start frames every `hop_frames`; the last window ends at the
  recording end (a recording shorter than one window gets one window)."""
  if num_frames <= window_frames:
    return np.array([0])
  starts = np.arange(0, num_frames - window_frames + 1, hop_frames)
  if starts[-1] + window_frames < num_frames:
    starts = np.append(starts, num_frames - window_frames)
  return starts


def cannot_link_assign(posteriors: np.ndarray) -> np.ndarray:
  """`[n, C]` posteriors of one window's slots -> `[n]` clusters, distinct
  where n <= C (max total log posterior); slots beyond C take their best."""
  cost = -np.log(np.maximum(posteriors, 1e-12))
  labels = np.argmax(posteriors, axis=1)
  rows, cols = linear_sum_assignment(cost)
  labels[rows] = cols
  return labels


def overlap_add(num_frames: int, starts: np.ndarray,
                items: list[tuple[int, int]], activity: np.ndarray,
                labels: np.ndarray, num_clusters: int) -> np.ndarray:
  """Averaged cluster activity `[C, num_frames]`: each window adds its
  slots' activity to their clusters; a frame's sum is divided by the windows
  covering it (a cluster absent from a covering window counts as 0).

  Args:
    items: (window, slot) of each clustered slot; activity: `[W, S, F_w]`.
  """
  window_frames = activity.shape[-1]
  total = np.zeros((num_clusters, num_frames))
  cover = np.zeros(num_frames)
  for start in starts:
    end = min(start + window_frames, num_frames)
    cover[start:end] += 1
  for (w, s), c in zip(items, labels):
    start = starts[w]
    end = min(start + window_frames, num_frames)
    total[c, start:end] += activity[w, s, :end - start]
  return total / np.maximum(cover, 1)


def diarize_overlap(waveform: np.ndarray, *, route_windows: RouteWindows,
                    plda: plda_lib.PLDABackend,
                    cfg: OverlapConfig | None = None,
                    file_id: str = "file") -> list[rttm.Segment]:
  """Overlap-aware blind diarization of `[N]` 16 kHz audio -> segments
  (speakers spk0, spk1, ...; overlapping segments where two speak)."""
  cfg = cfg or OverlapConfig()
  waveform = pipeline.mono_waveform(waveform)
  if len(waveform) == 0:
    return []
  num_frames = int(np.ceil(len(waveform) / HOP))
  window_frames = int(round(cfg.window_seconds / FRAME_SECONDS))
  hop_frames = max(1, int(round(window_frames * cfg.hop_fraction)))
  starts = window_starts(num_frames, window_frames, hop_frames)
  padded = pipeline.pad_to(waveform, (starts[-1] + window_frames) * HOP)
  windows = np.stack([padded[s * HOP:(s + window_frames) * HOP]
                      for s in starts])
  existence, activity, embeddings = (np.asarray(a) for a in
                                     route_windows(windows))
  if activity.shape[:2] != existence.shape or activity.shape[-1] < 1:
    raise ValueError(f"route_windows gave existence {existence.shape} and "
                     f"activity {activity.shape}; expected [W, S] and "
                     "[W, S, frames].")
  if activity.shape[-1] != window_frames:  # Pad/crop to the window's frames.
    activity = np.pad(activity, ((0, 0), (0, 0),
                                 (0, max(0, window_frames - activity.shape[-1])
                                  )), mode="edge")[..., :window_frames]
  active_frames = (activity > cfg.activity_threshold).sum(-1)
  keep = ((existence > cfg.existence_threshold)
          & (active_frames * FRAME_SECONDS >= cfg.min_slot_seconds))
  items = [(int(w), int(s)) for w, s in zip(*np.nonzero(keep))]
  if not items:
    return []
  x = plda.transform(embeddings[tuple(np.array(items).T)])
  _, posteriors = vbx_lib.cluster_with_posteriors(x, plda.phi, cfg)
  labels = np.empty(len(items), np.int64)
  window_of = np.array([w for w, _ in items])
  for w in np.unique(window_of):
    rows = np.flatnonzero(window_of == w)
    labels[rows] = cannot_link_assign(posteriors[rows])
  num_clusters = posteriors.shape[1]
  track = overlap_add(num_frames, starts, items, activity, labels,
                      num_clusters)
  return tracks_to_segments(track, cfg, file_id, len(waveform) / SAMPLE_RATE)


def tracks_to_segments(track: np.ndarray, cfg: OverlapConfig, file_id: str,
                       duration: float) -> list[rttm.Segment]:
  """Cluster activity `[C, F]` -> thresholded, smoothed segments (empty
  clusters dropped; speakers renamed spk0.. by first appearance)."""
  active = track > cfg.activity_threshold
  if cfg.median_filter_frames > 1:
    if cfg.median_filter_frames % 2 == 0:
      raise ValueError(f"median_filter_frames must be odd; found"
                       f" {cfg.median_filter_frames}.")
    active = scipy.ndimage.median_filter(
        active.astype(np.uint8), size=(1, cfg.median_filter_frames),
        mode="nearest").astype(bool)
  active = pipeline.fill_short_pauses(
      active, round(cfg.min_pause_seconds / FRAME_SECONDS)) > 0
  used = [c for c in range(len(active)) if active[c].any()]
  used.sort(key=lambda c: int(np.argmax(active[c])))
  segments = rttm.activity_to_segments(
      active[used], FRAME_SECONDS, file_id,
      [f"spk{i}" for i in range(len(used))],
      min_duration=cfg.min_segment_seconds)
  return [s if s.end <= duration else
          dataclasses.replace(s, duration=round(float(duration - s.start), 6))
          for s in segments if s.start < duration]
