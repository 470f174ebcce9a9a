"""Overlap-aware diarization back-end (NumPy): windows, the per-window
cannot-link assignment, overlap-added activities, and RTTMs with overlapping
segments scored against hand-made references."""

import dataclasses

import numpy as np
import pytest

from echo_jax.diarization import overlap, rttm, scoring

FRAMES_PER_SECOND = 100


class IdentityPLDA:
  """Embeddings already in a PLDA space (within-speaker covariance I)."""

  def __init__(self, dim):
    self.phi = np.full(dim, 50.0)

  def transform(self, x):
    return np.asarray(x, np.float64)


def test_window_starts_cover_the_recording():
  np.testing.assert_array_equal(overlap.window_starts(800, 400, 200),
                                [0, 200, 400])
  np.testing.assert_array_equal(overlap.window_starts(850, 400, 200),
                                [0, 200, 400, 450])
  np.testing.assert_array_equal(overlap.window_starts(100, 400, 200), [0])


def test_cannot_link_keeps_two_slots_of_a_window_apart():
  # Both slots prefer cluster 0; the assignment puts the less sure one in 1.
  posteriors = np.array([[0.9, 0.1], [0.6, 0.4]])
  np.testing.assert_array_equal(overlap.cannot_link_assign(posteriors),
                                [0, 1])
  # More slots than clusters: the extra one takes its best cluster.
  three = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
  labels = overlap.cannot_link_assign(three)
  assert sorted(labels[:2].tolist()) == [0, 1] or len(set(labels)) == 2


def test_overlap_add_averages_over_covering_windows():
  activity = np.zeros((2, 1, 4))
  activity[0, 0] = [1, 1, 1, 1]
  activity[1, 0] = [0, 0, 1, 1]
  track = overlap.overlap_add(6, np.array([0, 2]), [(0, 0), (1, 0)],
                              activity, np.array([0, 0]), 1)
  np.testing.assert_allclose(track[0], [1, 1, 0.5, 0.5, 1, 1])


def test_tracks_fill_each_speakers_short_pauses():
  # Speaker 0 pauses 0.2 s (one turn), speaker 1 pauses 0.5 s (two turns).
  track = np.zeros((2, 300))
  track[0, 0:100] = track[0, 120:200] = 1.0
  track[1, 100:150] = track[1, 200:260] = 1.0
  cfg = overlap.OverlapConfig(median_filter_frames=1)
  segments = overlap.tracks_to_segments(track, cfg, "f", 3.0)
  turns = sorted((s.speaker, round(s.start, 2), round(s.end, 2))
                 for s in segments)
  assert turns == [("spk0", 0.0, 2.0), ("spk1", 1.0, 1.5), ("spk1", 2.0, 2.6)]


def _scene(seconds=8.0):
  """Speaker A talks over [0, 5) s, B over [3, 8) s: 2 s of overlap."""
  frames = int(seconds * FRAMES_PER_SECOND)
  truth = np.zeros((2, frames), bool)
  truth[0, :500] = True
  truth[1, 300:] = True
  return frames, truth


def _fake_router(truth, dim=6, seed=0):
  """Per window: slots in a shuffled order, A and B active where the truth
  says, one empty slot; embeddings near two speaker centres."""
  rng = np.random.default_rng(seed)
  centres = np.zeros((2, dim))
  centres[0, 0], centres[1, 1] = 6.0, 6.0

  def route(windows):
    w, n = windows.shape
    frames = n // 160
    existence = np.zeros((w, 3))
    activity = np.zeros((w, 3, frames))
    embeddings = rng.normal(0, 0.3, (w, 3, dim))
    for i in range(w):
      start = int(route.starts[i])
      order = rng.permutation(3)
      for spk in range(2):
        slot = order[spk]
        act = truth[spk, start:start + frames].astype(float)
        activity[i, slot, :len(act)] = act
        existence[i, slot] = 0.95 if act.any() else 0.05
        embeddings[i, slot] += centres[spk]
      existence[i, order[2]] = 0.02
    return existence, activity, embeddings
  route.starts = None
  return route


