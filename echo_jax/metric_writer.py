"""Metrics to the console (with a progress bar when interactive), JSONL and
TensorBoard event files. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalar metrics; `progress` shows a bar on a terminal only."""

  def __init__(self, workdir: str, total_steps: int, *, initial_step: int = 0,
               log_every: int = 10, progress: bool | None = None):
    self.enabled = jax.process_index() == 0
    self.log_every = log_every
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    # A resumed run repeats the steps after its checkpoint: drop their old
    # rows (JSONL) and events (TensorBoard's purge_step), so each step is
    # logged once.
    drop_rows_after(path, initial_step)
    self._jsonl = open(path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=initial_step + 1 if initial_step
                             else None)
    if progress is None:
      progress = sys.stderr.isatty()
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step,
                            dynamic_ncols=True, desc="train")

  def write(self, step: int, metrics: Mapping[str, float], *,
            console: bool | None = None) -> None:
    """All to JSONL/TensorBoard; to the console every `log_every` steps."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars})
                      + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if "train/loss" in scalars:
        self._bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")
    if console or (console is None and step % self.log_every == 0):
      line = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
      message = f"step {step}: {line}"
      if self._bar is not None:
        self._bar.write(message)
      else:
        logging.info(message)

  def close(self) -> None:
    if self.enabled:
      if self._bar is not None:
        self._bar.close()
      self._jsonl.close()
      self._tb.close()


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites a metrics JSONL without rows past `step` (atomically); returns
  how many it dropped. A torn last line (a crash mid-write) goes too."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if row.get("step", 0) > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped
