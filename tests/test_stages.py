"""Stage chaining: stage 2 starts from a real stage-1 checkpoint, keeps the
JEPA term on, trains the speaker head and reports all speaker evaluations."""

import json
import os

import jax
import numpy as np
import pytest

from echo_jax import checkpointing, trainer
from experiments import stage1_jepa, stage2_speaker
from smoke_configs import smoke


@pytest.fixture(scope="module")
def stage1_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("runs") / "stage1")
  trainer.train(smoke(stage1_jepa.get_config), workdir)
  return workdir


def test_stage2_chains_from_stage1(stage1_workdir, monkeypatch, tmp_path):
  stage1_state, _, _ = checkpointing.load_state(stage1_workdir)
  # Nothing moves with lr 0: the restored trees must match. The default
  # init_from finds stage 1 beside this workdir, whatever the current dir.
  config = smoke(stage2_speaker.get_config, **{"optim.lr": 0.0})
  assert config.init_from.workdir == "{parent}/stage1"
  workdir = os.path.join(os.path.dirname(stage1_workdir), "stage2")
  monkeypatch.chdir(tmp_path)
  config.evals = stage2_speaker.get_config("smoke").evals
  final = trainer.train(config, workdir)

  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == config.total_steps
  for r in train_rows:  # JEPA is still computed and logged next to ArcFace.
    assert np.isfinite(r["jepa/loss"]) and r["jepa/loss"] > 0
    assert np.isfinite(r["arcface/loss"]) and r["arcface/loss"] > 0
    np.testing.assert_allclose(
        r["train/loss"], 0.5 * r["jepa/total"] + 0.5 * r["crop/total"]
        + r["arcface/loss"]
        + config.objective.activity.weight * r["activity/loss"], rtol=1e-5)
  margins = [r["arcface/margin"] for r in train_rows]
  assert margins[0] == 0.0 and margins[-1] == pytest.approx(0.2)
  # Evaluations of all three encoders are reported.
  for key in ("speaker/projection_top1", "speaker/projection_eer",
              "speaker/target_best_top1", "speaker/random_best_top1",
              "speaker/mfcc_top1", "speaker/mfcc_eer"):
    assert 0.0 <= final[key] <= 1.0
  # And under the conditions, beside both floors, at the end.
  for condition in ("clean", "snr10"):
    for system in ("projection", "random", "mfcc"):
      for what in ("top1", "eer"):
        assert 0.0 <= final[f"robustness/heldout/{condition}/{system}_{what}"
                           ] <= 1.0
  assert 0.0 <= final["robustness/noise_false_alarm"] <= 1.0

  stage2_state, _, _ = checkpointing.load_state(workdir)
  for tree in ("encoder", "predictor"):
    jax.tree.map(np.testing.assert_array_equal, stage1_state["params"][tree],
                 stage2_state["params"][tree])
  assert set(stage2_state["params"]["heads"]) == {"rwse", "speaker", "arcface",
                                                  "activity"}


def test_stage2_without_stage1_checkpoint_fails(tmp_path):
  config = smoke(stage2_speaker.get_config)
  with pytest.raises(FileNotFoundError, match="Run the previous stage"):
    trainer.train(config, str(tmp_path / "stage2"))


def test_stage2_checkpoint_restores_into_a_later_stage(stage1_workdir,
                                                       tmp_path):
  """A later stage reads stage 2's heads by name through init_from.trees."""
  runs = os.path.dirname(stage1_workdir)
  stage2 = os.path.join(runs, "stage2_for_later")
  trainer.train(smoke(stage2_speaker.get_config, total_steps=2,
                      **{"init_from.workdir": stage1_workdir}), stage2)
  saved, _, _ = checkpointing.load_state(stage2)
  heads = ("rwse", "speaker", "arcface", "activity")
  later = smoke(stage2_speaker.get_config, total_steps=1, **{
      "optim.lr": 0.0, "init_from.workdir": stage2,
      "init_from.trees": ("params/encoder", "target") + tuple(
          f"params/heads/{h}" for h in heads)})
  workdir = str(tmp_path / "later")
  trainer.train(later, workdir)
  restored, _, _ = checkpointing.load_state(workdir)
  for h in heads:
    jax.tree.map(np.testing.assert_array_equal, saved["params"]["heads"][h],
                 restored["params"]["heads"][h])
