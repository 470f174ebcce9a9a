"""The fixed, seeded held-out mixtures every mixture evaluator scores.

One function makes mixture i, so that evaluation conditions (noise, rooms)
can wrap it and every evaluator sees the same set.
"""

from __future__ import annotations

import logging

import numpy as np

from data_pipelines import augment
from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from data_pipelines import storage


class HeldoutMixtures:
  """Mixture `i` of held-out speakers as a pure function of (seed, i).

  Args:
    manifest_path: corpus whose HELDOUT speakers are mixed.
    seconds: mixture length; k_min, k_max: K drawn uniformly in between.
    clamp_k_max: lower k_max to the number of held-out speakers (with a
      warning) instead of failing on a small corpus.
    condition: one of `augment.CONDITIONS`, applied to the whole mixture
      (noise at the condition's SNR against its speech frames; "reverb": one
      room impulse response for the recording), a fixed draw per (seed, i);
      sources and labels stay the clean ones. Under noise, examples name
      the kind added (`noise_kind`).
  """

  def __init__(self, manifest_path: str, *, seconds: float, k_min: int,
               k_max: int, seed: int = 0, clamp_k_max: bool = False,
               condition: str = "clean"):
    if condition not in augment.CONDITIONS:
      raise ValueError(f"Unknown condition {condition!r}; known: "
                       f"{augment.CONDITIONS}.")
    self.condition = condition
    self.banks = None
    if condition != "clean":
      from echo_jax.evaluators import robustness  # Banks only when needed.
      self.banks = robustness.eval_banks(manifest_path, seed)
    self.index = mixtures.MixtureIndex.from_manifest(manifest_path,
                                                     manifest_lib.HELDOUT)
    available = len(self.index.eligible)
    if clamp_k_max and k_max > available:
      logging.warning("%s has %d held-out speakers: evaluation mixtures get "
                      "K <= %d (asked for up to %d).", manifest_path,
                      available, available, k_max)
      k_max, k_min = available, min(k_min, available)
    self.cfg = mixtures.MixtureConfig(clip_seconds=seconds, k_min=k_min,
                                      k_max=k_max, p_mixture=1.0)
    self.store = storage.AudioStore(manifest_path)
    self.seed = seed

  @property
  def speakers(self) -> tuple[str, ...]:
    return self.index.speakers

  def example(self, i: int) -> dict[str, np.ndarray]:
    """Mixture `i` (`mixtures.make_example` keys: mixture, sources,
    speakers, activity, num_speakers, ...)."""
    ex = mixtures.make_example(self.store, self.index, self.cfg,
                               np.random.default_rng((self.seed, i)))
    if self.banks is not None:
      seed = (self.seed, i, augment.CONDITIONS.index(self.condition))
      ex["mixture"] = augment.apply_condition(
          ex["mixture"], self.condition, self.banks,
          np.random.default_rng(seed),
          augment.frame_mask(ex["activity"], len(ex["mixture"])))
      if self.condition.startswith("snr"):
        ex["noise_kind"] = augment.condition_noise_kind(
            self.banks, np.random.default_rng(seed))
    return ex
