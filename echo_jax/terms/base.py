"""What an objective term is, and what every term of one step can read.

A term is a unit of a stage's loss: it names the heads it needs and the batch
entries it reads, and computes `loss(cfg, inputs, rng) -> (loss, metrics)`,
where `cfg` is its own `config.objective.<name>` block and `rng` its own key.
`echo_jax/losses.py` sums the terms a stage's config lists.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax


class StepInputs:
  """One step's model, params and batch, with the values several terms share
  (log-mel, the full encoder pass) computed once per trace on first use."""

  def __init__(self, model, params: dict, target: dict, batch: dict,
               step: jax.Array, log_step: bool | jax.Array = True):
    self.model, self.params, self.target = model, params, target
    self.batch, self.step = batch, step
    # Whether this step's metrics are read: costly diagnostics run only then.
    self.log_step = log_step

  @functools.cached_property
  def mel(self) -> jax.Array:
    """Normalised log-mel of the mixture [B, F, n_mels]."""
    return self.model.log_mel(self.batch["mixture"])

  @functools.cached_property
  def clean_mel(self) -> jax.Array:
    """Normalised log-mel of the dry mixture (the mixture before room, noise
    and channel augmentation; the mixture itself when the batch has none)."""
    if "clean" not in self.batch:
      return self.mel
    return self.model.log_mel(self.batch["clean"])

  @functools.cached_property
  def features(self) -> jax.Array:
    """RWSE features [B, T, W] of the online encoder's full pass."""
    feats, _ = self.model.features(self.params, self.params["encoder"],
                                   self.mel)
    return feats


LossFn = Callable[[object, StepInputs, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Term:
  loss: LossFn
  heads: tuple[str, ...] = ()               # Heads it applies.
  # Stream entries it reads, or a function of the term's config giving them.
  batch_keys: tuple[str, ...] | Callable[[object], tuple[str, ...]] = (
      "mixture",)

  def keys(self, cfg) -> tuple[str, ...]:
    return self.batch_keys(cfg) if callable(self.batch_keys) else (
        self.batch_keys)
