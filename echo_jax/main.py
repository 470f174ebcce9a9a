"""Runs one stage: `python -m echo_jax.main --config=FILE:VARIANT --workdir=DIR`.

Thin on purpose: the trainer is the importable, tested library.
"""

import logging as std_logging

from absl import app, flags
from ml_collections import config_flags

from echo_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. experiments/stage1_jepa.py:cpu.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or any "
                               "path orbax supports, e.g. gs://).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Orbax and grain log every save at INFO through absl; keep the console for
  # the run's own progress (our modules log through the root logger).
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  if _DISTRIBUTED.value:
    import jax  # Initialise before any other JAX call.
    jax.distributed.initialize()
  std_logging.info("Config:\n%s", _CONFIG.value)
  metrics = trainer.train(_CONFIG.value, _WORKDIR.value)
  std_logging.info("Final metrics: %s", metrics)


if __name__ == "__main__":
  app.run(main)
