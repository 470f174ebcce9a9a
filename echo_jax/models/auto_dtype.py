"""`compute_dtype="auto"`, and the XLA options the train step is compiled
with, both chosen by measurement on the backend in use (cached per machine
type). Apart from `precision.py` because it times `vit.Block`, which is built
from `precision`'s layers.

One encoder block's fwd+bwd is timed in each dtype that may be used, under
each option set `xla_options.candidates` offers on the backend. The two
choices are made together because they interact: on an AMX CPU bfloat16 is
1.9x faster than float32 with XLA's own dots and 1.1x slower with oneDNN's.
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


def _block_step_seconds(dtype, options: str, width: int, num_heads: int,
                        mlp_dim: int, tokens: int, repeats: int) -> float:
  """Median time of one encoder block's fwd+bwd in `dtype` on `tokens`
  tokens (sequences of 128), compiled with candidate `options`."""
  block = vit.Block(num_heads, mlp_dim, dtype)
  x = jax.random.normal(jax.random.key(0), (max(tokens // 128, 1), 128, width))
  params = jax.jit(block.init)(jax.random.key(1), x)

  def loss(params, x):
    return jnp.sum(jnp.square(block.apply(params, x)))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)),
                 **xla_options.jit_kwargs(options))
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_block_seconds(dtypes, width: int, num_heads: int, mlp_dim: int,
                          tokens: int = 2048, repeats: int = 5
                          ) -> dict[str, dict[str, float]]:
  """{dtype: {option set: seconds}} for `_block_step_seconds` on the default
  backend, each (dtype, option set) timed twice, alternating, best kept."""
  variants = [(d, o) for d in dtypes for o in xla_options.candidates()]
  seconds = {d: {} for d in dtypes}
  for _ in range(2):  # Alternate, so a load change hits all alike.
    for d, o in variants:
      s = _block_step_seconds(DTYPES[d], o, width, num_heads, mlp_dim, tokens,
                              repeats)
      seconds[d][o] = min(s, seconds[d].get(o, np.inf))
  return seconds


def _cache_key(dtype: str, width: int, num_heads: int, mlp_dim: int) -> str:
  device = jax.devices()[0]
  options = ",".join(sorted(xla_options.candidates()))
  return (f"{jax.default_backend()}|{device.device_kind}|jax {jax.__version__}"
          f"|width {width}|heads {num_heads}|mlp {mlp_dim}|{dtype}"
          f"|options {options}")


def _block_seconds(dtypes, width: int, num_heads: int, mlp_dim: int
                   ) -> dict[str, dict[str, float]]:
  """`measure_block_seconds` for `dtypes`, from the cache file where it holds
  them; what is missing is measured (together, alternating) and added."""
  path = _cache_path()
  keys = {d: _cache_key(d, width, num_heads, mlp_dim) for d in dtypes}
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  missing = [d for d in dtypes if keys[d] not in cache]
  if missing:
    measured = measure_block_seconds(missing, width, num_heads, mlp_dim)
    for d in missing:
      cache[keys[d]] = {"seconds": measured[d]}
      logging.info("Block step on %s: %s.", keys[d], ", ".join(
          f"{o} {s * 1e3:.2f} ms" for o, s in measured[d].items()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # Atomic: concurrent runs never read half a file.
  return {d: cache[keys[d]]["seconds"] for d in dtypes}


def _fastest(seconds: dict[str, float]) -> tuple[str, float]:
  name = min(seconds, key=seconds.get)
  return name, seconds[name]


@functools.lru_cache(maxsize=None)
def _decide(name: str, width: int, num_heads: int, mlp_dim: int
            ) -> tuple[str, str]:
  """(dtype name, option set name) for config `compute_dtype=name`."""
  if name != "auto" and name not in DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}; found "
                     f"{name!r}.")
  requested, options = name, list(xla_options.candidates())
  dtypes = list(DTYPES) if name == "auto" else [name]
  if len(options) == 1 and len(dtypes) == 1:
    return name, options[0]  # Nothing to choose: nothing measured.
  seconds = _block_seconds(dtypes, width, num_heads, mlp_dim)
  best = {d: _fastest(seconds[d]) for d in dtypes}
  if name == "auto":
    faster = best["float32"][1] / best["bfloat16"][1] >= AUTO_MIN_SPEEDUP
    name = "bfloat16" if faster else "float32"
  choice = (name, best[name][0])
  if jax.process_count() > 1:
    # Every process must compile the same program: process 0 decides.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    index = multihost_utils.broadcast_one_to_all(np.int32(
        list(DTYPES).index(choice[0]) * len(options)
        + options.index(choice[1])))
    choice = (list(DTYPES)[int(index) // len(options)],
              options[int(index) % len(options)])
  logging.info("compute_dtype=%r -> %s, XLA options %r (%s; block step %s).",
               requested, choice[0], choice[1],
               _cache_key(choice[0], width, num_heads, mlp_dim),
               {d: {o: f"{s * 1e3:.2f} ms" for o, s in seconds[d].items()}
                for d in dtypes})
  return choice


def resolve_compute_dtype(name: str, width: int, num_heads: int,
                          mlp_dim: int) -> Dtype:
  """The jnp dtype for config's `compute_dtype`.

  `float32` / `bfloat16` are taken as given. `auto` is decided by
  measurement on the backend in use: one encoder block's fwd+bwd (`width`,
  `num_heads`, `mlp_dim`, 2048 tokens) is timed in both dtypes, each under
  every candidate XLA option set, alternating, and bfloat16 wins only when
  its best is at least `AUTO_MIN_SPEEDUP` faster than float32's best.
  Timings are cached per (backend, device kind, jax version, width,
  num_heads, mlp_dim, dtype) in `$ECHO_JAX_CACHE/compute_dtype.json`
  (default `~/.cache/echo_jax/`), so they are measured once per machine type
  (seconds) and stable afterwards; delete an entry to measure again. With
  several processes, process 0's choice is used by all.
  """
  return DTYPES[_decide(name, width, num_heads, mlp_dim)[0]]


def xla_options_name(name: str, width: int, num_heads: int,
                     mlp_dim: int) -> str:
  """The `xla_options.candidates` entry that was fastest for the dtype
  `compute_dtype=name` resolves to (the same measurement as
  `resolve_compute_dtype`; nothing is measured where there is one entry)."""
  return _decide(name, width, num_heads, mlp_dim)[1]
