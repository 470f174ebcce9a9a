"""Evaluations the stack runs once training is done, beyond the trainer's
own evaluators (whose numbers are in each stage's metrics.jsonl).

`EVALUATIONS` is the registry: name -> `fn(runs, out_dir, variant)` that
evaluates the stage(s) it applies to, writes its files under `out_dir` and
returns a JSON-able record (None when no stage applies). A record is cached
in `<out_dir>/evaluation.json` with the checkpoint step and settings it was
made with, so rerunning the stack on finished stages does not redo it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

from data_pipelines import augment
from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from echo_jax import diarizer as diarizer_lib
from echo_jax.evaluators import content_eval
from echo_jax.evaluators import diarization_eval
from echo_jax.evaluators import routing_eval
from echo_jax.report.stages import StageRun, latest_step

_log = logging.getLogger(__name__)

RECORD = "evaluation.json"

# Per variant: the cpu demo's 200 mixtures take about 2.3 minutes per
# condition on 2 CPU cores (0.64-0.74 s each); a mixture holds several 1.5 s
# embedding windows. At 50 mixtures the 95% interval of a condition's
# difference from clean spanned 7.7 points (10 dB SNR after stage 2:
# +6.3 [+2.7, +10.4]); at 200, 3.0 (+4.9 [+3.5, +6.5]).
DIARIZATION_SETTINGS = {
    "smoke": dict(num_mixtures=2, seconds=6.0, conditions=("clean",)),
    "cpu": dict(num_mixtures=200, seconds=10.0,
                conditions=("clean", "snr10", "reverb")),
    "canonical": dict(num_mixtures=200, seconds=10.0,
                      conditions=augment.CONDITIONS),
}


def _cached(out_dir: str, key: dict) -> dict | None:
  path = os.path.join(out_dir, RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  return record if record.get("key") == key else None


def _save(out_dir: str, record: dict) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, RECORD)
  with open(f"{path}.tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(f"{path}.tmp", path)
  return record


# Part of the diarization record's cache key: bump it when a code change
# alters the diarization of a checkpoint, so cached records are redone.
# 2: the speech detector's last chunk ends at the recording's end; pauses
# under 0.3 s are filled in hypotheses. 3: each condition's difference from
# clean with its paired-bootstrap interval. 4: and per noise kind.
DIARIZATION_REVISION = 4


def diarization(runs: Sequence[StageRun], out_dir: str, variant: str
                ) -> dict | None:
  """Blind DER of the last stage that can diarize, on held-out mixtures
  (`diarization_eval.evaluate_blind_der`; RTTMs and UEM in `out_dir`)."""
  capable = [r for r in runs
             if set(diarizer_lib.REQUIRED_HEADS) <= set(r.heads)]
  if not capable:
    return None
  run = capable[-1]
  settings = dict(DIARIZATION_SETTINGS[variant], k_min=1, seed=0)
  conditions = list(settings.pop("conditions"))
  key = dict(workdir=os.path.abspath(run.workdir),
             step=latest_step(run.workdir), conditions=conditions,
             revision=DIARIZATION_REVISION, **settings)
  record = _cached(out_dir, key)
  if record is not None:
    _log.info("Diarization of %s step %d: cached in %s.", run.stage.name,
              key["step"], out_dir)
    return record
  _log.info("Diarization of %s step %d: %d mixtures of %g s ...",
            run.stage.name, key["step"], settings["num_mixtures"],
            settings["seconds"])
  diarizer = diarizer_lib.EchoDiarizer.from_workdir(run.workdir)
  manifest = diarizer.train_manifest
  diarizer.load_or_fit_plda(manifest)
  # K up to 3, or as many held-out speakers as the corpus has.
  k_max = min(3, mixtures.num_speakers(manifest, manifest_lib.HELDOUT))
  results = diarization_eval.evaluate_blind_der(
      diarizer, manifest, k_max=k_max, out_dir=out_dir, **settings)
  _log.info("Diarization of %s:\n%s", run.stage.name,
            diarization_eval.format_report(results))
  # The same mixtures under noise / a room / a telephone channel, scored
  # against the same clean labels (RTTMs in out_dir/<condition>).
  by_condition = {"clean": diarization_eval.flat_metrics(results, "der")}
  gaps, kind_gaps = {}, {}
  for condition in conditions:
    if condition == "clean":
      continue
    r = diarization_eval.evaluate_blind_der(
        diarizer, manifest, k_max=k_max, condition=condition,
        out_dir=os.path.join(out_dir, condition), **settings)
    by_condition[condition] = diarization_eval.flat_metrics(r, "der")
    gaps[condition] = diarization_eval.der_difference(results, r)
    kind_gaps[condition] = diarization_eval.der_difference_by_noise_kind(
        results, r)
    _log.info("Diarization of %s, %s:\n%s", run.stage.name, condition,
              diarization_eval.format_report(r))
  summary = [condition_summary(by_condition, gaps, kind_gaps)]
  return _save(out_dir, dict(key=key, stage=run.stage.name, dir=out_dir,
                             results=results, conditions=by_condition,
                             gaps=gaps, noise_kind_gaps=kind_gaps,
                             summary=summary if len(by_condition) > 1
                             else []))


def condition_summary(by_condition: dict, gaps: dict,
                      kind_gaps: dict | None = None) -> str:
  """One line: blind DER at collar 0 per condition, and each condition's
  difference from clean with its interval (`der_difference`), in points;
  for a noisy condition also per noise kind (`der_difference_by_noise_kind`),
  since one kind can make the whole gap."""
  def gap(g: dict) -> str:
    g = {k: 100 * g[k] for k in ("difference", "low", "high")}
    return f"{g['difference']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]"

  cells = []
  for condition, metrics in by_condition.items():
    cell = f"{condition} {100 * metrics['der/blind_c0_der']:.1f}%"
    if condition in gaps:
      kinds = (kind_gaps or {}).get(condition) or {}
      cell += f" ({gap(gaps[condition])}" + "".join(
          f"; {kind} ({g['num_mixtures']}) {gap(g)}"
          for kind, g in kinds.items()) + ")"
    cells.append(cell)
  return ("Blind DER at collar 0 by condition, same held-out mixtures (against"
          " clean: difference [95% paired-bootstrap interval over the"
          " mixtures]; under noise, also by the kind of noise (mixtures)): "
          + ", ".join(cells))


# Per variant: held-out mixtures of the stage's clip length (seconds each on
# 2 CPU cores for the cpu variant's 200).
ROUTING_SETTINGS = {
    "smoke": dict(num_mixtures=4, batch_size=4),
    "cpu": dict(num_mixtures=200, batch_size=16),
    "canonical": dict(num_mixtures=500, batch_size=32),
}


def routing(runs: Sequence[StageRun], out_dir: str, variant: str
            ) -> dict | None:
  """Count / PIT / latent SI-SDR of the last stage with a router, and the
  trivial baseline (`routing_eval.evaluate_workdir`; results.json in
  `out_dir`)."""
  capable = [r for r in runs if "router" in r.heads]
  if not capable:
    return None
  run = capable[-1]
  settings = dict(ROUTING_SETTINGS[variant], seed=0)
  key = dict(workdir=os.path.abspath(run.workdir),
             step=latest_step(run.workdir), **settings)
  record = _cached(out_dir, key)
  if record is not None:
    _log.info("Routing of %s step %d: cached in %s.", run.stage.name,
              key["step"], out_dir)
    return record
  results = routing_eval.evaluate_workdir(run.workdir, **settings)
  routing_eval.write_json(os.path.join(out_dir, "results.json"), results)
  _log.info("Routing of %s:\n%s", run.stage.name,
            routing_eval.format_report(results))
  return _save(out_dir, dict(
      key=key, stage=run.stage.name, dir=out_dir, results=results,
      summary=[routing_eval.summary_line(run.stage.name, results)]))


def content(runs: Sequence[StageRun], out_dir: str, variant: str
            ) -> dict | None:
  """The content evaluator's latest values (factorisation gap, phoneme
  probes, PER) of the last stage with a content head, as `results` in
  `out_dir`'s record, with a summary line (the trainer computed them)."""
  del variant
  capable = [r for r in runs if "content" in r.heads]
  results = {k.split("/", 1)[1]: v
             for k, v in (capable[-1].final if capable else {}).items()
             if k.startswith("content/")}
  if "gap_points" not in results:
    return None
  stage = capable[-1].stage.name
  return _save(out_dir, dict(stage=stage, dir=out_dir, results=results,
                             summary=[content_eval.summary_line(stage,
                                                                results)]))


Evaluation = Callable[[Sequence[StageRun], str, str], "dict | None"]
EVALUATIONS: dict[str, Evaluation] = {"diarization": diarization,
                                      "routing": routing, "content": content}


def run_all(runs: Sequence[StageRun], root: str, variant: str) -> dict:
  """{name: record} of every evaluation that applies; files in
  `<root>/<name>/`."""
  records = {}
  for name, evaluation in EVALUATIONS.items():
    record = evaluation(runs, os.path.join(root, name), variant)
    if record is not None:
      records[name] = record
  return records
