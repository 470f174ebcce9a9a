"""Corpus preparation: decoding, conversion, bad files, split, resume, CLI."""

import dataclasses
import filecmp
import json
import os
import shutil
import subprocess
import sys
import types

import av
import numpy as np
import pytest
import soundfile

from data_pipelines import default_corpus
from data_pipelines import manifest as manifest_lib
from data_pipelines import prepare
from data_pipelines import storage

SR = manifest_lib.SAMPLE_RATE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5):
  t = np.arange(int(round(seconds * rate))) / rate
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_pyav(path: str, audio: np.ndarray, rate: int, codec: str,
                container_format: str) -> None:
  """Encodes float `[channels, time]` with PyAV's bundled FFmpeg."""
  layout = "stereo" if audio.shape[0] == 2 else "mono"
  with av.open(path, "w", format=container_format) as container:
    stream = container.add_stream(codec, rate=rate, layout=layout)
    stream.codec_context.format = "fltp"  # Both aac and libmp3lame take it.
    step = stream.codec_context.frame_size or 1024
    for pts in range(0, audio.shape[1], step):
      block = np.ascontiguousarray(audio[:, pts:pts + step])
      frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
      frame.sample_rate, frame.pts = rate, pts
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write(root, rel: str, audio=None, rate: int = SR, raw: bytes | None = None,
          subtype: str | None = None) -> str:
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if raw is not None:
    with open(path, "wb") as f:
      f.write(raw)
  elif rel.endswith(".m4a"):
    encode_pyav(path, np.atleast_2d(audio), rate, "aac", "ipod")
  elif rel.endswith(".mp3"):
    encode_pyav(path, np.atleast_2d(audio), rate, "mp3", "mp3")
  else:
    soundfile.write(path, audio.T if audio.ndim == 2 else audio, rate,
                    subtype=subtype)
  return path


def peak_freqs(x: np.ndarray, rate: int, k: int) -> tuple[list, list]:
  """Frequencies and amplitudes of the k largest spectral peaks (Hann)."""
  win = np.hanning(len(x))
  spec = np.abs(np.fft.rfft(x * win)) * 2 / win.sum()
  freqs = np.fft.rfftfreq(len(x), 1 / rate)
  order = [i for i in np.argsort(spec)[::-1]
           if 0 < i < len(spec) - 1 and spec[i] >= spec[i - 1]
           and spec[i] >= spec[i + 1]][:k]
  return [freqs[i] for i in order], [spec[i] for i in order]


