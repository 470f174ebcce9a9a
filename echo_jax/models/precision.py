"""Mixed precision and rematerialisation for the ViT blocks.

Mixed precision (`Linear`, `mixed_matmul`): params stay float32; a matmul
casts its two inputs to the compute dtype, the matrix units accumulate in
float32 (cuBLAS and the TPU MXU do for bfloat16; XLA's CPU dot too) and the
layer's output (product + bias) is stored in the compute dtype, so the
activations that go through device memory are 16-bit. Bias adds, residual
adds, LayerNorm, GELU, softmax and losses compute in float32 (XLA fuses the
casts into those elementwise ops); GELU's output is stored 16-bit and its
backward recomputes it (`gelu_stored`).
The backward pass is written out (`jax.custom_vjp`) so that its matmuls take
compute-dtype inputs too (JAX's own transpose would multiply a float32
cotangent by the bf16 operand, which XLA upcasts to a float32 matmul); weight
gradients come out in float32 for the float32 masters. With float32 compute
it is a plain matmul (no custom rule), so float32 numerics are unchanged.

Measured on an H200 (canonical size, batch 256, bf16): keeping the matmul
outputs in float32 instead (`preferred_element_type=float32`) made the step
14% slower than 16-bit outputs, because at width 512 the step is bound by
the memory traffic of the activations, not by the matmuls. On an H100 the
float32 bias add and GELU at the MLP's hidden width (4x the model width)
were the largest such traffic.

`compute_dtype="auto"` is resolved in `auto_dtype.py`: a measurement on the
backend in use, cached.

Remat policies (`REMAT_POLICIES`, `remat_block`): `none` keeps every
activation; `full` saves only each block's input and recomputes the block in
the backward pass; `dots` saves the outputs of the block's linear layers
(tagged `linear`) and recomputes the cheap elementwise work, norms and the
attention core.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPUTE_DTYPES = ("auto",) + tuple(DTYPES)
# `auto` takes bfloat16 only when it beats float32 by this factor, so a noisy
# tie does not flip the choice between runs.
AUTO_MIN_SPEEDUP = 1.1
# Checkpoint-name of the linear layers' outputs (the `dots` remat policy).
LINEAR_NAME = "linear"
REMAT_POLICIES = ("none", "full", "dots")

# I-JEPA / MAE initialisation for linear layers.
dense_init = nn.initializers.truncated_normal(stddev=0.02)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_matmul(x: jax.Array, w: jax.Array, dtype, x_dtype
                          ) -> jax.Array:
  del x_dtype  # The backward pass returns x's gradient in it.
  return jnp.matmul(x.astype(dtype), w.astype(dtype))


def _low_precision_fwd(x, w, dtype, x_dtype):
  del x_dtype
  xc, wc = x.astype(dtype), w.astype(dtype)
  # Residuals in the compute dtype: half the activation memory of float32.
  return jnp.matmul(xc, wc), (xc, wc)


def _low_precision_bwd(dtype, x_dtype, residuals, g):
  xc, wc = residuals
  gc = g.astype(dtype)
  dx = jnp.matmul(gc, wc.T)
  # Summed over every token: float32 output for the float32 master weights.
  dw = jnp.einsum("...i,...o->io", xc, gc, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype), dw


_low_precision_matmul.defvjp(_low_precision_fwd, _low_precision_bwd)


def mixed_matmul(x: jax.Array, w: jax.Array, dtype: Dtype) -> jax.Array:
  """`x @ w` for `[..., in] x [in, out] -> [..., out]` in `dtype`.

  Inputs are cast to `dtype` (float32 accumulation in the matrix units), and
  the backward matmuls take `dtype` inputs too; the gradient of `x` comes
  back in `x`'s dtype and that of `w` in float32.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.matmul(x.astype(jnp.float32), w)
  return _low_precision_matmul(x, w, jnp.dtype(dtype), jnp.dtype(x.dtype))


class Linear(nn.Module):
  """`nn.Dense` with mixed precision: float32 params (`kernel`, `bias`, the
  names and initial values of `nn.Dense`), `dtype` matmul inputs, and the
  output (product + bias, added in float32) stored in `dtype`."""
  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = dense_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., in] -> [..., features]` in `dtype`."""
    kernel = self.param("kernel", self.kernel_init,
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    y = (mixed_matmul(x, kernel, self.dtype) + bias).astype(self.dtype)
    return checkpoint_name(y, LINEAR_NAME)


def gelu_stored(x: jax.Array, dtype: Dtype) -> jax.Array:
  """tanh-GELU computed in float32, stored in `dtype`.

  With 16-bit `dtype` its backward pass recomputes it from the 16-bit `x`
  instead of keeping float32 intermediates (tanh) of the MLP's hidden width
  in device memory. In float32 there is nothing to shrink, and recomputing
  made the CPU step 8% slower, so it is a plain GELU.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return nn.gelu(x.astype(jnp.float32))
  return jax.checkpoint(
      lambda y: nn.gelu(y.astype(jnp.float32)).astype(dtype))(x)


def remat_policy_name(remat: bool | str) -> str:
  """'none' | 'full' | 'dots' from a config value (bools: False / True)."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {REMAT_POLICIES} (or a bool); "
                     f"found {remat!r}.")
  return remat


def remat_block(block_cls: type[nn.Module], remat: bool | str
                ) -> type[nn.Module]:
  """`block_cls` wrapped for the remat policy (`REMAT_POLICIES`)."""
  policy = remat_policy_name(remat)
  if policy == "none":
    return block_cls
  if policy == "full":
    return nn.remat(block_cls)
  return nn.remat(block_cls, policy=jax.checkpoint_policies
                  .save_only_these_names(LINEAR_NAME))


# --- compute_dtype="auto" -----------------------------------------------------
