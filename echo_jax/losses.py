"""A stage's training loss: the weighted sum of the terms its config turns on.

Terms: `jepa` (masked latent prediction, every stage keeps it on so earlier
skills are not forgotten), `crop` (clip-level JEPA across disjoint halves, for
speaker information in pooled embeddings), `speaker` (ArcFace on pooled RWSE
features) and `activity` (frame speech/non-speech, used by blind diarization).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from echo_jax import audio
from echo_jax.model import EchoModel, token_activity
from echo_jax.objectives import arcface, jepa


def stage_loss(model: EchoModel, objective, params: dict, target: dict,
               batch: dict, rng: jax.Array, step: jax.Array
               ) -> tuple[jax.Array, dict]:
  """Total loss and scalar metrics for one batch.

  Args:
    objective: `config.objective` (term weights and their settings).
    params: {'encoder', 'predictor', 'heads'}; target: EMA encoder params.
    batch: the mixture stream's batch (`mixture` [B, N], `speakers` [B, K],
      `activity` [B, K, F], ...).
  """
  mel = model.log_mel(batch["mixture"])
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  if objective.jepa.weight > 0:
    o = objective.jepa
    loss, m = jepa.jepa_loss(
        model.encoder, model.predictor, params, target, mel, rng,
        mask_fraction=o.mask_fraction, span_tokens=tuple(o.span_tokens),
        loss_kind=o.loss, target_layers=o.target_layers,
        sigreg_weight=o.sigreg_weight, sigreg_directions=o.sigreg_directions)
    total += o.weight * loss
    metrics.update(m)
  if objective.crop.weight > 0:
    o = objective.crop
    crop_rng, eq_rng = jax.random.split(jax.random.fold_in(rng, 1))
    colouring = audio.db_to_log_power(audio.random_equalizer_db(
        eq_rng, mel.shape[0], mel.shape[-1], o.equalizer_db)) / model.mel_std
    loss, m = jepa.cross_crop_loss(
        model.encoder, params["encoder"], target, mel, crop_rng,
        sigreg_weight=o.sigreg_weight, context_offset=colouring,
        sigreg_directions=objective.jepa.sigreg_directions)
    total += o.weight * loss
    metrics.update(m)
  if objective.speaker.weight > 0 or objective.activity.weight > 0:
    feats, _ = model.features(params, params["encoder"], mel)
    if objective.speaker.weight > 0:
      o = objective.speaker
      embeddings = model.speaker_embedding(params, feats)
      margin = arcface.margin_schedule(step, ramp_steps=o.margin_ramp_steps,
                                       max_margin=o.margin)
      loss, m = arcface.arcface_loss(
          embeddings, params["heads"]["arcface"]["class_weights"],
          batch["speakers"][:, 0], scale=o.scale, margin=margin)
      total += o.weight * loss
      metrics.update(m)
      metrics["arcface/margin"] = margin
    if objective.activity.weight > 0:
      labels = token_activity(batch["activity"], model.patch_frames)
      logits = model.activity_logits(params, feats)
      loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
      total += objective.activity.weight * loss
      metrics["activity/loss"] = loss
      metrics["activity/accuracy"] = jnp.mean((logits > 0) == (labels > 0.5))
  metrics["train/loss"] = total
  return total, metrics
