"""Mixture stream: example invariants, phoneme frames, determinism, resume."""

import dataclasses
import os

import grain
import numpy as np
import pytest

from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from data_pipelines import phonemes
from data_pipelines import storage
from data_pipelines import stream
from experiments import stage2_speaker
from tools import bench_data

SR = manifest_lib.SAMPLE_RATE
# 2 s clips keep the tests fast; crops of 0.5..2 s.
CFG = mixtures.MixtureConfig(clip_seconds=2.0, min_source_seconds=0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("corpus"))
  return bench_data.write_synthetic_corpus(
      root, num_speakers=8, utts_per_speaker=4, seconds=(2.5, 4.0),
      heldout_fraction=0.25, seed=1)


@pytest.fixture(scope="module")
def index(corpus):
  return mixtures.MixtureIndex.from_manifest(corpus, manifest_lib.TRAIN)


def _examples(corpus, index, cfg, count, seed0=0):
  store = storage.AudioStore(corpus)
  return [mixtures.make_example(store, index, cfg, np.random.default_rng(
      seed0 + i)) for i in range(count)]


def _frame_energy(x, hop):
  frames = x.reshape(x.shape[:-1] + (-1, hop)).astype(np.float64)
  return (frames ** 2).sum(-1)


def _active_level_db(source, activity, hop):
  energy = _frame_energy(source, hop)
  return 10 * np.log10(energy[activity > 0].mean() / hop)


# --- phonemes ---------------------------------------------------------------


def test_frame_labels_hand_case(tmp_path):
  path = tmp_path / "a.tsv"
  path.write_text("start_s\tend_s\tphoneme\n0.00\t0.05\tb\n0.05\t0.10\t_\n"
                  "0.15\t0.20\ta\n")
  inventory = phonemes.PhonemeInventory.from_symbols(["b", "a", "_"])
  assert inventory.symbols == ("a", "b")
  labels = phonemes.frame_labels(str(path), 22, hop=160, sr=SR,
                                 inventory=inventory)
  s, u = phonemes.SILENCE, phonemes.UNKNOWN
  expected = [1] * 5 + [s] * 5 + [u] * 5 + [0] * 5 + [u] * 2
  np.testing.assert_array_equal(labels, expected)
  assert labels.dtype == np.int32


def test_inventory_built_saved_and_loaded(corpus):
  inventory = phonemes.PhonemeInventory.for_manifest(corpus)
  assert inventory.symbols == tuple(sorted(bench_data.TONE_HZ))
  saved = os.path.join(os.path.dirname(corpus), phonemes.INVENTORY_FILE)
  assert phonemes.PhonemeInventory.load(saved) == inventory


# --- single examples ---------------------------------------------------------


def test_example_shapes_and_invariants(corpus, index):
  n, f, s = CFG.num_samples, CFG.num_frames, CFG.k_max
  ks = []
  for ex in _examples(corpus, index, CFG, 60):
    assert ex["mixture"].shape == (n,) and ex["mixture"].dtype == np.float32
    assert ex["sources"].shape == (s, n) and ex["sources"].dtype == np.float32
    assert ex["activity"].shape == (s, f) and ex["phonemes"].shape == (s, f)
    assert ex["phonemes"].dtype == np.int32 and ex["speakers"].dtype == np.int32
    np.testing.assert_allclose(ex["mixture"], ex["sources"].sum(0), rtol=0,
                               atol=1e-7)
    k = int(ex["num_speakers"])
    ks.append(k)
    assert CFG.k_min <= k <= CFG.k_max
    speakers = ex["speakers"]
    assert len(set(speakers[:k])) == k and (speakers[:k] >= 0).all()
    assert (speakers[:k] < len(index.speakers)).all()
    assert (speakers[k:] == -1).all()
    assert not ex["sources"][k:].any() and not ex["activity"][k:].any()
    assert (ex["phonemes"][k:] == phonemes.UNKNOWN).all()
    assert np.abs(ex["mixture"]).max() <= CFG.peak + 1e-6
  assert set(ks) == {1, 2, 3}


