r"""Training-step benchmark: step time, examples/s, FLOPs (XLA's count and the
model's matmul count), MFU, memory; and the whole training loop against the
bare step.

  python -m tools.bench_step --config=experiments/stage1_jepa.py:canonical \
      --batch_size=8 --steps=5

Bare step: synthetic batches of the entries the stage's terms read, the
jitted, donated train step of `echo_jax.trainer`, `--steps` timed steps after
a warm-up (median). `--remat=none,full --batch_sizes=128,256` sweeps the remat
policy and the batch in one process (one compile each; a batch that does not
fit is reported as such).

FLOPs: `xla_tflop` is XLA's cost analysis of the compiled step (every op);
`matmul_tflop` counts the model's matmuls from the config (`matmul_flops`),
the number MFU is computed from. Their ratio shows hidden extra work on CPUs
(1.01 at the issue's matched shapes); on GPUs XLA's count leaves out the
matmuls it hands to cuBLAS as custom calls (0.17 there), so only the matmul
count is meaningful.
MFU is against `--peak_tflops`, by default the datasheet dense peak of the
device for the compute dtype (`DATASHEET_TFLOPS`; an H100/H200 SXM does 989
TFLOP/s in bf16), and also against a large matmul measured in this run.

Whole loop (`--loop_steps=N`): `trainer.train` for N steps in a temporary
workdir on the real data stream (the config's corpus), with its logging and
a checkpoint every `--loop_checkpoint_every` steps; its per-interval rates
(from the run's metrics.jsonl) against the bare step show a data or host
bottleneck, and the intervals that hold a checkpoint save show whether the
(asynchronous) saves stall steps.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines import mixtures
from data_pipelines import storage
from data_pipelines.framing import HOP
from echo_jax import losses, sharding, trainer
from echo_jax.model import build_model, clip_samples, param_count
from tools import cli
from tools import profile_summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: config's).")
_BATCHES = flags.DEFINE_list("batch_sizes", [], "Sweep these global batches "
                             "(overrides --batch_size).")
_REMAT = flags.DEFINE_list("remat", [], "Sweep these remat policies (none, "
                           "full, dots); default: the config's.")
_ATTENTION = flags.DEFINE_list("attention", ["default"], "Sweep attention "
                               "implementations: default (the config's "
                               "model.attention), xla, cudnn.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up.")
_CLASSES = flags.DEFINE_integer("num_classes", 64, "ArcFace classes if used.")
_PEAK_N = flags.DEFINE_integer("peak_matmul_size", 4096, "Peak matmul size.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak for MFU in "
                           "TFLOP/s (0: the datasheet table, if it knows the "
                           "device).")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 0, "Also time the whole "
                                   "training loop for this many steps.")
_LOOP_LOG = flags.DEFINE_integer("loop_log_every", 5, "Whole loop: log every.")
_LOOP_CKPT = flags.DEFINE_integer("loop_checkpoint_every", 10,
                                  "Whole loop: checkpoint every.")
_JSON = flags.DEFINE_string("json", "", "Also write the rows to this file.")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Trace 3 steps of the first "
                               "row here and print where the device time "
                               "goes (tools/profile_summary.py).")
_PROFILE_STEPS = 3

# Dense (no sparsity) datasheet peaks, TFLOP/s, by compute dtype; float32
# matmuls run as TF32 on NVIDIA tensor cores by XLA's default precision.
DATASHEET_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.5},
    "H200": {"bfloat16": 989.0, "float32": 494.5},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def synthetic_batch(config, batch_size: int) -> dict:
  """Random entries of the shapes and dtypes the stream gives, for the keys
  the stage's terms read."""
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
  batch = {key: make[key]().astype(dtypes.get(key, np.float32))
           for key in losses.batch_keys(config.objective)}
  shipped_as_pcm16 = mixtures.pcm16_keys(
      config.data.get("wire_dtype", mixtures.DEFAULT_WIRE_DTYPE))
  batch.update({k: storage.to_int16(batch[k]) for k in shipped_as_pcm16
                if k in batch})
  return batch


