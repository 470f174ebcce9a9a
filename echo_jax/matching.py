"""Set matching of routing slots to sources, inside the jitted step.

Given per-example costs `[slots, sources]` and which sources are present, the
matching is the injective map sources -> slots of least total cost over the
present sources (DETR's bipartite matching). Absent sources cost nothing, so
they take whatever slots are left and never change the optimum (slots >=
sources). For `slots <= MAX_ENUMERATED_SLOTS` every permutation is scored at
once (a static table: 720 rows at 6 slots, one gather and an argmin, cheap
and exact); above that, `optax.assignment.hungarian_algorithm` under `vmap`.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

MAX_ENUMERATED_SLOTS = 6


@functools.cache
def permutation_table(num_slots: int) -> np.ndarray:
  """All permutations of `range(num_slots)`: int32 `[num_slots!, num_slots]`."""
  return np.array(list(itertools.permutations(range(num_slots))), np.int32)


def _match_enumerated(cost: jax.Array) -> jax.Array:
  """`[B, S, K]` (absent sources already zeroed) -> `[B, K]` slot indices."""
  num_slots, num_sources = cost.shape[-2:]
  table = jnp.asarray(permutation_table(num_slots)[:, :num_sources])  # [P, K]
  # cost[b, table[p, k], k] -> [B, P, K].
  per_source = cost[:, table, jnp.arange(num_sources)[None, :]]
  best = jnp.argmin(per_source.sum(-1), axis=-1)                      # [B]
  return table[best]


def _match_hungarian(cost: jax.Array) -> jax.Array:
  """`[B, S, K]` -> `[B, K]` slot indices via optax's Hungarian algorithm."""
  num_sources = cost.shape[-1]

  def one(c):  # c: [S, K]; rows = sources, columns = slots.
    rows, cols = optax.assignment.hungarian_algorithm(c.T)
    return jnp.zeros(num_sources, jnp.int32).at[rows].set(
        cols.astype(jnp.int32))
  return jax.vmap(one)(cost)


def match(cost: jax.Array, present: jax.Array) -> jax.Array:
  """Least-cost injective assignment of present sources to slots.

  Args:
    cost: `[batch, slots, sources]` float; `cost[b, s, k]` is the price of
      slot s carrying source k. No gradient flows through the result.
    present: `[batch, sources]` bool; absent sources' columns are ignored.

  Returns:
    `[batch, sources]` int32: the slot of each source (absent sources get the
    left-over slots; use `present` to tell them apart). Distinct per example.
  """
  num_slots, num_sources = cost.shape[-2:]
  if num_sources > num_slots:
    raise ValueError(f"match: {num_sources} sources need at least as many "
                     f"slots; found {num_slots}.")
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  cost = jnp.where(present[:, None, :], cost, 0.0)
  if num_slots <= MAX_ENUMERATED_SLOTS:
    return _match_enumerated(cost)
  return _match_hungarian(cost)


def matched_slots(slot_of_source: jax.Array, present: jax.Array,
                  num_slots: int) -> jax.Array:
  """`[B, K]` slot indices, `[B, K]` present -> `[B, S, K]` float one-hot of
  (slot, source) pairs that are matched (zero rows: null slots)."""
  one_hot = jax.nn.one_hot(slot_of_source, num_slots, axis=1)  # [B, S, K]
  return one_hot * present[:, None, :].astype(one_hot.dtype)
