"""Fault injection, data side: damaged shards in held-out and train
data, out-of-range and NaN audio through preparation and diarization, a
`kill -9` of a preparation pool, a symlink loop in a source tree."""

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import soundfile

from data_pipelines import audio_io
from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from data_pipelines import prepare
from data_pipelines import storage
from test_prepare import sine, write
from tools import bench_data

SR = manifest_lib.SAMPLE_RATE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# write_synthetic_corpus: one shard per speaker; ids 0-2 train, 3-5 held out.
TRAIN_SPEAKERS = ["id00000", "id00001", "id00002"]
HELDOUT_SPEAKERS = ["id00003", "id00004", "id00005"]
UTTS_PER_SPEAKER = 3


def _damage(path: str, how: str) -> None:
  """'truncated': half the bytes (numpy: "mmap length is greater than file
  size"); 'empty': 0 bytes (numpy: EOFError)."""
  size = os.path.getsize(path) // 2 if how == "truncated" else 0
  with open(path, "r+b") as f:
    f.truncate(size)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("pristine"))
  return bench_data.write_synthetic_corpus(
      root, num_speakers=6, utts_per_speaker=UTTS_PER_SPEAKER,
      seconds=(1.0, 2.0), heldout_fraction=0.5, seed=3)


def _damaged_copy(pristine: str, tmp_path, speakers, how: str) -> str:
  root = str(tmp_path / "damaged")
  shutil.copytree(os.path.dirname(pristine), root)
  for speaker in speakers:
    _damage(os.path.join(root, "shards", f"{speaker}.npy"), how)
  return os.path.join(root, "manifest.tsv")


def _split(manifest_path, split):
  return [u for u in manifest_lib.read_manifest(manifest_path)
          if u.split == split]


