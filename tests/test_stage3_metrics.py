"""Stage-3 metrics: the factorisation gap on constructed embeddings, and the
phone error rate's edit distance, greedy CTC decoding and CTC head."""

import numpy as np
import pytest

from echo_jax.evaluators import phone_probe, speaker_metrics


def _sets(num_speakers=10, per_speaker=8, seed=0):
  """A speaker-only set (speaker identity + noise) and a content-only set
  (noise independent of the speaker)."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_speakers), per_speaker)
  centres = rng.normal(size=(num_speakers, 16))
  speaker_only = centres[labels] + 0.1 * rng.normal(size=(len(labels), 16))
  content_only = rng.normal(size=(len(labels), 16))
  return labels, speaker_only, content_only


def test_gap_of_speaker_only_vs_content_only_embeddings():
  labels, speaker_only, content_only = _sets()
  gap = speaker_metrics.factorisation_gap(speaker_only, content_only, labels)
  assert gap["speaker_top1"] == 1.0
  # Content holds no speaker: around chance (10%), so the gap is ~ +90.
  assert gap["content_top1"] <= 0.3
  assert 70 <= gap["gap_points"] <= 100
  np.testing.assert_allclose(
      gap["gap_points"], 100 * (gap["speaker_top1"] - gap["content_top1"]))
  # Swapped roles: the same size, negative.
  swapped = speaker_metrics.factorisation_gap(content_only, speaker_only,
                                              labels)
  np.testing.assert_allclose(swapped["gap_points"], -gap["gap_points"])
  # Both sides speaker-bearing: no gap.
  same = speaker_metrics.factorisation_gap(speaker_only, speaker_only, labels)
  assert same["gap_points"] == 0.0


@pytest.mark.parametrize("ref, hyp, distance", [
    ([], [], 0),
    ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [], 3),                  # 3 deletions.
    ([], [4, 5], 2),                     # 2 insertions.
    ([1, 2, 3], [1, 4, 3], 1),           # 1 substitution.
    ("kitten", "sitting", 3),            # k->s, e->i, +g.
    ([1, 2, 3, 4], [2, 3, 4, 5], 2),     # -1, +5.
    ([1, 1, 2], [1, 2, 2], 1),
])
def test_edit_distance_hand_cases(ref, hyp, distance):
  assert phone_probe.edit_distance(ref, hyp) == distance
  assert phone_probe.edit_distance(hyp, ref) == distance


def test_phone_error_rate_is_corpus_level():
  refs = [[1, 2, 3, 4], [5, 6]]
  hyps = [[1, 2, 3, 4], [7]]            # 0 + 2 errors over 6 phones.
  assert phone_probe.phone_error_rate(refs, hyps) == pytest.approx(2 / 6)
  with pytest.raises(ValueError):
    phone_probe.phone_error_rate([[]], [[1]])


def test_greedy_decode_merges_repeats_and_drops_blanks():
  # Frame classes: blank=0, phone p = class p + 1.
  path = [0, 3, 3, 0, 3, 1, 1, 0, 2, 9]
  logits = np.eye(10)[path]
  assert phone_probe.greedy_decode(logits, 9) == [2, 2, 0, 1]
  assert phone_probe.greedy_decode(logits, 10) == [2, 2, 0, 1, 8]


def test_ctc_head_learns_a_separable_task():
  """Frames whose features one-hot encode the phone: the linear CTC head
  recovers the sequences (PER near 0) on new utterances."""
  rng = np.random.default_rng(0)

  def utterances(n):
    feats, seqs = np.zeros((n, 24, 8), np.float32), []
    for i in range(n):
      seq = list(rng.integers(0, 5, 6))
      seqs.append([p for j, p in enumerate(seq) if j == 0 or p != seq[j - 1]])
      for j, p in enumerate(seqs[-1]):
        feats[i, 3 * j:3 * j + 2, p] = 1.0   # Two frames per phone,
        feats[i, 3 * j + 2, 7] = 1.0         # then a gap frame.
      feats[i, 3 * len(seqs[-1]):, 7] = 1.0
    return feats + 0.05 * rng.normal(size=feats.shape), seqs

  train_x, train_y = utterances(64)
  test_x, test_y = utterances(16)
  lengths = np.full(64, 24)
  head = phone_probe.train_ctc_head(train_x, lengths, train_y, 5, steps=300,
                                    lr=0.05)
  hyps = phone_probe.decode(head, test_x, np.full(16, 24))
  assert phone_probe.phone_error_rate(test_y, hyps) < 0.05


def test_summary_line_names_gap_and_per():
  from echo_jax.evaluators import content_eval
  line = content_eval.summary_line("stage3_content", dict(
      gap_points=61.25, speaker_top1=0.9, content_top1=0.2875,
      content_phone_linear=0.5, speaker_phone_linear=0.1,
      random_phone_linear=0.2, content_per=0.6, random_per=0.95))
  assert "gap +61.2 points" in line and "PER 60.0%" in line
  assert "random encoder 95.0%" in line
  with_ceiling = content_eval.summary_line("stage3_content", dict(
      gap_points=61.25, speaker_top1=0.9, content_top1=0.2875,
      gap_ceiling_points=63.5, content_phone_linear=0.5,
      speaker_phone_linear=0.1, content_per=0.6))
  assert "+63.5 with the true phones as content" in with_ceiling
  with_anchor = content_eval.summary_line("stage3_content", dict(
      gap_points=6.0, speaker_top1=0.9, content_top1=0.84,
      gap_ceiling_points=63.5, gap_anchor_points=-2.5,
      content_phone_linear=0.5, speaker_phone_linear=0.1, content_per=0.6))
  assert "-2.5 with the anchor GMM's posteriors" in with_anchor


def test_pooled_anchor_posteriors_are_the_mean_of_sklearns(tmp_path):
  """The anchor's pooled posteriors: scikit-learn's predict_proba of the
  standardised features of each clip's valid frames, averaged."""
  from sklearn import mixture
  from echo_jax import anchors
  from echo_jax.evaluators import content_eval
  rng = np.random.default_rng(0)
  waves = rng.normal(scale=0.1, size=(3, 8000)).astype(np.float32)
  waves[1, 4000:] = 0
  lengths = np.array([8000, 4000, 6400])
  settings = anchors.AnchorSettings(num_components=4, max_iter=5)
  feats = [anchors.frame_features(anchors.host_log_mel(w[:n], 80), settings,
                                  xp=np) for w, n in zip(waves, lengths)]
  gm = mixture.GaussianMixture(4, covariance_type="diag", random_state=0,
                               reg_covar=settings.var_floor)
  mean, std = np.concatenate(feats).mean(0), np.concatenate(feats).std(0)
  gm.fit((np.concatenate(feats) - mean) / std)
  path = str(tmp_path / "gmm.npz")
  anchors.save(anchors.from_sklearn(gm, mean, std, settings), path)
  cfg = dict(path=path, manifest="", corpus_size="tiny",
             **{k: getattr(settings, k) for k in ("kind", "normalize",
                                                  "n_mels", "n_mfcc",
                                                  "num_components",
                                                  "var_floor", "max_frames",
                                                  "max_utterances", "max_iter",
                                                  "seed")})
  import ml_collections
  pooled = content_eval._pooled_anchor_posteriors(
      ml_collections.ConfigDict(cfg), waves, lengths)
  expected = [gm.predict_proba((f - mean) / std).mean(0) for f in feats]
  np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)


