"""Pre-LN ViT over full-band frame patches: the Echo encoder and JEPA predictor.

Tokens are `patch_frames` consecutive log-mel frames x all mel bins, linearly
embedded, plus a fixed 1-D sin-cos time position. Parameters are always
float32; `dtype` is the compute dtype of the matmuls (bfloat16 on
accelerators: 16-bit inputs and layer outputs, float32 accumulation;
`precision.Linear`). The residual stream (unless `residual_dtype` says
otherwise), the arithmetic of LayerNorms, GELU and the attention softmax, and
the encoder's `final` and the predictor's outputs stay float32 so bfloat16
compute does not drift the features. `remat` picks a rematerialisation
policy per block (`precision.REMAT_POLICIES`).

Parameter names are stable (they become export names):
  Encoder:   patch_embed, norm,
             blocks_{i}/{norm1,attn/{qkv,out},norm2,mlp/{fc1,fc2}}
  Predictor: context_proj, mask_token, blocks_{i}/..., norm, out_proj
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from echo_jax.models.precision import Dtype, Linear, gelu_stored, remat_block


def sincos_1d(num_positions: int, dim: int) -> np.ndarray:
  """Fixed sin-cos position table `[num_positions, dim]` (float32, MAE style).

  Row t is `[sin(t * w_0..w_{d/2-1}), cos(t * w_0..w_{d/2-1})]` with
  `w_i = 10000 ** (-i / (dim / 2))`.
  """
  if dim % 2:
    raise ValueError(f"sincos_1d needs an even dim; found {dim}.")
  omega = 1.0 / 10000.0**(np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.arange(num_positions, dtype=np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)],
                        axis=1).astype(np.float32)


ATTENTION = ("auto", "xla", "cudnn")


def resolve_attention(name: str, dtype: Dtype) -> str | None:
  """`config.model.attention` -> `jax.nn.dot_product_attention`'s
  implementation. "auto": cuDNN's fused (flash) kernel on GPUs when q/k/v are
  16-bit, as it needs; XLA's otherwise (CPU, TPU, float32). On an H200 at the
  canonical size and batch 256 in bf16 the fused kernel took the step from
  65.0 to 55.6 ms: XLA writes out every score matrix."""
  if name not in ATTENTION:
    raise ValueError(f"config.model.attention={name!r}: one of {ATTENTION}.")
  if name == "auto":
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit else None
  return name


RESIDUAL_DTYPES = ("float32", "compute")


def resolve_residual_dtype(name: str, dtype: Dtype) -> Dtype:
  """`config.model.residual_dtype` -> the residual stream's storage dtype:
  "float32", or "compute" (the compute dtype: bfloat16 halves the bytes the
  memory-bound elementwise work moves at width 512)."""
  if name not in RESIDUAL_DTYPES:
    raise ValueError(f"config.model.residual_dtype={name!r}: one of "
                     f"{RESIDUAL_DTYPES}.")
  return jnp.float32 if name == "float32" else dtype


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Per-example gather `x[b, idx[b, j]]`.

  `[batch, tokens, dim]`, `[batch, k]` -> `[batch, k, dim]`.
  """
  return jnp.take_along_axis(x, idx[..., None], axis=1)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (no mask).

  q, k, v enter `jax.nn.dot_product_attention` in the compute dtype. Its
  XLA implementation (`attention_impl=None`) takes logits and softmax in
  float32; "cudnn" asks for cuDNN's fused kernel on GPUs (16-bit inputs).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} must be divisible by num_heads "
                       f"{self.num_heads}.")
    head_dim = width // self.num_heads
    qkv = Linear(3 * width, self.dtype, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = jax.nn.dot_product_attention(q, k, v,
                                     implementation=self.attention_impl)
    y = y.reshape(batch, tokens, width)
    return Linear(width, self.dtype, name="out")(y)


class Mlp(nn.Module):
  """Two-layer GELU MLP; the hidden activations are stored in `dtype`."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = gelu_stored(Linear(self.hidden_dim, self.dtype, name="fc1")(x),
                    self.dtype)
    return Linear(width, self.dtype, name="fc2")(h)


class Block(nn.Module):
  """Pre-LN transformer block; norms and residual adds compute in float32.

  `residual_dtype` is what the residual stream is stored in between the
  block's ops (float32, or the compute dtype to halve its memory traffic).
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  residual_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, tokens, width]` -> same, in `residual_dtype`."""
    stored = lambda y: y.astype(self.residual_dtype)
    h = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
    x = stored(x + Attention(self.num_heads, self.dtype, self.attention_impl,
                             name="attn")(h))
    h = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    return stored(x + Mlp(self.mlp_dim, self.dtype, name="mlp")(h))


class Encoder(nn.Module):
  """ViT encoder over full-band frame patches.

  Attributes:
    width, depth, num_heads, mlp_dim: transformer sizes (canonical: 25.3M
      params).
    patch_frames: log-mel frames per token (2 = 20 ms tokens at a 10 ms hop).
    n_mels: mel bins per frame.
    dtype: compute dtype of the matmul inputs; params are float32 regardless.
    remat: per-block rematerialisation policy, `none` | `full` | `dots`
      (`precision.REMAT_POLICIES`; True / False mean `full` / `none`).
    attention_impl: `jax.nn.dot_product_attention` implementation (None: XLA).
    residual_dtype: storage dtype of the residual stream (`Block`); `hidden`
      comes out in it, `final` is float32 regardless.
  """
  width: int = 512
  depth: int = 8
  num_heads: int = 8
  mlp_dim: int = 2048
  patch_frames: int = 2
  n_mels: int = 80
  dtype: Dtype = jnp.float32
  remat: bool | str = "none"
  attention_impl: str | None = None
  residual_dtype: Dtype = jnp.float32

  def num_tokens(self, num_frames: int) -> int:
    """Tokens for `num_frames` mel frames (remainder frames are dropped)."""
    return num_frames // self.patch_frames

  @nn.compact
  def __call__(self,
               mel: jax.Array,
               keep_idx: jax.Array | None = None) -> dict[str, jax.Array]:
    """Encodes `[batch, frames, n_mels]` log-mel.

    Args:
      mel: normalised log-mel `[batch, frames, n_mels]`.
      keep_idx: optional `[batch, keep]` int32 token indices; only these tokens
        enter the transformer (the JEPA context encoder). Positions are added
        before the gather, so each kept token keeps its true time position.

    Returns:
      dict with `hidden`: `[depth, batch, tokens', width]` output of every
      block (in `residual_dtype`), and `final`: `[batch, tokens', width]`
      float32, the final LayerNorm of the last block; `tokens'` is `keep`
      when `keep_idx` is given.
    """
    batch, frames, n_mels = mel.shape
    if n_mels != self.n_mels:
      raise ValueError(f"Encoder expects {self.n_mels} mel bins; found "
                       f"{n_mels}.")
    tokens = self.num_tokens(frames)
    if tokens < 1:
      raise ValueError(f"Encoder needs at least patch_frames="
                       f"{self.patch_frames} frames; found {frames}.")
    patches = mel[:, :tokens * self.patch_frames].reshape(
        batch, tokens, self.patch_frames * n_mels)
    x = Linear(self.width, self.dtype,
               kernel_init=nn.initializers.xavier_uniform(),
               name="patch_embed")(patches)
    x = x + sincos_1d(tokens, self.width)
    if keep_idx is not None:
      x = gather_tokens(x, keep_idx)
    hidden = []
    block_cls = remat_block(Block, self.remat)
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, self.dtype,
                    self.attention_impl, self.residual_dtype,
                    name=f"blocks_{i}")(x)
      hidden.append(x)
    final = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
    return {"hidden": jnp.stack(hidden), "final": final}


class Predictor(nn.Module):
  """Narrow ViT that predicts target latents at masked token positions."""
  width: int = 256
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  out_dim: int = 512
  dtype: Dtype = jnp.float32
  remat: bool | str = "none"
  attention_impl: str | None = None
  residual_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, context: jax.Array, context_idx: jax.Array,
               target_idx: jax.Array, num_tokens: int) -> jax.Array:
    """Predicts `[batch, targets, out_dim]` float32.

    Args:
      context: context-encoder output `[batch, ctx, encoder_width]`.
      context_idx: `[batch, ctx]` token positions of `context`.
      target_idx: `[batch, targets]` token positions to predict.
      num_tokens: total tokens of the sequence (static; sizes the position
        table).
    """
    positions = sincos_1d(num_tokens, self.width)
    ctx = Linear(self.width, self.dtype, name="context_proj")(context)
    ctx = ctx + jnp.take(positions, context_idx, axis=0)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (self.width,), jnp.float32)
    tgt = mask_token + jnp.take(positions, target_idx, axis=0)
    x = jnp.concatenate([ctx, tgt], axis=1)
    block_cls = remat_block(Block, self.remat)
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, self.dtype,
                    self.attention_impl, self.residual_dtype,
                    name=f"blocks_{i}")(x)
    # Only the target tokens are read out: norm and projection skip the rest.
    x = nn.LayerNorm(epsilon=1e-6, name="norm")(x[:, context.shape[1]:])
    return Linear(self.out_dim, self.dtype, name="out_proj")(x).astype(
        jnp.float32)
