"""The Echo model wired to the diarization back-end: checkpoint loading,
window embeddings, chunked speech activity, PLDA caching, diarize_file, the
command-line tools and the blind-DER evaluator. Models are smoke-trained
(a few steps): the tests check behaviour and exact identities, not quality."""

import os

import jax
import ml_collections
import numpy as np
import pytest
import soundfile

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from echo_jax import embed, sharding, trainer
from echo_jax import diarizer as diarizer_lib
from echo_jax.diarization import pipeline, rttm, scoring
from echo_jax.evaluators import diarization_eval
from experiments import stage1_jepa, stage2_speaker
from tools import der_gap
from tools import diarize as diarize_tool
from tools import eval_diarization
from tools import score_rttm
from smoke_configs import smoke

SR = manifest_lib.SAMPLE_RATE


def _smoke(get_config, **overrides):
  # Two steps: behaviour, not quality.
  return smoke(get_config, total_steps=2, **{"checkpoint.every": 2},
               **overrides)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("echo_diar")
  stage1, stage2 = str(root / "stage1"), str(root / "stage2")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer.train(_smoke(stage1_jepa.get_config), stage1, mesh=mesh)
  trainer.train(_smoke(stage2_speaker.get_config,
                       **{"init_from.workdir": stage1}), stage2, mesh=mesh)
  return stage1, stage2


@pytest.fixture(scope="module")
def diarizer(workdirs):
  d = diarizer_lib.EchoDiarizer.from_workdir(workdirs[1])
  d.load_or_fit_plda()
  return d


def _utterance_audio(manifest_path, split, count):
  utts = [u for u in manifest_lib.read_manifest(manifest_path)
          if u.split == split]
  by_speaker = {}
  for u in utts:
    by_speaker.setdefault(u.speaker, u)
  store = storage.AudioStore(manifest_path)
  return [store.read(u) for u in list(by_speaker.values())[:count]]


def _check_segments(segments, duration, file_id):
  assert all(s.file_id == file_id for s in segments)
  assert all(0 <= s.start and s.duration > 0 for s in segments)
  assert all(s.end <= duration + 1e-6 for s in segments)
  # One speaker per frame: no two segments overlap.
  ordered = sorted(segments, key=lambda s: s.start)
  assert all(a.end <= b.start + 1e-6 for a, b in zip(ordered, ordered[1:]))


def test_load_stage_model(workdirs):
  stage1, stage2 = workdirs
  model, params = diarizer_lib.load_stage_model(stage2)
  assert set(params["heads"]) == {"rwse", "speaker", "arcface", "activity"}
  # The tiny corpus has 6 train speakers: the ArcFace classes.
  assert params["heads"]["arcface"]["class_weights"].shape == (
      6, model.speaker_dim)
  with pytest.raises(ValueError, match="stage-2"):
    diarizer_lib.load_stage_model(stage1)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    diarizer_lib.load_stage_model(os.path.join(stage1, "nowhere"))