# Expected outcome per source file: written utt ids, and skip reasons.
GOOD = {
    "spk_a/s1/u1": "u1.flac",  # + alignment; u1.wav is its duplicate.
    "spk_a/s1/u2": "u2.wav",
    "spk_b/s1/u1": "u1.wav",   # stereo 44.1 kHz
    "spk_c/s1/u1": "u1.m4a",   # AAC mono 44.1 kHz
    "spk_c/s2/u1": "u1.m4a",   # AAC stereo 16 kHz
    "spk_d/s1/u1": "u1.ogg",   # Vorbis 22.05 kHz
    "spk_d/s1/u2": "u2.mp3",   # MP3 mono 16 kHz
    "spk_e/s1/u1": "u1.flac",
}
SKIPS = {
    "spk_a/s1/u1.wav": prepare.DUPLICATE,
    "spk_a/stray.wav": prepare.BAD_LAYOUT,
    "spk_d/s1/bad.m4a": prepare.UNREADABLE,
    "spk_d/s1/bad2.wav": prepare.UNREADABLE,
    "spk_e/s1/empty.wav": prepare.EMPTY,
    "spk_e/s1/short.wav": prepare.TOO_SHORT,
    "spk_e/s1/zeros.flac": prepare.SILENT,
    "spk_e/s1/nan.wav": prepare.NON_FINITE,
    "spk_e/s1/u2.flac": prepare.BAD_ALIGNMENT,
}
ALIGNMENT = "0.000\t0.120\tsil\n0.120\t0.310\th\n0.310\t1.500\taI\n"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("src"))
  rng = np.random.default_rng(0)
  write(root, "spk_a/s1/u1.flac", sine(440, 1.5, SR))
  with open(os.path.join(root, "spk_a/s1/u1.phn.tsv"), "w") as f:
    f.write(ALIGNMENT)
  write(root, "spk_a/s1/u1.wav", sine(440, 1.5, SR))
  # Float WAV: AudioStore must return it within int16 quantisation.
  write(root, "spk_a/s1/u2.wav", 0.3 * rng.standard_normal(SR * 2).clip(-3, 3)
        .astype(np.float32), subtype="FLOAT")
  write(root, "spk_b/s1/u1.wav", np.stack(
      [sine(1000, 1.5, 44100, 0.5), sine(2500, 1.5, 44100, 0.3)]), 44100)
  write(root, "spk_c/s1/u1.m4a", sine(700, 1.5, 44100), 44100)
  write(root, "spk_c/s2/u1.m4a", np.stack(
      [sine(500, 1.5, SR, 0.4), sine(500, 1.5, SR, 0.2)]), SR)
  write(root, "spk_d/s1/u1.ogg", sine(300, 1.5, 22050), 22050)
  write(root, "spk_d/s1/u2.mp3", sine(900, 1.5, SR), SR)
  write(root, "spk_e/s1/u1.flac", sine(200, 3.0, SR))
  write(root, "spk_a/stray.wav", sine(440, 1.5, SR))
  write(root, "spk_d/s1/bad.m4a", raw=rng.bytes(5000))
  write(root, "spk_d/s1/bad2.wav", raw=b"RIFF" + rng.bytes(3000))
  write(root, "spk_e/s1/empty.wav", raw=b"")
  write(root, "spk_e/s1/short.wav", sine(440, 0.2, SR))
  write(root, "spk_e/s1/zeros.flac", np.zeros(SR * 2, np.float32))
  nan = sine(440, 1.5, SR)
  nan[100] = np.nan
  write(root, "spk_e/s1/nan.wav", nan, subtype="FLOAT")
  write(root, "spk_e/s1/u2.flac", sine(440, 1.5, SR))
  with open(os.path.join(root, "spk_e/s1/u2.phn.tsv"), "w") as f:
    f.write("0.0\tsil\n")
  with open(os.path.join(root, "spk_e/s1/notes.txt"), "w") as f:
    f.write("not audio, not counted\n")
  return root


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  report = prepare.prepare_corpus(src, out, heldout_fraction=0.4, seed=0,
                                  num_workers=0, chunk_size=4, progress=False)
  return out, report


def utts_by_id(manifest_path):
  return {u.utt_id: u for u in manifest_lib.read_manifest(manifest_path)}


def test_pyav_has_aac_encoder():
  # The m4a inputs below are real AAC; if this fails, the m4a cases are moot.
  assert av.codec.Codec("aac", "w").name == "aac"


def test_manifest_and_report(src, prepared):
  out, report = prepared
  utts = utts_by_id(report.manifest_path)
  assert sorted(utts) == sorted(GOOD)
  for utt_id, name in GOOD.items():
    u = utts[utt_id]
    spk, session, stem = utt_id.split("/")
    assert (u.speaker, u.session, u.sample_rate) == (spk, session, SR)
    assert u.source_path == os.path.join(src, spk, session, name)
    assert stem == os.path.splitext(name)[0]
  # Durations survive resampling (AAC/MP3 may pad by up to a frame).
  assert utts["spk_b/s1/u1"].num_samples == 24000
  assert utts["spk_d/s1/u1"].num_samples == 24000
  assert utts["spk_e/s1/u1"].num_samples == 48000
  assert abs(utts["spk_c/s1/u1"].num_samples - 24000) <= 1200
  assert report.num_files == len(GOOD) + len(SKIPS)
  assert report.num_written == len(GOOD)
  # Converted: stereo wav 44.1k, AAC 44.1k, AAC stereo, Vorbis 22.05k.
  assert report.num_converted == 4
  assert report.hours == pytest.approx(
      sum(u.num_samples for u in utts.values()) / SR / 3600)
  assert report.num_chunks == 4  # 15 decodable-layout files / chunk_size 4.


def test_skipped_reasons(src, prepared):
  out, report = prepared
  skips = prepare.read_skipped(os.path.join(out, "skipped.tsv"))
  found = {os.path.relpath(s.path, src): s.reason for s in skips}
  assert found == SKIPS
  expected_counts = {}
  for reason in SKIPS.values():
    expected_counts[reason] = expected_counts.get(reason, 0) + 1
  assert report.skipped == expected_counts
  assert all(s.detail for s in skips)


