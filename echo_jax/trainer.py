"""The one trainer. Stages differ only by config: loss terms, heads,
`init_from`, frozen / slowed parameter groups and evaluators.

Resume order, written once here: this workdir's latest checkpoint, else the
`init_from` trees of a previous stage, else from scratch.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from echo_jax import checkpointing, losses, metric_writer, optimizer
from echo_jax import preemption as preemption_lib
from echo_jax import sharding
from echo_jax.evaluators import registry as eval_registry
from echo_jax.model import EchoModel, build_model, clip_samples, param_count
from echo_jax.objectives import jepa


# Batch entries the losses read; the rest of the stream's example (sources,
# phoneme tracks) stays on the host instead of being copied to devices.
DEVICE_KEYS = ("mixture", "speakers", "activity", "num_speakers")


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; the last good checkpoint is kept."""


def resolve_manifest(data_config) -> str:
  """The configured manifest, or the embedded default corpus (built once)."""
  if data_config.manifest:
    if not os.path.exists(data_config.manifest):
      raise FileNotFoundError(
          f"config.data.manifest={data_config.manifest} does not exist; "
          "prepare a corpus with tools/prepare_corpus.py or leave it empty "
          "for the embedded default corpus.")
    return data_config.manifest
  from data_pipelines import default_corpus  # Only needed for the default.
  return default_corpus.ensure_default_corpus(size=data_config.corpus_size)


def mixture_config(data_config) -> mixtures.MixtureConfig:
  return mixtures.MixtureConfig(
      clip_seconds=data_config.clip_seconds, k_min=data_config.k_min,
      k_max=data_config.k_max, p_mixture=data_config.p_mixture,
      gain_db=data_config.gain_db)


def make_dataset(config, manifest_path: str, split: str, seed: int):
  """This host's shard of the stream, batched to the per-host batch size."""
  if config.data.batch_size % jax.process_count():
    raise ValueError(f"Global batch {config.data.batch_size} does not split "
                     f"over {jax.process_count()} hosts.")
  return mixtures.mixture_dataset(
      manifest_path, split, mixture_config(config.data), seed=seed,
      batch_size=config.data.batch_size // jax.process_count(),
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      num_workers=config.data.num_workers, keys=DEVICE_KEYS)


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


def make_train_step(model: EchoModel, config):
  """`train_step(state, batch) -> (state, metrics)`, pure; jit it once."""
  total_steps = config.total_steps
  schedule = optimizer.lr_schedule(config)
  tx = optimizer.make_optimizer(config)

  def train_step(state: dict, batch: dict):
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    loss_fn = functools.partial(losses.stage_loss, model, config.objective)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["target"], batch, rng, step)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    momentum = jepa.ema_momentum(step, total_steps, start=config.ema.start,
                                 end=config.ema.end)
    target = jepa.ema_update(state["target"], params["encoder"], momentum)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    new_state = {"step": step + 1, "params": params, "target": target,
                 "opt_state": opt_state, "rng": state["rng"]}
    # A non-finite step changes nothing, so the state never holds NaNs; the
    # host sees the flag and stops before the next save.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(param_norm))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state)
    metrics.update({"train/grad_norm": grad_norm,
                    "train/param_norm": param_norm,
                    "train/lr": schedule(step), "train/ema_momentum": momentum,
                    "train/finite": finite.astype(jnp.float32)})
    return new_state, metrics

  return train_step


def train(config: ml_collections.ConfigDict, workdir: str,
          mesh: jax.sharding.Mesh | None = None) -> dict:
  """Trains `config.total_steps` steps in `workdir`; returns final metrics."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  manifest_path = resolve_manifest(config.data)
  utterances = manifest_lib.read_manifest(manifest_path)
  num_classes = len(manifest_lib.speakers_of(utterances, manifest_lib.TRAIN))
  model = build_model(config, num_classes)
  num_samples = clip_samples(config)

  dataset = make_dataset(config, manifest_path, manifest_lib.TRAIN, config.seed)
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
    state, start_step = resumed
    logging.info("Resumed %s at step %d.", workdir, start_step)
  else:
    start_step = 0
    state = jax.jit(functools.partial(init_state, model, config, num_samples),
                    out_shardings=state_sharding)()
    if config.init_from.workdir:
      trees = checkpointing.restore_trees(
          os.path.join(config.init_from.workdir, "checkpoints"),
          config.init_from.trees, abstract)
      for path, tree in trees.items():
        checkpointing.set_subtree(state, path, tree)
  logging.info("Params: encoder %.2fM, predictor %.2fM, heads %.2fM.",
               *(param_count(state["params"][k]) / 1e6
                 for k in ("encoder", "predictor", "heads")))

  train_step = jax.jit(
      make_train_step(model, config),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=0)
  evaluators = eval_registry.build(config, model, manifest_path)
  writer = metric_writer.MetricWriter(
      workdir, config.total_steps, initial_step=start_step,
      log_every=config.log_every, progress=config.get("progress", None))
  config_dict = config.to_dict()
  metrics: dict = {}
  step = start_step
  tick, tick_step = time.time(), step
  try:
    with preemption_lib.Preemption() as preemption:
      while step < config.total_steps:
        batch = sharding.global_batch(next(data_iterator), mesh)
        state, metrics = train_step(state, batch)
        metrics = jax.device_get(metrics)
        if not metrics.pop("train/finite"):
          bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
          raise NonFiniteLossError(
              f"Non-finite values at step {step + 1}: {bad}. The state was not"
              f" updated and the last good checkpoint "
              f"(step {manager.latest_step()}) is intact. Lower "
              "config.optim.lr, raise config.ema.start, or check the data.")
        step += 1
        if step % config.log_every == 0 or step == config.total_steps:
          now = time.time()
          rate = (step - tick_step) / max(now - tick, 1e-9)
          metrics["perf/steps_per_s"] = rate
          metrics["perf/examples_per_s"] = rate * config.data.batch_size
          tick, tick_step = now, step
        writer.write(step, metrics)
        stop = preemption.should_stop(step)
        checkpointing.save(manager, step, state, data_iterator, config_dict,
                           force=stop)
        for evaluator in evaluators:
          if step % evaluator.every == 0 or step == config.total_steps:
            results = evaluator.run(model, state)
            writer.write(step, results, console=True)
            metrics.update(results)
        if stop:
          logging.warning("Stopped at step %d after SIGTERM.", step)
          break
    if step == config.total_steps:
      checkpointing.save(manager, step, state, data_iterator, config_dict,
                         force=manager.latest_step() != step)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return {k: float(v) for k, v in metrics.items()}