def test_embed_windows_batches_and_matches_model(diarizer):
  rng = np.random.default_rng(0)
  batch = diarizer.cfg.batch_windows
  windows = 0.1 * rng.standard_normal(
      (batch + 3, diarizer.window_samples)).astype(np.float32)
  emb = diarizer.embed_windows(windows)
  assert emb.shape == (batch + 3, diarizer.model.speaker_dim)
  # Padding rows never leak into real ones; same as the model called directly.
  direct = embed.speaker_embeddings(diarizer.model, diarizer.params,
                                    windows[-3:])
  np.testing.assert_allclose(emb[-3:], np.asarray(direct), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(diarizer.embed_windows(windows[:1]), emb[:1],
                             rtol=1e-4, atol=1e-5)
  assert diarizer.embed_windows(windows[:0]).shape == (0, emb.shape[1])


@pytest.mark.parametrize("num_samples", [4800, "chunk", 30 * SR + 77])
def test_speech_activity_shapes(diarizer, num_samples):
  chunk = diarizer.chunk_samples
  n = chunk if num_samples == "chunk" else num_samples
  wave = 0.1 * np.random.default_rng(1).standard_normal(n).astype(np.float32)
  probs = diarizer.speech_activity(wave)
  assert probs.shape == (n // 160,)
  assert np.all((probs >= 0) & (probs <= 1))
  if n == chunk:  # One chunk: exactly the model's token probs, repeated.
    model = diarizer.model
    feats, _ = model.features(diarizer.params, diarizer.params["encoder"],
                              model.log_mel(wave[None]))
    tokens = jax.nn.sigmoid(model.apply_head("activity", diarizer.params, feats)[..., 0])[0]
    expected = np.repeat(np.asarray(tokens), model.patch_frames)
    np.testing.assert_allclose(probs[:len(expected)], expected, rtol=1e-5,
                               atol=1e-6)
  if n > 2 * chunk:  # Frames before the second chunk come from the first only.
    half = (chunk // 2) // 160
    np.testing.assert_allclose(
        probs[:half], diarizer.speech_activity(wave[:chunk])[:half],
        rtol=1e-5, atol=1e-6)


def test_speech_activity_chunks_hold_only_recording_audio(diarizer,
                                                         monkeypatch):
  # Zeros after a recording's noise make the model call that noise speech,
  # so the last chunk ends at the last whole frame instead of running past
  # it, and only a recording shorter than a chunk is padded (by mirroring).
  chunk = diarizer.chunk_samples
  tokens = chunk // (160 * diarizer.model.patch_frames)
  seen = []

  def fake_speech(params, rows):
    seen.extend(r for r in np.asarray(rows) if r.any())  # Not batch padding.
    return np.zeros((len(rows), tokens), np.float32)

  monkeypatch.setattr(diarizer, "_speech", fake_speech)
  wave = np.random.default_rng(2).uniform(
      0.1, 1.0, 2 * chunk + chunk // 3 + 77).astype(np.float32)
  diarizer.speech_activity(wave)
  starts = []
  for row in seen:
    assert np.all(row != 0), "a chunk holds padding"
    start = int(np.flatnonzero(wave == row[0])[0])
    np.testing.assert_array_equal(row, wave[start:start + chunk])
    starts.append(start)
  assert starts[0] == 0 and all(s % 160 == 0 for s in starts)
  assert starts[-1] + chunk == len(wave) // 160 * 160

  seen.clear()
  short = wave[:chunk // 2 + 5]
  assert diarizer.speech_activity(short).shape == (len(short) // 160,)
  (row,) = seen
  np.testing.assert_array_equal(row, pipeline.pad_to(short, chunk))


def test_pad_to_mirrors_the_end():
  np.testing.assert_array_equal(pipeline.pad_to(np.array([1., 2., 3.]), 7),
                                [1, 2, 3, 2, 1, 2, 3])
  x = np.array([4., 5.])
  assert pipeline.pad_to(x, 2) is x and pipeline.pad_to(x, 1) is x


def test_plda_is_saved_and_reused(diarizer, workdirs):
  path = os.path.join(workdirs[1], diarizer_lib.PLDA_FILE)
  assert os.path.exists(path)
  mtime = os.stat(path).st_mtime_ns
  again = diarizer_lib.EchoDiarizer.from_workdir(workdirs[1])
  plda = again.load_or_fit_plda()
  assert os.stat(path).st_mtime_ns == mtime  # Loaded, not refitted.
  np.testing.assert_array_equal(plda.phi, diarizer.plda.phi)
  # A different fitting recipe does not match the saved record: refitted.
  again.load_or_fit_plda(windows_per_utterance=2)
  assert os.stat(path).st_mtime_ns != mtime


def test_diarize_file_any_rate_silence_and_short(diarizer, tmp_path):
  manifest = diarizer.train_manifest
  a, b = _utterance_audio(manifest, manifest_lib.HELDOUT, 2)
  speech = np.concatenate([a, np.zeros(SR // 2, np.float32), b])
  import librosa
  at_44k = librosa.resample(speech, orig_sr=SR, target_sr=44_100)
  stereo = np.stack([at_44k, at_44k], axis=1)
  cases = {"two speakers": (stereo, 44_100),
           "silent": (np.zeros(3 * SR, np.float32), SR),
           "short": (speech[:int(0.3 * SR)], SR)}
  for name, (audio, rate) in cases.items():
    path = str(tmp_path / f"{name}.wav")
    soundfile.write(path, audio, rate)
    segments = diarizer.diarize_file(path)
    _check_segments(segments, len(audio) / rate, name.replace(" ", "_"))
  with pytest.raises(FileNotFoundError):
    diarizer.diarize_file(str(tmp_path / "missing.wav"))


def test_diarize_tool_writes_rttms_and_counts_failures(diarizer, workdirs,
                                                       tmp_path):
  a, b = _utterance_audio(diarizer.train_manifest, manifest_lib.HELDOUT, 2)
  soundfile.write(str(tmp_path / "a.flac"), a, SR)
  soundfile.write(str(tmp_path / "b.wav"), np.concatenate([a, b]), 22_050)
  (tmp_path / "broken.wav").write_bytes(b"not audio")
  out = tmp_path / "rttm"
  failed = diarize_tool.main([
      "--workdir", workdirs[1], "--out", str(out), "--Fb", "10",
      "--ahc_calibrate", "false", str(tmp_path / "a.flac"),
      str(tmp_path / "b.wav"), str(tmp_path / "missing.wav"),
      str(tmp_path / "broken.wav")])
  assert failed == 2
  assert sorted(os.listdir(out)) == ["a.rttm", "b.rttm"]
  for name, seconds in (("a", len(a) / SR), ("b", (len(a) + len(b)) / SR)):
    lines = (out / f"{name}.rttm").read_text().splitlines()
    assert all(len(l.split()) == 10 and l.startswith(f"SPEAKER {name} 1 ")
               for l in lines)
    segments = rttm.read_rttm(str(out / f"{name}.rttm")).get(name, [])
    _check_segments(segments, seconds, name)
  args = diarize_tool.parse_args(["--workdir", "w", "--out", "o", "x.wav",
                                  "--Fb", "10", "--ahc_calibrate", "false"])
  cfg = diarize_tool.config_from_args(args)
  assert cfg.Fb == 10.0 and cfg.ahc_calibrate is False and cfg.Fa == 0.3


def test_blind_der_and_oracle_activity(diarizer, tmp_path):
  out_dir = str(tmp_path / "eval")
  results = diarization_eval.evaluate_blind_der(
      diarizer, diarizer.train_manifest, num_mixtures=3, seconds=8.0,
      k_min=1, k_max=2, seed=0, out_dir=out_dir)
  # A stage-2 model has no router: no overlap-aware variant.
  assert "overlap_aware" not in results
  for variant in ("blind", "oracle_activity"):
    for collar in (0.0, 0.25):
      r = results[variant][scoring.collar_key(collar)]
      for key in ("der", "missed_rate", "false_alarm_rate", "confusion_rate"):
        assert np.isfinite(r[key]) and r[key] >= 0, (variant, collar, key)
    assert 0 <= results[variant]["count"]["accuracy"] <= 1
    assert results[variant]["count"]["num_files"] == 3
  oracle = results["oracle_activity"][scoring.collar_key(0.0)]
  blind = results["blind"][scoring.collar_key(0.0)]
  # With oracle activity every reference speech frame gets exactly one
  # speaker: no false alarm, and the missed speech is exactly the overlap
  # beyond one speaker.
  assert oracle["false_alarm"] == pytest.approx(0.0, abs=1e-6)
  assert oracle["missed"] == pytest.approx(results["overlap_excess_seconds"],
                                           abs=1e-6)
  assert oracle["total"] == pytest.approx(blind["total"])
  # The reference total is the summed per-speaker activity of the mixtures.
  ref = rttm.read_rttm(os.path.join(out_dir, "reference.rttm"))
  assert blind["total"] == pytest.approx(
      sum(s.duration for segs in ref.values() for s in segs), abs=1e-6)
  # Re-scored from the written files by the scoring tool: same numbers.
  rescored = score_rttm.main([
      "--ref", os.path.join(out_dir, "reference.rttm"),
      "--hyp", os.path.join(out_dir, "blind.rttm"),
      "--uem", os.path.join(out_dir, "all.uem")])
  assert rescored[scoring.collar_key(0.0)]["der"] == pytest.approx(
      blind["der"], abs=1e-3)
  assert os.path.exists(os.path.join(out_dir, "results.json"))
  # The per-mixture parts add up to the pooled numbers, and a run compared
  # with itself differs by nothing.
  per_file = results["blind_per_file_c0"]
  assert len(per_file) == 3
  for part in ("missed", "false_alarm", "confusion", "total"):
    assert sum(f[part] for f in per_file.values()) == pytest.approx(
        blind[part], abs=1e-9)
  assert diarization_eval.der_difference(results, results) == dict(
      difference=0.0, low=0.0, high=0.0)


def _per_file(errors_and_totals):
  return {"blind_per_file_c0": {
      f"mix{i}": dict(missed=e, false_alarm=0.0, confusion=0.0, total=t)
      for i, (e, t) in enumerate(errors_and_totals)}}


def test_der_difference_hand_cases():
  # Every mixture 2 s worse out of 10 s: any resample differs by 0.2.
  base = _per_file([(1.0, 10.0), (4.0, 10.0), (0.0, 10.0)])
  worse = _per_file([(3.0, 10.0), (6.0, 10.0), (2.0, 10.0)])
  d = diarization_eval.der_difference(base, worse)
  assert d["difference"] == pytest.approx(0.2)
  assert d["low"] == pytest.approx(0.2) and d["high"] == pytest.approx(0.2)
  # Two mixtures: pooled difference 7/40 - 4/40. A paired resample is
  # {a, a} (1/4: 8/20 - 2/20 = 0.3), {b, b} (1/4: 0) or one of each
  # (1/2: 0.075), so the 2.5th and 97.5th percentiles are 0 and 0.3.
  base = _per_file([(1.0, 10.0), (3.0, 30.0)])
  other = _per_file([(4.0, 10.0), (3.0, 30.0)])
  d = diarization_eval.der_difference(base, other)
  assert d["difference"] == pytest.approx(0.075)
  assert d["low"] == pytest.approx(0.0) and d["high"] == pytest.approx(0.3)
  with pytest.raises(ValueError, match="same mixtures"):
    diarization_eval.der_difference(base, _per_file([(1.0, 10.0)]))


def test_der_difference_by_noise_kind_splits_the_mixtures():
  base = _per_file([(1.0, 10.0), (1.0, 10.0), (2.0, 10.0), (9.0, 10.0)])
  other = _per_file([(6.0, 10.0), (4.0, 10.0), (2.0, 10.0), (9.0, 10.0)])
  for f, kind in zip(sorted(other["blind_per_file_c0"]),
                     ("babble", "babble", "hum", "hum")):
    other["blind_per_file_c0"][f]["noise_kind"] = kind
  gaps = diarization_eval.der_difference_by_noise_kind(base, other)
  assert list(gaps) == ["babble", "hum"]
  # babble: (6 + 4 - 1 - 1) / 20; hum: nothing changed.
  assert gaps["babble"]["difference"] == pytest.approx(0.4)
  assert gaps["babble"]["num_mixtures"] == 2
  assert gaps["hum"] == dict(difference=0.0, low=0.0, high=0.0,
                             num_mixtures=2)
  assert diarization_eval.der_difference_by_noise_kind(base, base) == {}


def test_evaluator_interface_and_eval_tool(diarizer, workdirs, tmp_path):
  config = ml_collections.ConfigDict(dict(
      type="diarization", every=5, num_mixtures=2, seconds=6.0,
      chunk_seconds=2.0, k_min=1, k_max=2, plda_windows_per_utterance=2,
      plda_max_utterances_per_speaker=3, diarization=dict(Fb=12.0)))
  evaluator = diarization_eval.DiarizationEvaluator(
      "diar", config, diarizer.model, diarizer.train_manifest, seed=0)
  assert evaluator.name == "diar" and evaluator.every == 5
  metrics = evaluator.run(diarizer.model, {"params": diarizer.params})
  assert metrics and all(k.startswith("diar/") for k in metrics)
  assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
  assert metrics["diar/oracle_activity_c0_false_alarm"] == pytest.approx(
      0.0, abs=1e-9)

  json_path = str(tmp_path / "out.json")
  results = eval_diarization.main([
      "--workdir", workdirs[1], "--num_mixtures", "2", "--seconds", "6",
      "--k_max", "2", "--json", json_path])
  assert os.path.exists(json_path) and results["num_mixtures"] == 2
  noisy_path = str(tmp_path / "snr0.json")
  noisy = eval_diarization.main([
      "--workdir", workdirs[1], "--num_mixtures", "2", "--seconds", "6",
      "--k_max", "2", "--condition", "snr0", "--json", noisy_path])
  # The same mixtures under noise, scored against the same clean reference.
  assert noisy["condition"] == "snr0" and results["condition"] == "clean"
  assert noisy["blind"]["collar_0.00"]["total"] == pytest.approx(
      results["blind"]["collar_0.00"]["total"])
  # The gap between them, overall and per kind of noise added.
  gaps = der_gap.main([json_path, noisy_path])
  kinds = [r["noise_kind"] for r in noisy["blind_per_file_c0"].values()]
  assert sum(g["num_mixtures"] for g in gaps["by_noise_kind"].values()) == 2
  assert sorted(gaps["by_noise_kind"]) == sorted(set(kinds))
  assert gaps["all"]["difference"] == pytest.approx(
      noisy["blind"]["collar_0.00"]["der"]
      - results["blind"]["collar_0.00"]["der"], abs=1e-9)


def test_fill_short_pauses_hand_case():
  row = np.array([0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0], np.float32)
  silent = np.zeros(12, np.float32)
  filled = pipeline.fill_short_pauses(np.stack([row, silent]), 3)
  # The 2-frame pause is filled, the 4-frame one kept; edges stay silent.
  np.testing.assert_array_equal(
      filled[0], [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(filled[1], silent)
