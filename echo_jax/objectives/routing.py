"""Set-prediction loss of the routing slots (stage 4), with null targets.

Per decoder layer (each layer is matched on its own, as in DETR):
  cost[s, k] = latent MSE of slot s vs source k on k's active tokens
               + activity BCE of slot s vs k's token activity
               - log p(slot s exists)
  matching   = least-cost assignment of the present sources to slots
               (`echo_jax.matching`);
  matched    : latent MSE over the whole sequence (the isolated source's
               target includes its silences) + activity BCE + existence 1;
  null slots : existence 0 weighted `null_weight` (DETR's no-object weight),
               activity all 0, no latent loss (optionally a small energy
               penalty `null_energy_weight` on the latent);
  distinct   : (optional, `distinct_weight`) in mixtures of K >= 2, each
               matched slot must be nearer its own source than the other
               sources (cross-entropy over the present sources of
               -MSE / `distinct_temperature`).

Why `distinct`: with the latent MSE alone, a slot unsure of its source is
pulled to the mean of the candidates, i.e. toward the mixture; measured on
held-out K >= 2 mixtures, matched slots ended about a tenth as far apart as
the sources they stand for, which caps PIT accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from echo_jax import matching


def existence_probability(logits: jax.Array, null_weight: float) -> jax.Array:
  """Calibrated P(slot holds a source) from existence logits trained with
  null slots weighted `null_weight`.

  Weighted BCE is minimised at logit = log(p / (w (1 - p))): down-weighting
  the negatives shifts every logit up by -log w (+2.3 at DETR's 0.1), which
  suits DETR's 100 queries for a few objects but, read as sigmoid > 0.5,
  over-counts with S = K_max + 1 slots. Adding log w undoes the shift
  exactly, so 0.5 means even odds again (logit adjustment, Menon et al.
  2021)."""
  return jax.nn.sigmoid(logits + jnp.log(null_weight))


def token_activity(activity: jax.Array, patch_frames: int) -> jax.Array:
  """Frame activity `[B, K, F]` -> token activity `[B, K, F // p]` (a token
  is active when any of its frames is)."""
  b, k, f = activity.shape
  t = f // patch_frames
  return jnp.max(activity[..., :t * patch_frames].reshape(b, k, t,
                                                          patch_frames), -1)


def matching_cost(latents: jax.Array, existence: jax.Array,
                  activity: jax.Array, targets: jax.Array,
                  target_activity: jax.Array, *, latent_weight: float = 1.0,
                  activity_weight: float = 1.0,
                  existence_weight: float = 1.0) -> jax.Array:
  """Cost `[B, S, K]` of slot s carrying source k (see the module docstring).

  Args:
    latents: `[B, S, T, C]`; existence: `[B, S]` logits; activity:
      `[B, S, T]` logits; targets: `[B, K, T, C]`; target_activity:
      `[B, K, T]` in {0, 1}.
  """
  c = latents.shape[-1]
  # |l - t|^2 = |l|^2 + |t|^2 - 2 l.t, per token, without a [B, S, K, T, C]
  # temporary.
  sq_l = jnp.sum(jnp.square(latents), -1)                         # [B, S, T]
  sq_t = jnp.sum(jnp.square(targets), -1)                         # [B, K, T]
  cross = jnp.einsum("bstc,bktc->bskt", latents, targets,
                     precision=jax.lax.Precision.HIGHEST)
  dist = (sq_l[:, :, None] + sq_t[:, None] - 2.0 * cross) / c     # [B,S,K,T]
  weights = target_activity[:, None]                               # [B,1,K,T]
  latent_cost = (jnp.sum(dist * weights, -1)
                 / jnp.maximum(jnp.sum(weights, -1), 1.0))
  # Mean BCE over tokens: softplus(x) - x * y.
  activity_cost = (jax.nn.softplus(activity).mean(-1)[:, :, None]
                   - jnp.einsum("bst,bkt->bsk", activity, target_activity)
                   / activity.shape[-1])
  existence_cost = -jax.nn.log_sigmoid(existence)[:, :, None]
  return (latent_weight * latent_cost + activity_weight * activity_cost
          + existence_weight * existence_cost)


def distinct_loss(matched: jax.Array, targets: jax.Array, present: jax.Array,
                  temperature: float) -> jax.Array:
  """Mean over present sources of K >= 2 mixtures of
  `-log softmax_j(-mse(matched_k, target_j) / temperature)[k]`, j over the
  present sources; 0 when no mixture has two.

  Args:
    matched: `[B, K, T, C]` the slot matched to each source; targets:
      `[B, K, T, C]`; present: `[B, K]` bool.
  """
  c, t = matched.shape[-1], matched.shape[-2]
  sq_m = jnp.sum(jnp.square(matched), (-2, -1))                   # [B, K]
  sq_t = jnp.sum(jnp.square(targets), (-2, -1))
  cross = jnp.einsum("bktc,bjtc->bkj", matched, targets,
                     precision=jax.lax.Precision.HIGHEST)
  mse = (sq_m[:, :, None] + sq_t[:, None] - 2.0 * cross) / (t * c)  # [B,K,J]
  # A large finite mask, not -inf: a K = 0 row must not give NaN gradients.
  logits = jnp.where(present[:, None], -mse / temperature, -1e9)
  log_p = jnp.diagonal(jax.nn.log_softmax(logits, -1), axis1=1, axis2=2)
  rows = present & (jnp.sum(present, -1, keepdims=True) >= 2)
  rows_f = rows.astype(jnp.float32)
  return -jnp.sum(jnp.where(rows, log_p, 0.0)) / jnp.maximum(rows_f.sum(),
                                                             1.0)


def slot_losses(latents: jax.Array, existence: jax.Array, activity: jax.Array,
                targets: jax.Array, target_activity: jax.Array,
                present: jax.Array, slot_of_source: jax.Array, *,
                null_weight: float = 0.1, null_energy_weight: float = 0.0,
                distinct_temperature: float = 0.1
                ) -> dict[str, jax.Array]:
  """Losses of one layer's slots given the matching.

  Args:
    latents, existence, activity, targets, target_activity: as in
      `matching_cost`.
    present: `[B, K]` bool; slot_of_source: `[B, K]` int (`matching.match`).
  Returns:
    {latent, activity, existence, null_energy, distinct}: scalars. `latent`
    is the MSE of matched slots vs their sources over the whole sequence,
    averaged over present sources; null slots get no latent gradient;
    `distinct` is `distinct_loss` (unweighted).
  """
  num_slots = latents.shape[1]
  pairs = matching.matched_slots(slot_of_source, present, num_slots)  # [B,S,K]
  present_f = present.astype(jnp.float32)
  # The matched slot's latents, per source: [B, K, T, C].
  gathered = jnp.take_along_axis(latents, slot_of_source[:, :, None, None],
                                 axis=1)
  per_source = jnp.mean(jnp.square(gathered - targets), axis=(-2, -1))
  latent = jnp.sum(per_source * present_f) / jnp.maximum(present_f.sum(), 1.0)
  exists = jnp.sum(pairs, -1)                                     # [B, S]
  slot_activity = jnp.einsum("bsk,bkt->bst", pairs, target_activity)
  activity_loss = optax.sigmoid_binary_cross_entropy(activity,
                                                     slot_activity).mean()
  weights = jnp.where(exists > 0.5, 1.0, null_weight)
  existence_loss = (jnp.sum(weights * optax.sigmoid_binary_cross_entropy(
      existence, exists)) / jnp.sum(weights))
  null = 1.0 - exists
  null_energy = (jnp.sum(null[..., None, None] * jnp.square(latents))
                 / jnp.maximum(null.sum() * latents.shape[2]
                               * latents.shape[3], 1.0))
  return {"latent": latent, "activity": activity_loss,
          "existence": existence_loss,
          "null_energy": null_energy_weight * null_energy,
          "distinct": distinct_loss(gathered, targets, present,
                                    distinct_temperature)}


def routing_loss(outputs: dict, targets: jax.Array,
                 target_activity: jax.Array, present: jax.Array, *,
                 latent_weight: float = 1.0, activity_weight: float = 1.0,
                 existence_weight: float = 1.0, null_weight: float = 0.1,
                 null_energy_weight: float = 0.0, aux_weight: float = 1.0,
                 distinct_weight: float = 0.0,
                 distinct_temperature: float = 0.1
                 ) -> tuple[jax.Array, dict]:
  """Loss over every decoder layer (auxiliary layers weighted `aux_weight`).

  Args:
    outputs: `SlotRouter` output (per-layer latents `[D, B, S, T, C]`,
      existence `[D, B, S]`, activity `[D, B, S, T]`).
    targets: `[B, K, T, C]` JEPA targets of the isolated sources;
    target_activity: `[B, K, T]`; present: `[B, K]` bool.
  Returns:
    (loss, metrics) where metrics describe the last layer's prediction.
  """
  depth = outputs["existence"].shape[0]
  total = jnp.zeros((), jnp.float32)
  norm = 0.0
  for layer in range(depth):
    lat, ex, act = (outputs[k][layer] for k in ("latents", "existence",
                                                "activity"))
    cost = matching_cost(lat, ex, act, targets, target_activity,
                         latent_weight=latent_weight,
                         activity_weight=activity_weight,
                         existence_weight=existence_weight)
    slot_of = matching.match(cost, present)
    parts = slot_losses(lat, ex, act, targets, target_activity, present,
                        slot_of, null_weight=null_weight,
                        null_energy_weight=null_energy_weight,
                        distinct_temperature=distinct_temperature)
    layer_loss = (latent_weight * parts["latent"]
                  + activity_weight * parts["activity"]
                  + existence_weight * parts["existence"]
                  + parts["null_energy"]
                  + distinct_weight * parts["distinct"])
    w = 1.0 if layer == depth - 1 else aux_weight
    total += w * layer_loss
    norm += w
  loss = total / norm
  count = jnp.sum(existence_probability(outputs["existence"][-1], null_weight)
                  > 0.5, -1)
  metrics = {"latent": parts["latent"], "activity": parts["activity"],
             "existence": parts["existence"], "distinct": parts["distinct"],
             "count_accuracy": jnp.mean(count == present.sum(-1)),
             "latent_std": jnp.mean(jnp.std(jax.lax.stop_gradient(lat),
                                            axis=(1, 2)))}
  return loss, metrics
