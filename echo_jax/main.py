"""Runs one stage: `python -m echo_jax.main --config=FILE:VARIANT --workdir=DIR`.

Thin on purpose: the trainer is the importable, tested library.

Exit status: 0 finished; 75 (`trainer.EXIT_PREEMPTED`) stopped by SIGTERM
after saving, so rerun it to resume; 1 a fault reported in one line (NaN
loss, failed save); anything else an unexpected error with its traceback.
"""

import logging as std_logging
import sys

from absl import app, flags
from ml_collections import config_flags

from echo_jax import checkpointing, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. experiments/stage1_jepa.py:cpu.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or any "
                               "path orbax supports, e.g. gs://).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host); "
    "alone, the cluster (Cloud TPU, SLURM, ...) is detected.")
# Explicit cluster, e.g. several processes on one machine (tests). Unset flags
# are left to the auto-detection.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (with --distributed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Orbax and grain log every save at INFO through absl; keep the console for
  # the run's own progress (our modules log through the root logger).
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  if _DISTRIBUTED.value:
    import jax  # Initialise before any other JAX call.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  std_logging.info("Config:\n%s", _CONFIG.value)
  try:
    metrics = trainer.train(_CONFIG.value, _WORKDIR.value)
  except trainer.Preempted as e:
    std_logging.warning("%s", e)
    sys.exit(trainer.EXIT_PREEMPTED)
  except (trainer.NonFiniteLossError, checkpointing.CheckpointSaveError) as e:
    # Expected faults: one line that says what to do, not a traceback.
    std_logging.error("%s", e)
    sys.exit(1)
  std_logging.info("Final metrics: %s", metrics)


if __name__ == "__main__":
  app.run(main)
