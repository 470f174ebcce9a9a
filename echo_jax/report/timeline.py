"""Diarization: DER of the stack's evaluation and a timeline of reference
vs hypothesis speakers for a few mixtures.

Hypothesis labels are arbitrary cluster names; each is drawn in the colour
of the reference speaker it overlaps most under the optimal one-to-one
mapping (the one DER uses), so a confusion shows as a change of colour.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

import matplotlib
import matplotlib.figure
import numpy as np
from scipy import optimize

from echo_jax.diarization import rttm, scoring
from echo_jax.evaluators import diarization_eval
from echo_jax.report.page import Context, Fragment, save_png

NUM_MIXTURES = 3


def _overlap(a: Sequence[rttm.Segment], b: Sequence[rttm.Segment]) -> float:
  return sum(max(0.0, min(x.end, y.end) - max(x.start, y.start))
             for x in a for y in b)


def map_speakers(reference: Sequence[rttm.Segment],
                 hypothesis: Sequence[rttm.Segment]) -> dict[str, str]:
  """{hypothesis speaker: reference speaker} maximising the total overlap
  (Hungarian); unmatched hypothesis speakers are left out."""
  refs = sorted({s.speaker for s in reference})
  hyps = sorted({s.speaker for s in hypothesis})
  if not refs or not hyps:
    return {}
  overlap = np.array([[_overlap([s for s in hypothesis if s.speaker == h],
                                [s for s in reference if s.speaker == r])
                       for r in refs] for h in hyps])
  rows, cols = optimize.linear_sum_assignment(-overlap)
  return {hyps[i]: refs[j] for i, j in zip(rows, cols)}


def plot(reference: dict, hypothesis: dict, uem: dict, files: Sequence[str],
         title: str) -> matplotlib.figure.Figure:
  """One panel per file: a lane per reference speaker, then per hypothesis
  speaker."""
  colours = matplotlib.colormaps["tab10"]
  lanes = [len({s.speaker for s in reference.get(f, [])})
           + max(1, len({s.speaker for s in hypothesis.get(f, [])}))
           for f in files]
  fig = matplotlib.figure.Figure(figsize=(11, 0.45 * sum(lanes) + 1.2
                                          * len(files)))
  axes = fig.subplots(len(files), 1, squeeze=False,
                      height_ratios=[max(n, 1) for n in lanes])[:, 0]
  for ax, f in zip(axes, files):
    ref, hyp = reference.get(f, []), hypothesis.get(f, [])
    ref_names = sorted({s.speaker for s in ref})
    colour = {r: colours(i) for i, r in enumerate(ref_names)}
    mapping = map_speakers(ref, hyp)
    hyp_names = sorted({s.speaker for s in hyp})
    labels = [f"ref {r}" for r in ref_names] + ([
        f"hyp {h}" + (f" (= {mapping[h]})" if h in mapping else "")
        for h in hyp_names] or ["hyp: no speech found"])
    for lane, name in enumerate(ref_names):
      ax.broken_barh([(s.start, s.duration) for s in ref if s.speaker == name],
                     (lane + 0.15, 0.7), color=colour[name])
    for lane, name in enumerate(hyp_names, len(ref_names)):
      ax.broken_barh([(s.start, s.duration) for s in hyp if s.speaker == name],
                     (lane + 0.15, 0.7), hatch="//", edgecolor="white",
                     color=colour.get(mapping.get(name), "0.55"))
    if ref_names:
      ax.axhline(len(ref_names), color="0.3", lw=0.8)
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=8)
    ax.set_ylim(len(labels), 0)
    end = max([b for _, b in uem.get(f, [])] + [s.end for s in ref + hyp]
              + [1.0])
    ax.set_xlim(0, end)
    ax.set_title(f, fontsize=9, loc="left")
    ax.tick_params(axis="x", labelsize=8)
  axes[-1].set_xlabel("seconds")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def der_table(results: dict) -> str:
  rows = ["<tr><th>Variant</th><th>Collar (&plusmn;s)</th><th>DER</th>"
          "<th>Missed</th><th>False alarm</th><th>Confusion</th>"
          "<th>Speaker count accuracy</th></tr>"]
  # Overlap-aware rows only where the model has a router (stage 4).
  for variant in (v for v in diarization_eval.VARIANTS if v in results):
    for collar in (0.0, 0.25):
      c = results[variant][scoring.collar_key(collar)]
      rows.append(
          f"<tr><td>{variant}</td><td>{collar:.2f}</td>"
          + "".join(f"<td>{100 * c[k]:.1f}%</td>" for k in
                    ("der", "missed_rate", "false_alarm_rate",
                     "confusion_rate"))
          + f"<td>{100 * results[variant]['count']['accuracy']:.0f}%</td>"
          "</tr>")
  return "<table>" + "".join(rows) + "</table>"


def section(ctx: Context) -> list[Fragment]:
  record = ctx.evaluations.get("diarization")
  if record is None:
    return []
  out_dir, results = record["dir"], record["results"]
  reference = rttm.read_rttm(os.path.join(out_dir, "reference.rttm"))
  hypothesis = rttm.read_rttm(os.path.join(out_dir, "blind.rttm"))
  uem = rttm.read_uem(os.path.join(out_dir, "all.uem"))
  files = sorted(uem)[:NUM_MIXTURES]
  figure = save_png(
      plot(reference, hypothesis, uem, files, f"{record['stage']}: blind "
           "diarization"), ctx, "diarization_timeline",
      f"Reference (solid) and blind hypothesis (hatched) speakers of the "
      f"first {len(files)} of {results['num_mixtures']} held-out mixtures; "
      "a hypothesis speaker takes the colour of the reference speaker it is "
      "mapped to (grey: unmapped).")
  note = (f"<p>{html.escape(record['stage'])} at step {record['key']['step']}"
          f": {results['num_mixtures']} mixtures of {results['seconds']:g} s "
          f"of held-out speakers, K in [{results['k_min']}, "
          f"{results['k_max']}]; RTTMs in <code>{html.escape(out_dir)}</code>."
          " <i>oracle_activity</i> replaces the model's speech activity by the"
          " reference, leaving clustering errors.</p>")
  return [Fragment("Diarization", note + der_table(results), (figure,))]