def _vit_token_flops(width: int, mlp: int, tokens: int) -> float:
  """Forward matmul FLOPs per token of one pre-LN block over `tokens`."""
  projections = 2 * (3 * width * width + width * width + 2 * width * mlp)
  return projections + 4 * tokens * width  # + q.k and attention.v


def matmul_flops(config, batch_size: int) -> dict:
  """The step's matmul FLOPs by part, from the config (no compiler).

  Forward = 2 * m * n * k per matmul; a trained matmul costs 3x its forward
  (dX and dW), one whose input needs no gradient 2x (patch embedding).
  Counts the `jepa` and `crop` terms, the full online pass that head terms
  read, the log-mel DFT and mel matmuls, and the target-rank Gram matrix.
  """
  m, o = config.model, config.objective
  enc, prd = m.encoder, m.predictor
  samples = clip_samples(config)
  frames = samples // HOP
  tokens = frames // enc.patch_frames
  patch = 2 * enc.patch_frames * m.n_mels * enc.width

  def encoder_flops(t: int, train: bool) -> float:
    blocks = enc.depth * _vit_token_flops(enc.width, enc.mlp_dim, t)
    return batch_size * t * ((3 * blocks + 2 * patch) if train
                             else (blocks + patch))

  def log_mel(num_frames: int) -> float:
    return batch_size * num_frames * 2 * (400 * 514 + 257 * m.n_mels)

  active = losses.active_terms(o)
  parts = {"log_mel": log_mel(frames)}
  if "jepa" in active:
    j = o.jepa
    masked = int(round(j.mask_fraction * tokens))
    context = tokens - masked
    if j.get("clean_targets"):
      parts["log_mel"] += log_mel(frames)
    parts["jepa/target"] = encoder_flops(tokens, train=False)
    # The patch embedding runs on every token before the context gather.
    parts["jepa/context"] = (encoder_flops(context, train=True)
                             + 2 * patch * batch_size * (tokens - context))
    pred_blocks = prd.depth * _vit_token_flops(prd.width, prd.mlp_dim, tokens)
    parts["jepa/predictor"] = 3 * batch_size * (
        context * 2 * enc.width * prd.width + tokens * pred_blocks
        + masked * 2 * prd.width * enc.width)
    rows = batch_size * masked
    parts["jepa/rank_gram"] = (2 * rows * enc.width**2 if rows >= enc.width
                               else 0.0)
  if "crop" in active:
    half = (frames // 2) // enc.patch_frames
    parts["crop/context"] = encoder_flops(half, train=True)
    parts["crop/target"] = encoder_flops(half, train=False)
  if any(active[name][0].heads for name in active):
    parts["features"] = encoder_flops(tokens, train=True)
  parts["total"] = sum(parts.values())
  return parts


def datasheet_peak(dtype: str) -> float | None:
  """FLOP/s of `DATASHEET_TFLOPS` for the first device, or None."""
  kind = jax.devices()[0].device_kind
  for name, peaks in DATASHEET_TFLOPS.items():
    if name in kind:
      return peaks[dtype] * 1e12
  return None


def matmul_peak(dtype, n: int) -> float:
  """FLOP/s of an n x n x n matmul chain in `dtype` (best of a few runs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype) / np.sqrt(n)
  f = jax.jit(lambda x: (x @ x) @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 4 * n**3 / best


def _memory(compiled) -> dict:
  """Bytes XLA plans for the step (temporaries = activations and the like)."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not on every backend.
    return {}
  if mem is None:
    return {}
  return {"temp_GB": mem.temp_size_in_bytes / 1e9,
          "arguments_GB": mem.argument_size_in_bytes / 1e9}


def bench_step(config, batch_size: int, mesh, attention: str = "default"
               ) -> dict:
  """Compiles and times the bare train step; returns one report row."""
  model = build_model(config, _CLASSES.value)
  if attention != "default":
    model = dataclasses.replace(
        model, encoder=model.encoder.clone(attention_impl=attention),
        predictor=model.predictor.clone(attention_impl=attention))
  n = clip_samples(config)
  init = functools.partial(trainer.init_state, model, config, n)
  state_sharding = sharding.param_shardings(jax.eval_shape(init), mesh)
  state = jax.jit(init, out_shardings=state_sharding)()
  batch = sharding.global_batch(synthetic_batch(config, batch_size), mesh)
  failed_at = jax.device_put(jnp.zeros((), jnp.int32),
                             sharding.replicated(mesh))
  step_fn = trainer.jit_train_step(model, config, mesh, state_sharding)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, failed_at).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  state, metrics, failed_at = compiled(state, batch, failed_at)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state, metrics, failed_at = compiled(state, batch, failed_at)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_time = float(np.median(times))
  profile = None
  if _PROFILE.value and not os.path.exists(_PROFILE.value):
    with jax.profiler.trace(_PROFILE.value, create_perfetto_trace=True):
      for _ in range(_PROFILE_STEPS):
        state, metrics, failed_at = compiled(state, batch, failed_at)
      jax.block_until_ready(metrics)
    profile = profile_summary.summarize(_PROFILE.value, _PROFILE_STEPS)
    print(profile_summary.format_summary(profile), flush=True)
  dtype = jnp.dtype(model.encoder.dtype).name
  flops = matmul_flops(config, batch_size)
  peak = (_PEAK.value * 1e12 if _PEAK.value else datasheet_peak(dtype))
  row = {
      "config": f"{config.stage}:{config.variant}",
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "compute_dtype": config.model.compute_dtype, "resolved_dtype": dtype,
      "remat": config.model.get("remat", "none"), "attention": attention,
      "attention_impl": str(model.encoder.attention_impl),
      "xla_options": model.xla_options,
      "residual_dtype": jnp.dtype(model.encoder.residual_dtype).name,
      "encoder_params_M": param_count(state["params"]["encoder"]) / 1e6,
      "batch_size": batch_size, "tokens_per_example": model.num_tokens(n),
      "compile_s": compile_s, "step_time_s": step_time,
      "step_time_spread_s": [float(min(times)), float(max(times))],
      "examples_per_s": batch_size / step_time,
      "xla_tflop": xla_flops / 1e12,
      "matmul_tflop": flops["total"] / 1e12,
      "xla_over_matmul": xla_flops / flops["total"],
      "matmul_tflop_by_part": {k: v / 1e12 for k, v in flops.items()},
      "achieved_tflops_per_s": flops["total"] / step_time / 1e12,
      "peak_tflops_per_s": peak / 1e12 if peak else None,
      "mfu": flops["total"] / step_time / peak if peak else None,
      **_memory(compiled),
      "loss": float(metrics["train/loss"]),
  }
  if profile is not None:
    row["profile_ms_by_kind"] = profile["by_kind"]
    row.update({f"profile_{k}": profile[k]
                for k in ("busy_ms", "span_ms", "kernels")})
    row["profile_top"] = profile["top"][:15]
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["device_peak_GB"] = stats["peak_bytes_in_use"] / 1e9
  del state, batch
  return row