def test_resampled_downmixed_sines(prepared):
  out, report = prepared
  utts = utts_by_id(report.manifest_path)
  store = storage.AudioStore(report.manifest_path)
  # Stereo 44.1 kHz: L 0.5 @ 1 kHz, R 0.3 @ 2.5 kHz -> mono 0.25 and 0.15.
  x = store.read(utts["spk_b/s1/u1"])
  freqs, amps = peak_freqs(x, SR, 2)
  np.testing.assert_allclose(freqs, [1000, 2500], atol=1.0)
  np.testing.assert_allclose(amps, [0.25, 0.15], rtol=0.02)
  # Vorbis at 22.05 kHz (lossy: looser amplitude).
  freqs, amps = peak_freqs(store.read(utts["spk_d/s1/u1"]), SR, 1)
  assert freqs[0] == pytest.approx(300, abs=1.0)
  assert amps[0] == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("utt_id,freq,amp", [
    ("spk_c/s1/u1", 700, 0.5),   # AAC 44.1 kHz mono
    ("spk_c/s2/u1", 500, 0.3),   # AAC 16 kHz stereo (0.4 + 0.2) / 2
    ("spk_d/s1/u2", 900, 0.5),   # MP3
])
def test_compressed_decoded(prepared, utt_id, freq, amp):
  out, report = prepared
  u = utts_by_id(report.manifest_path)[utt_id]
  # Skips codec priming/padding edges.
  x = storage.AudioStore(report.manifest_path).read(u, 2000, u.num_samples - 4000)
  freqs, amps = peak_freqs(x, SR, 1)
  assert freqs[0] == pytest.approx(freq, abs=2.0)
  assert amps[0] == pytest.approx(amp, rel=0.05)


def test_storage_round_trip(src, prepared):
  out, report = prepared
  u = utts_by_id(report.manifest_path)["spk_a/s1/u2"]
  source, rate = soundfile.read(os.path.join(src, "spk_a/s1/u2.wav"),
                                dtype="float32")
  assert rate == SR and u.num_samples == len(source)
  store = storage.AudioStore(report.manifest_path)
  crop = store.read(u, 1234, 8000)
  assert crop.dtype == np.float32 and crop.shape == (8000,)
  np.testing.assert_allclose(crop, source[1234:9234], rtol=0,
                             atol=0.5 / storage.INT16_SCALE + 1e-7)
  assert np.abs(crop - source[1234:9234]).max() > 0  # It was quantised.


def test_int16_float_conversions_invert_each_other():
  every = np.arange(-32768, 32768).astype(np.int16)
  as_float = storage.to_float(every)
  assert as_float.dtype == np.float32
  assert as_float[0] == -1.0 and as_float[-1] == 32767 / 32768
  np.testing.assert_array_equal(storage.to_int16(as_float), every)
  row = np.full(len(every) + 2, 7.0, np.float32)
  storage.to_float(every, out=row[1:-1])  # In place, nothing else touched.
  np.testing.assert_array_equal(row[1:-1], as_float)
  assert row[0] == row[-1] == 7.0
  pcm = np.full(len(every) + 2, 7, np.int16)
  storage.to_int16(as_float, out=pcm[1:-1])
  np.testing.assert_array_equal(pcm[1:-1], every)
  assert pcm[0] == pcm[-1] == 7
  # Rounded to the nearest step, clipped at full scale.
  np.testing.assert_array_equal(
      storage.to_int16(np.float32([0.4, 0.6, -1.5, 1.0, 2.0]) / 32768 *
                       np.float32([1, 1, 1, 32768, 32768])),
      [0, 1, -2, 32767, 32767])


def test_alignment_copied(prepared):
  out, report = prepared
  utts = utts_by_id(report.manifest_path)
  rel = "alignments/spk_a/s1/u1.phn.tsv"
  assert utts["spk_a/s1/u1"].alignment == rel
  with open(os.path.join(out, rel)) as f:
    assert f.read() == ALIGNMENT
  assert all(u.alignment == "" for k, u in utts.items() if k != "spk_a/s1/u1")


