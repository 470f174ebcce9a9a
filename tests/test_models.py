"""Encoder, predictor and RWSE: sizes, shapes, position handling, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.models import RWSE, Encoder, Predictor, sincos_1d

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_frames=2,
            n_mels=16)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _block_params(width: int, mlp: int) -> int:
  norms = 2 * 2 * width
  attn = width * 3 * width + 3 * width + width * width + width
  return norms + attn + width * mlp + mlp + mlp * width + width


def test_canonical_encoder_has_25m_params():
  shapes = jax.eval_shape(
      lambda mel: Encoder().init(jax.random.key(0), mel),
      jax.ShapeDtypeStruct((1, 100, 80), jnp.float32))
  count = _num_params(shapes)
  expected = (160 * 512 + 512) + 8 * _block_params(512, 2048) + 2 * 512
  assert count == expected == 25_302_528
  assert abs(count - 25e6) <= 1e6
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  names = set(shapes["params"])
  assert names == {"patch_embed", "norm"} | {f"blocks_{i}" for i in range(8)}


def test_canonical_predictor_params():
  shapes = jax.eval_shape(
      lambda c, ci, ti: Predictor().init(jax.random.key(0), c, ci, ti, 50),
      jax.ShapeDtypeStruct((1, 20, 512), jnp.float32),
      jax.ShapeDtypeStruct((1, 20), jnp.int32),
      jax.ShapeDtypeStruct((1, 30), jnp.int32))
  expected = ((512 * 256 + 256) + 256 + 4 * _block_params(256, 1024) + 2 * 256
              + (256 * 512 + 512))
  assert _num_params(shapes) == expected == 3_422_720


def test_sincos_1d_closed_form():
  table = sincos_1d(7, 8)
  assert table.shape == (7, 8) and table.dtype == np.float32
  np.testing.assert_allclose(table[3, 0], np.sin(3.0), rtol=1e-6)
  np.testing.assert_allclose(table[3, 4], np.cos(3.0), rtol=1e-6)
  np.testing.assert_allclose(table[5, 1], np.sin(5.0 / 10000**0.25), rtol=1e-6)
  np.testing.assert_allclose(table[:, :4]**2 + table[:, 4:]**2, 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_encoder():
  enc = Encoder(**TINY)
  mel = jax.random.normal(jax.random.key(1), (2, 21, 16))  # 10 tokens + 1 frame
  params = jax.jit(enc.init)(jax.random.key(0), mel)["params"]
  return enc, params, mel


# Jitted applies: eager op-by-op dispatch is far slower than one compile on CPU.
_apply = {}


def _run(enc: Encoder, params, mel, keep_idx=None):
  if enc not in _apply:
    _apply[enc] = jax.jit(enc.apply)
  return _apply[enc]({"params": params}, mel, keep_idx=keep_idx)


def test_encoder_shapes_and_final_norm(tiny_encoder):
  enc, params, mel = tiny_encoder
  out = _run(enc, params, mel)
  assert out["hidden"].shape == (2, 2, 10, 32)
  assert out["final"].shape == (2, 10, 32)
  assert out["hidden"].dtype == out["final"].dtype == jnp.float32
  ref = nn.LayerNorm(epsilon=1e-6).apply({"params": params["norm"]},
                                         out["hidden"][-1])
  np.testing.assert_allclose(out["final"], ref, atol=1e-5)


def test_keep_idx_adds_positions_before_gather(tiny_encoder):
  """Attention without masks is permutation-equivariant, so a permuted
  keep_idx gives the permuted full output only if each token carries its own
  position (added before the gather)."""
  enc, params, mel = tiny_encoder
  full = _run(enc, params, mel)
  perm = jnp.array([[3, 0, 9, 1, 2, 8, 4, 7, 6, 5], list(range(9, -1, -1))])
  permuted = _run(enc, params, mel, perm)
  np.testing.assert_allclose(
      permuted["final"],
      jnp.take_along_axis(full["final"], perm[..., None], axis=1), atol=1e-5)
  np.testing.assert_allclose(
      permuted["hidden"],
      jnp.take_along_axis(full["hidden"], perm[None, ..., None], axis=2),
      atol=1e-5)


def test_keep_idx_subset_sees_only_context(tiny_encoder):
  enc, params, mel = tiny_encoder
  keep = jnp.array([[0, 2, 5, 7], [1, 3, 4, 9]], jnp.int32)
  sub = _run(enc, params, mel, keep)["final"]
  full = _run(enc, params, mel)["final"]
  assert sub.shape == (2, 4, 32)
  gathered = jnp.take_along_axis(full, keep[..., None], axis=1)
  assert np.abs(np.asarray(sub - gathered)).max() > 1e-3  # attention differs
  # Hidden masked tokens cannot leak: changing a dropped frame changes nothing.
  mel2 = mel.at[:, 2:4].add(5.0)  # token 1 (dropped for example 0)
  sub2 = _run(enc, params, mel2, keep)["final"]
  np.testing.assert_allclose(sub2[0], sub[0], atol=1e-6)
  assert np.abs(np.asarray(sub2[1] - sub[1])).max() > 1e-3


def test_remainder_frames_are_dropped(tiny_encoder):
  enc, params, mel = tiny_encoder
  out = _run(enc, params, mel)["final"]
  out2 = _run(enc, params, mel.at[:, -1].set(100.0))["final"]
  np.testing.assert_allclose(out, out2, atol=1e-6)


def test_bfloat16_compute_close_to_float32(tiny_encoder):
  _, params, mel = tiny_encoder
  enc16 = Encoder(**TINY, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(jax.eval_shape(
      enc16.init, jax.random.key(0), mel)))
  ref = _run(Encoder(**TINY), params, mel)["final"]
  out = _run(enc16, params, mel)["final"]
  assert out.dtype == jnp.float32
  rel = jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)
  assert 0 < rel < 3e-2, rel


def test_remat_matches(tiny_encoder):
  _, params, mel = tiny_encoder
  ref = _run(Encoder(**TINY), params, mel)["final"]
  out = _run(Encoder(**TINY, remat=True), params, mel)["final"]
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_predictor_shapes_and_target_positions():
  pred = Predictor(width=32, depth=2, num_heads=2, mlp_dim=64, out_dim=48)
  ctx = jax.random.normal(jax.random.key(0), (2, 6, 48))
  ctx_idx = jnp.tile(jnp.array([0, 1, 2, 6, 7, 8]), (2, 1))
  tgt_idx = jnp.tile(jnp.array([3, 4, 5, 9]), (2, 1))
  params = jax.jit(pred.init, static_argnums=4)(
      jax.random.key(1), ctx, ctx_idx, tgt_idx, 10)["params"]
  apply = jax.jit(pred.apply, static_argnums=4)
  out = apply({"params": params}, ctx, ctx_idx, tgt_idx, 10)
  assert out.shape == (2, 4, 48) and out.dtype == jnp.float32
  # The mask tokens differ only by position, so their outputs must differ.
  assert np.abs(np.asarray(out[0, 0] - out[0, 1])).max() > 1e-4
  # Permuting targets permutes predictions (each keeps its position).
  rev = apply({"params": params}, ctx, ctx_idx, tgt_idx[:, ::-1], 10)
  np.testing.assert_allclose(rev, out[:, ::-1], atol=1e-5)


def test_rwse_uniform_init_is_mean_plus_last():
  hidden = jax.random.normal(jax.random.key(0), (5, 2, 3, 8))
  module = RWSE(num_heads=4)
  params = module.init(jax.random.key(1), hidden)
  out = module.apply(params, hidden)
  np.testing.assert_allclose(out, hidden.mean(0) + hidden[-1], atol=1e-6)


def test_rwse_groups_use_their_own_weights():
  hidden = np.random.default_rng(0).standard_normal((3, 2, 4, 6)).astype(
      np.float32)
  logits = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], np.float32)
  out = RWSE(num_heads=2).apply({"params": {"layer_logits": logits}}, hidden)
  w = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  ref = np.concatenate([
      np.einsum("l,lbtc->btc", w[0], hidden[..., :3]),
      np.einsum("l,lbtc->btc", w[1], hidden[..., 3:])], -1) + hidden[-1]
  np.testing.assert_allclose(out, ref, atol=1e-5)
