"""Evaluation embeddings ignore the zero padding of short utterances."""

import jax
import numpy as np

from echo_jax import embed
from echo_jax.model import build_model, clip_samples
from experiments import stage2_speaker
from smoke_configs import smoke


def test_speaker_projection_masks_padding():
  config = smoke(stage2_speaker.get_config)
  model = build_model(config, num_classes=4)
  n = clip_samples(config)
  params = model.init(jax.random.PRNGKey(0), n)
  rng = np.random.default_rng(0)
  waves = np.zeros((2, n), np.float32)
  lengths = np.array([n, n // 2], np.int32)
  waves[0] = 0.1 * rng.standard_normal(n)
  waves[1, :n // 2] = 0.1 * rng.standard_normal(n // 2)
  masked = np.asarray(embed.speaker_embeddings(model, params, waves, lengths))
  # Reference: the head pools only the tokens inside the audio.
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  valid = int(embed.token_mask(model, lengths, n)[1].sum())
  assert 0 < valid < feats.shape[1]
  want = model.apply_head("speaker", params, feats[1:, :valid])
  np.testing.assert_allclose(masked[1], np.asarray(want)[0], rtol=1e-4,
                             atol=1e-5)
  # The full-length clip is unchanged by the mask, and without a mask the
  # padded clip's embedding differs (padding would leak in).
  unmasked = np.asarray(embed.speaker_embeddings(model, params, waves))
  np.testing.assert_allclose(masked[0], unmasked[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(masked[1], unmasked[1], rtol=1e-3, atol=1e-4)