def test_speaker_disjoint_split(src, prepared, tmp_path):
  out, report = prepared
  utts = manifest_lib.read_manifest(report.manifest_path)
  train = manifest_lib.speakers_of(utts, manifest_lib.TRAIN)
  heldout = manifest_lib.speakers_of(utts, manifest_lib.HELDOUT)
  assert len(heldout) == round(0.4 * 5) == report.num_heldout_speakers
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == manifest_lib.speakers_of(utts)
  # Same seed, same choice; explicit speakers override it.
  assert prepare.choose_heldout(train + heldout, None, 0.4, 0) == set(heldout)
  assert len({frozenset(prepare.choose_heldout(train + heldout, None, 0.4, s))
              for s in range(10)}) > 1
  report2 = prepare.prepare_corpus(
      src, str(tmp_path), heldout_speakers=["spk_c", "spk_z"], num_workers=0,
      progress=False)
  split = {u.speaker: u.split
           for u in manifest_lib.read_manifest(report2.manifest_path)}
  assert split == {"spk_a": "train", "spk_b": "train", "spk_c": "heldout",
                   "spk_d": "train", "spk_e": "train"}
  with pytest.raises(ValueError, match="held-out speakers"):
    prepare.choose_heldout(["a", "b"], ["x"], 0.2, 0)


def _read(path):
  with open(path) as f:
    return f.read()


def test_resume_after_lost_part(src, prepared, tmp_path):
  out, report = prepared
  # Copy the finished output, lose one chunk and the final manifest.
  copy = str(tmp_path / "out")
  shutil.copytree(out, copy)
  os.remove(os.path.join(copy, "parts", "chunk_000002.json"))
  os.remove(os.path.join(copy, "manifest.tsv"))
  again = prepare.prepare_corpus(src, copy, heldout_fraction=0.4, seed=0,
                                 num_workers=0, chunk_size=4, progress=False)
  assert again.num_chunks_reused == report.num_chunks - 1
  assert _read(again.manifest_path) == _read(report.manifest_path)
  for name in ("chunk_000002.npy",):
    assert filecmp.cmp(os.path.join(out, "shards", name),
                       os.path.join(copy, "shards", name), shallow=False)
  # A changed source file invalidates exactly its chunk.
  os.utime(os.path.join(src, "spk_a/s1/u2.wav"), ns=(1, 1))
  third = prepare.prepare_corpus(src, copy, heldout_fraction=0.4, seed=0,
                                 num_workers=0, chunk_size=4, progress=False)
  assert third.num_chunks_reused == report.num_chunks - 1
  assert _read(third.manifest_path) == _read(report.manifest_path)


def test_resume_after_interruption(src, prepared, tmp_path, monkeypatch):
  out, report = prepared
  real, calls = prepare._prepare_chunk, []

  def crash_after_two(job):
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated interruption")
    calls.append(job.index)
    return real(job)

  monkeypatch.setattr(prepare, "_prepare_chunk", crash_after_two)
  run = lambda: prepare.prepare_corpus(  # noqa: E731
      src, str(tmp_path), heldout_fraction=0.4, seed=0, num_workers=0,
      chunk_size=4, progress=False)
  with pytest.raises(KeyboardInterrupt):
    run()
  assert not os.path.exists(tmp_path / "manifest.tsv")
  monkeypatch.setattr(prepare, "_prepare_chunk", real)
  resumed = run()
  assert resumed.num_chunks_reused == 2
  assert _read(resumed.manifest_path) == _read(report.manifest_path)
  assert dataclasses.replace(resumed, num_chunks_reused=0, manifest_path="",
                             skipped_path="") == dataclasses.replace(
                                 report, num_chunks_reused=0, manifest_path="",
                                 skipped_path="")


def test_process_pool_matches_serial(src, prepared, tmp_path):
  out, report = prepared
  par = prepare.prepare_corpus(src, str(tmp_path), heldout_fraction=0.4,
                               seed=0, num_workers=2, chunk_size=4,
                               progress=False)
  assert _read(par.manifest_path) == _read(report.manifest_path)
  assert _read(par.skipped_path) == _read(report.skipped_path)
  for name in sorted(os.listdir(os.path.join(out, "shards"))):
    assert filecmp.cmp(os.path.join(out, "shards", name),
                       os.path.join(tmp_path, "shards", name), shallow=False)


