"""Span masks: static counts, partitions, span structure."""

import jax
import numpy as np
import pytest

from echo_jax import masking


def _masks(target_idx: np.ndarray, num_tokens: int) -> np.ndarray:
  mask = np.zeros((target_idx.shape[0], num_tokens), bool)
  np.put_along_axis(mask, target_idx, True, axis=1)
  return mask


@pytest.mark.parametrize("num_tokens,fraction,span", [
    (200, 0.6, 10), (101, 0.5, 3), (250, 0.65, (3, 10, 25))])
def test_span_mask_partition_and_counts(num_tokens, fraction, span):
  fn = jax.jit(masking.span_mask, static_argnums=(1, 2, 3, 4))
  ctx, tgt = fn(jax.random.key(0), 8, num_tokens, fraction, span)
  ctx, tgt = np.asarray(ctx), np.asarray(tgt)
  m = int(round(fraction * num_tokens))
  assert tgt.shape == (8, m) and ctx.shape == (8, num_tokens - m)
  assert tgt.dtype == np.int32 and ctx.dtype == np.int32
  for b in range(8):
    assert np.all(np.diff(tgt[b]) > 0) and np.all(np.diff(ctx[b]) > 0)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([ctx[b], tgt[b]])), np.arange(num_tokens))


@pytest.mark.parametrize("span", [10, (4, 12)])
def test_masked_tokens_form_spans(span):
  """Runs are unions of whole spans: at most one short (trimmed) run each."""
  num_tokens = 400
  _, tgt = masking.span_mask(jax.random.key(1), 16, num_tokens, 0.5, span)
  shortest = span if isinstance(span, int) else min(span)
  for mask in _masks(np.asarray(tgt), num_tokens):
    runs = masking.run_lengths(mask)
    assert np.sum(runs < shortest) <= 1, runs


def test_mean_run_length_close_to_span():
  num_tokens, span = 1000, 10
  _, tgt = masking.span_mask(jax.random.key(2), 16, num_tokens, 0.2, span)
  runs = np.concatenate(
      [masking.run_lengths(m) for m in _masks(np.asarray(tgt), num_tokens)])
  # Overlaps merge spans into longer runs; at 20% masking that adds ~10%.
  assert span * 0.9 <= runs.mean() <= span * 1.3, runs.mean()


def test_span_mixture_uses_several_lengths():
  num_tokens = 1000
  _, tgt = masking.span_mask(jax.random.key(3), 32, num_tokens, 0.1, (2, 30))
  medians = [np.median(masking.run_lengths(m))
             for m in _masks(np.asarray(tgt), num_tokens)]
  assert min(medians) < 5 and max(medians) >= 30


def test_rngs_differ_and_same_rng_repeats():
  a = np.asarray(masking.span_mask(jax.random.key(0), 4, 100, 0.6, 5)[1])
  b = np.asarray(masking.span_mask(jax.random.key(1), 4, 100, 0.6, 5)[1])
  c = np.asarray(masking.span_mask(jax.random.key(0), 4, 100, 0.6, 5)[1])
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # examples in a batch differ too


def test_high_fraction_fills_up_exactly():
  ctx, tgt = masking.span_mask(jax.random.key(4), 4, 50, 0.98, 7)
  assert tgt.shape == (4, 49) and ctx.shape == (4, 1)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="mask_fraction"):
    masking.span_mask(jax.random.key(0), 2, 10, 0.0, 2)
  with pytest.raises(ValueError, match="mask_fraction"):
    masking.span_mask(jax.random.key(0), 2, 10, 1.0, 2)
  with pytest.raises(ValueError, match="span_tokens"):
    masking.span_mask(jax.random.key(0), 2, 10, 0.5, 11)