def test_phone_histograms_hand_case():
  labels = np.array([[0, 0, 2, -1, 1],     # 2/4, 1/4, 1/4.
                     [-1, -1, -1, -1, -1],  # No labels: zeros.
                     [3, 3, 3, 3, 3]])
  np.testing.assert_allclose(phone_probe.phone_histograms(labels, 4), [
      [0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def test_gap_ceiling_is_near_chance_when_texts_are_shared():
  """Speakers reading one shared pool of texts: true phone frequencies name
  them at about chance, so the ceiling is about the speaker side's top-1; if
  each speaker reads their own texts, the ceiling falls."""
  rng = np.random.default_rng(0)
  speakers = np.repeat(np.arange(10), 8)
  speaker_emb = np.eye(10)[speakers] + 0.01 * rng.normal(size=(80, 10))
  texts = rng.integers(0, 20, (40, 30))        # 40 sentences of 30 tokens.
  shared = texts[rng.integers(0, 40, 80)]
  own = texts[speakers * 4 + rng.integers(0, 4, 80)]
  gap_shared = speaker_metrics.factorisation_gap(
      speaker_emb, phone_probe.phone_histograms(shared, 20), speakers)
  gap_own = speaker_metrics.factorisation_gap(
      speaker_emb, phone_probe.phone_histograms(own, 20), speakers)
  assert gap_shared["content_top1"] <= 0.3 and gap_shared["gap_points"] >= 70
  assert gap_own["content_top1"] > gap_shared["content_top1"] + 0.3
