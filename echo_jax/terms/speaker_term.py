"""`speaker`: ArcFace on the pooled speaker projection of the RWSE features.

Labels are `speakers[:, 0]` (stages that train it draw single-speaker clips).
The additive angular margin ramps up over `margin_ramp_steps`.
"""

from echo_jax.objectives import arcface
from echo_jax.terms.base import StepInputs, Term


def loss(cfg, inputs: StepInputs, rng):
  del rng
  model, params = inputs.model, inputs.params
  embeddings = model.apply_head("speaker", params, inputs.features)
  margin = arcface.margin_schedule(inputs.step, ramp_steps=cfg.margin_ramp_steps,
                                   max_margin=cfg.margin)
  value, metrics = arcface.arcface_loss(
      embeddings, params["heads"]["arcface"]["class_weights"],
      inputs.batch["speakers"][:, 0], scale=cfg.scale, margin=margin)
  return value, {**metrics, "arcface/margin": margin}


TERM = Term(loss=loss, heads=("rwse", "speaker", "arcface"),
            batch_keys=("mixture", "speakers"))
