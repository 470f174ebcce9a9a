"""A stage's training loss: the weighted sum of the terms its config lists.

`config.objective` holds one block per term (`weight` plus the term's own
settings); the names index `echo_jax.terms.TERMS`. A term with weight 0 is not
computed. Each term draws from its own key, folded from its name, so adding or
removing a term never changes another term's random draws.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from echo_jax.terms import TERMS, StepInputs


def active_terms(objective) -> dict:
  """{name: (Term, its config)} of the terms with a non-zero weight."""
  unknown = sorted(set(objective) - set(TERMS))
  if unknown:
    raise ValueError(f"config.objective has unknown terms {unknown}; known: "
                     f"{sorted(TERMS)}.")
  return {name: (TERMS[name], cfg) for name, cfg in sorted(objective.items())
          if cfg.weight != 0}


def check_objective(objective, heads) -> None:
  """Fails early, naming the term, when a term's heads are not built."""
  for name, (term, _) in active_terms(objective).items():
    missing = [h for h in term.heads if h not in heads]
    if missing:
      raise ValueError(
          f"config.objective.{name} needs heads {missing}; add them to "
          f"config.model.heads (now {list(heads)}).")
  if not active_terms(objective):
    raise ValueError("config.objective has no term with a non-zero weight.")


def batch_keys(objective) -> tuple[str, ...]:
  """The stream entries the active terms read (sorted, no duplicates)."""
  return tuple(sorted({k for term, cfg in active_terms(objective).values()
                       for k in term.keys(cfg)}))


def term_rng(rng: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(rng, zlib.crc32(name.encode()))


def stage_loss(model, objective, params: dict, target: dict, batch: dict,
               rng: jax.Array, step: jax.Array,
               log_step: bool | jax.Array = True) -> tuple[jax.Array, dict]:
  """Total loss and scalar metrics for one batch.

  Args:
    objective: `config.objective`.
    params: {'encoder', 'predictor', 'heads'}; target: EMA encoder params.
    batch: the stream's batch, holding at least `batch_keys(objective)`.
    log_step: whether the metrics of this step are read (diagnostics that
      cost real time, e.g. `jepa/target_rank`, are 0 on other steps).
  """
  inputs = StepInputs(model, params, target, batch, step, log_step)
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, (term, cfg) in active_terms(objective).items():
    loss, term_metrics = term.loss(cfg, inputs, term_rng(rng, name))
    total += cfg.weight * loss
    metrics.update(term_metrics)
  metrics["train/loss"] = total
  return total, metrics