def test_cli(src, tmp_path, capsys):
  from tools import prepare_corpus as cli
  heldout_file = tmp_path / "heldout.txt"
  heldout_file.write_text("# test speakers\nspk_b\n\nspk_e\n")
  report = cli.main(["--src", src, "--out", str(tmp_path / "o"),
                     "--heldout_speakers_file", str(heldout_file),
                     "--workers", "0", "--no_progress", "--bench_reads", "50"])
  printed = capsys.readouterr().out
  assert "8/17 files written" in printed and "crops/s" in printed
  assert report.num_heldout_speakers == 2
  # The entry point parses arguments (a subprocess: spawned imports).
  done = subprocess.run([sys.executable, "-m", "tools.prepare_corpus",
                         "--help"], cwd=REPO, capture_output=True, text=True,
                        check=True)
  assert "--heldout_speakers_file" in done.stdout


def test_empty_source_is_an_error(tmp_path):
  (tmp_path / "src" / "spk" / "sess").mkdir(parents=True)
  with pytest.raises(ValueError, match="No usable audio"):
    prepare.prepare_corpus(str(tmp_path / "src"), str(tmp_path / "out"),
                           num_workers=0, progress=False)


def test_default_corpus_cache(tmp_path, monkeypatch):
  """ensure_default_corpus with a stand-in generator: sizes, split, caching."""
  calls = []

  def fake_generate_corpus(out_root, *, seed, num_speakers, utts_per_speaker,
                           seconds, num_workers=None):
    calls.append((seed, num_speakers, utts_per_speaker, seconds))
    shutil.rmtree(out_root, ignore_errors=True)  # As the real one regenerates.
    for s in range(num_speakers):
      for i in range(utts_per_speaker[0]):
        write(out_root, f"id{s:05d}/sess/u{i}.flac",
              sine(200 + 10 * s + i, seconds[0] / 2, SR))
    # The real generator's speakers.json: the last 2 unseen_variant, 2 held out.
    splits = ([manifest_lib.TRAIN] * (num_speakers - 4)
              + [manifest_lib.HELDOUT] * 2 + [manifest_lib.UNSEEN_VARIANT] * 2)
    with open(os.path.join(out_root, default_corpus.SPEAKERS_FILE), "w") as f:
      json.dump({"speakers": {f"id{s:05d}": {"split": split}
                              for s, split in enumerate(splits)}}, f)
    return out_root

  fake = types.ModuleType("data_pipelines.embedded.generate")
  fake.generate_corpus = fake_generate_corpus
  monkeypatch.setitem(sys.modules, "data_pipelines.embedded.generate", fake)
  monkeypatch.setenv(default_corpus.ROOT_ENV, str(tmp_path))
  path = default_corpus.ensure_default_corpus(size="tiny", num_workers=0)
  assert path == str(tmp_path / "tiny" / "prepared" / "manifest.tsv")
  assert calls == [(0, 10, (6, 6), (2.0, 4.0))]
  utts = manifest_lib.read_manifest(path)
  assert len(utts) == 60
  assert len(manifest_lib.speakers_of(utts, manifest_lib.TRAIN)) == 6
  assert len(manifest_lib.speakers_of(utts, manifest_lib.HELDOUT)) == 2
  assert manifest_lib.speakers_of(utts, manifest_lib.UNSEEN_VARIANT) == [
      "id00008", "id00009"]
  assert default_corpus.ensure_default_corpus(size="tiny") == path
  assert len(calls) == 1  # Cached: no second generation.
  assert "6 speakers, 36 utterances" in default_corpus.summarize(path)
  # Changed size settings rebuild instead of returning a stale corpus.
  monkeypatch.setitem(default_corpus.SIZES, "tiny", dict(
      num_speakers=8, utts_per_speaker=(5, 5), seconds=(2.0, 4.0)))
  assert default_corpus.ensure_default_corpus(size="tiny") == path
  assert len(calls) == 2 and len(manifest_lib.read_manifest(path)) == 40
  with pytest.raises(ValueError, match="tiny"):
    default_corpus.ensure_default_corpus(size="huge")
