"""What every `python -m tools.<name>` shares."""

import logging


def setup_logging(*names: str) -> None:
  """Root at WARNING keeps orbax/JAX chatter out; `names` (the tool's own
  logger, "echo_jax") at INFO. `force`: absl may have installed a handler
  already."""
  logging.basicConfig(level=logging.WARNING,
                      format="%(levelname)s %(message)s", force=True)
  for name in names:
    logging.getLogger(name).setLevel(logging.INFO)
