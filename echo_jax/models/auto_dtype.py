"""`compute_dtype="auto"`: float32 or bfloat16, whichever a measurement of
one encoder block finds faster on the backend in use (cached per machine
type). Apart from `precision.py` because it times `vit.Block`, which is built
from `precision`'s layers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from echo_jax import xla_options
from echo_jax.models import vit
from echo_jax.models.precision import AUTO_MIN_SPEEDUP, COMPUTE_DTYPES, DTYPES
from echo_jax.models.precision import Dtype


def _cache_path() -> str:
  root = os.environ.get("ECHO_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "echo_jax")
  return os.path.join(root, "compute_dtype.json")


def _block_step_seconds(dtype, width: int, num_heads: int, mlp_dim: int,
                        tokens: int, repeats: int) -> float:
  """Median time of one encoder block's fwd+bwd in `dtype` on `tokens`
  tokens (sequences of 128)."""
  block = vit.Block(num_heads, mlp_dim, dtype)
  x = jax.random.normal(jax.random.key(0), (max(tokens // 128, 1), 128, width))
  params = jax.jit(block.init)(jax.random.key(1), x)

  def loss(params, x):
    return jnp.sum(jnp.square(block.apply(params, x)))

  # Compiled as the train step is (echo_jax/xla_options.py), or the choice
  # would be made for a different program.
  step = jax.jit(jax.grad(loss, argnums=(0, 1)), **xla_options.jit_kwargs())
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_compute_dtype(width: int, num_heads: int, mlp_dim: int,
                          tokens: int = 2048, repeats: int = 5
                          ) -> tuple[str, dict]:
  """Times `_block_step_seconds` in float32 and bfloat16 on the default
  backend, alternating; returns (choice, {dtype: seconds})."""
  seconds = {"float32": [], "bfloat16": []}
  for _ in range(2):  # Alternate, so a load change hits both alike.
    for name in seconds:
      seconds[name].append(_block_step_seconds(DTYPES[name], width, num_heads,
                                               mlp_dim, tokens, repeats))
  best = {name: min(ts) for name, ts in seconds.items()}
  faster = best["float32"] / best["bfloat16"] >= AUTO_MIN_SPEEDUP
  return ("bfloat16" if faster else "float32"), best


def _cache_key(width: int, num_heads: int, mlp_dim: int) -> str:
  device = jax.devices()[0]
  options = "".join(f"|{k}={v}" for k, v in
                    sorted(xla_options.train_step_options().items()))
  return (f"{jax.default_backend()}|{device.device_kind}|jax {jax.__version__}"
          f"|width {width}|heads {num_heads}|mlp {mlp_dim}{options}")


@functools.lru_cache(maxsize=None)
def _resolve_auto(width: int, num_heads: int, mlp_dim: int) -> str:
  path, key = _cache_path(), _cache_key(width, num_heads, mlp_dim)
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  if key in cache:
    choice = cache[key]["choice"]
    source = f"cached in {path}"
  else:
    choice, seconds = measure_compute_dtype(width, num_heads, mlp_dim)
    cache[key] = {"choice": choice, "seconds": seconds}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # Atomic: concurrent runs never read half a file.
    source = (f"measured: float32 {seconds['float32'] * 1e3:.2f} ms, "
              f"bfloat16 {seconds['bfloat16'] * 1e3:.2f} ms per block step")
  if jax.process_count() > 1:
    # Every process must compile the same program: process 0 decides.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    is_bf16 = multihost_utils.broadcast_one_to_all(
        np.int32(choice == "bfloat16"))
    choice = "bfloat16" if int(is_bf16) else "float32"
  logging.info("compute_dtype='auto' -> %s on %s (%s).", choice, key, source)
  return choice


def resolve_compute_dtype(name: str, width: int, num_heads: int,
                          mlp_dim: int) -> Dtype:
  """The jnp dtype for config's `compute_dtype`.

  `float32` / `bfloat16` are taken as given. `auto` is decided by
  measurement on the backend in use: one encoder block's fwd+bwd (`width`,
  `num_heads`, `mlp_dim`, 2048 tokens) is timed in both dtypes, alternating,
  and bfloat16 wins only when it is at least `AUTO_MIN_SPEEDUP` faster.
  The choice is cached per (backend, device kind, jax version, width,
  num_heads, mlp_dim) in `$ECHO_JAX_CACHE/compute_dtype.json` (default
  `~/.cache/echo_jax/`), so it is measured once per machine type (a few
  seconds) and stable afterwards; delete the entry to measure again. With
  several processes, process 0's choice is used by all.
  """
  if name == "auto":
    name = _resolve_auto(width, num_heads, mlp_dim)
  if name not in DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}; found "
                     f"{name!r}.")
  return DTYPES[name]
