"""SIGTERM -> save the current step and stop.

`Preemption` is a context manager around the training loop; the loop asks
`should_stop(step)` once per step and, when it says yes, saves `step` and
leaves. A second SIGTERM (e.g. a hung step) stops the process at once.
"""

from __future__ import annotations

import logging
import os
import signal


class Preemption:
  """Turns SIGTERM into a flag that the loop reads at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:  # A second SIGTERM (e.g. a hung step): die now.
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
      return
    logging.warning("SIGTERM: saving a checkpoint and stopping (send it "
                    "again to stop at once).")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` and stop (same answer on every host)."""
    del step
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
