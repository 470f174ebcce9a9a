"""Speaker metrics against hand-made cases, closed forms and brute force."""

import math

import numpy as np
import pytest

from echo_jax.evaluators import speaker_eval
from echo_jax.evaluators import speaker_metrics as sm


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clusters(num_speakers=5, per_speaker=6, dim=8, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_speakers, dim))
  labels = np.repeat(np.arange(num_speakers), per_speaker)
  emb = centres[labels] + spread * rng.normal(size=(len(labels), dim))
  return emb, labels


# ---- EER -------------------------------------------------------------------

def _trials(pos, neg):
  scores = np.concatenate([pos, neg]).astype(float)
  same = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
  return scores, same


def test_eer_hand_made_exact_crossing():
  # Threshold in (0.3, 0.6]: one of 4 targets rejected, one of 4 non-targets
  # (0.6) accepted at 0.6 -> FPR = FNR = 1/4 exactly.
  scores, same = _trials([0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1])
  assert sm.equal_error_rate(scores, same) == pytest.approx(0.25, abs=1e-12)


def test_eer_hand_made_interpolated():
  # ROC points (fpr, fnr): (0, 1/3) then (1/2, 1/3) -> the curves cross on
  # that segment where fpr = 1/3.
  scores, same = _trials([0.9, 0.8, 0.3], [0.5, 0.2])
  assert sm.equal_error_rate(scores, same) == pytest.approx(1 / 3, abs=1e-12)


def test_eer_separable_identical_and_gaussian_closed_form():
  rng = np.random.default_rng(0)
  assert sm.equal_error_rate(*_trials(rng.uniform(1, 2, 50),
                                      rng.uniform(-1, 0.99, 80))) == 0.0
  n = 20000
  same_dist = sm.equal_error_rate(*_trials(rng.normal(size=n),
                                           rng.normal(size=n)))
  assert abs(same_dist - 0.5) < 0.02
  # Targets N(d, 1), non-targets N(0, 1): EER = Phi(-d / 2).
  d = 2.0
  expected = 0.5 * math.erfc(d / 2 / math.sqrt(2))  # 0.1587
  eer = sm.equal_error_rate(*_trials(rng.normal(d, 1, n), rng.normal(0, 1, n)))
  assert abs(eer - expected) < 0.01


def test_eer_invariant_to_order_and_monotone_transform():
  rng = np.random.default_rng(1)
  scores, same = _trials(rng.normal(1, 1, 40), rng.normal(0, 1, 60))
  eer = sm.equal_error_rate(scores, same)
  perm = rng.permutation(len(scores))
  assert sm.equal_error_rate(scores[perm], same[perm]) == pytest.approx(eer)
  assert sm.equal_error_rate(np.exp(3 * scores), same) == pytest.approx(eer)


def test_eer_needs_both_trial_kinds():
  with pytest.raises(ValueError, match="non-target"):
    sm.equal_error_rate(np.array([0.1, 0.2]), np.array([True, True]))


# ---- trials and k-NN -------------------------------------------------------

def test_trial_scores_match_pairwise_loop():
  emb, labels = _clusters(num_speakers=3, per_speaker=3)
  scores, same = sm.trial_scores(emb, labels)
  expected_scores, expected_same = [], []
  for i in range(len(emb)):
    for j in range(i + 1, len(emb)):
      expected_scores.append(
          emb[i] @ emb[j] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[j]))
      expected_same.append(labels[i] == labels[j])
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-12)
  np.testing.assert_array_equal(same, expected_same)
  assert same.sum() == 3 * 3  # 3 speakers x C(3, 2) target pairs.


@pytest.mark.parametrize("k", [1, 3])
def test_knn_matches_brute_force_cosine(k):
  # Overlapping clusters so the accuracy is strictly between 0 and 1.
  emb, labels = _clusters(num_speakers=6, per_speaker=20, spread=1.2, seed=3)
  rng = np.random.default_rng(3)
  is_test = rng.random(len(labels)) < 0.5
  enrol, test = emb[~is_test], emb[is_test]
  sims = _unit(test) @ _unit(enrol).T
  nearest = np.argsort(-sims, axis=1)[:, :k]
  votes = labels[~is_test][nearest]
  # Majority vote, ties to the smallest label (what sklearn does).
  predicted = np.array([np.bincount(v, minlength=6).argmax() for v in votes])
  expected = np.mean(predicted == labels[is_test])
  assert 0.2 < expected < 0.95
  got = sm.knn_top1(enrol, labels[~is_test], test, labels[is_test], k=k)
  assert got == pytest.approx(expected)


def test_knn_is_scale_invariant_cosine():
  emb, labels = _clusters(spread=1.0, seed=5)
  enrol_idx, test_idx = sm.enrol_test_split(labels)
  scaled = emb * np.random.default_rng(0).uniform(0.1, 10, (len(emb), 1))
  args = lambda e: (e[enrol_idx], labels[enrol_idx], e[test_idx],
                    labels[test_idx])
  assert sm.knn_top1(*args(emb)) == sm.knn_top1(*args(scaled))


# ---- split -----------------------------------------------------------------

