"""What every `python -m tools.<name>` shares."""

import json
import logging
import os


def setup_logging(*names: str) -> None:
  """Root at WARNING keeps orbax/JAX chatter out; `names` (the tool's own
  logger, "echo_jax") at INFO. `force`: absl may have installed a handler
  already."""
  logging.basicConfig(level=logging.WARNING,
                      format="%(levelname)s %(message)s", force=True)
  for name in names:
    logging.getLogger(name).setLevel(logging.INFO)


def print_and_save(results: dict, table: str, json_path: str | None) -> dict:
  """Prints a tool's table and, when asked, writes its results as JSON
  (complete or not at all: written beside, then renamed)."""
  print(table)
  if json_path:
    tmp = f"{json_path}.tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2)
    os.replace(tmp, json_path)
  return results
