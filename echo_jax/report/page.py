"""The report hub: runs every registered section and writes `index.html`.

A section is a function `(Context) -> [Fragment]`: a title, an HTML body
(tables, notes) and the PNG figures it saved in the report folder. It returns
no fragment when it has nothing to show (e.g. no stage can diarize). The hub
knows no section; `echo_jax/report/sections.py` lists them.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import logging
import os
import traceback
from collections.abc import Callable, Mapping, Sequence

import matplotlib.figure

from echo_jax.report.stages import StageRun

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Figure:
  file: str      # PNG name inside the report folder.
  caption: str


@dataclasses.dataclass(frozen=True)
class Fragment:
  title: str
  html: str = ""                    # Already escaped by the section.
  figures: tuple[Figure, ...] = ()


@dataclasses.dataclass(frozen=True)
class Context:
  """What a section can read: the stages' runs and the evaluations' results."""
  runs: str
  out_dir: str                      # The report folder (PNGs go here).
  variant: str
  stages: tuple[StageRun, ...]      # Trained stages, in order.
  evaluations: Mapping[str, dict]   # Name -> results (see evaluations.py).


Section = Callable[[Context], Sequence[Fragment]]


def save_png(fig: matplotlib.figure.Figure, ctx: Context, name: str,
             caption: str) -> Figure:
  """Saves `fig` as `<report>/<name>.png`; returns its `Figure` entry."""
  file = f"{name}.png"
  fig.savefig(os.path.join(ctx.out_dir, file), dpi=110, bbox_inches="tight")
  return Figure(file, caption)


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.better { color: #1a7f37; } .worse { color: #c62828; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; }
.error { background: #fdecea; border: 1px solid #c62828; padding: 0.5em; }
"""


def _fragment_html(fragment: Fragment) -> str:
  parts = [f"<h2>{html.escape(fragment.title)}</h2>", fragment.html]
  for f in fragment.figures:
    parts.append(f'<figure><img src="{html.escape(f.file)}" alt="'
                 f'{html.escape(f.caption)}"><figcaption>'
                 f"{html.escape(f.caption)}</figcaption></figure>")
  return "\n".join(parts)


def _error_html(name: str, error: str) -> str:
  return (f"<h2>{html.escape(name)}</h2><div class='error'>This section "
          f"failed:<pre>{html.escape(error)}</pre></div>")


def write(ctx: Context, sections: Sequence[tuple[str, Section]],
          summary: Sequence[str] = ()) -> tuple[str, list[str]]:
  """Writes `<out_dir>/index.html`; returns (its path, failed sections).

  A failing section is logged with its traceback and shown as an error box,
  so the other sections still reach the page; the caller decides the exit
  status from the failed names.
  """
  os.makedirs(ctx.out_dir, exist_ok=True)
  body, failed = [], []
  for name, section in sections:
    try:
      fragments = list(section(ctx))
    except Exception:  # noqa: BLE001 - shown on the page and returned.
      error = traceback.format_exc()
      _log.error("Report section %r failed:\n%s", name, error)
      body.append(_error_html(name, error))
      failed.append(name)
      continue
    for fragment in fragments:
      missing = [f.file for f in fragment.figures
                 if not os.path.exists(os.path.join(ctx.out_dir, f.file))]
      if missing:
        raise FileNotFoundError(f"Report section {name!r} names figures "
                                f"{missing} it did not save in {ctx.out_dir}.")
      body.append(_fragment_html(fragment))
  stages = ", ".join(
      f"{s.stage.name} (step {s.train_rows[-1]['step'] if s.train_rows else 0}"
      f" of {s.config.total_steps})" for s in ctx.stages)
  head = (f"<h1>Echo-JAX stack report: variant {html.escape(ctx.variant)}</h1>"
          f"<p>Runs: <code>{html.escape(os.path.abspath(ctx.runs))}</code><br>"
          f"Stages: {html.escape(stages)}<br>Written "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}.</p>")
  if summary:
    head += f"<pre>{html.escape(chr(10).join(summary))}</pre>"
  page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>"
          f"Echo-JAX report ({html.escape(ctx.variant)})</title><style>"
          f"{_STYLE}</style></head><body>\n{head}\n" + "\n".join(body)
          + "\n</body></html>\n")
  path = os.path.join(ctx.out_dir, "index.html")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(page)
  os.replace(tmp, path)
  return path, failed