def test_split_is_deterministic_complete_and_disjoint():
  labels = np.array(["b"] * 5 + ["a"] * 4 + ["c"] * 2 + ["solo"] + ["d"] * 7)
  enrol, test = sm.enrol_test_split(labels, seed=7)
  again = sm.enrol_test_split(labels, seed=7)
  np.testing.assert_array_equal(enrol, again[0])
  np.testing.assert_array_equal(test, again[1])
  assert not set(enrol) & set(test)
  assert sorted(set(enrol) | set(test)) == list(range(len(labels)))
  # Every speaker with >= 2 utterances is in both; the singleton enrols only.
  assert set(labels[enrol]) == {"a", "b", "c", "d", "solo"}
  assert set(labels[test]) == {"a", "b", "c", "d"}
  counts = {s: int(np.sum(labels[enrol] == s)) for s in "abcd"}
  assert counts == {"a": 2, "b": 2, "c": 1, "d": 4}  # round(n / 2), banker's.
  # Other seeds draw other utterances.
  assert any(not np.array_equal(enrol, sm.enrol_test_split(labels, seed=s)[0])
             for s in range(1, 5))


def test_split_enrol_per_speaker_is_clipped():
  labels = np.repeat([0, 1], [5, 3])
  enrol, test = sm.enrol_test_split(labels, enrol_per_speaker=4)
  assert np.sum(labels[enrol] == 0) == 4
  assert np.sum(labels[enrol] == 1) == 2  # Clipped to n - 1: one left to test.
  with pytest.raises(ValueError, match="enrol_fraction"):
    sm.enrol_test_split(labels, enrol_fraction=1.0)


# ---- reports ---------------------------------------------------------------

def test_speaker_report_and_factorisation_gap():
  emb, labels = _clusters(spread=0.05)
  report = sm.speaker_report(emb, labels, seed=0)
  assert report == {"top1": 1.0, "eer": 0.0}

  noise = np.random.default_rng(9).normal(size=(len(labels), 4))
  gap = sm.factorisation_gap(emb, noise, labels, seed=0)
  enrol, test = sm.enrol_test_split(labels, seed=0)
  content_top1 = sm.knn_top1(noise[enrol], labels[enrol], noise[test],
                             labels[test])
  assert gap["speaker_top1"] == 1.0
  assert gap["content_top1"] == content_top1 < 0.6
  assert gap["gap_points"] == pytest.approx(100 * (1.0 - content_top1))


def test_frame_knn_ignores_unlabelled_frames():
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(3, 6))
  train_labels = rng.integers(0, 3, size=(2, 10))
  train = centres[train_labels] + 0.1 * rng.normal(size=(2, 10, 6))
  test_labels = rng.integers(0, 3, size=(1, 12))
  test = centres[test_labels] + 0.1 * rng.normal(size=(1, 12, 6))
  assert sm.frame_knn_accuracy(train, train_labels, test, test_labels) == 1.0
  # Unlabelled train frames that exactly equal the test frames would win every
  # neighbour vote if they were used; unlabelled test frames would score 0.
  train_plus = np.concatenate([train.reshape(-1, 6), test.reshape(-1, 6)])
  train_labels_plus = np.concatenate([train_labels.ravel(), np.full(12, -1)])
  test_labels_half = test_labels.copy()
  test_labels_half[0, :6] = -1
  acc = sm.frame_knn_accuracy(train_plus, train_labels_plus, test,
                              test_labels_half)
  assert acc == 1.0


def test_best_layer_is_chosen_on_train_speakers_not_the_reported_ones():
  # Layer 0 separates the held-out speakers, layer 1 the train speakers: the
  # reported "best" must be layer 1, with its (poor) held-out top-1.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 6)
  centres = 10 * rng.standard_normal((4, 8))
  clear = centres[labels] + 0.1 * rng.standard_normal((24, 8))
  noise = rng.standard_normal((24, 8))
  ev = speaker_eval.SpeakerEvaluator.__new__(speaker_eval.SpeakerEvaluator)
  ev.name, ev.seed, ev.batch_size, ev.labels = "speaker", 0, 8, labels
  # Row i carries its index, and whether it is a train row, in its samples.
  ev.waves = np.zeros((24, 16), np.float32)            # Held-out rows.
  ev.waves[:, 0] = np.arange(24)
  ev.lengths = np.full(24, 16, np.int32)
  select_waves = ev.waves.copy()                       # Train rows.
  select_waves[:, 1] = 1.0
  ev.select = (select_waves, ev.lengths, labels)

  def pooled_layers(params, waves, lengths):
    del params, lengths
    idx = waves[:, 0].astype(int)
    train = (waves[:, 1] > 0)[:, None]
    return np.stack([np.where(train, noise[idx], clear[idx]),
                     np.where(train, clear[idx], noise[idx])])

  ev._pooled_layers = pooled_layers
  r = ev._layer_metrics(None, "target")
  assert r["speaker/target_L0_top1"] > 0.9 > r["speaker/target_L1_top1"]
  assert r["speaker/target_best_layer"] == 1
  assert r["speaker/target_best_top1"] == r["speaker/target_L1_top1"]
  ev.select = None                                     # The fallback.
  assert ev._layer_metrics(None, "target")["speaker/target_best_layer"] == 0
