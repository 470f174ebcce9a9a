"""Phone recognition from frozen frame features (the SUPERB PR protocol, with
the upstream's weighted layer sum already inside the features): one linear
layer, CTC over phone ids, greedy decoding, phone error rate by edit distance.
Also the per-token phoneme labels and phone sequences the content evaluator
reads from the corpus's alignments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import manifest as manifest_lib
from data_pipelines import phonemes as phonemes_lib
from data_pipelines.framing import HOP

BLANK = 0  # CTC blank; phone id p is class p + 1.


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
  """Levenshtein distance (substitutions, insertions, deletions cost 1)."""
  previous = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    current = [i] + [0] * len(hyp)
    for j, h in enumerate(hyp, 1):
      current[j] = min(previous[j] + 1, current[j - 1] + 1,
                       previous[j - 1] + (r != h))
    previous = current
  return previous[-1]


def phone_error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]
                     ) -> float:
  """Total edit distance over total reference length (corpus-level PER)."""
  if len(refs) != len(hyps):
    raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses.")
  total = sum(len(r) for r in refs)
  if total == 0:
    raise ValueError("PER needs at least one reference phone.")
  return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def greedy_decode(logits: np.ndarray, length: int) -> list[int]:
  """Best path of [T, classes] CTC logits over the first `length` frames:
  argmax, merge repeats, drop blanks; returns phone ids (class - 1)."""
  best = np.argmax(np.asarray(logits)[:length], -1)
  out, previous = [], BLANK
  for c in best:
    if c != previous and c != BLANK:
      out.append(int(c) - 1)
    previous = c
  return out


def token_labels(alignment: str, inventory: phonemes_lib.PhonemeInventory,
                 num_tokens: int, patch_frames: int, valid_samples: int
                 ) -> np.ndarray:
  """Phoneme id per token `[num_tokens]` (the label of its centre frame);
  -1 for silence, unknown and tokens past `valid_samples`."""
  frames = phonemes_lib.frame_labels(alignment, num_tokens * patch_frames,
                                     HOP, manifest_lib.SAMPLE_RATE, inventory)
  labels = frames[np.arange(num_tokens) * patch_frames + patch_frames // 2]
  inside = (np.arange(num_tokens) + 1) * patch_frames * HOP <= valid_samples
  return np.where((labels >= 0) & inside, labels, -1).astype(np.int32)


def phone_histograms(labels: np.ndarray, num_phones: int) -> np.ndarray:
  """Token labels `[utts, tokens]` (< 0: none) -> each utterance's phone
  frequencies `[utts, num_phones]` (rows sum to 1, or 0 without labels).

  Pooled, a perfectly phonetic content projection could be no more than this:
  what speaker-ID finds in it is the text (and language) each speaker read.
  """
  labels = np.asarray(labels)
  out = np.zeros((len(labels), num_phones), np.float64)
  rows, cols = np.nonzero(labels >= 0)
  np.add.at(out, (rows, labels[rows, cols]), 1.0)
  return out / np.maximum(out.sum(1, keepdims=True), 1.0)


def phone_sequence(alignment: str, inventory: phonemes_lib.PhonemeInventory,
                   seconds: float) -> list[int]:
  """Phone ids (silence and unknown left out) whose centre is in the first
  `seconds`, in order."""
  ids = []
  for start, end, symbol in phonemes_lib.read_alignment(alignment):
    phone = inventory.id_of(symbol)
    if phone >= 0 and (start + end) / 2 < seconds:
      ids.append(phone)
  return ids


def _pad_labels(seqs: Sequence[Sequence[int]], max_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
  labels = np.zeros((len(seqs), max_len), np.int32)
  paddings = np.ones((len(seqs), max_len), np.float32)
  for i, s in enumerate(seqs):
    s = list(s)[:max_len]
    labels[i, :len(s)] = np.asarray(s) + 1
    paddings[i, :len(s)] = 0.0
  return labels, paddings


def train_ctc_head(feats: np.ndarray, lengths: np.ndarray,
                   seqs: Sequence[Sequence[int]], num_phones: int, *,
                   steps: int, lr: float, seed: int = 0
                   ) -> dict[str, np.ndarray]:
  """Fits a linear CTC layer on frozen features (full-batch Adam).

  Args:
    feats: [U, T, D] frame features; lengths: [U] valid frames.
    seqs: U phone-id sequences; num_phones: phone classes (blank added).

  Returns:
    {'w': [D, num_phones + 1], 'b': [num_phones + 1], 'mean', 'std' [D]}.
  """
  feats = np.asarray(feats, np.float32)
  valid = np.arange(feats.shape[1])[None, :] < np.asarray(lengths)[:, None]
  mean = feats[valid].mean(0)
  std = feats[valid].std(0) + 1e-5
  x = jnp.asarray((feats - mean) / std)
  logit_pad = jnp.asarray(~valid, jnp.float32)
  labels, label_pad = _pad_labels(seqs, max(1, max(len(s) for s in seqs)))
  k = num_phones + 1
  params = {"w": jax.random.normal(jax.random.PRNGKey(seed),
                                   (feats.shape[-1], k)) * 0.01,
            "b": jnp.zeros((k,))}
  optimizer = optax.adam(lr)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    per_utt = optax.ctc_loss(logits, logit_pad, jnp.asarray(labels),
                             jnp.asarray(label_pad), blank_id=BLANK)
    return jnp.mean(per_utt / jnp.maximum(1.0, jnp.sum(1 - label_pad, -1)))

  @jax.jit
  def run(p):
    def step(carry, _):
      p, opt = carry
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt = optimizer.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), loss
    (p, _), losses = jax.lax.scan(step, (p, optimizer.init(p)), None,
                                  length=steps)
    return p, losses

  params, _ = run(params)
  return {"w": np.asarray(params["w"]), "b": np.asarray(params["b"]),
          "mean": mean, "std": std}


def decode(head: dict[str, np.ndarray], feats: np.ndarray,
           lengths: np.ndarray) -> list[list[int]]:
  """Greedy phone sequences of [U, T, D] features with a `train_ctc_head`."""
  logits = ((np.asarray(feats, np.float32) - head["mean"]) / head["std"]
            ) @ head["w"] + head["b"]
  return [greedy_decode(l, int(n)) for l, n in zip(logits, lengths)]


def alignment_path(manifest_path: str, utt: manifest_lib.Utterance) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(manifest_path)),
                      utt.alignment)
