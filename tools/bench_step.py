r"""Training-step benchmark: step time, examples/s, tokens/s, XLA FLOPs, FLOP/s
and that as a fraction of a matmul peak measured in the same run (MFU).

  python -m tools.bench_step --config=experiments/stage1_jepa.py:canonical \
      --batch_size=8 --steps=5

Synthetic batches (compute only; the data stream has its own benchmark,
tools/bench_data.py). The peak is a large square matmul in the config's compute
dtype on this machine, so "MFU" here is relative to what this backend attains,
not a datasheet number.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.framing import HOP
from echo_jax import losses, sharding, trainer
from echo_jax.model import DTYPES, build_model, clip_samples, param_count

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up.")
_CLASSES = flags.DEFINE_integer("num_classes", 64, "ArcFace classes if used.")
_PEAK_N = flags.DEFINE_integer("peak_matmul_size", 4096, "Peak matmul size.")


def synthetic_batch(config, batch_size: int) -> dict:
  """Random entries of the shapes the stream gives, for the keys the stage's
  terms read."""
  rng = np.random.default_rng(0)
  n = clip_samples(config)
  k = config.data.k_max
  frames = n // HOP
  make = {  # Only the entries the terms read are drawn (sources are big).
      "mixture": lambda: 0.1 * rng.standard_normal((batch_size, n)),
      "clean": lambda: 0.1 * rng.standard_normal((batch_size, n)),
      "sources": lambda: 0.1 * rng.standard_normal((batch_size, k, n)),
      "speakers": lambda: rng.integers(0, _CLASSES.value, (batch_size, k)),
      "activity": lambda: rng.random((batch_size, k, frames)) > 0.5,
      "phonemes": lambda: rng.integers(-2, 40, (batch_size, k, frames)),
      "num_speakers": lambda: np.full((batch_size,), k),
  }
  dtypes = {"speakers": np.int32, "phonemes": np.int32,
            "num_speakers": np.int32}
  return {key: make[key]().astype(dtypes.get(key, np.float32))
          for key in losses.batch_keys(config.objective)}


def matmul_peak(dtype, n: int) -> float:
  """FLOP/s of an n x n x n matmul chain in `dtype` (best of a few runs)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: (x @ x) @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 4 * n**3 / best


def main(argv):
  del argv
  config = _CONFIG.value
  batch_size = _BATCH.value or config.data.batch_size
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config, _CLASSES.value)
  n = clip_samples(config)
  init = functools.partial(trainer.init_state, model, config, n)
  abstract = jax.eval_shape(init)
  state_sharding = sharding.param_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=state_sharding)()
  batch = sharding.global_batch(synthetic_batch(config, batch_size), mesh)
  failed_at = jax.device_put(jnp.zeros((), jnp.int32),
                             sharding.replicated(mesh))
  step_fn = trainer.jit_train_step(model, config, mesh, state_sharding)
  compiled = step_fn.lower(state, batch, failed_at).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, metrics, failed_at = compiled(state, batch, failed_at)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state, metrics, failed_at = compiled(state, batch, failed_at)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_time = float(np.median(times))
  dtype = DTYPES[config.model.compute_dtype]
  peak = matmul_peak(dtype, _PEAK_N.value) * jax.device_count()
  tokens = model.num_tokens(n) * batch_size
  report = {
      "config": f"{config.stage}:{config.variant}",
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "compute_dtype": config.model.compute_dtype,
      "encoder_params_M": param_count(state["params"]["encoder"]) / 1e6,
      "batch_size": batch_size, "tokens_per_example": model.num_tokens(n),
      "step_time_s": step_time, "examples_per_s": batch_size / step_time,
      "tokens_per_s": tokens / step_time, "step_tflops": flops / 1e12,
      "achieved_tflops_per_s": flops / step_time / 1e12,
      "matmul_peak_tflops_per_s": peak / 1e12,
      "mfu_vs_measured_peak": flops / step_time / peak,
      "loss": float(metrics["train/loss"]),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
