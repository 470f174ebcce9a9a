"""RTTM / UEM files and their conversion to pyannote.core objects.

RTTM (NIST) speaker lines have 10 space-separated fields:
`SPEAKER <file> <chan> <start> <dur> <NA> <NA> <speaker> <NA> <NA>`.
UEM lines have 4: `<file> <chan> <start> <end>`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np
from pyannote.core import Annotation, Timeline
from pyannote.core import Segment as PyannoteSegment


@dataclasses.dataclass(frozen=True)
class Segment:
  """One speaker turn; times in seconds."""
  file_id: str
  start: float
  duration: float
  speaker: str

  @property
  def end(self) -> float:
    return self.start + self.duration


def write_rttm(path: str, segments: Iterable[Segment]) -> None:
  """Writes 10-field SPEAKER lines, atomically (tmp file + rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for s in segments:
      if " " in s.file_id or " " in s.speaker:
        raise ValueError(
            f"RTTM fields cannot contain spaces; found file_id={s.file_id!r},"
            f" speaker={s.speaker!r}. Rename them.")
      f.write(f"SPEAKER {s.file_id} 1 {s.start:.3f} {s.duration:.3f}"
              f" <NA> <NA> {s.speaker} <NA> <NA>\n")
  os.replace(tmp, path)


def read_rttm(path: str) -> dict[str, list[Segment]]:
  """Reads SPEAKER lines (others, blanks and `#` comments are skipped).

  Returns {file_id: segments sorted by start}; files without any SPEAKER line
  do not appear.
  """
  out: dict[str, list[Segment]] = collections.defaultdict(list)
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      fields = line.split()
      if not fields or fields[0].startswith("#") or fields[0] != "SPEAKER":
        continue
      if len(fields) < 8:
        raise ValueError(
            f"{path}:{line_no}: expected >= 8 fields (SPEAKER file chan start"
            f" dur <NA> <NA> speaker ...), found {len(fields)}: {line!r}")
      start, duration = float(fields[3]), float(fields[4])
      if duration < 0:
        raise ValueError(f"{path}:{line_no}: negative duration {duration}.")
      out[fields[1]].append(Segment(fields[1], start, duration, fields[7]))
  return {k: sorted(v, key=lambda s: (s.start, s.speaker))
          for k, v in out.items()}


def read_uem(path: str) -> dict[str, list[tuple[float, float]]]:
  """Reads `<file> <chan> <start> <end>` lines -> {file_id: [(start, end)]}."""
  out: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      fields = line.split()
      if not fields or fields[0].startswith("#"):
        continue
      if len(fields) != 4:
        raise ValueError(
            f"{path}:{line_no}: expected 4 UEM fields (file chan start end),"
            f" found {len(fields)}: {line!r}")
      start, end = float(fields[2]), float(fields[3])
      if end < start:
        raise ValueError(f"{path}:{line_no}: end {end} < start {start}.")
      out[fields[0]].append((start, end))
  return dict(out)


def to_annotation(segments: Sequence[Segment], uri: str | None = None
                  ) -> Annotation:
  """Segments of one file -> pyannote Annotation.

  Overlapping segments of the same speaker are merged (as NIST md-eval does):
  pyannote's DER would otherwise count that speaker twice where they overlap.
  """
  annotation = Annotation(uri=uri)
  for i, s in enumerate(segments):
    if s.duration > 0:
      annotation[PyannoteSegment(s.start, s.end), i] = s.speaker
  return annotation.support()


def to_timeline(regions: Sequence[tuple[float, float]], uri: str | None = None
                ) -> Timeline:
  """[(start, end)] seconds -> pyannote Timeline."""
  return Timeline([PyannoteSegment(a, b) for a, b in regions], uri=uri)


def activity_to_segments(activity: np.ndarray, frame_seconds: float,
                         file_id: str, speaker_names: Sequence[str], *,
                         min_duration: float = 0.0) -> list[Segment]:
  """Per-speaker frame activity -> segments sorted by start.

  Args:
    activity: [num_speakers, num_frames] bool, or float (active where > 0.5).
    frame_seconds: frame hop; frame f covers [f, f + 1) * frame_seconds.
    file_id: RTTM file id.
    speaker_names: one name per activity row.
    min_duration: runs shorter than this (seconds) are dropped.
  """
  activity = np.asarray(activity)
  if activity.ndim != 2 or activity.shape[0] != len(speaker_names):
    raise ValueError(
        f"activity must be [num_speakers={len(speaker_names)}, frames];"
        f" found shape {activity.shape}.")
  active = activity > 0.5 if activity.dtype != bool else activity
  segments = []
  for name, row in zip(speaker_names, active):
    # Run starts/ends from the edges of the 0/1 signal padded with zeros.
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for a, b in zip(starts, ends):
      duration = (b - a) * frame_seconds
      if duration >= min_duration and duration > 0:
        segments.append(Segment(file_id, round(float(a * frame_seconds), 6),
                                round(float(duration), 6), name))
  return sorted(segments, key=lambda s: (s.start, s.speaker))