def bench_loop(config, batch_size: int, bare_step_s: float) -> dict:
  """`trainer.train` for `--loop_steps` steps; rates per logging interval."""
  workdir = tempfile.mkdtemp(prefix="bench_loop_")
  with config.unlocked():
    config.data.batch_size = batch_size
    config.total_steps = _LOOP_STEPS.value
    config.log_every = _LOOP_LOG.value
    config.checkpoint.every = _LOOP_CKPT.value
    config.evals = {}
    config.progress = False
  start = time.perf_counter()
  trainer.train(config, workdir)
  wall = time.perf_counter() - start
  rows = [json.loads(line) for line in
          open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if "perf/steps_per_s" in r]
  intervals = []
  for r in rows[1:]:  # The first interval holds the compilation.
    saved = r["step"] // _LOOP_CKPT.value != (
        (r["step"] - _LOOP_LOG.value) // _LOOP_CKPT.value)
    intervals.append({"to_step": r["step"],
                      "step_time_s": 1.0 / r["perf/steps_per_s"],
                      "holds_checkpoint": saved})
  plain = [i["step_time_s"] for i in intervals if not i["holds_checkpoint"]]
  saving = [i["step_time_s"] for i in intervals if i["holds_checkpoint"]]
  loop_step = float(np.median(plain)) if plain else float("nan")
  return {
      "loop_steps": _LOOP_STEPS.value, "loop_wall_s": wall,
      "loop_step_time_s": loop_step,
      "loop_step_time_with_checkpoint_s": (float(np.median(saving)) if saving
                                           else None),
      "bare_step_time_s": bare_step_s,
      "loop_overhead": loop_step / bare_step_s - 1.0,
      "intervals": intervals, "workdir": workdir,
  }