def test_peak_limit_scales_mixture_and_sources_together(corpus, index):
  cfg = mixtures.MixtureConfig(clip_seconds=2.0, min_source_seconds=0.5,
                               target_level_db=-6.0)  # Loud: the limit acts.
  limited = 0
  for ex in _examples(corpus, index, cfg, 20):
    peak = np.abs(ex["mixture"]).max()
    assert peak <= cfg.peak + 1e-6
    limited += peak > cfg.peak - 1e-6
    np.testing.assert_allclose(ex["mixture"], ex["sources"].sum(0), rtol=0,
                               atol=1e-7)
  assert limited > 10


def test_activity_matches_source_energy(corpus, index):
  rel = 10 ** (CFG.activity_rel_db / 10)
  for ex in _examples(corpus, index, CFG, 40):
    for slot in range(int(ex["num_speakers"])):
      energy = _frame_energy(ex["sources"][slot], CFG.hop)
      threshold = energy.max() * rel
      active = ex["activity"][slot] > 0
      assert set(np.unique(ex["activity"][slot])) <= {0.0, 1.0}
      assert active.any()
      # Borderline frames (within 1% of the threshold) may go either way.
      clear = np.abs(energy - threshold) > 0.01 * threshold
      np.testing.assert_array_equal(active[clear], (energy > threshold)[clear])
      assert not active[energy == 0].any()  # Outside the segment and gaps.


def test_phonemes_match_the_tones(corpus, index):
  """Synthetic phonemes are tones: a labelled frame's spectral peak tells it."""
  inventory = index.inventory
  hz = np.array([bench_data.TONE_HZ[p] for p in inventory.symbols])
  checked = matched = 0
  for ex in _examples(corpus, index, CFG, 20):
    for slot in range(int(ex["num_speakers"])):
      labels = ex["phonemes"][slot]
      frames = ex["sources"][slot].reshape(-1, CFG.hop)
      # Frames whose neighbours carry the same label lie inside one phoneme.
      inner = np.zeros_like(labels, bool)
      inner[1:-1] = (labels[1:-1] == labels[:-2]) & (labels[1:-1] == labels[2:])
      for t in np.flatnonzero(inner & (labels >= 0)):
        spectrum = np.abs(np.fft.rfft(frames[t], n=1600))
        peak_hz = np.argmax(spectrum) * SR / 1600
        checked += 1
        matched += abs(peak_hz - hz[labels[t]]) <= 50
      silent = inner & (labels == phonemes.SILENCE)
      assert not frames[silent].any()
  assert checked > 500
  assert matched / checked > 0.98


def test_gains_within_bounds_before_peak_limit(corpus, index):
  cfg = mixtures.MixtureConfig(clip_seconds=2.0, min_source_seconds=0.5,
                               peak=1e6)
  levels = []
  for ex in _examples(corpus, index, cfg, 40):
    for slot in range(int(ex["num_speakers"])):
      levels.append(_active_level_db(ex["sources"][slot],
                                     ex["activity"][slot], cfg.hop))
  levels = np.array(levels) - cfg.target_level_db
  assert (np.abs(levels) <= cfg.gain_db + 0.01).all()
  assert levels.std() > 1.0  # Gains are actually drawn.
  # After the peak limit, relative levels stay within the +-gain_db spread.
  for ex in _examples(corpus, index, CFG, 40):
    k = int(ex["num_speakers"])
    if k >= 2:
      lv = [_active_level_db(ex["sources"][i], ex["activity"][i], CFG.hop)
            for i in range(k)]
      assert max(lv) - min(lv) <= 2 * CFG.gain_db + 0.01


def test_onsets_and_overlap_vary(corpus, index):
  onsets, overlaps = [], []
  for ex in _examples(corpus, index, CFG, 60):
    k = int(ex["num_speakers"])
    for slot in range(k):
      onsets.append(np.flatnonzero(ex["sources"][slot])[0])
    if k >= 2:
      busy = ex["activity"][:k].sum(0)
      overlaps.append((busy >= 2).sum() / max((busy >= 1).sum(), 1))
  assert np.mean(np.array(onsets) > CFG.hop) > 0.5
  assert np.std(overlaps) > 0.05 and min(overlaps) < max(overlaps)


