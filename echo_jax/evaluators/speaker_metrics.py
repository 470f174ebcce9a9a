"""Speaker ID / verification and factorisation-gap metrics.

Pure numpy / scikit-learn functions on embeddings already computed on the host:
- speaker ID: per-speaker enrolment/test split, cosine k-NN top-1 accuracy;
- verification: cosine scores over all unordered utterance pairs, EER;
- factorisation gap: speaker-ID top-1 from the speaker projection minus the
  same from the content projection, in points (x 100);
- phoneme frame k-NN accuracy for content probes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as sk_metrics
from sklearn import neighbors

IGNORE_LABEL = -1  # Frames without a phoneme label.


def _as_2d(name: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"Expected {name} [num, dim]; found shape {x.shape}.")
  return x


def _check_pairs(emb_name: str, emb: np.ndarray, labels: np.ndarray) -> None:
  if len(emb) != len(labels):
    raise ValueError(
        f"{emb_name} has {len(emb)} rows but its labels have {len(labels)}; "
        "expected one label per row.")


def _sorted_indices(parts: list[np.ndarray]) -> np.ndarray:
  if not parts:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(parts)).astype(np.int64)


def enrol_test_split(labels: Sequence | np.ndarray,
                     *,
                     enrol_per_speaker: int | None = None,
                     enrol_fraction: float = 0.5,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits each speaker's utterances into enrolment and test.

  A speaker with n >= 2 utterances always lands in both sets: it gets
  `enrol_per_speaker` (or round(enrol_fraction * n)) enrolment utterances,
  clipped to [1, n - 1]. A speaker with a single utterance goes to enrolment
  only: it cannot be tested, but stays in the gallery as a distractor.
  Deterministic: a function of (labels, seed) only (speakers are visited in
  sorted order, each drawing from one seeded generator).

  Args:
    labels: [num_utts] speaker labels (ints or strings).

  Returns:
    (enrol_idx, test_idx): sorted int64 index arrays into `labels`, disjoint,
    together covering every utterance.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"Expected labels [num_utts]; found shape {labels.shape}.")
  if enrol_per_speaker is not None and enrol_per_speaker < 1:
    raise ValueError(
        f"Expected enrol_per_speaker >= 1 (or None); found {enrol_per_speaker}.")
  if not 0.0 < enrol_fraction < 1.0:
    raise ValueError(
        f"Expected 0 < enrol_fraction < 1; found {enrol_fraction}.")
  rng = np.random.default_rng(seed)
  enrol, test = [], []
  for speaker in np.unique(labels):
    idx = np.flatnonzero(labels == speaker)
    order = rng.permutation(len(idx))
    if len(idx) < 2:
      enrol.append(idx)
      continue
    n_enrol = (enrol_per_speaker if enrol_per_speaker is not None
               else int(round(enrol_fraction * len(idx))))
    n_enrol = min(max(n_enrol, 1), len(idx) - 1)
    enrol.append(idx[order[:n_enrol]])
    test.append(idx[order[n_enrol:]])
  return _sorted_indices(enrol), _sorted_indices(test)


def knn_top1(enrol_emb: np.ndarray, enrol_labels: np.ndarray,
             test_emb: np.ndarray, test_labels: np.ndarray,
             *, k: int = 1) -> float:
  """Cosine k-NN identification accuracy in [0, 1].

  Each test embedding gets the majority label of its k nearest enrolment
  embeddings by cosine distance (sklearn; ties go to the smallest label).

  Args:
    enrol_emb: [num_enrol, dim]; enrol_labels: [num_enrol].
    test_emb: [num_test, dim]; test_labels: [num_test].
  """
  enrol_emb = _as_2d("enrol_emb", enrol_emb)
  test_emb = _as_2d("test_emb", test_emb)
  enrol_labels, test_labels = np.asarray(enrol_labels), np.asarray(test_labels)
  _check_pairs("enrol_emb", enrol_emb, enrol_labels)
  _check_pairs("test_emb", test_emb, test_labels)
  if len(test_emb) == 0:
    raise ValueError("No test embeddings: nothing to score.")
  if not 1 <= k <= len(enrol_emb):
    raise ValueError(
        f"Expected 1 <= k <= num_enrol = {len(enrol_emb)}; found k = {k}.")
  classifier = neighbors.KNeighborsClassifier(
      n_neighbors=k, metric="cosine", algorithm="brute")
  classifier.fit(enrol_emb, enrol_labels)
  return float(np.mean(classifier.predict(test_emb) == test_labels))


def trial_scores(emb: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cosine scores over all unordered pairs i < j (verification trials).

  Memory is O(num^2): meant for held-out sets of a few thousand utterances.

  Args:
    emb: [num, dim]; labels: [num].

  Returns:
    scores: [num * (num - 1) / 2] float64 cosines, row-major over i < j;
    same: [same length] bool, True where both come from one speaker.
  """
  emb = _as_2d("emb", emb).astype(np.float64)
  labels = np.asarray(labels)
  _check_pairs("emb", emb, labels)
  norms = np.linalg.norm(emb, axis=1, keepdims=True)
  unit = emb / np.maximum(norms, 1e-12)
  i, j = np.triu_indices(len(emb), k=1)
  return (unit @ unit.T)[i, j], labels[i] == labels[j]


