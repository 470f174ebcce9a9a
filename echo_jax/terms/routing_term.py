"""`routing`: slots of the router head carry the mixture's sources or nothing.

Targets are the frozen EMA encoder's JEPA targets (mean of the last
`target_layers` layer-normed layers) of each isolated source, computed on that
source alone: the K_max source waveforms go through the target encoder as one
batch of B * K_max clips (absent sources are silent clips and are masked out).
The loss and the matching are in `echo_jax/objectives/routing.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from echo_jax.objectives import jepa
from echo_jax.objectives import routing
from echo_jax.terms.base import StepInputs, Term


def ema_latent(model, target_params: dict, mel: jax.Array,
               num_layers: int) -> jax.Array:
  """Log-mel `[B, F, M]` -> the EMA encoder's JEPA targets `[B, T, W]`."""
  hidden = model.encoder.apply(
      {"params": jax.lax.stop_gradient(target_params)}, mel)["hidden"]
  return jepa.layer_targets(hidden, num_layers)


def source_targets(model, target_params: dict, sources: jax.Array,
                   num_layers: int) -> jax.Array:
  """Waveforms `[B, K, N]` -> EMA-encoder JEPA targets `[B, K, T, W]`."""
  b, k, n = sources.shape
  targets = ema_latent(model, target_params,
                       model.log_mel(sources.reshape(b * k, n)), num_layers)
  return targets.reshape((b, k) + targets.shape[1:])


def route(model, params: dict, features: jax.Array, mel: jax.Array,
          target_params: dict) -> dict[str, jax.Array]:
  """The router head on a mixture (RWSE `features` of its log-mel `mel`).

  A residual router (`residual_layers` = n) corrects the mixture's latent by
  the rule its targets follow: the EMA encoder's (`target_params`) last n
  layers. Not the online encoder's: on held-out mixtures (K 1-3) its latent
  scores -0.9 dB mean latent SI-SDR against the sources' targets, the EMA's
  +11 dB.
  """
  n = model.heads["router"].residual_layers
  if not n:
    return model.apply_head("router", params, features)
  return model.apply_head("router", params, features,
                          ema_latent(model, target_params, mel, n))


def present_sources(num_speakers: jax.Array, k_max: int) -> jax.Array:
  """`[B]` K -> `[B, K_max]` bool: the stream fills slots 0..K-1."""
  return jnp.arange(k_max)[None, :] < num_speakers[:, None]


def loss(cfg, inputs: StepInputs, rng):
  del rng
  batch, model = inputs.batch, inputs.model
  targets = source_targets(model, inputs.target, batch["sources"],
                           cfg.target_layers)
  target_activity = routing.token_activity(batch["activity"],
                                           model.patch_frames)
  present = present_sources(batch["num_speakers"], batch["sources"].shape[1])
  outputs = route(model, inputs.params, inputs.features, inputs.mel,
                  inputs.target)
  value, metrics = routing.routing_loss(
      outputs, targets, target_activity, present,
      latent_weight=cfg.latent_weight, activity_weight=cfg.activity_weight,
      existence_weight=cfg.existence_weight, null_weight=cfg.null_weight,
      null_energy_weight=cfg.null_energy_weight, aux_weight=cfg.aux_weight,
      distinct_weight=cfg.distinct_weight,
      distinct_temperature=cfg.distinct_temperature)
  metrics = {f"routing/{k}": v for k, v in metrics.items()}
  metrics["routing/loss"] = value
  metrics["routing/target_std"] = jepa.feature_std(targets)
  return value, metrics


TERM = Term(loss=loss, heads=("rwse", "router"),
            batch_keys=("mixture", "sources", "activity", "num_speakers"))
