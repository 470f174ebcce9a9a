"""Mixed precision, `compute_dtype="auto"` and remat policies.

Tolerances: bfloat16 has an 8-bit mantissa (relative rounding 2**-9 ~ 2e-3),
so a matmul with bfloat16 inputs and float32 accumulation lands within about
1e-2 of float32 (relative norm of the difference); the train-step losses over
a few steps, which average many such products, within 1e-2 relative.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax import trainer
from echo_jax.model import build_model, clip_samples
from echo_jax.models import Encoder, auto_dtype, precision, vit
from experiments import stage1_jepa
from smoke_configs import smoke

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_frames=2,
            n_mels=16)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_linear_has_dense_names_and_initial_values():
  """Checkpoints keep restoring by tree path: same names, same init."""
  x = jnp.ones((2, 5, 8))
  dense = nn.Dense(16, kernel_init=precision.dense_init).init(
      jax.random.key(3), x)
  linear = precision.Linear(16, jnp.bfloat16).init(jax.random.key(3), x)
  assert jax.tree.structure(dense) == jax.tree.structure(linear)
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(linear)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)


def test_mixed_matmul_values_gradients_and_dtypes():
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (4, 24, 64))
  w = jax.random.normal(kw, (64, 48)) / 8
  g = jax.random.normal(kg, (4, 24, 48))

  def loss(dtype, x, w):
    return jnp.sum(precision.mixed_matmul(x, w, dtype) * g)

  ref = jax.grad(functools.partial(loss, jnp.float32), argnums=(0, 1))(x, w)
  out = jax.grad(functools.partial(loss, jnp.bfloat16), argnums=(0, 1))(x, w)
  y = precision.mixed_matmul(x, w, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  assert _rel(y, x @ w) < 1e-2
  for a, b in zip(out, ref):
    assert a.dtype == jnp.float32  # float32 gradients for float32 masters.
    assert _rel(a, b) < 1e-2
  # float32 accumulation: a long sum is as close as one rounding to bf16
  # (bf16 accumulation over 4096 terms would be ~10x further off).
  kx, kw = jax.random.split(jax.random.key(7))
  long_x = jax.random.normal(kx, (16, 4096))
  long_w = jax.random.normal(kw, (4096, 16))
  long_ref = np.asarray(long_x.astype(jnp.bfloat16).astype(jnp.float32)
                        @ long_w.astype(jnp.bfloat16).astype(jnp.float32))
  assert _rel(precision.mixed_matmul(long_x, long_w, jnp.bfloat16),
              long_ref) < 5e-3
  # Every matmul of the backward pass takes bfloat16 inputs, none float32.
  jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, jnp.bfloat16),
                                  argnums=(0, 1)))(x, w)
  dots = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append([v.aval.dtype for v in eqn.invars])
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jaxpr.jaxpr)
  assert len(dots) == 3, dots  # forward, dx, dw
  assert all(d == [jnp.bfloat16, jnp.bfloat16] for d in dots), dots


def test_float32_compute_is_a_plain_matmul():
  x, w = jnp.ones((3, 4)), jnp.ones((4, 5))
  jaxpr = jax.make_jaxpr(lambda x, w: precision.mixed_matmul(
      x, w, jnp.float32))(x, w)
  assert [e.primitive.name for e in jaxpr.eqns] == ["dot_general"]


def _stage1(dtype: str, remat: str = "none", residual: str = "float32"):
  config = smoke(stage1_jepa.get_config, **{"model.compute_dtype": dtype,
                                            "model.remat": remat,
                                            "model.residual_dtype": residual})
  model = build_model(config)
  n = clip_samples(config)
  state = jax.jit(functools.partial(trainer.init_state, model, config, n))()
  batch = {"mixture": jnp.asarray(0.1 * np.random.default_rng(0)
                                  .standard_normal((8, n)), jnp.float32)}
  batch["clean"] = batch["mixture"]
  step = jax.jit(trainer.make_train_step(model, config))
  return state, batch, step


def _run(dtype: str, remat: str = "none", steps: int = 3,
         residual: str = "float32"):
  state, batch, step = _stage1(dtype, remat, residual)
  failed_at = jnp.zeros((), jnp.int32)
  losses = []
  for _ in range(steps):
    state, metrics, failed_at = step(state, batch, failed_at)
    losses.append(float(metrics["train/loss"]))
  assert int(failed_at) == 0
  return losses, state


@pytest.mark.parametrize("residual", ["float32", "compute"])
def test_bfloat16_step_matches_float32_over_steps(residual):
  """Three train steps (jepa + crop) in bfloat16 vs float32 from the same
  state and batch, with the residual stream in float32 or bfloat16: losses
  within 1e-2 relative, updated params within 5e-2 of the float32 update,
  and every state leaf stays float32."""
  ref_losses, ref_state = _run("float32")
  losses, state = _run("bfloat16", residual=residual)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-2)
  assert all(x.dtype in (jnp.float32, jnp.int32) or
             jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
             for x in jax.tree.leaves(state)
             if hasattr(x, "dtype") and x.dtype != jnp.uint32)
  init_state, _, _ = _stage1("float32")
  for name in ("params", "target"):
    ref_delta = jax.tree.map(lambda a, b: a - b, ref_state[name],
                             init_state[name])
    delta = jax.tree.map(lambda a, b: a - b, state[name], init_state[name])
    flat_ref = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref_delta)])
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(delta)])
    assert _rel(flat, flat_ref) < 5e-2, name
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[name]))


def test_gelu_stored_matches_gelu_and_its_gradient():
  x = jax.random.normal(jax.random.key(0), (64, 48), jnp.float32)
  np.testing.assert_allclose(precision.gelu_stored(x, jnp.float32),
                             nn.gelu(x), rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda v: jnp.sum(precision.gelu_stored(v, jnp.float32)))
  ref = jax.grad(lambda v: jnp.sum(nn.gelu(v)))
  np.testing.assert_allclose(grad(x), ref(x), rtol=1e-6, atol=1e-7)
  stored = precision.gelu_stored(x.astype(jnp.bfloat16), jnp.bfloat16)
  assert stored.dtype == jnp.bfloat16
  assert _rel(stored, nn.gelu(x)) < 1e-2   # Input and output rounding.


def test_residual_dtype_sets_the_stream_and_keeps_final_float32():
  mel = jax.random.normal(jax.random.key(1), (2, 20, 16))
  enc = Encoder(**TINY, dtype=jnp.bfloat16, residual_dtype=jnp.bfloat16)
  params = enc.init(jax.random.key(0), mel)
  out = enc.apply(params, mel)
  assert out["hidden"].dtype == jnp.bfloat16
  assert out["final"].dtype == jnp.float32
  ref = Encoder(**TINY).apply(params, mel)["final"]
  assert _rel(out["final"], ref) < 5e-2
  assert vit.resolve_residual_dtype("compute", jnp.bfloat16) == jnp.bfloat16
  assert vit.resolve_residual_dtype("float32", jnp.bfloat16) == jnp.float32
  with pytest.raises(ValueError, match="residual_dtype"):
    vit.resolve_residual_dtype("bf16", jnp.bfloat16)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
  mel = jax.random.normal(jax.random.key(1), (2, 20, 16))
  plain = Encoder(**TINY)
  params = plain.init(jax.random.key(0), mel)

  def loss(enc, p):
    return jnp.mean(jnp.square(enc.apply(p, mel)["final"]))

  ref_loss, ref_grad = jax.jit(jax.value_and_grad(
      functools.partial(loss, plain)))(params)
  out_loss, out_grad = jax.jit(jax.value_and_grad(
      functools.partial(loss, Encoder(**TINY, remat=policy))))(params)
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out_grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_step_gives_the_same_loss():
  ref, _ = _run("float32", "none", steps=2)
  out, _ = _run("float32", "full", steps=2)
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_remat_policy_names():
  assert precision.remat_policy_name(True) == "full"
  assert precision.remat_policy_name(False) == "none"
  with pytest.raises(ValueError, match="remat must be one of"):
    precision.remat_policy_name("sometimes")


@pytest.fixture
def fake_timings(monkeypatch, tmp_path):
  """Block timings by (dtype, XLA option set), the measurements made, a
  fresh cache, and two option sets to choose from."""
  monkeypatch.setenv("ECHO_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(auto_dtype.xla_options, "candidates",
                      lambda: {"default": {}, "onednn": {"x": True}})
  auto_dtype._decide.cache_clear()
  seconds = {(d, o): 1.0 for d in ("float32", "bfloat16")
             for o in ("default", "onednn")}
  calls = []

  def fake(dtype, options, *args):
    calls.append((jnp.dtype(dtype).name, options))
    return seconds[jnp.dtype(dtype).name, options]

  monkeypatch.setattr(auto_dtype, "_block_step_seconds", fake)
  yield seconds, calls, tmp_path / "compute_dtype.json"
  auto_dtype._decide.cache_clear()


def _set(seconds, dtype, value):
  for o in ("default", "onednn"):
    seconds[dtype, o] = value


@pytest.mark.parametrize("bf16_seconds, expected", [
    (0.5, jnp.bfloat16),    # 2x faster: bfloat16.
    (0.95, jnp.float32),    # 5% faster: inside the margin, float32.
    (1.6, jnp.float32),     # Slower (e.g. a CPU without bf16 units).
])
def test_auto_picks_the_measured_faster_dtype(fake_timings, bf16_seconds,
                                              expected):
  seconds, calls, _ = fake_timings
  _set(seconds, "bfloat16", bf16_seconds)
  assert auto_dtype.resolve_compute_dtype("auto", 32, 2, 64) == expected
  assert sorted(set(calls)) == [("bfloat16", "default"), ("bfloat16", "onednn"),
                                ("float32", "default"), ("float32", "onednn")]


def test_dtype_and_options_are_chosen_together(fake_timings):
  # As measured on an AMX CPU: oneDNN's dots help float32 a little and cost
  # bfloat16 most of its speed; bfloat16 with XLA's dots is the fastest.
  seconds, _, _ = fake_timings
  seconds.update({("float32", "default"): 1.0, ("float32", "onednn"): 0.9,
                  ("bfloat16", "default"): 0.5, ("bfloat16", "onednn"): 1.0})
  assert auto_dtype.resolve_compute_dtype("auto", 32, 2, 64) == jnp.bfloat16
  assert auto_dtype.xla_options_name("auto", 32, 2, 64) == "default"
  assert auto_dtype.xla_options_name("float32", 32, 2, 64) == "onednn"
  assert auto_dtype.xla_options_name("bfloat16", 32, 2, 64) == "default"
  # bfloat16's best is compared with float32's best, not with its default.
  seconds[("bfloat16", "default")] = 0.85
  auto_dtype._decide.cache_clear()
  assert auto_dtype.resolve_compute_dtype("auto", 48, 2, 64) == jnp.float32
  assert auto_dtype.xla_options_name("auto", 48, 2, 64) == "onednn"


def test_auto_is_cached_per_device_and_shape(fake_timings):
  seconds, calls, path = fake_timings
  _set(seconds, "bfloat16", 0.5)
  assert auto_dtype.resolve_compute_dtype("auto", 32, 2, 64) == jnp.bfloat16
  measured = len(calls)
  cache = json.load(open(path))
  assert len(cache) == 2   # One entry per dtype.
  for key, entry in cache.items():
    assert jax.devices()[0].device_kind in key and "width 32" in key
    assert set(entry["seconds"]) == {"default", "onednn"}
  # A new process (cleared memo) reads the file and measures nothing, for
  # `auto` and for an explicit dtype alike.
  auto_dtype._decide.cache_clear()
  _set(seconds, "bfloat16", 5.0)
  assert auto_dtype.resolve_compute_dtype("auto", 32, 2, 64) == jnp.bfloat16
  assert auto_dtype.resolve_compute_dtype("float32", 32, 2, 64) == jnp.float32
  assert len(calls) == measured
  # Another shape is measured on its own.
  assert auto_dtype.resolve_compute_dtype("auto", 48, 2, 64) == jnp.float32
  assert len(calls) > measured


def test_explicit_dtypes_and_bad_names(fake_timings, monkeypatch):
  _, calls, _ = fake_timings
  assert auto_dtype.resolve_compute_dtype("float32", 8, 1, 8) == jnp.float32
  assert auto_dtype.resolve_compute_dtype("bfloat16", 8, 1, 8) == jnp.bfloat16
  assert {d for d, _ in calls} == {"float32", "bfloat16"}  # Options only.
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    auto_dtype.resolve_compute_dtype("float16", 8, 1, 8)
  # With one option set (GPUs, TPUs) an explicit dtype measures nothing.
  monkeypatch.setattr(auto_dtype.xla_options, "candidates",
                      lambda: {"default": {}})
  auto_dtype._decide.cache_clear()
  calls.clear()
  assert auto_dtype.resolve_compute_dtype("float32", 16, 1, 8) == jnp.float32
  assert auto_dtype.xla_options_name("float32", 16, 1, 8) == "default"
  assert not calls


def test_canonical_config_uses_auto_and_build_model_resolves_it(fake_timings):
  seconds, _, _ = fake_timings
  _set(seconds, "bfloat16", 0.5)
  seconds["bfloat16", "onednn"] = 0.4
  config = stage1_jepa.get_config("canonical")
  assert config.model.compute_dtype == "auto"
  assert config.model.remat == "none"
  model = build_model(config)
  assert model.encoder.dtype == model.predictor.dtype == jnp.bfloat16
  assert model.xla_options == "onednn"
  assert model.jit_kwargs == {"compiler_options": {"x": True}}


def test_real_measurement_runs_on_this_backend():
  seconds = auto_dtype.measure_block_seconds(["float32", "bfloat16"], 32, 2,
                                             64, tokens=128, repeats=1)
  assert set(seconds) == {"float32", "bfloat16"}
  for by_options in seconds.values():
    assert set(by_options) == set(auto_dtype.xla_options.candidates())
    assert all(s > 0 for s in by_options.values())


def test_attention_auto_picks_cudnn_only_for_16_bit_on_gpus(monkeypatch):
  assert vit.resolve_attention("auto", jnp.bfloat16) is None   # This CPU.
  assert vit.resolve_attention("xla", jnp.bfloat16) == "xla"
  assert vit.resolve_attention("cudnn", jnp.float32) == "cudnn"
  with pytest.raises(ValueError, match="config.model.attention"):
    vit.resolve_attention("flash", jnp.bfloat16)
  monkeypatch.setattr(vit.jax, "default_backend", lambda: "gpu")
  assert vit.resolve_attention("auto", jnp.bfloat16) == "cudnn"
  assert vit.resolve_attention("auto", jnp.float16) == "cudnn"
  assert vit.resolve_attention("auto", jnp.float32) is None   # cuDNN: 16-bit.
