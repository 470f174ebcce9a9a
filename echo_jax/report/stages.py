"""The stages of the stack and what each run wrote.

A stage is a file `experiments/stage<N>_<what>.py`; its run for a variant
lives in `<runs>/stage<N>` (the default `init_from` of stage N is
`{parent}/stage<N-1>`, so the workdirs sit side by side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from echo_jax import checkpointing

_STAGE_FILE = re.compile(r"^stage(\d+)_\w+\.py$")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One `experiments/stage<N>_<what>.py`."""
  number: int
  name: str         # The file's stem, e.g. "stage1_jepa".
  config_path: str

  def workdir(self, runs: str) -> str:
    return os.path.join(runs, f"stage{self.number}")


def discover(experiments_dir: str) -> tuple[Stage, ...]:
  """Every `stage<N>_*.py` of `experiments_dir`, by N."""
  stages = []
  for name in os.listdir(experiments_dir):
    match = _STAGE_FILE.match(name)
    if match:
      stages.append(Stage(int(match.group(1)), name[:-3],
                          os.path.join(experiments_dir, name)))
  stages.sort(key=lambda s: s.number)
  numbers = [s.number for s in stages]
  if len(set(numbers)) != len(numbers):
    raise ValueError(f"Two stage files share a number in {experiments_dir}: "
                     f"{[s.name for s in stages]}; give each its own N.")
  if not stages:
    raise FileNotFoundError(f"No experiments/stage<N>_*.py in "
                            f"{experiments_dir}.")
  return tuple(stages)


def load_config(stage: Stage, variant: str, overrides: Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """The config `python -m echo_jax.main --config=FILE:VARIANT *overrides`
  would train (overrides like `--config.total_steps=10`), locked."""
  argv = ["stack", f"--config={stage.config_path}:{variant}", *overrides]
  # A private flag set: parsed like main's, leaving the global FLAGS alone.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Stage config.",
                                  flag_values=flag_values, sys_argv=argv)
  unparsed = flag_values(argv)
  if len(unparsed) > 1:
    raise ValueError(f"Stage arguments {unparsed[1:]} are not config "
                     "overrides; pass them as --config.<field>=<value>.")
  return flag_values.config


_OVERRIDE_FIELD = re.compile(r"^--config\.([\w.]+)=")


def has_field(config: ml_collections.ConfigDict, path: str) -> bool:
  """Whether `config` has the dotted field `path` (e.g. "optim.lr")."""
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def stage_overrides(stage: Stage, variant: str, overrides: Sequence[str]
                    ) -> list[str]:
  """The `--config.<field>=<value>` overrides whose field `stage`'s config
  has: a stage-only key (e.g. objective.activity.weight) leaves the other
  stages alone. Anything else is kept, for `load_config` to judge."""
  config = load_config(stage, variant)
  kept = []
  for override in overrides:
    match = _OVERRIDE_FIELD.match(override)
    if match is None or has_field(config, match.group(1)):
      kept.append(override)
  return kept


def latest_step(workdir: str) -> int | None:
  """Newest committed checkpoint step of a run, None if it has none."""
  steps = checkpointing.committed_steps(os.path.join(workdir, "checkpoints"))
  return steps[-1] if steps else None


def is_finished(workdir: str, config) -> bool:
  """A run is finished when it saved its `total_steps` checkpoint (the
  trainer always saves the last step)."""
  return latest_step(workdir) == config.total_steps


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(training rows in step order, evaluation rows) of `metrics.jsonl`.

  A resumed run re-logs the steps after its last checkpoint: the last row of
  each step is kept.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: has {workdir} been trained?")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = {r["step"]: r for r in rows if "train/loss" in r}
  evals = [r for r in rows if "train/loss" not in r]
  return [train[s] for s in sorted(train)], evals


@dataclasses.dataclass(frozen=True)
class StageRun:
  """A trained stage: its config, workdir and metrics."""
  stage: Stage
  workdir: str
  config: ml_collections.ConfigDict
  train_rows: tuple[dict, ...]
  eval_rows: tuple[dict, ...]

  @classmethod
  def read(cls, stage: Stage, runs: str, config) -> StageRun:
    train, evals = read_metrics(stage.workdir(runs))
    return cls(stage, stage.workdir(runs), config, tuple(train), tuple(evals))

  @property
  def final(self) -> dict[str, float]:
    """The latest value of every evaluator metric."""
    values: dict[str, float] = {}
    for row in self.eval_rows:
      values.update({k: v for k, v in row.items() if k not in ("step", "time")})
    return values

  @property
  def heads(self) -> tuple[str, ...]:
    return tuple(self.config.model.heads)
