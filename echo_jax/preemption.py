"""SIGTERM -> save the current step and stop, on every host at the same step.

`Preemption` is a context manager around the training loop; the loop asks
`should_stop(step)` once per step and, when it says yes, saves `step` and
leaves. A second SIGTERM (e.g. a hung step) stops the process at once.

One process: `should_stop` is the local flag, no communication at all.

Several processes (`jax.distributed.initialize()`): a SIGTERM may reach only
some hosts, yet every host must save the same step (a checkpoint save is a
collective) and stop. We reuse JAX's preemption sync manager, the protocol
behind `multihost_utils.reached_preemption_sync_point` (as MaxText/orbax
do): a host that got the notice posts it to the coordination service, every
host's background thread then agrees on the sync step (the fastest host's
step + 1) and `reached_preemption_sync_point(step)` turns true there on every
host. Until a notice arrives that call is a local mutex and an integer
compare, so a step costs nothing extra.

JAX's runtime installs its own C-level SIGTERM notifier for that protocol;
our Python handler replaces it while the loop runs (for the warning and the
second-SIGTERM exit) and posts the notice itself, exactly what the notifier
would have posted. Without the coordination service (e.g. a multi-host
runtime that JAX did not initialise, or `jax_enable_preemption_service`
off) the local flags are OR-ed with a small all-gather every `sync_every`
steps, the same steps on every host.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

# The key JAX's preemption notifier posts (tsl preemption_sync_manager.cc,
# kPreemptionNoticeKey); its value is the death time, RFC 3339.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def _sync_manager_client():
  """The distributed client when JAX's preemption sync manager runs."""
  from jax._src import distributed  # The client has no public accessor.
  state = distributed.global_state
  if state.client is None or state.preemption_sync_manager is None:
    return None
  return state.client


class Preemption:
  """Turns SIGTERM into a flag that the loop reads at step boundaries."""

  def __init__(self, sync_every: int = 10):
    self.requested = False  # This process got SIGTERM.
    self.sync_every = sync_every  # Fallback all-gather period (steps).
    self._previous = None
    self._client = None
    self._multiprocess = False
    self._announced = False

  def __enter__(self):
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      self._client = _sync_manager_client()
      if self._client is None:
        logging.warning(
            "No JAX preemption sync manager; hosts agree on SIGTERM with an "
            "all-gather every %d steps.", self.sync_every)
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:  # A second SIGTERM (e.g. a hung step): die now.
      logging.error("Second SIGTERM: stopping now; the current step is not "
                    "saved (the last committed checkpoint is kept).")
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
      return
    logging.warning("SIGTERM: saving a checkpoint and stopping (send it "
                    "again to stop at once).")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` and stop (same answer on every host).

    Call it once per step, with consecutive steps, on every host.
    """
    if not self._multiprocess:
      return self.requested
    if self._client is None:
      if step % self.sync_every:
        return False
      flags = multihost_utils.process_allgather(np.int32(self.requested))
      return bool(np.any(flags))
    if self.requested and not self._announced:
      self._announce()
    return multihost_utils.reached_preemption_sync_point(step)

  def _announce(self) -> None:
    """Posts the notice, as JAX's own SIGTERM notifier would."""
    self._announced = True
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    try:
      self._client.key_value_set(_NOTICE_KEY, now)
    except jax.errors.JaxRuntimeError as e:  # Another host posted it first.
      logging.info("Preemption notice already posted: %s", e)
    logging.warning("Host %d: told the other hosts about the SIGTERM.",
                    jax.process_index())

  def __exit__(self, *exc):
    # Python's record of the previous handler: JAX's C-level notifier is not
    # in it (SIG_DFL then), so after the loop a SIGTERM simply ends the run.
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
