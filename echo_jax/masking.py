"""Time-span masks for JEPA with a fixed number of masked tokens per example.

Static shapes need the same masked count M for every example, yet the masked
tokens should form time spans. Per example we draw a sequence of span starts
(span length fixed, or drawn per example from a tuple: a mixture of spans) and
rank every token by the first span in draw order that covers it. The M
best-ranked tokens are masked. So spans are taken whole, in draw order, until
M is reached:
  * trim: the last span taken is cut to the tokens still needed (its earliest
    uncovered tokens), so at most one span per example is partial;
  * fill-up: if all drawn spans together cover fewer than M tokens (rare: enough
    spans are drawn to cover M about twice over), the rest are uniformly random
    unmasked tokens.
Spans may overlap, so merged runs can be longer than the span length at high
mask fractions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def num_masked(num_tokens: int, mask_fraction: float) -> int:
  """M = round(mask_fraction * num_tokens): masked count of every example."""
  return int(round(mask_fraction * num_tokens))


def _num_span_draws(num_tokens: int, num_target: int, span: int) -> int:
  """Span starts to draw so that their union covers `num_target` w.h.p.

  With uniform starts the uncovered fraction after k spans is about
  exp(-k * span / T); we draw twice the k that reaches the target fraction,
  plus a few, capped at one start per possible position.
  """
  fraction = min(num_target / num_tokens, 1.0 - 1e-3)
  needed = num_tokens / span * math.log(1.0 / (1.0 - fraction))
  return int(min(2 * math.ceil(needed) + 4, num_tokens))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def span_mask(rng: jax.Array, batch_size: int, num_tokens: int,
              mask_fraction: float,
              span_tokens: int | tuple[int, ...]
              ) -> tuple[jax.Array, jax.Array]:
  """Draws span masks; returns `(context_idx, target_idx)`.

  Args:
    rng: PRNG key.
    batch_size, num_tokens: static sizes B and T.
    mask_fraction: fraction of tokens to mask; M = round(mask_fraction * T) must
      satisfy 1 <= M <= T - 1.
    span_tokens: span length in tokens, or a tuple of lengths from which each
      example draws one uniformly.

  Returns:
    context_idx `[B, T - M]` and target_idx `[B, M]`, int32, each sorted
    ascending; together a partition of `range(T)` for every example.
    Jitted with all arguments but `rng` static (hashable; pass tuples).
  """
  spans = (span_tokens,) if isinstance(span_tokens, int) else tuple(span_tokens)
  if not spans or min(spans) < 1 or max(spans) > num_tokens:
    raise ValueError(f"span_tokens must be in [1, num_tokens={num_tokens}]; "
                     f"found {span_tokens}.")
  m = num_masked(num_tokens, mask_fraction)
  if not 1 <= m <= num_tokens - 1:
    raise ValueError(
        f"mask_fraction={mask_fraction} masks {m} of {num_tokens} tokens; need "
        f"between 1 and {num_tokens - 1} so both context and targets exist.")
  num_draws = _num_span_draws(num_tokens, m, min(spans))
  if num_draws * num_tokens * 2 >= 2**24:
    raise ValueError(f"span_mask: num_tokens={num_tokens} is too large for "
                     "exact float32 ranks; use fewer tokens per example.")

  # All randomness is one batched uniform draw, sliced: every separate random
  # op (and vmapped threefry even more) costs compile time.
  u = jax.random.uniform(rng, (batch_size, 1 + num_draws + num_tokens))
  span_choice = jnp.minimum((u[:, 0] * len(spans)).astype(jnp.int32),
                            len(spans) - 1)
  span = jnp.asarray(spans, jnp.int32)[span_choice][:, None, None]  # [B, 1, 1]
  num_starts = num_tokens - span + 1  # starts in [0, T - span]
  starts = jnp.minimum(
      (u[:, 1:1 + num_draws, None] * num_starts).astype(jnp.int32),
      num_starts - 1)  # [B, draws, 1]
  fill = u[:, 1 + num_draws:]  # [B, T]
  t = jnp.arange(num_tokens)
  covers = (t >= starts) & (t < starts + span)  # [B, draws, T]
  first = jnp.where(covers.any(1), jnp.argmax(covers, axis=1), num_draws)
  # Rank: earlier span first, then earlier position; uncovered tokens last in
  # random order. Values stay below 2**24 so float32 keeps them exact.
  rank = jnp.where(first < num_draws,
                   (first * num_tokens + t).astype(jnp.float32),
                   num_draws * num_tokens + fill * num_tokens)
  order = jnp.argsort(rank, axis=1)
  context_idx = jnp.sort(order[:, m:], axis=1)
  target_idx = jnp.sort(order[:, :m], axis=1)
  return context_idx.astype(jnp.int32), target_idx.astype(jnp.int32)


def run_lengths(mask: np.ndarray) -> np.ndarray:
  """Lengths of the runs of True in a 1-D boolean array (diagnostics)."""
  padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
  edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
  return edges[1::2] - edges[::2]
