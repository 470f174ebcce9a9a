"""Loss curves of every term: each training metric named `*/loss` or
`*/total`, one panel per metric, one figure per stage."""

from __future__ import annotations

import math

import matplotlib.figure

from echo_jax.report.page import Context, Fragment, save_png

SUFFIXES = ("/loss", "/total")


def loss_keys(rows) -> list[str]:
  """Training metrics that are a loss term, `train/loss` (the sum) first."""
  keys = sorted({k for r in rows for k in r if k.endswith(SUFFIXES)})
  return sorted(keys, key=lambda k: k != "train/loss")


def plot(rows, title: str) -> matplotlib.figure.Figure:
  """[panels] of `loss_keys(rows)` against the step."""
  keys = loss_keys(rows)
  cols = min(3, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig = matplotlib.figure.Figure(figsize=(4.2 * cols, 2.8 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False).ravel()
  for ax, key in zip(axes, keys):
    points = [(r["step"], r[key]) for r in rows if key in r]
    ax.plot(*zip(*points), lw=1.2, marker="." if len(points) < 30 else None,
            color="C0" if key == "train/loss" else "C1")
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def section(ctx: Context) -> list[Fragment]:
  figures = []
  for run in ctx.stages:
    if not loss_keys(run.train_rows):
      continue
    figures.append(save_png(
        plot(run.train_rows, run.stage.name), ctx, f"loss_{run.stage.name}",
        f"{run.stage.name}: every loss term logged in training (train/loss is"
        " the weighted sum the optimiser sees)."))
  return [Fragment("Loss curves", figures=tuple(figures))] if figures else []