def _summary(rows: list[dict]) -> str:
  head = (f"{'dtype':9s} {'remat':5s} {'attn':7s} {'batch':>5s} {'step_s':>8s} "
          f"{'ex/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'xla/mm':>6s} "
          f"{'temp_GB':>7s} xla_options")
  lines = [head]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['resolved_dtype']:9s} {r['remat']:5s} "
                   f"{r['attention']:7s} {r['batch_size']:5d} {r['error']}")
      continue
    mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
    lines.append(
        f"{r['resolved_dtype']:9s} {r['remat']:5s} {r['attention']:7s} "
        f"{r['batch_size']:5d} "
        f"{r['step_time_s']:8.4f} {r['examples_per_s']:8.1f} "
        f"{r['achieved_tflops_per_s']:8.2f} {mfu:>6s} "
        f"{r['xla_over_matmul']:6.3f} {r.get('temp_GB', float('nan')):7.2f} "
        f"{r.get('xla_options', '-')}")
  return "\n".join(lines)


def main(argv):
  del argv
  cli.setup_logging("echo_jax")
  config = _CONFIG.value
  batches = ([int(b) for b in _BATCHES.value] or
             [_BATCH.value or config.data.batch_size])
  policies = _REMAT.value or [config.model.get("remat", "none")]
  mesh = sharding.make_mesh(config.mesh)
  rows = []
  for policy, batch_size, attention in itertools.product(
      policies, batches, _ATTENTION.value):
    variant = config.copy_and_resolve_references()
    with variant.unlocked():
      variant.model.remat = policy
    try:
      row = bench_step(variant, batch_size, mesh, attention)
    except Exception as e:  # pylint: disable=broad-except
      # One row's failure (memory, an attention kernel the device lacks) is
      # reported and the sweep goes on.
      message = str(e)
      if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
        message = "does not fit in device memory"
      logging.exception("Row remat=%s batch=%d attention=%s failed.", policy,
                        batch_size, attention)
      row = {"resolved_dtype": variant.model.compute_dtype, "remat": policy,
             "batch_size": batch_size, "attention": attention,
             "error": message.splitlines()[0][:200] if message else repr(e)}
    print(json.dumps(row), flush=True)
    rows.append(row)
  if _LOOP_STEPS.value:
    first = next(r for r in rows if "error" not in r)
    loop_config = config.copy_and_resolve_references()
    with loop_config.unlocked():
      loop_config.model.remat = first["remat"]
    loop = bench_loop(loop_config,
                      first["batch_size"], first["step_time_s"])
    print(json.dumps(loop, indent=1), flush=True)
    rows.append(loop)
  dtype = jnp.dtype(build_model(config, _CLASSES.value).encoder.dtype)
  measured = matmul_peak(dtype, _PEAK_N.value) * jax.device_count()
  for r in rows:
    if "achieved_tflops_per_s" in r:
      r["mfu_vs_measured_matmul"] = r["achieved_tflops_per_s"] * 1e12 / measured
  print(_summary([r for r in rows if "batch_size" in r]))
  print(f"measured matmul peak ({dtype.name}): {measured / 1e12:.1f} TFLOP/s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
