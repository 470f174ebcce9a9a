"""DER (pyannote.metrics) and speaker-count accuracy over a set of files."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pyannote.metrics.diarization import DiarizationErrorRate

from echo_jax.diarization import rttm

Regions = Sequence[tuple[float, float]]


def _default_uem(segments: Sequence[rttm.Segment]) -> list[tuple[float, float]]:
  """Extent of the given (reference + hypothesis) segments of one file."""
  if not segments:
    return []
  return [(min(s.start for s in segments), max(s.end for s in segments))]


def collar_key(collar: float) -> str:
  """Key of one collar's results, e.g. 'collar_0.25' (seconds each side)."""
  return f"collar_{collar:.2f}"


def _rate(errors: float, total: float) -> float:
  if total > 0:
    return errors / total
  return 0.0 if errors == 0 else math.inf


def score(reference: Mapping[str, Sequence[rttm.Segment]],
          hypothesis: Mapping[str, Sequence[rttm.Segment]],
          uem: Mapping[str, Regions] | None = None,
          collars: Sequence[float] = (0.0, 0.25)) -> dict:
  """DER and its parts per collar, summed over files, plus count accuracy.

  Args:
    reference, hypothesis: {file_id: segments} (e.g. from `rttm.read_rttm`).
      A file missing on one side counts as all missed / all false alarm.
    uem: {file_id: [(start, end)]} scored regions. With a UEM exactly its
      files are scored (ref/hyp files outside it are an error). Without one,
      each file is scored over the extent (earliest start to latest end) of
      its reference + hypothesis segments; time outside both is neither
      speech nor error, so only this choice of end points matters.
    collars: forgiveness collars in seconds on EACH side of every reference
      boundary (0.25 means +-0.25 s, NIST md-eval style).
  Returns:
    {collar_key(c): {der, missed, false_alarm, confusion, total (seconds of
    reference speech, overlap counted per speaker), *_rate}, "count":
    {accuracy, under, over, num_files}, "per_file": {file_id: {...}}}.
  """
  if uem is not None:
    files = sorted(uem)
    outside = (set(reference) | set(hypothesis)) - set(uem)
    if outside:
      raise ValueError(
          f"Files {sorted(outside)[:5]} (of {len(outside)}) have segments but"
          " no UEM entry; add them to the UEM or drop them.")
  else:
    files = sorted(set(reference) | set(hypothesis))

  results: dict = {}
  per_file: dict = {f: {} for f in files}
  for collar in collars:
    # pyannote's `collar` is the TOTAL width centred on each boundary
    # (pyannote.metrics.utils: Segment(t - collar / 2, t + collar / 2)),
    # so +-collar seconds each side is collar=2 * collar there.
    metric = DiarizationErrorRate(collar=2.0 * collar, skip_overlap=False)
    sums = dict(missed=0.0, false_alarm=0.0, confusion=0.0, total=0.0)
    for f in files:
      ref, hyp = reference.get(f, []), hypothesis.get(f, [])
      regions = uem[f] if uem is not None else _default_uem([*ref, *hyp])
      detail = metric(rttm.to_annotation(ref, uri=f),
                      rttm.to_annotation(hyp, uri=f),
                      uem=rttm.to_timeline(regions, uri=f), detailed=True)
      parts = dict(missed=detail["missed detection"],
                   false_alarm=detail["false alarm"],
                   confusion=detail["confusion"], total=detail["total"])
      for k, v in parts.items():
        sums[k] += v
      per_file[f][collar_key(collar)] = dict(
          der=_rate(parts["missed"] + parts["false_alarm"]
                    + parts["confusion"], parts["total"]), **parts)
    errors = sums["missed"] + sums["false_alarm"] + sums["confusion"]
    results[collar_key(collar)] = dict(
        der=_rate(errors, sums["total"]),
        missed_rate=_rate(sums["missed"], sums["total"]),
        false_alarm_rate=_rate(sums["false_alarm"], sums["total"]),
        confusion_rate=_rate(sums["confusion"], sums["total"]),
        collar_each_side=collar, **sums)

  under = over = 0
  for f in files:
    num_ref = len({s.speaker for s in reference.get(f, [])})
    num_hyp = len({s.speaker for s in hypothesis.get(f, [])})
    per_file[f].update(ref_speakers=num_ref, hyp_speakers=num_hyp)
    under += num_hyp < num_ref
    over += num_hyp > num_ref
  n = max(len(files), 1)
  results["count"] = dict(accuracy=(len(files) - under - over) / n,
                          under=under / n, over=over / n,
                          num_files=len(files))
  results["per_file"] = per_file
  return results