def _assert_named_skips(caplog, manifest_path, speakers):
  """One warning per skipped utterance, naming its shard file and reason."""
  lines = [r.getMessage() for r in caplog.records
           if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
  root = os.path.dirname(manifest_path)
  for speaker in speakers:
    shard = os.path.join(root, "shards", f"{speaker}.npy")
    named = [l for l in lines if shard in l]
    assert len(named) >= UTTS_PER_SPEAKER, lines
    assert all("unreadable" in l for l in named), named


# --- a damaged shard in held-out data -------------------------------------------


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_load_clips_skips_damaged_heldout_shard(pristine, tmp_path, caplog,
                                                how):
  from echo_jax import embed
  path = _damaged_copy(pristine, tmp_path, HELDOUT_SPEAKERS[-1:], how)
  utts = _split(path, manifest_lib.HELDOUT)
  skips = collections.Counter()
  with caplog.at_level(logging.WARNING):
    clips = embed.load_clips(path, utts, SR, skips=skips)
  assert skips == {storage.UNREADABLE: UTTS_PER_SPEAKER}
  assert [u.utt_id for u in clips.utterances] == [
      u.utt_id for u in utts if u.speaker != HELDOUT_SPEAKERS[-1]]
  assert clips.waves.shape == (len(clips.utterances), SR)
  good = embed.load_clips(pristine, clips.utterances, SR)
  np.testing.assert_array_equal(clips.waves, good.waves)
  np.testing.assert_array_equal(clips.lengths, good.lengths)
  _assert_named_skips(caplog, path, HELDOUT_SPEAKERS[-1:])


def _speaker_evaluator(path):
  import ml_collections
  from echo_jax.evaluators import speaker_eval
  config = ml_collections.ConfigDict(dict(
      every=1, seconds=1.0, batch_size=4, max_utterances_per_speaker=10,
      random_floor=False))
  # No random floor: the model is never called while the clips are loaded.
  return speaker_eval.SpeakerEvaluator("speaker", config, None, path, seed=0)


def test_speaker_evaluator_skips_damaged_heldout_shard(pristine, tmp_path,
                                                       caplog):
  path = _damaged_copy(pristine, tmp_path, HELDOUT_SPEAKERS[-1:], "truncated")
  with caplog.at_level(logging.WARNING):
    evaluator = _speaker_evaluator(path)
  assert evaluator.skipped == UTTS_PER_SPEAKER
  assert evaluator.skip_reasons == {storage.UNREADABLE: UTTS_PER_SPEAKER}
  assert len(evaluator.labels) == len(evaluator.waves) == 2 * UTTS_PER_SPEAKER
  assert sorted(set(evaluator.labels.tolist())) == [0, 1]
  _assert_named_skips(caplog, path, HELDOUT_SPEAKERS[-1:])


def test_speaker_evaluator_fails_clearly_when_too_few_remain(pristine,
                                                             tmp_path):
  path = _damaged_copy(pristine, tmp_path, HELDOUT_SPEAKERS[1:], "truncated")
  with pytest.raises(ValueError, match=r"6 held-out utterances .* unreadable"
                     r".* 1 speakers remain; needs >= 2"):
    _speaker_evaluator(path)


# --- a damaged shard when fitting the PLDA -----------------------------------


def test_plda_windows_skip_damaged_shard_with_count(pristine, tmp_path,
                                                    caplog):
  from echo_jax import diarizer
  path = _damaged_copy(pristine, tmp_path, TRAIN_SPEAKERS[-1:], "truncated")
  skips = collections.Counter()
  with caplog.at_level(logging.WARNING):
    windows, labels = diarizer.plda_windows(path, 4000, seed=1, skips=skips)
  assert skips == {storage.UNREADABLE: UTTS_PER_SPEAKER}
  assert sorted(set(labels)) == TRAIN_SPEAKERS[:2]
  # The windows of healthy utterances are the ones a healthy corpus gives.
  good_windows, good_labels = diarizer.plda_windows(pristine, 4000, seed=1)
  keep = good_labels != TRAIN_SPEAKERS[-1]
  np.testing.assert_array_equal(windows, good_windows[keep])
  np.testing.assert_array_equal(labels, good_labels[keep])
  _assert_named_skips(caplog, path, TRAIN_SPEAKERS[-1:])
  assert any("PLDA windows: left out 3 of 9 utterances" in r.getMessage()
             for r in caplog.records)

  path2 = _damaged_copy(pristine, tmp_path / "2", TRAIN_SPEAKERS[1:], "empty")
  with pytest.raises(ValueError, match="1 remain after leaving out 6"):
    diarizer.plda_windows(path2, 4000, seed=1)


# --- a damaged shard in train data -------------------------------------------
# tests/test_mixtures.py covers a missing shard and an offset past a shard's
# end; here the shard file itself is cut short or empty (an empty one used to
# escape the stream's skip as an EOFError).


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_train_stream_skips_damaged_shard(pristine, tmp_path, how):
  path = _damaged_copy(pristine, tmp_path, TRAIN_SPEAKERS[-1:], how)
  index = mixtures.MixtureIndex.from_manifest(path, manifest_lib.TRAIN)
  cfg = mixtures.MixtureConfig(clip_seconds=1.0, min_source_seconds=0.5,
                               k_min=1, k_max=2)
  transform = mixtures.MixtureTransform(storage.AudioStore(path), index, cfg)
  bad = [i for i, u in enumerate(index.utterances)
         if u.speaker == TRAIN_SPEAKERS[-1]]
  for anchor in bad:
    ex = transform.random_map(anchor, np.random.default_rng(anchor))
    assert int(ex["num_speakers"]) >= 1
    assert np.isfinite(ex["mixture"]).all()
  assert transform.skips["unreadable"] >= len(bad)


def test_shard_error_names_the_file(pristine, tmp_path):
  path = _damaged_copy(pristine, tmp_path, TRAIN_SPEAKERS[:1], "truncated")
  utt = _split(path, manifest_lib.TRAIN)[0]
  with pytest.raises(ValueError, match=r"Shard .*id00000\.npy is unreadable: "
                     "ValueError: mmap length"):
    storage.AudioStore(path).read(utt)


# --- out-of-range and NaN audio ------------------------------------------------


def _loud(seconds=1.5, peak=1e6):
  return sine(440, seconds, SR, amp=peak)


def _assert_is_the_sine(x, freq=440):
  """Not clipped: a sine at full scale, not a square wave."""
  assert np.abs(x).max() <= 1.0
  assert np.abs(x).max() > 0.99
  assert np.mean(np.abs(x) > 0.999) < 0.05  # A square wave: ~100 %.
  ref = np.sin(2 * np.pi * freq * np.arange(len(x)) / SR)
  assert abs(np.corrcoef(x, ref)[0, 1]) > 0.999


@pytest.fixture(scope="module")
def bad_audio_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad_audio"))
  write(root, "spk_a/s1/loud.wav", _loud(), subtype="FLOAT")
  write(root, "spk_a/s1/ok.wav", sine(300, 1.5, SR))
  nan, inf = sine(440, 1.5, SR), sine(440, 1.5, SR)
  nan[SR // 2:SR // 2 + 10] = np.nan
  inf[7] = np.inf
  write(root, "spk_b/s1/nan.wav", nan, subtype="FLOAT")
  write(root, "spk_b/s1/inf.wav", inf, subtype="FLOAT")
  write(root, "spk_b/s1/ok.m4a", sine(500, 1.5, 44100), 44100)
  return root


def test_prepare_rescales_out_of_range_and_skips_non_finite(bad_audio_tree,
                                                            tmp_path):
  out = str(tmp_path / "out")
  report = prepare.prepare_corpus(bad_audio_tree, out, heldout_fraction=0.0,
                                  num_workers=0, progress=False)
  assert report.num_written == 3 and report.num_rescaled == 1
  assert report.skipped == {prepare.NON_FINITE: 2}
  assert "1 peak-normalised" in report.summary()
  skips = {os.path.basename(s.path): s
           for s in prepare.read_skipped(report.skipped_path)}
  assert sorted(skips) == ["inf.wav", "nan.wav"]
  assert "10 of 24000 samples are NaN or Inf, the first at 0.500 s" in (
      skips["nan.wav"].detail)
  utts = {u.utt_id: u for u in manifest_lib.read_manifest(report.manifest_path)}
  _assert_is_the_sine(storage.AudioStore(report.manifest_path).read(
      utts["spk_a/s1/loud"]))
  with open(os.path.join(out, prepare.INFO_NAME)) as f:
    rescaled = json.load(f)["rescaled"]
  assert [(os.path.basename(p), peak) for p, peak in rescaled] == [
      ("loud.wav", pytest.approx(1e6, rel=1e-3))]


def test_diarize_loader_nan_is_an_error_out_of_range_rescaled(
    bad_audio_tree, caplog):
  from echo_jax.diarization import pipeline
  for name in ("nan.wav", "inf.wav"):
    path = os.path.join(bad_audio_tree, "spk_b/s1", name)
    with pytest.raises(ValueError, match=rf"{name}: non_finite: .* NaN or Inf"):
      pipeline.load_audio(path)
  loud = os.path.join(bad_audio_tree, "spk_a/s1/loud.wav")
  with caplog.at_level(logging.WARNING):
    x = pipeline.load_audio(loud)
  _assert_is_the_sine(x)
  assert any(loud in r.getMessage() and "peak-normalised" in r.getMessage()
             for r in caplog.records)
  # .m4a, as preparation reads it (one reader).
  m4a = os.path.join(bad_audio_tree, "spk_b/s1/ok.m4a")
  np.testing.assert_array_equal(
      pipeline.load_audio(m4a), audio_io.read_audio(m4a).samples)
  stored, _ = prepare.load_audio(m4a)
  np.testing.assert_allclose(pipeline.load_audio(m4a), stored / 32768.0,
                             atol=1 / 32768)


def test_diarize_tool_reads_folders_m4a_and_names_nan_files(
    bad_audio_tree, tmp_path, monkeypatch, caplog):
  from echo_jax import diarizer as diarizer_lib
  from echo_jax.diarization import rttm
  from tools import diarize as diarize_tool
  loaded = {}

  class FakeDiarizer:
    """A stage-2 checkpoint's stand-in: the real `diarize_file` (so the real
    loader), then one segment per file."""
    diarize_file = diarizer_lib.EchoDiarizer.diarize_file

    @classmethod
    def from_workdir(cls, workdir, cfg=None):
      return cls()

    def load_or_fit_plda(self, manifest=None):
      pass

    def diarize_waveform(self, waveform, file_id):
      loaded[file_id] = len(waveform)
      return [rttm.Segment(file_id, 0.0, len(waveform) / SR, "spk0")]

  monkeypatch.setattr(diarizer_lib, "EchoDiarizer", FakeDiarizer)
  # main() re-configures logging (force=True), which would drop caplog's.
  monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
  folder = tmp_path / "in"
  folder.mkdir()
  shutil.copy(os.path.join(bad_audio_tree, "spk_b/s1/ok.m4a"), folder / "a.m4a")
  soundfile.write(str(folder / "b.flac"), sine(200, 1.0, 22050), 22050)
  (folder / "notes.txt").write_text("not audio")
  (tmp_path / "empty").mkdir()
  out = tmp_path / "rttm"
  with caplog.at_level(logging.INFO):
    failed = diarize_tool.main([
        "--workdir", "unused", "--out", str(out), str(folder),
        os.path.join(bad_audio_tree, "spk_b/s1/nan.wav"),
        str(tmp_path / "empty")])
  assert failed == 2  # nan.wav, and a folder without audio.
  assert sorted(os.listdir(out)) == ["a.rttm", "b.rttm"]
  assert abs(loaded["a"] - 1.5 * SR) < 0.1 * SR and loaded["b"] == SR
  errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
  assert any("nan.wav" in e and "non_finite" in e for e in errors), errors
  assert any(str(tmp_path / "empty") in e and "no audio files" in e
             for e in errors), errors
  assert not any("does not exist" in e for e in errors), errors


# --- kill -9 of a preparation pool -------------------------------------------


def _workers(proc: psutil.Process) -> list[psutil.Process]:
  """Pool workers of `proc` that finished starting (numpy is mapped)."""
  found = []
  for child in proc.children(recursive=True):
    try:
      if ("spawn_main" in " ".join(child.cmdline()) and any(
          "numpy" in m.path for m in child.memory_maps())):
        found.append(child)
    except psutil.Error:
      pass
  return found


def test_kill_9_of_prepare_pool_leaves_no_process(tmp_path):
  src = str(tmp_path / "src")
  for i in range(24):  # 22.05 kHz: every worker's first chunk loads librosa.
    write(src, f"spk{i % 4}/s1/u{i}.wav", sine(200 + i, 1.0, 22050), 22050)
  proc = subprocess.Popen(
      [sys.executable, "-m", "tools.prepare_corpus", "--src", src, "--out",
       str(tmp_path / "out"), "--workers", "2", "--chunk_size", "1",
       "--no_progress"], cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  parent = psutil.Process(proc.pid)
  everyone: list[psutil.Process] = []
  try:
    deadline = time.time() + 60
    while len(_workers(parent)) < 2:
      assert proc.poll() is None, "prepare_corpus ended before the test killed it"
      assert time.time() < deadline, "no pool workers started"
      time.sleep(0.02)
    everyone = parent.children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(everyone, timeout=5)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
  finally:
    proc.kill()
    for p in everyone:  # Today's orphans must not outlive the test.
      try:
        p.kill()
      except psutil.Error:
        pass


# --- a symlink loop in a source tree ------------------------------------------


def test_symlink_loop_counted_once(tmp_path, caplog):
  src = tmp_path / "src"
  for rel in ("spk_a/s1/u1.wav", "spk_a/s1/u2.wav", "spk_b/s1/u1.wav"):
    write(str(src), rel, sine(300, 1.2, SR))
  os.symlink("../..", src / "spk_a" / "s1" / "loop")  # -> src itself.
  os.symlink(str(src / "spk_b"), src / "spk_b_again")  # Same folder twice.
  (src / "spk_c" / "s1").mkdir(parents=True)  # Same file at a second id.
  os.symlink(src / "spk_a" / "s1" / "u1.wav", src / "spk_c" / "s1" / "x.wav")
  with caplog.at_level(logging.WARNING):
    files, skips = prepare.scan_corpus(str(src))
  assert [f.utt_id for f in files] == ["spk_a/s1/u1", "spk_a/s1/u2",
                                       "spk_b/s1/u1"]
  assert [(os.path.relpath(s.path, src), s.reason) for s in skips] == [
      ("spk_c/s1/x.wav", prepare.DUPLICATE)]
  assert any("loop" in r.getMessage() and "already scanned" in r.getMessage()
             for r in caplog.records)
  report = prepare.prepare_corpus(str(src), str(tmp_path / "out"),
                                  num_workers=0, progress=False)
  assert report.num_files == 4 and report.num_written == 3
  assert report.skipped == {prepare.DUPLICATE: 1}
