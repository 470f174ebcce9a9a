"""Stage 4 chains from a real stage-2 checkpoint (restoring the encoder, EMA,
predictor and the stage-2 heads by name), trains the router next to JEPA,
and its evaluators run: routing (count / PIT / SI-SDR) and the diarization
evaluator with the overlap-aware path next to the VBx one. Smoke-sized:
behaviour, not quality."""

import json
import os

import jax
import numpy as np
import pytest

from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures, stream
from echo_jax import checkpointing, sharding, trainer
from echo_jax import diarizer as diarizer_lib
from echo_jax.diarization import scoring
from echo_jax.evaluators import diarization_eval
from experiments import stage1_jepa, stage2_speaker, stage4_routing
from smoke_configs import smoke
from tools import diarize as diarize_tool


def _smoke(get_config, **overrides):
  config = smoke(get_config, total_steps=2, **{"checkpoint.every": 2},
                 **overrides)
  if "augment" in config.data:  # Rooms and noise are not what this checks.
    with config.unlocked():
      config.data.augment.enabled = False
  return config


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mesh):
  root = tmp_path_factory.mktemp("stage4")
  stage1, stage2 = str(root / "stage1"), str(root / "stage2")
  trainer.train(_smoke(stage1_jepa.get_config), stage1, mesh=mesh)
  trainer.train(_smoke(stage2_speaker.get_config,
                       **{"init_from.workdir": stage1}), stage2, mesh=mesh)
  return root, stage2


@pytest.fixture(scope="module")
def stage4(runs, mesh):
  root, stage2 = runs
  config = _smoke(stage4_routing.get_config,
                  **{"init_from.workdir": stage2, "optim.lr": 0.0})
  routing = stage4_routing.get_config("smoke").evals.routing.to_dict()
  routing["json"] = str(root / "routing.json")
  with config.unlocked():
    config.evals = {"routing": routing}
  workdir = str(root / "stage4")
  final = trainer.train(config, workdir, mesh=mesh)
  return workdir, config, final


def test_default_init_from_is_stage3():
  config = stage4_routing.get_config("smoke")
  assert config.init_from.workdir == "{parent}/stage3"
  assert config.model.router.num_slots == config.data.k_max + 1


def test_stage4_chains_from_stage2(runs, stage4):
  root, stage2 = runs
  workdir, config, final = stage4
  before, _, _ = checkpointing.load_state(stage2)
  after, _, _ = checkpointing.load_state(workdir)
  # lr 0: every restored tree is exactly stage 2's.
  for tree in ("encoder", "predictor"):
    jax.tree.map(np.testing.assert_array_equal, before["params"][tree],
                 after["params"][tree])
  for head in ("rwse", "speaker", "activity"):
    jax.tree.map(np.testing.assert_array_equal, before["params"]["heads"][head],
                 after["params"]["heads"][head])
  assert set(after["params"]["heads"]) == {"rwse", "speaker", "activity",
                                           "router"}
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == config.total_steps
  for r in train_rows:
    assert np.isfinite(r["routing/loss"]) and r["routing/loss"] > 0
    np.testing.assert_allclose(
        r["train/loss"], 0.5 * r["jepa/total"] + 0.5 * r["crop/total"]
        + 1.0 * r["activity/loss"]  # Stage 2's activity weight, kept.
        + r["routing/loss"], rtol=1e-5)
  for key in ("count_accuracy", "pit_accuracy", "baseline_pit_accuracy"):
    assert 0.0 <= final[f"routing/{key}"] <= 1.0
  assert np.isfinite(final["routing/si_sdr"])
  assert np.isfinite(final["routing/baseline_si_sdr"])
  # The residual router's corrections start at zero (lr 0 keeps them there),
  # so its slots are the EMA encoder's mixture latent: the baseline exactly.
  assert config.model.router.residual_layers > 0
  np.testing.assert_allclose(final["routing/si_sdr"],
                             final["routing/baseline_si_sdr"], rtol=1e-4)
  with open(root / "routing.json") as f:
    results = json.load(f)
  # K is capped by the tiny corpus's held-out speakers; S = k_max + 1 slots.
  heldout = mixtures.num_speakers(stream.resolve_manifest(config.data),
                                  manifest_lib.HELDOUT)
  assert results["k_max"] == min(config.data.k_max, heldout)
  assert np.array(results["count"]["confusion"]).shape == (
      results["k_max"] + 1, config.data.k_max + 2)
  assert np.array(results["count"]["confusion"]).sum() == (
      config.evals.routing.num_mixtures)


def test_overlap_aware_diarization_of_stage4(stage4, tmp_path):
  workdir, _, _ = stage4
  diarizer = diarizer_lib.EchoDiarizer.from_workdir(workdir)
  assert diarizer.has_router
  diarizer.fit_plda(windows_per_utterance=1, max_utterances_per_speaker=3,
                    save=False)
  results = diarization_eval.evaluate_blind_der(
      diarizer, diarizer.train_manifest, num_mixtures=2, seconds=4.0,
      k_max=2, out_dir=str(tmp_path))
  for variant in ("blind", "oracle_activity", "overlap_aware"):
    assert 0.0 <= results[variant][scoring.collar_key(0.0)]["missed_rate"]
  flat = diarization_eval.flat_metrics(results, "d")
  assert "d/overlap_aware_c0_der" in flat
  assert "overlap_aware" in diarization_eval.format_report(results)
  assert os.path.exists(tmp_path / "overlap_aware.rttm")
  # The tool's switch: the overlap path on a stage-4 model.
  wav = tmp_path / "a.wav"
  import soundfile
  soundfile.write(wav, np.random.default_rng(0).normal(
      0, 0.05, 16000 * 5).astype(np.float32), 16000)
  out = tmp_path / "rttm"
  assert diarize_tool.main(["--workdir", workdir, "--out", str(out),
                            "--method", "overlap", str(wav)]) == 0
  assert os.path.exists(out / "a.rttm")


def test_overlap_path_needs_a_router(runs, tmp_path):
  _, stage2 = runs
  diarizer = diarizer_lib.EchoDiarizer.from_workdir(stage2)
  assert not diarizer.has_router
  with pytest.raises(ValueError, match="router"):
    diarizer.route_windows(np.zeros((1, 16000), np.float32))
  with pytest.raises(SystemExit, match="router"):
    diarize_tool.main(["--workdir", stage2, "--out", str(tmp_path),
                       "--method", "overlap", str(tmp_path / "a.wav")])
  # A stage-2 model is evaluated on the VBx path only, as before.
  diarizer.fit_plda(windows_per_utterance=1, max_utterances_per_speaker=3,
                    save=False)
  results = diarization_eval.evaluate_blind_der(
      diarizer, diarizer.train_manifest, num_mixtures=1, seconds=4.0,
      k_max=2)
  assert "overlap_aware" not in results and "blind" in results
  assert "overlap_aware" not in diarization_eval.format_report(results)