def test_k_min_zero_gives_silent_examples(corpus, index):
  cfg = mixtures.MixtureConfig(clip_seconds=2.0, min_source_seconds=0.5,
                               k_min=0, k_max=2)
  examples = _examples(corpus, index, cfg, 40)
  empty = [ex for ex in examples if int(ex["num_speakers"]) == 0]
  assert 0 < len(empty) < len(examples)
  for ex in empty:
    assert not ex["mixture"].any() and not ex["activity"].any()
    assert (ex["speakers"] == -1).all()


def test_p_mixture_zero_gives_full_single_speaker_clips(corpus, index):
  cfg = mixtures.MixtureConfig(clip_seconds=2.0, min_source_seconds=0.5,
                               p_mixture=0.0)
  for ex in _examples(corpus, index, cfg, 20):
    assert int(ex["num_speakers"]) == 1
    # Utterances outlast the clip, so the one crop covers every frame.
    assert (ex["phonemes"][0] != phonemes.UNKNOWN).all()


def test_stage2_stream_holds_one_talker_with_and_without_pauses(corpus, index):
  # Stage 2 labels ArcFace with speakers[:, 0] and trains the activity head:
  # every clip must hold exactly one talker, and some must leave a long
  # stretch without speech beside it (where noise goes on after the talker).
  data = stage2_speaker.get_config("cpu").data
  cfg = dataclasses.replace(stream.mixture_config(data), clip_seconds=2.0,
                            min_source_seconds=0.5)
  examples = _examples(corpus, index, cfg, 40)
  for ex in examples:
    assert int(ex["num_speakers"]) == 1 and ex["speakers"].shape == (1,)
    assert ex["speakers"][0] >= 0
  uncovered = [np.mean(ex["phonemes"][0] == phonemes.UNKNOWN)
               for ex in examples]
  full = sum(u == 0 for u in uncovered)
  partial = sum(u >= 0.25 for u in uncovered)  # >= 0.5 s of a 2 s clip.
  assert full >= 10 and partial >= 5, (full, partial)


def test_different_seeds_differ_same_seed_equal(corpus, index):
  a = _examples(corpus, index, CFG, 3, seed0=0)
  b = _examples(corpus, index, CFG, 3, seed0=0)
  c = _examples(corpus, index, CFG, 3, seed0=10)
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x["mixture"], y["mixture"])
    assert not np.array_equal(x["mixture"], z["mixture"])


def test_bad_audio_is_skipped_and_counted(corpus, tmp_path):
  utts = manifest_lib.read_manifest(corpus)
  root = os.path.dirname(corpus)
  os.symlink(os.path.join(root, "shards"), tmp_path / "shards")
  os.symlink(os.path.join(root, "align"), tmp_path / "align")
  storage.write_shard(str(tmp_path / "zeros.npy"),
                      [np.zeros(3 * SR, np.int16)])
  bad = dict(speaker="bad", session="s", split=manifest_lib.TRAIN,
             num_samples=3 * SR)
  utts += [
      manifest_lib.Utterance(utt_id="bad/s/0", shard="zeros.npy", offset=0,
                             **bad),
      manifest_lib.Utterance(utt_id="bad/s/1", shard="missing.npy", offset=0,
                             **bad),
      manifest_lib.Utterance(utt_id="bad/s/2", shard="zeros.npy", offset=SR,
                             **bad),  # Runs past the shard's end.
  ]
  path = str(tmp_path / "manifest.tsv")
  manifest_lib.write_manifest(path, utts)
  index = mixtures.MixtureIndex.from_manifest(path, manifest_lib.TRAIN)
  transform = mixtures.MixtureTransform(storage.AudioStore(path), index, CFG)
  cfg1 = mixtures.MixtureConfig(clip_seconds=2.0, min_source_seconds=0.5,
                                p_mixture=0.0)  # Full crops reach the tail.
  transform1 = mixtures.MixtureTransform(storage.AudioStore(path), index, cfg1)
  bad_ids = [i for i, u in enumerate(index.utterances) if u.speaker == "bad"]
  for anchor in bad_ids * 4:
    rng = np.random.default_rng(anchor)
    for t in (transform, transform1):
      ex = t.random_map(anchor, rng)
      assert int(ex["num_speakers"]) >= 1
      assert ex["activity"][:int(ex["num_speakers"])].any(1).all()
  skips = transform.skips + transform1.skips
  assert skips["silent"] > 0
  assert skips["unreadable"] > 0
  assert skips["truncated"] > 0


