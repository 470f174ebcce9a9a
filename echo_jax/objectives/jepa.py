"""JEPA objective: predict the EMA target encoder's latents at masked spans.

Pieces: data2vec layer-averaged targets, smooth-L1/L2 regression at masked
tokens, optional SIGReg (LeJEPA) on pooled context embeddings, a clip-level
cross-crop prediction term (pooled embeddings of disjoint halves), collapse
watches (feature std, RankMe effective rank), and the EMA target update.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from echo_jax import masking
from echo_jax.models.vit import Encoder, Predictor, gather_tokens

PyTree = Any


def layer_targets(hidden: jax.Array, num_layers: int = 4) -> jax.Array:
  """data2vec targets `[layers, batch, time, width] -> [batch, time, width]`.

  Mean of the last `num_layers` layers, each layer-normed over channels without
  learned params; float32; no gradient flows back.
  """
  if not 1 <= num_layers <= hidden.shape[0]:
    raise ValueError(f"layer_targets: num_layers must be in [1, "
                     f"{hidden.shape[0]}]; found {num_layers}.")
  top = hidden[-num_layers:].astype(jnp.float32)
  mean = top.mean(-1, keepdims=True)
  var = jnp.square(top - mean).mean(-1, keepdims=True)
  normed = (top - mean) * jax.lax.rsqrt(var + 1e-6)
  return jax.lax.stop_gradient(normed.mean(0))


def regression_loss(pred: jax.Array, target: jax.Array, kind: str = "smooth_l1",
                    beta: float = 1.0) -> jax.Array:
  """Mean over positions and channels of smooth-L1 (PyTorch's) or L2.

  smooth_l1(d) = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta;
  l2(d) = d^2.
  """
  if pred.shape != target.shape:
    raise ValueError(f"regression_loss: pred {pred.shape} != target "
                     f"{target.shape}.")
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  if kind == "smooth_l1":
    # optax's Huber is beta * smooth-L1.
    return jnp.mean(optax.huber_loss(pred, target, delta=beta)) / beta
  if kind == "l2":
    return jnp.mean(jnp.square(pred - target))
  raise ValueError(f"regression_loss kind must be 'smooth_l1' or 'l2'; "
                   f"found {kind!r}.")


def sigreg(embeddings: jax.Array, rng: jax.Array, num_directions: int = 256,
           num_points: int = 17) -> jax.Array:
  """SIGReg (LeJEPA): Epps-Pulley test of random 1-D projections vs N(0, 1).

  For unit directions a, z = x @ a; the empirical characteristic function
  ecf(t) = mean_n exp(i t z_n) is compared with exp(-t^2 / 2) on `num_points`
  nodes in [-5, 5]: N * trapz(|ecf - phi|^2 * phi), averaged over directions
  (exactly LeJEPA's reference code). It is the test statistic, scaled by N, so
  for true N(0, 1) samples its expectation is
  int (1 - e^{-t^2}) e^{-t^2/2} dt ~= 1.06 (not 0); degenerate embeddings give
  O(N). Computed with cos/sin (no complex dtype); the batch mean is global
  under jit, so sharded batches need no extra all-reduce.

  Args:
    embeddings: `[N, D]`.
    rng: key for the random directions (use the same key on every host).
  """
  x = embeddings.astype(jnp.float32)
  n, dim = x.shape
  directions = jax.random.normal(rng, (dim, num_directions), jnp.float32)
  directions /= jnp.linalg.norm(directions, axis=0, keepdims=True)
  z = jnp.matmul(x, directions, precision=jax.lax.Precision.HIGHEST)  # [N, M]
  t = jnp.linspace(-5.0, 5.0, num_points, dtype=jnp.float32)
  phi = jnp.exp(-0.5 * t**2)
  zt = z[..., None] * t  # [N, M, P]
  ecf_re, ecf_im = jnp.cos(zt).mean(0), jnp.sin(zt).mean(0)  # [M, P]
  err = (jnp.square(ecf_re - phi) + jnp.square(ecf_im)) * phi
  return jnp.mean(jnp.trapezoid(err, t, axis=-1) * n)


def feature_std(x: jax.Array) -> jax.Array:
  """Mean over channels of the per-channel std over all other axes `[..., D]`.
  """
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.mean(jnp.std(x, axis=0))


def effective_rank(x: jax.Array, eps: float = 1e-7) -> jax.Array:
  """RankMe: exp of the entropy of the normalised singular values of `[N, D]`.

  For N >= D the singular values come from the eigenvalues of the D x D Gram
  matrix (cheap on accelerators; tiny singular values lose precision, but they
  barely move the entropy).
  """
  x = jax.lax.stop_gradient(x.astype(jnp.float32))
  n, dim = x.shape
  if n >= dim:
    gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    singular = jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(gram), 0.0))
  else:
    singular = jnp.linalg.svd(x, compute_uv=False)
  p = singular / (jnp.sum(singular) + eps) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def crop_halves(mel: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits `[batch, frames, mels]` into two disjoint halves in time; each
  example's halves are swapped with probability 1/2, so neither side is
  always the earlier one."""
  half = mel.shape[1] // 2
  first, second = mel[:, :half], mel[:, mel.shape[1] - half:]
  swap = jax.random.bernoulli(rng, 0.5, (mel.shape[0], 1, 1))
  return jnp.where(swap, second, first), jnp.where(swap, first, second)


def cross_crop_loss(encoder: Encoder, encoder_params: PyTree,
                    target_params: PyTree, mel: jax.Array, rng: jax.Array, *,
                    sigreg_weight: float, sigreg_directions: int = 256,
                    context_offset: jax.Array | float = 0.0
                    ) -> tuple[jax.Array, dict]:
  """Clip-level JEPA: the pooled context embedding of one half of a clip
  predicts the pooled EMA-target embedding of the other, disjoint half.

  The halves share the speaker but not the content, so this term puts
  clip-invariant information (who is speaking) in the pooled embedding;
  token-level JEPA alone left content the larger share of the pooled variance,
  and k-NN speaker ID below a random encoder's. A random channel colouring on
  the context half (`context_offset`) keeps the recording channel, which the
  halves also share, from standing in for the speaker. A mixture's halves may
  hold different speakers; that noise is accepted to keep one code path.
  SIGReg on the context embeddings keeps them from collapsing to a constant
  (LeJEPA pairs its view-prediction term with it the same way).

  Args:
    context_offset: added to the context half's log-mel (e.g. a random
      channel colouring `[batch, 1, mels]`), so the pooled embedding has to
      become invariant to it.
  """
  split_rng, sigreg_rng = jax.random.split(rng)
  context_mel, target_mel = crop_halves(mel, split_rng)
  context = encoder.apply({"params": encoder_params},
                          context_mel + context_offset)["final"].mean(1)
  target = jax.lax.stop_gradient(encoder.apply(
      {"params": target_params}, target_mel)["final"].mean(1))
  prediction = jnp.mean(jnp.square(context - target))
  sig = sigreg(context, sigreg_rng, sigreg_directions)
  total = prediction + sigreg_weight * sig
  return total, {"crop/loss": prediction, "crop/sigreg": sig,
                 "crop/total": total,
                 "crop/context_std": feature_std(jax.lax.stop_gradient(context))}


def jepa_loss(encoder: Encoder,
              predictor: Predictor,
              params: PyTree,
              target_params: PyTree,
              mel: jax.Array,
              rng: jax.Array,
              *,
              mask_fraction: float,
              span_tokens: int | tuple[int, ...],
              loss_kind: str = "smooth_l1",
              target_layers: int = 4,
              sigreg_weight: float = 0.0,
              sigreg_directions: int = 256,
              target_mel: jax.Array | None = None,
              rank_now: bool | jax.Array = True) -> tuple[jax.Array, dict]:
  """JEPA loss on normalised log-mel `[batch, frames, n_mels]`.

  Args:
    params: `{'encoder': ..., 'predictor': ...}` trainable param trees.
    target_params: EMA encoder params (no gradient flows into them).
    rng: key for the masks and SIGReg directions.
    target_mel: what the target encoder sees (default `mel`); e.g. the clean
      mixture while the context sees its augmented copy (denoising targets).
    rank_now: whether to compute `jepa/target_rank` (an eigenvalue solve that
      can cost a tenth of a step; 0, never a real rank, when False).

  Returns:
    `(loss, metrics)`: loss = regression + sigreg_weight * sigreg; metrics are
    scalars `jepa/{loss,sigreg,total,target_std,pred_std,context_std,
    target_rank}`.
  """
  batch, frames = mel.shape[:2]
  num_tokens = encoder.num_tokens(frames)
  mask_rng, sigreg_rng = jax.random.split(rng)
  context_idx, target_idx = masking.span_mask(mask_rng, batch, num_tokens,
                                              mask_fraction, span_tokens)

  target_params = jax.lax.stop_gradient(target_params)
  target_hidden = encoder.apply({"params": target_params},
                                mel if target_mel is None else target_mel
                                )["hidden"]
  targets = gather_tokens(layer_targets(target_hidden, target_layers),
                          target_idx)

  context = encoder.apply({"params": params["encoder"]}, mel,
                          keep_idx=context_idx)["final"]
  pred = predictor.apply({"params": params["predictor"]}, context, context_idx,
                         target_idx, num_tokens)
  regression = regression_loss(pred, targets, loss_kind)

  if sigreg_weight > 0:
    sig = sigreg(context.mean(1), sigreg_rng, sigreg_directions)
  else:
    sig = jnp.zeros((), jnp.float32)
  total = regression + sigreg_weight * sig
  metrics = {
      "jepa/loss": regression,
      "jepa/sigreg": sig,
      "jepa/total": total,
      "jepa/target_std": feature_std(targets),
      "jepa/pred_std": feature_std(jax.lax.stop_gradient(pred)),
      "jepa/context_std": feature_std(jax.lax.stop_gradient(context)),
      "jepa/target_rank": jax.lax.cond(
          rank_now, effective_rank, lambda _: jnp.float32(0.0),
          targets.reshape(-1, targets.shape[-1])),
  }
  return total, metrics


def ema_update(target: PyTree, online: PyTree, momentum: float | jax.Array
              ) -> PyTree:
  """`target <- momentum * target + (1 - momentum) * online`, leaf by leaf."""
  return optax.incremental_update(online, target, step_size=1.0 - momentum)


def ema_momentum(step: int | jax.Array, total_steps: int, start: float = 0.996,
                 end: float = 1.0) -> jax.Array:
  """EMA momentum: linear from `start` (step 0) to `end` (`total_steps`), then
  flat. Works on traced steps."""
  return optax.linear_schedule(start, end, total_steps)(step)
