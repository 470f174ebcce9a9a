"""The one trainer. Stages differ only by config: objective terms, heads,
`init_from`, frozen / slowed parameter groups and evaluators.

Resume order, written once here: this workdir's latest checkpoint, else the
`init_from` trees of a previous stage, else from scratch.

The host does not wait for the devices every step: metrics come to the host
at log steps, evaluations and saves; a non-finite step freezes the state on
device and records its step, which the host reads before any save.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from data_pipelines import stream
from echo_jax import checkpointing, losses, metric_writer, optimizer
from echo_jax import preemption as preemption_lib
from echo_jax import sharding
from echo_jax.evaluators import registry as eval_registry
from echo_jax.model import EchoModel, build_model, clip_samples, param_count
from echo_jax.objectives import jepa


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM: the run saved `step` and stopped before `total_steps`.

  `python -m echo_jax.main` exits with `EXIT_PREEMPTED` then, so a scheduler
  can tell a preempted run (rerun it to resume) from a finished one (0).
  """

  def __init__(self, step: int, total_steps: int):
    super().__init__(f"Preempted: saved step {step} of {total_steps} and "
                     "stopped; rerun the same command to resume.")
    self.step = step


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: temporary failure, try again.

# Config fields that may differ on resume without a warning.
_RESUME_FREE = ("progress", "log_every", "evals")


def init_state(model: EchoModel, config, num_samples: int) -> dict:
  """A fresh train state (a plain dict pytree, float32 masters)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  params = model.init(init_rng, num_samples)
  tx = optimizer.make_optimizer(config)
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          # The EMA target starts as a copy of the encoder (I-JEPA).
          "target": jax.tree.map(jnp.copy, params["encoder"]),
          "opt_state": tx.init(params), "rng": step_rng}


def widen_batch(batch: dict) -> dict:
  """The stream's int16 PCM waveforms (`config.data.wire_dtype`) as float32
  in [-1, 1), exactly as `storage.to_float` scales them."""
  return {k: (v.astype(jnp.float32) * (1.0 / storage.INT16_SCALE)
              if v.dtype == jnp.int16 else v) for k, v in batch.items()}


def make_train_step(model: EchoModel, config):
  """`train_step(state, batch, failed_at) -> (state, metrics, failed_at)`.

  `failed_at` is an int32 scalar: 0 while every step was finite, else the
  number of the first step with a non-finite loss, gradient or parameter.
  From that step on the state is returned unchanged, so it never holds NaNs
  and the host can check one scalar whenever it likes.
  """
  total_steps = config.total_steps
  schedule = optimizer.lr_schedule(config)
  tx = optimizer.make_optimizer(config)

  def train_step(state: dict, batch: dict, failed_at: jax.Array):
    batch = widen_batch(batch)
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    loss_fn = functools.partial(losses.stage_loss, model, config.objective)
    # The host reads metrics after the steps the loop logs (see `train`).
    log_step = ((step + 1) % config.log_every == 0) | (step + 1 == total_steps)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["target"], batch, rng, step, log_step)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    momentum = jepa.ema_momentum(step, total_steps, start=config.ema.start,
                                 end=config.ema.end)
    target = jepa.ema_update(state["target"], params["encoder"], momentum)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    new_state = {"step": step + 1, "params": params, "target": target,
                 "opt_state": opt_state, "rng": state["rng"]}
    # Finite, clipped gradients give finite AdamW updates, so the new state
    # is finite whenever these are. Not waiting on a reduction over the new
    # params lets XLA fuse the keep-or-update select into the update itself
    # instead of a second pass over every parameter and moment.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    failed_at = jnp.where((failed_at == 0) & ~finite, step + 1, failed_at)
    new_state = jax.tree.map(lambda new, old: jnp.where(failed_at == 0, new, old),
                             new_state, state)
    metrics.update({"train/grad_norm": grad_norm,
                    "train/param_norm": param_norm,
                    "train/lr": schedule(step), "train/ema_momentum": momentum})
    return new_state, metrics, failed_at

  return train_step


def jit_train_step(model: EchoModel, config, mesh: jax.sharding.Mesh,
                   state_sharding):
  """The train step jitted with the run's shardings; donates the state."""
  replicated = sharding.replicated(mesh)
  return jax.jit(
      make_train_step(model, config),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
      out_shardings=(state_sharding, replicated, replicated),
      donate_argnums=(0, 2), **model.jit_kwargs)


def resolve_init_from(pattern: str, workdir: str) -> str:
  """`config.init_from.workdir` with `{parent}` = the parent of `workdir`."""
  if "://" in workdir:
    parent = posixpath.dirname(workdir.rstrip("/"))
  else:
    parent = os.path.dirname(os.path.abspath(workdir))
  return pattern.format(parent=parent)


def _check_finite(failed_at: jax.Array, metrics: dict, last_saved) -> None:
  failed = int(jax.device_get(failed_at))
  if failed:
    bad = {k: float(v) for k, v in jax.device_get(metrics).items()
           if not np.isfinite(v)}
    raise NonFiniteLossError(
        f"Non-finite loss, gradient or parameter at step {failed} (non-finite"
        f" metrics now: {bad}). The state was not updated from that step on "
        f"and the last good checkpoint (step {last_saved}) is intact. Lower "
        "config.optim.lr, raise config.ema.start, or check the data.")


def check_config(config) -> None:
  """Fails, naming the field, on counts that cannot train."""
  for field in ("total_steps", "log_every", "checkpoint.every",
                "checkpoint.keep", "data.batch_size"):
    node = config
    for key in field.split("."):
      node = node[key]
    if not isinstance(node, int) or node < 1:
      raise ValueError(f"config.{field}={node!r}: must be a positive integer.")


