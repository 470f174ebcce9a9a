"""tools/evaluate.py: DER of hand-made RTTMs equals the DER computed by hand;
speaker ID on a VoxCeleb-layout folder and DER of the model's own hypotheses
run end to end on a smoke checkpoint."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import soundfile

from data_pipelines import default_corpus
from data_pipelines import manifest as manifest_lib
from echo_jax import sharding, trainer
from echo_jax.diarization import rttm
from experiments import stage2_speaker
from smoke_configs import smoke
from tools import evaluate


def _write_rttm(path, rows):
  rttm.write_rttm(path, [rttm.Segment(f, a, b - a, s) for f, a, b, s in rows])


@pytest.fixture()
def hand_made(tmp_path):
  """Two files; times chosen so the errors are whole or quarter seconds.

  a (scored 0-10 s): ref alice 0-4, bob 4-8; hyp X 0-3, Y 4-6, X 6-8, Y 9-10.
    X maps to alice (3 s overlap vs 2), Y to bob. Collar 0: missed 3-4 (1 s),
    false alarm 9-10 (1 s), confusion 6-8 (2 s) of 8 s: DER 4 / 8.
    Collar 0.25 s each side of 0, 4, 8: reference 3.5 + 3.5 s; missed
    3-3.75, false alarm 9-10, confusion 6-7.75: (0.75 + 1 + 1.75) / 7.
  b (scored 0-6 s): ref carol 0-5; hyp Z 0.1-5. Collar 0: missed 0.1 of 5.
    Collar 0.25: the miss is inside the collar, 4.5 s scored, no error.
  """
  ref, hyp, uem = (tmp_path / d for d in ("ref", "hyp", "uem"))
  for d in (ref, hyp, uem):
    d.mkdir()
  _write_rttm(str(ref / "a.rttm"), [("a", 0, 4, "alice"), ("a", 4, 8, "bob")])
  _write_rttm(str(ref / "b.rttm"), [("b", 0, 5, "carol")])
  _write_rttm(str(hyp / "all.rttm"), [
      ("a", 0, 3, "X"), ("a", 4, 6, "Y"), ("a", 6, 8, "X"), ("a", 9, 10, "Y"),
      ("b", 0.1, 5, "Z")])
  (uem / "all.uem").write_text("a 1 0.0 10.0\nb 1 0.0 6.0\n")
  return str(ref), str(hyp), str(uem)


def test_der_of_hand_made_rttms(hand_made, tmp_path):
  ref, hyp, uem = hand_made
  out = str(tmp_path / "der.json")
  results = evaluate.main(["--rttm_dir", ref, "--hyp_rttm_dir", hyp,
                           "--uem_dir", uem, "--json", out])
  der = results["diarization"]
  a, b = der["per_file"]["a"], der["per_file"]["b"]
  assert a["collar_0.00"]["missed"] == pytest.approx(1.0)
  assert a["collar_0.00"]["false_alarm"] == pytest.approx(1.0)
  assert a["collar_0.00"]["confusion"] == pytest.approx(2.0)
  assert a["collar_0.00"]["der"] == pytest.approx(4 / 8)
  assert a["collar_0.25"]["der"] == pytest.approx((0.75 + 1 + 1.75) / 7)
  assert b["collar_0.00"]["der"] == pytest.approx(0.1 / 5)
  assert b["collar_0.25"]["der"] == pytest.approx(0.0, abs=1e-9)
  assert der["collar_0.00"]["der"] == pytest.approx((4 + 0.1) / (8 + 5))
  assert der["collar_0.25"]["der"] == pytest.approx(3.5 / (7 + 4.5))
  assert der["count"]["accuracy"] == 1.0 and der["num_files"] == 2
  with open(out) as f:
    assert json.load(f)["diarization"]["collar_0.25"]["der"] == pytest.approx(
        3.5 / 11.5)


def test_arguments_say_what_is_missing(hand_made):
  ref, _, _ = hand_made
  with pytest.raises(SystemExit):
    evaluate.main([])                                # Nothing to evaluate.
  with pytest.raises(SystemExit):
    evaluate.main(["--rttm_dir", ref])               # No audio, no hypothesis.
  with pytest.raises(SystemExit):
    evaluate.main(["--voxceleb", ref])               # No workdir.


@pytest.fixture(scope="module")
def smoke_stage2(tmp_path_factory):
  """A 2-step stage-2 run from scratch (speaker projection and diarization
  heads), on one device."""
  workdir = str(tmp_path_factory.mktemp("evaluate") / "stage2")
  config = smoke(stage2_speaker.get_config, total_steps=2,
                 **{"checkpoint.every": 2, "init_from.workdir": ""})
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer.train(config, workdir, mesh=mesh)
  return workdir


def _tiny_utterances(speakers: int):
  manifest = default_corpus.ensure_default_corpus(size="tiny")
  utts = manifest_lib.read_manifest(manifest)
  chosen = sorted({u.speaker for u in utts})[:speakers]
  return [u for u in utts if u.speaker in chosen]


def test_speaker_id_on_a_voxceleb_folder(smoke_stage2, tmp_path):
  root = tmp_path / "vox"
  utts = _tiny_utterances(3)
  for u in utts:
    folder = root / u.speaker / u.session
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(u.source_path, folder / os.path.basename(u.source_path))
  # One file as an 8 kHz stereo wav: read, downmixed and resampled.
  audio, rate = soundfile.read(utts[0].source_path, dtype="float32")
  soundfile.write(str(root / utts[0].speaker / utts[0].session / "x.wav"),
                  np.stack([audio[::2], audio[::2]], axis=1), rate // 2)
  out = str(tmp_path / "speaker.json")
  results = evaluate.main(["--workdir", smoke_stage2, "--voxceleb",
                           str(root), "--json", out])
  speaker = results["speaker"]
  assert speaker["num_files"] == len(utts) + 1 and speaker["num_speakers"] == 3
  assert len(speaker["layers"]) == 2                 # The smoke encoder depth.
  for r in speaker["layers"] + [speaker["projection"]]:
    assert 0 <= r["top1"] <= 1 and 0 <= r["eer"] <= 1
  assert results["step"] == 2 and os.path.exists(out)


def test_der_of_the_model_on_audio_files(smoke_stage2, tmp_path):
  utt = _tiny_utterances(1)[0]
  audio_dir, ref_dir, hyp_out = (tmp_path / d for d in ("audio", "ref", "hyp"))
  audio_dir.mkdir()
  ref_dir.mkdir()
  shutil.copy(utt.source_path, audio_dir / "rec1.flac")
  _write_rttm(str(ref_dir / "rec1.rttm"),
              [("rec1", 0.0, utt.duration, utt.speaker)])
  results = evaluate.main(["--workdir", smoke_stage2, "--rttm_dir",
                           str(ref_dir), "--audio_dir", str(audio_dir),
                           "--hyp_out", str(hyp_out)])
  der = results["diarization"]
  assert list(der["per_file"]) == ["rec1"]
  assert np.isfinite(der["collar_0.00"]["der"])
  assert os.path.exists(hyp_out / "rec1.rttm")
  with pytest.raises(FileNotFoundError, match="No audio"):
    evaluate.audio_for(str(audio_dir), ["rec2"])
