"""`jepa`: masked latent prediction (I-JEPA / data2vec over time spans).

Every stage keeps it on so that later stages do not erase what stage 1 learnt.
With `clean_targets`, the EMA target encoder sees the dry mixture while the
context sees the augmented one (denoising targets, as in WavLM): the latents
to predict then describe speech, not the room or the noise, and predicting
them from a noisy context teaches the encoder to look through the noise.
"""

from echo_jax.objectives import jepa
from echo_jax.terms.base import StepInputs, Term


def loss(cfg, inputs: StepInputs, rng):
  m = inputs.model
  return jepa.jepa_loss(
      m.encoder, m.predictor, inputs.params, inputs.target, inputs.mel, rng,
      mask_fraction=cfg.mask_fraction, span_tokens=tuple(cfg.span_tokens),
      loss_kind=cfg.loss, target_layers=cfg.target_layers,
      sigreg_weight=cfg.sigreg_weight,
      sigreg_directions=cfg.sigreg_directions,
      target_mel=inputs.clean_mel if cfg.get("clean_targets") else None,
      rank_now=inputs.log_step)


def _keys(cfg):
  return ("mixture", "clean") if cfg.get("clean_targets") else ("mixture",)


TERM = Term(loss=loss, batch_keys=_keys)