def equal_error_rate(scores: np.ndarray, same: np.ndarray) -> float:
  """EER: the error rate where false-accept rate equals false-reject rate.

  The ROC from `sklearn.metrics.roc_curve` (higher score = same speaker) is a
  list of points; between neighbouring points FPR and FNR = 1 - TPR are taken
  as linear in one parameter (the straight ROC segment), and the EER is their
  common value where FNR - FPR crosses zero. Exact for hand-made lists, e.g.
  positives {0.9, 0.8, 0.3} vs negatives {0.5, 0.2} give 1/3.

  Args:
    scores: [num_trials] float; same: [num_trials] bool (target trials).
  """
  scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
  if scores.shape != same.shape or scores.ndim != 1:
    raise ValueError(
        f"Expected scores and same as equal-length 1-D arrays; found shapes "
        f"{scores.shape} and {same.shape}.")
  if same.all() or not same.any():
    raise ValueError(
        f"EER needs both target and non-target trials; found {same.sum()} "
        f"target and {(~same).sum()} non-target trials.")
  fpr, tpr, _ = sk_metrics.roc_curve(same, scores, drop_intermediate=False)
  fnr = 1.0 - tpr
  diff = fnr - fpr  # Starts at 1 (threshold +inf), ends at -1: decreasing.
  cross = int(np.argmax(diff <= 0.0))  # First point at or past the crossing.
  if diff[cross] == 0.0 or cross == 0:
    return float(fpr[cross])
  prev = cross - 1
  t = diff[prev] / (diff[prev] - diff[cross])
  return float(fpr[prev] + t * (fpr[cross] - fpr[prev]))


def speaker_report(emb: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                   k: int = 1) -> dict[str, float]:
  """Speaker ID and verification on held-out speakers.

  top1: cosine k-NN accuracy of the test half against the enrolment half
  (`enrol_test_split`); eer: EER over all utterance pairs (`trial_scores`).
  """
  emb, labels = _as_2d("emb", emb), np.asarray(labels)
  _check_pairs("emb", emb, labels)
  enrol_idx, test_idx = enrol_test_split(labels, seed=seed)
  top1 = knn_top1(emb[enrol_idx], labels[enrol_idx],
                  emb[test_idx], labels[test_idx], k=k)
  eer = equal_error_rate(*trial_scores(emb, labels))
  return {"top1": top1, "eer": eer}


def factorisation_gap(speaker_emb: np.ndarray, content_emb: np.ndarray,
                      labels: np.ndarray, *, seed: int = 0,
                      k: int = 1) -> dict[str, float]:
  """Speaker-ID top-1 from the speaker projection minus that from the content
  projection, with the same enrolment/test split for both.

  Args:
    speaker_emb: [num_utts, dim_s] pooled speaker projections.
    content_emb: [num_utts, dim_c] pooled content projections.
    labels: [num_utts] speaker labels (held-out speakers).

  Returns:
    speaker_top1, content_top1 in [0, 1]; gap_points = 100 * difference.
  """
  speaker_emb = _as_2d("speaker_emb", speaker_emb)
  content_emb = _as_2d("content_emb", content_emb)
  labels = np.asarray(labels)
  _check_pairs("speaker_emb", speaker_emb, labels)
  _check_pairs("content_emb", content_emb, labels)
  enrol_idx, test_idx = enrol_test_split(labels, seed=seed)

  def top1(emb):
    return knn_top1(emb[enrol_idx], labels[enrol_idx],
                    emb[test_idx], labels[test_idx], k=k)

  speaker_top1, content_top1 = top1(speaker_emb), top1(content_emb)
  return {"speaker_top1": speaker_top1, "content_top1": content_top1,
          "gap_points": 100.0 * (speaker_top1 - content_top1)}


def _flatten_frames(name: str, feats: np.ndarray,
                    labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[..., dim] features and [...] labels -> labelled frames only."""
  feats, labels = np.asarray(feats), np.asarray(labels)
  if feats.shape[:-1] != labels.shape:
    raise ValueError(
        f"Expected {name} [..., dim] with labels [...]; found feature shape "
        f"{feats.shape} and label shape {labels.shape}.")
  feats, labels = feats.reshape(-1, feats.shape[-1]), labels.reshape(-1)
  keep = labels != IGNORE_LABEL
  return feats[keep], labels[keep]


def frame_knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray,
                       test_feats: np.ndarray, test_labels: np.ndarray,
                       *, k: int = 1) -> float:
  """Phoneme frame probe: cosine k-NN accuracy over labelled frames.

  Args:
    train_feats: [..., dim] frame features (e.g. [batch, time, dim]);
      train_labels: [...] int phoneme ids, -1 = unlabelled (ignored).
    test_feats, test_labels: the same for the evaluated frames.
  """
  train_feats, train_labels = _flatten_frames("train_feats", train_feats,
                                              train_labels)
  test_feats, test_labels = _flatten_frames("test_feats", test_feats,
                                            test_labels)
  if len(train_feats) == 0 or len(test_feats) == 0:
    raise ValueError(
        f"Need labelled frames on both sides; found {len(train_feats)} train "
        f"and {len(test_feats)} test frames with a label != {IGNORE_LABEL}.")
  return knn_top1(train_feats, train_labels, test_feats, test_labels, k=k)
