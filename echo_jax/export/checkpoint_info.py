"""A checkpoint's tree, shapes, dtypes and parameter counts from orbax's
metadata alone: no array is read or put on a device."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from echo_jax import checkpointing


@dataclasses.dataclass(frozen=True)
class Leaf:
  shape: tuple[int, ...]
  dtype: str

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  workdir: str
  step: int
  saved_steps: list[int]
  config: dict
  tree: dict            # Nested dicts (lists as {index: ...}) of `Leaf`.


def _plain(node):
  """Metadata as nested dicts of `Leaf`; empty optimizer slots (None) go."""
  if isinstance(node, (list, tuple)):
    node = {str(i): v for i, v in enumerate(node)}
  if isinstance(node, Mapping):
    children = {str(k): _plain(v) for k, v in node.items()}
    return {k: v for k, v in children.items() if v is not None}
  if node is None:
    return None
  return Leaf(tuple(int(d) for d in node.shape), str(node.dtype))


def read(workdir: str, step: int | None = None) -> CheckpointInfo:
  """Metadata of `workdir`'s checkpoint at `step` (None: the latest)."""
  directory = os.path.join(workdir, "checkpoints")
  if not epath.Path(checkpointing.absolute(directory)).exists():
    raise FileNotFoundError(f"No checkpoints in {directory}: is {workdir} a "
                            "training workdir? Train the stage first.")
  manager = checkpointing.make_manager(directory, read_only=True)
  try:
    saved = sorted(manager.all_steps())
    step = saved[-1] if step is None and saved else step
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {directory}.")
    if step not in saved:
      raise FileNotFoundError(f"No step {step} in {directory}; saved steps: "
                              f"{saved}.")
    tree = _plain(checkpointing._saved_tree(manager, step))
    config = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()
  return CheckpointInfo(workdir, int(step), saved, dict(config), tree)


def count(node) -> int:
  """Number of scalars under a node."""
  if isinstance(node, Leaf):
    return node.size
  return sum(count(v) for v in node.values())


def counts(tree: dict) -> dict[str, int]:
  """Scalars per top-level tree, with params split into encoder, predictor
  and heads (and each head)."""
  result = {}
  for key in sorted(tree):
    if key == "params":
      params = tree["params"]
      result["params"] = count(params)
      for part in sorted(params):
        result[f"params/{part}"] = count(params[part])
        if part == "heads":
          for head in sorted(params["heads"]):
            result[f"params/heads/{head}"] = count(params["heads"][head])
    else:
      result[key] = count(tree[key])
  return result


def _natural(key: str) -> list:
  """blocks_2 before blocks_10; list indices in numeric order."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def tree_lines(node: dict, depth: int | None = None, indent: int = 0
               ) -> list[str]:
  """One line per node: leaves with shape and dtype, inner nodes with their
  scalar count; below `depth` levels only counts are shown."""
  lines = []
  for key in sorted(node, key=_natural):
    child = node[key]
    pad = "  " * indent
    if isinstance(child, Leaf):
      lines.append(f"{pad}{key}  {list(child.shape)} {child.dtype}  "
                   f"{child.size:,}")
    else:
      lines.append(f"{pad}{key}/  {count(child):,}")
      if depth is None or indent + 1 < depth:
        lines += tree_lines(child, depth, indent + 1)
  return lines


def report(info: CheckpointInfo, depth: int | None = None) -> str:
  """What `python -m tools.export inspect` prints."""
  config = info.config
  model = config.get("model", {})
  lines = [f"{info.workdir}: step {info.step} (saved steps {info.saved_steps})",
           f"stage {config.get('stage', '?')!r}, variant "
           f"{config.get('variant', '?')!r}, heads {model.get('heads', [])}",
           "", "Parameter counts (scalars) per tree:"]
  lines += [f"  {name:<28}{n:>14,}" for name, n in counts(info.tree).items()]
  lines += ["", "Tree:"] + ["  " + l for l in tree_lines(info.tree, depth)]
  return "\n".join(lines)
