"""Orbax checkpoints: train state, grain iterator state and config, together.

One `CheckpointManager` per workdir holds three items per step: `state` (step,
params, EMA target, optimizer state, base RNG), `data` (the grain iterator
state, so a resumed run continues the exact stream) and `config` (JSON, for
humans and for `init_from` checks). Saves are atomic (orbax finalises a step
only when every item is written), so a crash mid-save leaves the previous
step as the latest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from echo_jax import sharding as sharding_lib
from echo_jax.optimizer import param_path

ITEMS = ("state", "data", "config")


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler(),
          "config": ocp.JsonCheckpointHandler()}


def absolute(path: str) -> str:
  """Local paths made absolute (orbax needs it); URLs such as gs:// kept."""
  return path if "://" in path else os.path.abspath(path)


def make_manager(directory: str, *, save_every: int = 1, keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for `<workdir>/checkpoints` (any path orbax supports)."""
  directory = absolute(directory)
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep, create=not read_only,
      read_only=read_only,
      # Folders of saves a crash interrupted go at start-up.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=_handlers())


class CheckpointSaveError(OSError):
  """A save failed (e.g. disk full); the message is one line that says what
  happened and what to do. The partial folder is gone and the last committed
  step is intact."""


def save(manager: ocp.CheckpointManager, step: int, state: Mapping,
         data_iterator, config: Mapping, *, force: bool = False) -> bool:
  """Saves if the interval (or `force`) says so; returns whether it saved.

  Raises `CheckpointSaveError` as soon as this or an earlier asynchronous
  save is known to have failed.
  """
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(dict(config)))
  try:
    saved = manager.save(step, args=args, force=force)
    manager.check_for_errors()
  except Exception as e:  # Orbax wraps OS errors in its own types.
    raise save_failed(manager, e) from e
  return saved


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises `CheckpointSaveError` if a background save has failed."""
  try:
    manager.check_for_errors()
  except Exception as e:
    raise save_failed(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for pending saves and closes; a failed save becomes one line."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise save_failed(manager, e) from e
  finally:
    manager.close()


def committed_steps(directory) -> list[int]:
  """Finalised steps in a checkpoint directory (partial saves excluded)."""
  path = epath.Path(absolute(str(directory)))
  if not path.exists():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def remove_partial_saves(directory) -> list[str]:
  """Deletes the temporary folders of unfinished saves; returns their names."""
  path = epath.Path(absolute(str(directory)))
  partial = [p for p in path.iterdir() if ".orbax-checkpoint-tmp" in p.name
             ] if path.exists() else []
  for p in partial:
    p.rmtree(missing_ok=True)
  return [p.name for p in partial]


def save_failed(manager: ocp.CheckpointManager, error: BaseException
                ) -> CheckpointSaveError:
  """The one-line error for a failed save, after removing partial folders."""
  cause, root = error, error
  while cause is not None:  # The innermost OS error says what happened.
    if isinstance(cause, OSError):
      root = cause
    cause = cause.__cause__ or cause.__context__
  what = (f"disk full ({root.strerror})"
          if getattr(root, "errno", None) == errno.ENOSPC else
          f"{type(root).__name__}: {root}")
  try:
    removed = remove_partial_saves(manager.directory)
  except OSError:
    removed = []
  committed = committed_steps(manager.directory)
  last = f"step {committed[-1]}" if committed else "none yet"
  return CheckpointSaveError(
      f"Saving a checkpoint in {manager.directory} failed: {what}. "
      f"{'Removed the partial save. ' if removed else ''}The last committed "
      f"checkpoint ({last}) is intact; free space or fix the path, then rerun "
      "the same command to resume from it.")


def check_same_tree(expected, found, *, what: str, prefix: str = "") -> None:
  """Fails, naming the parameter, unless both trees have equal paths/shapes."""
  def shapes(tree):
    return {prefix + param_path(p): tuple(np.shape(x)) if not hasattr(x, "shape")
            else tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = shapes(expected), shapes(found)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  problems = []
  if missing:
    problems.append(f"missing in checkpoint: {missing[:5]}")
  if unexpected:
    problems.append(f"not in the model: {unexpected[:5]}")
  if wrong:
    problems.append("shape mismatch: " + ", ".join(
        f"{k} expected {want[k]} found {got[k]}" for k in wrong[:5]))
  if problems:
    raise ValueError(
        f"{what}: the checkpoint does not fit the model config ("
        + "; ".join(problems) + "). Use a checkpoint written with the same "
        "model config, or change config.model to match it.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   data_iterator) -> tuple[Mapping, int, dict] | None:
  """(state, step, saved config) of the newest step, if any; the iterator is
  restored in place."""
  step = manager.latest_step()
  if step is None:
    return None
  saved = _saved_tree(manager, step)
  check_same_tree(abstract_state, saved, what=f"Resuming {manager.directory}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
      config=ocp.args.JsonRestore()))
  return restored["state"], step, dict(restored["config"])


def restore_trees(directory: str, trees: Sequence[str], abstract_state: Mapping,
                  ) -> dict:
  """Reads the chosen top-level trees of another run's latest checkpoint.

  `trees` name entries of the saved state such as 'params/encoder' or
  'target'. Each is checked strictly (same parameter names and shapes) against
  this run's freshly built state: a missing key fails, never initialises at
  random.
  """
  manager = make_manager(directory, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"init_from: no checkpoint in {directory}. Run the previous stage "
        "first, or set --config.init_from.workdir=''.")
  saved = _saved_tree(manager, step)
  selected = {}
  for tree in trees:
    want, got = _subtree(abstract_state, tree), _subtree(saved, tree)
    if got is None:
      raise KeyError(f"init_from: {directory} step {step} has no '{tree}' "
                     f"tree; it has {sorted(saved)}.")
    check_same_tree(want, got, what=f"init_from {directory}",
                    prefix=f"{tree}/")
    selected[tree] = want
  # Read only the selected trees, with this run's shardings: orbax's partial
  # restore skips every other leaf, the previous stage's optimizer moments
  # included. (The standard handler restores whole trees only; the PyTree
  # handler reads the same files.)
  subset: dict = {}
  for tree, want in selected.items():
    *parents, last = tree.split("/")
    node = subset
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = want
  path = epath.Path(manager.directory) / str(step) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=subset, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(subset)))
  logging.info("init_from: restored %s from %s (step %d).", list(trees),
               directory, step)
  return {tree: _subtree(restored, tree) for tree in trees}


def _saved_tree(manager: ocp.CheckpointManager, step: int):
  """The saved state's metadata (shapes, dtypes) as a plain nested dict."""
  metadata = manager.item_metadata(step)["state"]
  return getattr(metadata, "tree", metadata)


def _subtree(tree, path: str):
  for key in path.split("/"):
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def set_subtree(tree: dict, path: str, value) -> None:
  """tree['a']['b'] = value for path 'a/b' (in place)."""
  *parents, last = path.split("/")
  for key in parents:
    tree = tree[key]
  tree[last] = value


def load_state(workdir: str, step: int | None = None, *,
               mesh: jax.sharding.Mesh | None = None
               ) -> tuple[dict, dict, int]:
  """(raw state dict, config dict, step) of a run's checkpoint, for probes,
  export and diarization. Arrays come back sharded over `mesh` (FSDP rule) or
  on one device, whatever mesh (or number of devices) wrote them."""
  manager = make_manager(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train "
                              "the stage first.")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"No step {step} in {workdir}/checkpoints; "
                              f"saved steps: {sorted(manager.all_steps())}.")
    saved = _saved_tree(manager, step)
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda m: device, saved)
    else:
      shardings = sharding_lib.param_shardings(saved, mesh)
    abstract = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
        saved, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return dict(restored["state"]), dict(restored["config"]), step


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/.lock` for a run (process 0, local paths): a second
  trainer on the same workdir fails at once instead of both overwriting each
  other's checkpoints. The OS drops the lock when the process dies."""
  if "://" in workdir or jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "?"
      raise RuntimeError(
          f"Another trainer (pid {holder}) is running in {workdir}: two runs "
          "on one workdir would overwrite each other's checkpoints. Wait for "
          "it, stop it, or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