def _reference(truth, file_id):
  return rttm.activity_to_segments(truth, 0.01, file_id, ["A", "B"])


def test_overlap_aware_diarization_labels_overlap(tmp_path):
  frames, truth = _scene()
  cfg = overlap.OverlapConfig(window_seconds=4.0, Fa=1.0, Fb=1.0,
                              median_filter_frames=1)
  route = _fake_router(truth)
  route.starts = overlap.window_starts(frames, 400, 200)
  waveform = np.zeros(frames * 160, np.float32)
  segments = overlap.diarize_overlap(waveform, route_windows=route,
                                     plda=IdentityPLDA(6), cfg=cfg,
                                     file_id="f")
  # Two speakers, with overlapping segments.
  assert len({s.speaker for s in segments}) == 2
  spans = {s.speaker: (s.start, s.end) for s in segments}
  assert sorted(spans.values()) == [(0.0, 5.0), (3.0, 8.0)]
  # Written and read back as RTTM, they keep their overlap and score DER 0.
  path = str(tmp_path / "hyp.rttm")
  rttm.write_rttm(path, segments)
  hyp = rttm.read_rttm(path)
  a, b = sorted(hyp["f"], key=lambda s: s.start)
  assert a.end > b.start
  result = scoring.score({"f": _reference(truth, "f")}, hyp,
                         {"f": [(0.0, 8.0)]})
  assert result["collar_0.00"]["der"] == pytest.approx(0.0, abs=1e-9)
  assert result["count"]["accuracy"] == 1.0


def test_one_speaker_per_frame_misses_the_overlap():
  """The VBx path's limit, for comparison: labelling each frame with one
  speaker misses the 2 s of overlap out of 10 s of reference speech."""
  frames, truth = _scene()
  single = truth.copy()
  single[1, 300:500] = False                   # A keeps the overlap.
  ref = {"f": _reference(truth, "f")}
  hyp = {"f": rttm.activity_to_segments(single, 0.01, "f", ["x", "y"])}
  result = scoring.score(ref, hyp, {"f": [(0.0, 8.0)]})
  c0 = result["collar_0.00"]
  assert c0["missed_rate"] == pytest.approx(0.2)
  assert c0["der"] == pytest.approx(0.2)
  # A hand-made overlapping hypothesis that ends B 0.5 s early: 5% missed.
  early = [rttm.Segment("f", 0.0, 5.0, "x"),
           rttm.Segment("f", 3.0, 4.5, "y")]
  result = scoring.score(ref, {"f": early}, {"f": [(0.0, 8.0)]})
  assert result["collar_0.00"]["der"] == pytest.approx(0.05)
  assert result["collar_0.00"]["missed_rate"] == pytest.approx(0.05)
  # +-0.25 s collars around the four boundaries (0, 3, 5, 8 s) leave 8 s of
  # scored reference speech, of which [7.5, 7.75) s is missed.
  assert result["collar_0.25"]["der"] == pytest.approx(0.25 / 8.0)


def test_slots_that_do_not_exist_give_no_speaker():
  frames, truth = _scene()
  route = _fake_router(truth)
  route.starts = overlap.window_starts(frames, 400, 200)

  def nobody(windows):
    existence, activity, embeddings = route(windows)
    return np.zeros_like(existence), activity, embeddings
  assert overlap.diarize_overlap(
      np.zeros(frames * 160, np.float32), route_windows=nobody,
      plda=IdentityPLDA(6), cfg=overlap.OverlapConfig(window_seconds=4.0)
  ) == []


def test_config_is_a_clustering_config():
  cfg = overlap.OverlapConfig()
  assert cfg.loop_prob == 0.0 and cfg.hop_fraction == 0.5
  assert "Fb" in {f.name for f in dataclasses.fields(cfg)}
