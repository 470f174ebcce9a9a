"""`crop`: clip-level JEPA across disjoint halves of a clip.

The pooled embedding of one half (with a random smooth equaliser, a stand-in
for a channel change) predicts the EMA target's pooled embedding of the other
half; this is what makes pooled features speaker features.
"""

import jax

from echo_jax import audio
from echo_jax.objectives import jepa
from echo_jax.terms.base import StepInputs, Term


def loss(cfg, inputs: StepInputs, rng):
  crop_rng, eq_rng = jax.random.split(rng)
  mel, model = inputs.mel, inputs.model
  colouring = audio.db_to_log_power(audio.random_equalizer_db(
      eq_rng, mel.shape[0], mel.shape[-1], cfg.equalizer_db)) / model.mel_std
  return jepa.cross_crop_loss(
      model.encoder, inputs.params["encoder"], inputs.target, mel, crop_rng,
      sigreg_weight=cfg.sigreg_weight, context_offset=colouring,
      sigreg_directions=cfg.sigreg_directions)


TERM = Term(loss=loss)