# --- the grain stream ---------------------------------------------------------


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _dataset(corpus, **kw):
  kw = dict(seed=3, batch_size=4) | kw
  return mixtures.mixture_dataset(corpus, manifest_lib.TRAIN, CFG, **kw)


def test_batches_and_num_speakers(corpus):
  batch = next(iter(_dataset(corpus)))
  assert batch["mixture"].shape == (4, CFG.num_samples)
  assert batch["sources"].shape == (4, CFG.k_max, CFG.num_samples)
  assert batch["num_speakers"].shape == (4,)
  train = manifest_lib.speakers_of(manifest_lib.read_manifest(corpus),
                                   manifest_lib.TRAIN)
  assert mixtures.num_speakers(corpus, manifest_lib.TRAIN) == len(train) == 6
  other = _take(iter(_dataset(corpus, seed=4)), 1)[0]
  assert not np.array_equal(batch["mixture"], other["mixture"])


def test_waveforms_travel_as_pcm16(corpus):
  exact = next(iter(_dataset(corpus, wire_dtype="float32")))
  pcm = next(iter(_dataset(corpus)))  # The default: int16.
  assert exact["mixture"].dtype == np.float32
  for key in ("mixture", "sources"):
    assert pcm[key].dtype == np.int16
    np.testing.assert_array_equal(pcm[key], storage.to_int16(exact[key]))
    np.testing.assert_allclose(storage.to_float(pcm[key]), exact[key], rtol=0,
                               atol=0.5 / storage.INT16_SCALE)
  np.testing.assert_array_equal(pcm["activity"], exact["activity"])
  with pytest.raises(ValueError, match="wire_dtype"):
    _dataset(corpus, wire_dtype="float16")


def test_selected_keys_are_the_same_entries(corpus):
  keys = ("mixture", "activity", "speakers")
  full = _take(iter(_dataset(corpus)), 2)
  selected = _take(iter(_dataset(corpus, keys=keys)), 2)
  _assert_batches_equal(selected, [{k: b[k] for k in keys} for b in full])


def test_workers_resume_and_state(corpus):
  """0 and 2 workers give one stream; get_state/set_state resumes it exactly."""
  reference = _take(iter(_dataset(corpus)), 5)
  for workers in (0, 2):
    ds = _dataset(corpus, num_workers=workers)
    it = iter(ds)
    first = _take(it, 2)
    state = it.get_state()
    rest = _take(it, 3)
    _assert_batches_equal(first + rest, reference)
    it2 = iter(ds)
    it2.set_state(state)
    _assert_batches_equal(_take(it2, 3), reference[2:])
    for i in (it, it2):
      if hasattr(i, "close"):
        i.close()


def test_host_shards_are_disjoint_and_interleave_to_the_stream(corpus):
  full = _take(iter(_dataset(corpus, batch_size=1)), 9)
  for h in range(3):
    shard = _take(iter(_dataset(corpus, batch_size=1, shard_index=h,
                                shard_count=3)), 3)
    _assert_batches_equal(shard, full[h::3])
  mixes = [b["mixture"].tobytes() for b in full]
  assert len(set(mixes)) == len(mixes)


def test_epochs_use_every_utterance_as_anchor_once(corpus, index):
  """Shuffled anchors: one epoch = each usable utterance once (before mixing)."""
  u = len(index.utterances)
  ds = mixtures.example_dataset(corpus, manifest_lib.TRAIN, CFG, seed=0,
                                index=index)
  anchors = [ds.parents[0][i] for i in range(2 * u)]
  assert sorted(anchors[:u]) == list(range(u))
  assert sorted(anchors[u:]) == list(range(u))
  assert anchors[:u] != anchors[u:]


def test_orbax_checkpoint_of_iterator_state(corpus, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = _dataset(corpus)
  it = iter(ds)
  _take(it, 2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 2)
    it2 = iter(ds)
    mngr.restore(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(it2)))
  _assert_batches_equal(_take(it2, 2), expected)
