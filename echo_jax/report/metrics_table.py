"""Headline metrics per stage, against the previous stage and the random floor.

`HEADLINES` is the registry: a stage that logs new evaluator metrics adds one
`Headline` per number worth a row (values are read from the stage's latest
evaluation rows; a row shows only for stages that have its value).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Mapping

from echo_jax.report.page import Context, Fragment

Lookup = Callable[[Mapping[str, float]], float | None]


def metric(key: str) -> Lookup:
  """The value of `key`."""
  return lambda m: m.get(key)


def at_best_layer(prefix: str, what: str) -> Lookup:
  """`{prefix}_L{best}_{what}` at the layer of best k-NN top-1 the speaker
  evaluator reports (`{prefix}_best_layer`)."""
  def lookup(m):
    layer = m.get(f"{prefix}_best_layer")
    return None if layer is None else m.get(f"{prefix}_L{int(layer)}_{what}")
  return lookup


@dataclasses.dataclass(frozen=True)
class Headline:
  label: str
  value: Lookup
  floor: Lookup | None = None       # The random-init encoder's value.
  higher_is_better: bool = True


HEADLINES = (
    Headline("Held-out speaker k-NN top-1, EMA encoder (best layer)",
             metric("speaker/target_best_top1"),
             metric("speaker/random_best_top1")),
    Headline("Held-out speaker EER, EMA encoder (best layer)",
             at_best_layer("speaker/target", "eer"),
             at_best_layer("speaker/random", "eer"), higher_is_better=False),
    Headline("Held-out speaker k-NN top-1, speaker projection",
             metric("speaker/projection_top1"),
             metric("speaker/random_best_top1")),
    Headline("Held-out speaker EER, speaker projection",
             metric("speaker/projection_eer"),
             at_best_layer("speaker/random", "eer"), higher_is_better=False),
    Headline("Unseen-variant speaker EER, projection, clean",
             metric("robustness/unseen_variant/clean/projection_eer"),
             metric("robustness/unseen_variant/clean/random_eer"),
             higher_is_better=False),
    Headline("Unseen-variant speaker EER, projection, noise at 10 dB SNR",
             metric("robustness/unseen_variant/snr10/projection_eer"),
             metric("robustness/unseen_variant/snr10/random_eer"),
             higher_is_better=False),
    Headline("Unseen-variant speaker EER, projection, reverberant",
             metric("robustness/unseen_variant/reverb/projection_eer"),
             metric("robustness/unseen_variant/reverb/random_eer"),
             higher_is_better=False),
    Headline("Speech-activity false alarm on noise-only audio",
             metric("robustness/noise_false_alarm"), higher_is_better=False),
    Headline("Blind DER, collar 0.25 s (trainer evaluation)",
             metric("diarization/blind_c0.25_der"), higher_is_better=False),
    Headline("Factorisation gap: speaker minus content projection top-1 "
             "(1% = 1 point)",
             lambda m: (None if m.get("content/gap_points") is None
                        else m["content/gap_points"] / 100)),
    Headline("Held-out speaker k-NN top-1, content projection",
             metric("content/content_top1"), higher_is_better=False),
    Headline("Phoneme frame accuracy, linear probe on content projection",
             metric("content/content_phone_linear"),
             metric("content/random_phone_linear")),
    Headline("Phone error rate, CTC on frozen content projection",
             metric("content/content_per"), metric("content/random_per"),
             higher_is_better=False),
    Headline("Speaker count accuracy, routing slots (held-out mixtures)",
             metric("routing/count_accuracy")),
    Headline("PIT accuracy, routing slots (K >= 2)",
             metric("routing/pit_accuracy")),
    Headline("Overlap-aware blind DER, collar 0 (trainer evaluation)",
             metric("diarization/overlap_aware_c0_der"),
             higher_is_better=False),
)


def _pct(value: float | None) -> str:
  return "&mdash;" if value is None else f"{100 * value:.1f}%"


def _change(now: float, before: float | None, higher_is_better: bool) -> str:
  if before is None:
    return "&mdash;"
  points = 100 * (now - before)
  good = points > 0 if higher_is_better else points < 0
  css = "better" if good else "worse" if points else ""
  return f"<span class='{css}'>{points:+.1f} pts</span>"


def stage_table(final: Mapping[str, float],
                previous: Mapping[str, float] | None, previous_name: str,
                headlines=HEADLINES) -> str:
  """HTML table of one stage's headline values (empty if it has none)."""
  rows = []
  for h in headlines:
    now = h.value(final)
    if now is None:
      continue
    before = h.value(previous) if previous is not None else None
    floor = h.floor(final) if h.floor else None
    if floor is None and h.floor and previous is not None:
      floor = h.floor(previous)
    rows.append(f"<tr><td>{html.escape(h.label)}</td><td>{_pct(floor)}</td>"
                f"<td>{_pct(before)}</td><td>{_pct(now)}</td>"
                f"<td>{_change(now, before, h.higher_is_better)}</td></tr>")
  if not rows:
    return ""
  return ("<table><tr><th>Metric</th><th>Random floor</th><th>"
          f"{html.escape(previous_name)}</th><th>This stage</th>"
          "<th>Change</th></tr>" + "".join(rows) + "</table>")


def section(ctx: Context) -> list[Fragment]:
  body = []
  previous = None
  for run in ctx.stages:
    table = stage_table(run.final, previous.final if previous else None,
                        previous.stage.name if previous else "previous stage")
    steps = run.train_rows[-1]["step"] if run.train_rows else 0
    body.append(f"<h3>{html.escape(run.stage.name)} ({steps} steps)</h3>"
                + (table or "<p>No headline evaluation metrics logged.</p>"))
    previous = run
  return [Fragment("Metrics", "\n".join(body))]