def _config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """'key: saved -> current' for every leaf that differs."""
  changes = []
  for key in sorted(set(saved) | set(current)):
    if not prefix and key in _RESUME_FREE:
      continue
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += _config_changes(a, b, f"{prefix}{key}.")
    elif jax.tree.leaves(a) != jax.tree.leaves(b):  # Tuples equal lists.
      changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return changes


def train(config: ml_collections.ConfigDict, workdir: str,
          mesh: jax.sharding.Mesh | None = None) -> dict:
  """Trains `config.total_steps` steps in `workdir`; returns final metrics.

  Raises `Preempted` after saving when SIGTERM stopped the run early.
  """
  check_config(config)
  with checkpointing.workdir_lock(workdir):
    return _train(config, workdir, mesh)


def _train(config, workdir, mesh) -> dict:
  mesh = mesh or sharding.make_mesh(config.mesh)
  losses.check_objective(config.objective, config.model.heads)
  manifest_path = stream.resolve_manifest(config.data)
  utterances = manifest_lib.read_manifest(manifest_path)
  num_classes = len(manifest_lib.speakers_of(utterances, manifest_lib.TRAIN))
  model = build_model(config, num_classes)
  num_samples = clip_samples(config)

  # `skipped` (unusable draws per example) stays on the host, for the totals.
  dataset = stream.stage_stream(
      config.data, manifest_path,
      losses.batch_keys(config.objective) + ("skipped",),
      seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  data_iterator = iter(dataset)

  abstract = jax.eval_shape(functools.partial(init_state, model, config,
                                              num_samples))
  state_sharding = sharding.param_shardings(abstract, mesh)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, state_sharding)

  manager = checkpointing.make_manager(
      os.path.join(workdir, "checkpoints"), save_every=config.checkpoint.every,
      keep=config.checkpoint.keep)
  resumed = checkpointing.restore_latest(manager, abstract, data_iterator)
  if resumed is not None:
    state, start_step, saved_config = resumed
    logging.info("Resumed %s at step %d.", workdir, start_step)
    changes = _config_changes(saved_config, config.to_dict())
    if changes:
      logging.warning("Resuming %s with a config that differs from the saved "
                      "one (the new values apply from step %d): %s", workdir,
                      start_step, "; ".join(changes))
  else:
    start_step = 0
    state = jax.jit(functools.partial(init_state, model, config, num_samples),
                    out_shardings=state_sharding)()
    if config.init_from.workdir:
      source = resolve_init_from(config.init_from.workdir, workdir)
      trees = checkpointing.restore_trees(
          os.path.join(source, "checkpoints"), config.init_from.trees,
          abstract)
      for path, tree in trees.items():
        checkpointing.set_subtree(state, path, tree)
  logging.info("Params: encoder %.2fM, predictor %.2fM, heads %.2fM.",
               *(param_count(state["params"][k]) / 1e6
                 for k in ("encoder", "predictor", "heads")))

  train_step = jit_train_step(model, config, mesh, state_sharding)
  failed_at = jax.device_put(jnp.zeros((), jnp.int32),
                             sharding.replicated(mesh))
  evaluators = eval_registry.build(config, model, manifest_path)
  writer = metric_writer.MetricWriter(
      workdir, config.total_steps, initial_step=start_step,
      log_every=config.log_every, progress=config.get("progress", None))
  config_dict = config.to_dict()
  metrics: dict = {}
  step = start_step
  skipped = 0  # Unusable utterances this host's stream re-drew this run.
  tick, tick_step = time.time(), step
  stop = False
  try:
    with preemption_lib.Preemption() as preemption:
      while step < config.total_steps:
        local = next(data_iterator)
        skipped += int(np.sum(local.pop("skipped")))
        batch = sharding.global_batch(local, mesh)
        state, metrics, failed_at = train_step(state, batch, failed_at)
        checkpointing.check_saves(manager)  # A failed async save stops now.
        step += 1
        last = step == config.total_steps
        stop = preemption.should_stop(step)
        log_now = step % config.log_every == 0 or last
        save_now = stop or last or manager.should_save(step)
        due = [e for e in evaluators if step % e.every == 0 or last]
        if not (log_now or save_now or due):
          continue  # Nothing for the host to read: dispatch the next step.
        _check_finite(failed_at, metrics, manager.latest_step())
        metrics = jax.device_get(metrics)
        if log_now:
          now = time.time()
          rate = (step - tick_step) / max(now - tick, 1e-9)
          metrics["perf/steps_per_s"] = rate
          metrics["perf/examples_per_s"] = rate * config.data.batch_size
          metrics["data/skipped_utterances"] = skipped
          tick, tick_step = now, step
          writer.write(step, metrics)
        checkpointing.save(manager, step, state, data_iterator, config_dict,
                           force=stop or (last and manager.latest_step() != step))
        for evaluator in due:
          results = evaluator.run(model, state)
          writer.write(step, results, console=True)
          metrics.update(results)
        if stop:
          break
  except BaseException:
    try:  # Already failing: the first error is the one to report.
      checkpointing.finish(manager)
    except checkpointing.CheckpointSaveError as e:
      logging.error("%s", e)
    raise
  else:
    checkpointing.finish(manager)
  finally:
    writer.close()
  if stop and step < config.total_steps:
    # Said only now that the save is committed.
    logging.warning("Stopped at step %d after SIGTERM (checkpoint committed).",
                    step)
    raise Preempted(step, config.total_steps)
  return {k: float(v) for k, v in metrics.items()}
