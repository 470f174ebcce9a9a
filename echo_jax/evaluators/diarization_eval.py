"""Blind diarization DER on held-out-speaker mixtures with unknown K.

Mixtures come from `eval_mixtures.HeldoutMixtures` (split HELDOUT,
p_mixture 1, K drawn in [k_min, k_max]); the reference RTTM is each placed
source's 10 ms activity. Per mixture, the pipeline runs as:
  blind            model speech activity, VBx speaker count (the headline);
  oracle_activity  the reference any-speaker activity as speech activity
                   (no smoothing), so missed / false alarm left are only the
                   overlap a one-speaker-per-frame output cannot label, and
                   what remains is clustering (confusion, count);
  overlap_aware    (stage-4 models with a router) slot activities in 50%-hop
                   windows, per-slot embeddings, VBx with a per-window
                   cannot-link assignment, overlap-added activities: the only
                   variant that can label overlapped speech.
DER by pyannote.metrics (`scoring.score`) over an explicit UEM (the whole
clip) at collars 0 and 0.25 s each side; count accuracy from the number of
hypothesis speakers vs K. Results keep each mixture's blind errors, so two
runs on the same mixtures (a condition against clean, a change against its
base) compare with a paired bootstrap interval (`der_difference`): on 50
mixtures a difference of a few points is within what the draw moves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import scipy.stats

from data_pipelines import manifest as manifest_lib
from echo_jax import diarizer as diarizer_lib
from echo_jax.diarization import pipeline
from echo_jax.diarization import rttm
from echo_jax.diarization import scoring
from echo_jax.evaluators.eval_mixtures import HeldoutMixtures
from echo_jax.model import EchoModel

_log = logging.getLogger(__name__)

VARIANTS = ("blind", "oracle_activity", "overlap_aware")


def reference_segments(example: dict, file_id: str,
                       speaker_names: tuple[str, ...]) -> list[rttm.Segment]:
  """Mixture example -> reference segments (one speaker per present slot)."""
  present = np.flatnonzero(example["speakers"] >= 0)
  names = [speaker_names[int(example["speakers"][s])] for s in present]
  return rttm.activity_to_segments(example["activity"][present] > 0.5,
                                   pipeline.FRAME_SECONDS, file_id, names)


def overlap_excess_seconds(activity: np.ndarray) -> float:
  """Reference speech a one-speaker-per-frame output must miss: sum over
  frames of (active speakers - 1)+, in seconds. activity: [K, F]."""
  active = (np.asarray(activity) > 0.5).sum(0)
  return float(np.maximum(active - 1, 0).sum() * pipeline.FRAME_SECONDS)


def _summary(results: dict) -> dict:
  """`scoring.score` output without the per-file table."""
  return {k: v for k, v in results.items() if k != "per_file"}


def evaluate_blind_der(diarizer: diarizer_lib.EchoDiarizer,
                       manifest_path: str, *, num_mixtures: int,
                       seconds: float, k_min: int = 1, k_max: int = 3,
                       seed: int = 0, out_dir: str | None = None,
                       condition: str = "clean") -> dict:
  """DER / count accuracy of `diarizer` (PLDA already fitted) on mixtures.

  Args:
    diarizer: an `EchoDiarizer` with `plda` set.
    manifest_path: corpus whose HELDOUT speakers are mixed.
    num_mixtures: mixtures to draw; mixture i is a pure function of (seed, i).
    seconds: mixture length (long enough for several 1.5 s windows).
    k_min, k_max: speaker count range (needs k_max held-out speakers).
    condition: recording condition of the mixtures (`augment.CONDITIONS`;
      `HeldoutMixtures`); the references are the clean labels.
    out_dir: if set, writes reference.rttm, blind.rttm,
      oracle_activity.rttm, all.uem and results.json there.
  Returns:
    {"blind": {collar_0.00: {der, missed_rate, ...}, collar_0.25: ...,
    count: {accuracy, under, over, num_files}}, "oracle_activity": {...},
    "num_mixtures", "seconds", "mean_speakers", "overlap_excess_rate" (share
    of reference speech no one-speaker-per-frame output can get), "seconds_
    per_mixture"}.
  """
  if diarizer.plda is None:
    raise ValueError("diarizer has no PLDA back-end; call fit_plda() or"
                     " load_or_fit_plda() first.")
  heldout = HeldoutMixtures(manifest_path, seconds=seconds, k_min=k_min,
                            k_max=k_max, seed=seed, condition=condition)
  cfg = heldout.cfg
  variants = [v for v in VARIANTS
              if v != "overlap_aware" or diarizer.has_router]
  # The oracle mask is used as is: smoothing would alter the reference.
  oracle_cfg = dataclasses.replace(diarizer.cfg, median_filter_frames=1,
                                   min_speech_seconds=0.0,
                                   min_pause_seconds=0.0)
  reference, uem, noise_kinds = {}, {}, {}
  hypotheses = {v: {} for v in variants}
  overlap, num_speakers = 0.0, []
  tick = time.time()
  for i in range(num_mixtures):
    example = heldout.example(i)
    example["activity"] = pipeline.fill_short_pauses(
        example["activity"],
        round(pipeline.MIN_PAUSE_SECONDS / pipeline.FRAME_SECONDS))
    file_id = f"mix{i:05d}"
    if "noise_kind" in example:
      noise_kinds[file_id] = example["noise_kind"]
    reference[file_id] = reference_segments(example, file_id,
                                            heldout.speakers)
    uem[file_id] = [(0.0, cfg.num_samples / cfg.sample_rate)]
    overlap += overlap_excess_seconds(example["activity"])
    num_speakers.append(int(example["num_speakers"]))
    oracle = example["activity"].max(axis=0).astype(np.float32)
    hypotheses["blind"][file_id] = diarizer.diarize_waveform(
        example["mixture"], file_id)
    hypotheses["oracle_activity"][file_id] = diarizer.diarize_waveform(
        example["mixture"], file_id, speech_activity=lambda _: oracle,
        cfg=oracle_cfg)
    if "overlap_aware" in hypotheses:
      hypotheses["overlap_aware"][file_id] = diarizer.diarize_waveform_overlap(
          example["mixture"], file_id)
  elapsed = time.time() - tick

  scores = {v: scoring.score(reference, hypotheses[v], uem) for v in variants}
  results: dict = {v: _summary(scores[v]) for v in variants}
  # Per mixture, for paired comparisons of two runs (`der_difference`).
  c0 = scoring.collar_key(0.0)
  results["blind_per_file_c0"] = {
      f: {k: r[c0][k] for k in ("missed", "false_alarm", "confusion",
                                "total")}
      | ({"noise_kind": noise_kinds[f]} if f in noise_kinds else {})
      for f, r in scores["blind"]["per_file"].items()}
  total = results["blind"][c0]["total"]
  results.update(
      num_mixtures=num_mixtures, seconds=seconds, k_min=k_min, k_max=k_max,
      seed=seed, condition=condition, mean_speakers=float(np.mean(num_speakers)),
      overlap_excess_seconds=overlap,
      overlap_excess_rate=overlap / total if total > 0 else 0.0,
      seconds_per_mixture=elapsed / max(num_mixtures, 1))
  if out_dir:
    _write_outputs(out_dir, reference, hypotheses, uem, results)
  return results


def _write_outputs(out_dir: str, reference: dict, hypotheses: dict, uem: dict,
                   results: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  rttm.write_rttm(os.path.join(out_dir, "reference.rttm"),
                  [s for f in sorted(reference) for s in reference[f]])
  for variant, hyp in hypotheses.items():
    rttm.write_rttm(os.path.join(out_dir, f"{variant}.rttm"),
                    [s for f in sorted(hyp) for s in hyp[f]])
  with open(os.path.join(out_dir, "all.uem"), "w") as f:
    for file_id, regions in sorted(uem.items()):
      for a, b in regions:
        f.write(f"{file_id} 1 {a:.3f} {b:.3f}\n")
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)


def der_difference(base: dict, other: dict, *, confidence: float = 0.95,
                   n_resamples: int = 4000, seed: int = 0) -> dict:
  """Blind DER at collar 0 of `other` minus `base` (two `evaluate_blind_der`
  results on the same mixtures, e.g. a condition against clean), with a
  paired percentile-bootstrap interval over the mixtures
  (`scipy.stats.bootstrap`): how far apart the two could be on another draw
  of mixtures from the same source.

  Returns {"difference", "low", "high"} as fractions (DER points / 100).
  """
  a, b = base["blind_per_file_c0"], other["blind_per_file_c0"]
  if set(a) != set(b):
    raise ValueError("der_difference needs results on the same mixtures; "
                     f"found {len(a)} and {len(b)} files, "
                     f"{len(set(a) ^ set(b))} not in both.")
  files = sorted(a)

  def columns(per_file):
    errors = [per_file[f]["missed"] + per_file[f]["false_alarm"]
              + per_file[f]["confusion"] for f in files]
    return np.array(errors), np.array([per_file[f]["total"] for f in files])

  def pooled_difference(err_a, tot_a, err_b, tot_b, axis=-1):
    return (err_b.sum(axis) / tot_b.sum(axis)
            - err_a.sum(axis) / tot_a.sum(axis))

  data = (*columns(a), *columns(b))
  difference = float(pooled_difference(*data))
  if len(files) < 2:
    return dict(difference=difference, low=difference, high=difference)
  interval = scipy.stats.bootstrap(
      data, pooled_difference, paired=True, vectorized=True,
      confidence_level=confidence, n_resamples=n_resamples,
      method="percentile", random_state=np.random.default_rng(seed)
  ).confidence_interval
  return dict(difference=difference, low=float(interval.low),
              high=float(interval.high))


def der_difference_by_noise_kind(base: dict, other: dict, **kwargs
                                 ) -> dict[str, dict]:
  """`der_difference` over the mixtures of each noise kind `other` added
  (its per-mixture `noise_kind`; {} for a condition without noise), with
  "num_mixtures" per kind: whether a noisy gap is one kind's or all's."""
  by_kind: dict[str, list[str]] = {}
  for f, r in other["blind_per_file_c0"].items():
    if "noise_kind" in r:
      by_kind.setdefault(r["noise_kind"], []).append(f)

  def only(result, files):
    return {"blind_per_file_c0": {f: result["blind_per_file_c0"][f]
                                  for f in files if
                                  f in result["blind_per_file_c0"]}}
  return {kind: dict(der_difference(only(base, files), only(other, files),
                                    **kwargs), num_mixtures=len(files))
          for kind, files in sorted(by_kind.items())}


def flat_metrics(results: dict, prefix: str) -> dict[str, float]:
  """`evaluate_blind_der` output -> flat {prefix/name: value} scalars."""
  out = {}
  for variant in _present(results):
    r = results[variant]
    for collar in (0.0, 0.25):
      c = r[scoring.collar_key(collar)]
      tag = f"{prefix}/{variant}_c{collar:g}"
      out.update({f"{tag}_der": c["der"], f"{tag}_missed": c["missed_rate"],
                  f"{tag}_false_alarm": c["false_alarm_rate"],
                  f"{tag}_confusion": c["confusion_rate"]})
    out.update({f"{prefix}/{variant}_count_accuracy": r["count"]["accuracy"],
                f"{prefix}/{variant}_count_under": r["count"]["under"],
                f"{prefix}/{variant}_count_over": r["count"]["over"]})
  out[f"{prefix}/overlap_excess_rate"] = results["overlap_excess_rate"]
  return {k: float(v) for k, v in out.items()}


def _present(results: dict) -> list[str]:
  """The variants `results` holds (overlap_aware only with a router)."""
  return [v for v in VARIANTS if v in results]


def format_report(results: dict) -> str:
  """A table: one row per variant and collar, then speaker counting."""
  rows = [f"{'variant':>16} {'collar(+-s)':>11} {'DER%':>7} {'miss%':>7}"
          f" {'FA%':>7} {'conf%':>7}"]
  for variant in _present(results):
    for collar in (0.0, 0.25):
      c = results[variant][scoring.collar_key(collar)]
      rows.append(f"{variant:>16} {collar:>11.2f} {100 * c['der']:>7.2f}"
                  f" {100 * c['missed_rate']:>7.2f}"
                  f" {100 * c['false_alarm_rate']:>7.2f}"
                  f" {100 * c['confusion_rate']:>7.2f}")
  for variant in _present(results):
    n = results[variant]["count"]
    rows.append(f"{variant:>16} speaker count: accuracy"
                f" {100 * n['accuracy']:.1f}%  under {100 * n['under']:.1f}%"
                f"  over {100 * n['over']:.1f}%")
  rows.append(
      f"{results['num_mixtures']} mixtures of {results['seconds']:g} s, K in"
      f" [{results['k_min']}, {results['k_max']}] (mean"
      f" {results['mean_speakers']:.2f}); overlap beyond one speaker:"
      f" {100 * results['overlap_excess_rate']:.2f}% of reference speech"
      f" (a floor on missed speech); {results['seconds_per_mixture']:.2f}"
      " s/mixture.")
  return "\n".join(rows)


class DiarizationEvaluator:
  """Trainer evaluator: `run(model, state) -> {name/...: value}`.

  Config (`config.evals.<name>`): every, num_mixtures, seconds (mixture
  length), chunk_seconds (activity chunk: the stage's data.clip_seconds),
  k_min, k_max, plda_windows_per_utterance, plda_max_utterances_per_speaker,
  and optional `diarization` (a dict of `DiarizationConfig` overrides). The
  PLDA is refitted on train speakers at every run (the embeddings move).
  """

  def __init__(self, name: str, config, model: EchoModel, manifest_path: str,
               seed: int):
    self.name, self.every = name, config.every
    self.config, self.manifest_path, self.seed = config, manifest_path, seed
    overrides = dict(config.get("diarization", None) or {})
    self.cfg = pipeline.DiarizationConfig(**overrides)
    self.chunk_samples = int(round(config.chunk_seconds
                                   * manifest_lib.SAMPLE_RATE))
    self.model = model
    self._diarizer: diarizer_lib.EchoDiarizer | None = None

  def run(self, model: EchoModel, state: dict) -> dict[str, float]:
    params = state["params"]
    if self._diarizer is None or self._diarizer.model is not model:
      # Built once: its jitted functions take params as an argument.
      self._diarizer = diarizer_lib.EchoDiarizer(
          model, params, chunk_samples=self.chunk_samples, cfg=self.cfg)
    diarizer = self._diarizer
    diarizer.params = params
    c = self.config
    diarizer.fit_plda(
        self.manifest_path,
        windows_per_utterance=c.plda_windows_per_utterance,
        max_utterances_per_speaker=c.plda_max_utterances_per_speaker,
        seed=self.seed, save=False)
    results = evaluate_blind_der(
        diarizer, self.manifest_path, num_mixtures=c.num_mixtures,
        seconds=c.seconds, k_min=c.k_min, k_max=c.k_max, seed=self.seed)
    _log.info("%s:\n%s", self.name, format_report(results))
    return flat_metrics(results, self.name)
