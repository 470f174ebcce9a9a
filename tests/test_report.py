"""The stack runner and its report. A smoke stack run (every stage, trained
in-process for two steps) is evaluated and reported: index.html shows every
plot file it wrote. A rerun skips finished stages and cached evaluations; a
failed or preempted stage stops the stack with its status and names its log."""

import functools
import json
import logging
import os
import re

import jax
import pytest

from echo_jax import sharding
from echo_jax.report import evaluations
from echo_jax.report import stages as stages_lib
from tools import stack

# Two steps per stage: plumbing, not quality.
OVERRIDES = ("--config.total_steps=2", "--config.checkpoint.every=2")


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory):
  runs = str(tmp_path_factory.mktemp("stack") / "runs")
  # One device: compiling for the 8 simulated ones is slower, and the
  # stack's plumbing is what is tested here.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  status = stack.run_stack(
      "smoke", runs, overrides=OVERRIDES,
      runner=functools.partial(stack.run_stage_in_process, mesh=mesh))
  return runs, status


def test_report_shows_every_plot(stack_run, capsys):
  runs, status = stack_run
  assert status == 0
  report = os.path.join(runs, "report")
  page = open(os.path.join(report, "index.html")).read()
  shown = re.findall(r'<img src="([^"]+)"', page)
  written = sorted(f for f in os.listdir(report) if f.endswith(".png"))
  assert sorted(shown) == written
  assert {"loss_stage1_jepa.png", "loss_stage2_speaker.png",
          "latent_stage1_jepa.png", "latent_stage2_speaker.png",
          "diarization_timeline.png"} <= set(written)
  for name in written:
    with open(os.path.join(report, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  # Stage 2's table compares it with stage 1 and the random floor.
  assert "Random floor" in page and "stage1_jepa</th>" in page
  assert "speaker projection" in page and "class='error'" not in page
  assert "blind" in page and "oracle_activity" in page


def test_every_stage_trained_and_evaluated(stack_run):
  runs, _ = stack_run
  discovered = stages_lib.discover(stack.EXPERIMENTS)
  for stage in discovered:
    assert stages_lib.latest_step(stage.workdir(runs)) == 2
  with open(os.path.join(runs, "diarization", evaluations.RECORD)) as f:
    record = json.load(f)
  # The last stage that can diarize (stage 4 keeps stage 2's heads).
  assert record["stage"] == discovered[-1].name and record["key"]["step"] == 2


def test_rerun_skips_finished_stages_and_cached_evaluations(stack_run):
  runs, _ = stack_run
  discovered = stages_lib.discover(stack.EXPERIMENTS)
  called = []
  status = stack.train_stages("smoke", runs, discovered, OVERRIDES,
                              lambda *args: called.append(args) or 0, {})
  assert status == 0 and called == []
  record_path = os.path.join(runs, "diarization", evaluations.RECORD)
  before = os.path.getmtime(record_path)
  trained = [stages_lib.StageRun.read(
      s, runs, stages_lib.load_config(s, "smoke", OVERRIDES))
             for s in discovered]
  records = evaluations.run_all(trained, runs, "smoke")
  assert os.path.getmtime(record_path) == before
  assert records["diarization"]["key"]["step"] == 2


def test_a_new_diarization_revision_redoes_the_record(stack_run, monkeypatch):
  runs, _ = stack_run
  trained = [stages_lib.StageRun.read(
      s, runs, stages_lib.load_config(s, "smoke", OVERRIDES))
             for s in stages_lib.discover(stack.EXPERIMENTS)]
  revision = evaluations.DIARIZATION_REVISION + 1
  monkeypatch.setattr(evaluations, "DIARIZATION_REVISION", revision)
  records = evaluations.run_all(trained, runs, "smoke")
  assert records["diarization"]["key"]["revision"] == revision
  with open(os.path.join(runs, "diarization", evaluations.RECORD)) as f:
    assert json.load(f)["key"]["revision"] == revision


def test_failed_stage_stops_the_stack(tmp_path, caplog):
  runs = str(tmp_path / "runs")
  # An impossible batch size fails in the trainer's config check, at once.
  with caplog.at_level(logging.ERROR, logger="tools.stack"):
    status = stack.run_stack("smoke", runs,
                             overrides=("--config.data.batch_size=0",),
                             runner=stack.run_stage_in_process)
  assert status == 1
  log_path = os.path.join(runs, "logs", "stage1_jepa.log")
  assert "config.data.batch_size=0" in open(log_path).read()
  assert "stage1_jepa failed (exit status 1)" in caplog.text
  assert log_path in caplog.text
  assert not os.path.exists(os.path.join(runs, "stage2"))
  assert not os.path.exists(os.path.join(runs, "report"))


def test_preempted_stage_exits_75(tmp_path, caplog):
  ran = []

  def preempted(stage, *_):
    ran.append(stage.name)
    return 75

  with caplog.at_level(logging.WARNING, logger="tools.stack"):
    status = stack.run_stack("smoke", str(tmp_path), runner=preempted)
  assert status == 75 and ran == ["stage1_jepa"]
  assert "rerun the same command to resume" in caplog.text


def test_overrides_go_to_the_stages_that_have_the_field(tmp_path):
  stage1, stage2 = stages_lib.discover(stack.EXPERIMENTS)[:2]
  both = ["--config.optim.lr=0.1", "--config.objective.activity.weight=0.5"]
  assert stages_lib.stage_overrides(stage1, "smoke", both) == both[:1]
  assert stages_lib.stage_overrides(stage2, "smoke", both) == both
  assert stages_lib.load_config(
      stage2, "smoke", both).objective.activity.weight == 0.5
  # A field no selected stage has is a mistake, not a no-op.
  with pytest.raises(ValueError, match="objective.activity.weight"):
    stack.run_stack("smoke", str(tmp_path / "runs"), stage_numbers=[1],
                    overrides=both[1:], runner=lambda *a: 0)


def test_stage_arguments_must_be_config_overrides():
  args, overrides = stack.parse_args(["--variant", "smoke",
                                      "--config.optim.lr=0.1"])
  assert args.variant == "smoke" and overrides == ["--config.optim.lr=0.1"]
  with pytest.raises(SystemExit):
    stack.parse_args(["--bogus=1"])
  with pytest.raises(ValueError, match="no such stage"):
    stack.run_stack("smoke", "unused", stage_numbers=[9])


def test_subprocess_stage_failure_propagates(tmp_path, capsys):
  # The default runner: `python -m echo_jax.main` fails its config check.
  runs = str(tmp_path / "runs")
  status = stack.run_stack("smoke", runs,
                           overrides=("--config.data.batch_size=0",))
  assert status == 1
  log = open(os.path.join(runs, "logs", "stage1_jepa.log")).read()
  assert "echo_jax.main" in log and "config.data.batch_size=0" in log


def test_console_shows_losses_and_warnings_not_the_config():
  prefix = "I1127 13:36:26.593754 140157230226304 metric_writer.py:67] "
  assert stack.console_line(
      prefix + "step 25: jepa/loss=0.4 train/loss=0.7 perf/steps_per_s=2\n"
  ) == "step 25: train/loss=0.7 perf/steps_per_s=2"
  assert stack.console_line(
      prefix + "step 50: speaker/target_L0_top1=0.9 speaker/target_best_top1"
      "=0.95\n") == "step 50: speaker/target_best_top1=0.95"
  assert stack.console_line(prefix.replace("I", "W", 1) + "disk slow") == (
      "W disk slow")
  assert stack.console_line("  batch_size: 8\n") is None
  assert stack.console_line(prefix + "Config:") is None


def test_der_table_of_a_model_without_router():
  # Stages 1-2 only: the diarization evaluation has no overlap-aware path.
  from echo_jax.diarization import scoring
  from echo_jax.report import timeline
  cell = dict(der=0.25, missed_rate=0.1, false_alarm_rate=0.05,
              confusion_rate=0.1)
  results = {v: {scoring.collar_key(0.0): cell, scoring.collar_key(0.25): cell,
                 "count": {"accuracy": 0.5}}
             for v in ("blind", "oracle_activity")}
  table = timeline.der_table(results)
  assert table.count("<td>blind</td>") == 2
  assert "overlap_aware" not in table and "25.0%" in table


def test_condition_summary_gives_each_gap_with_its_interval():
  by_condition = {"clean": {"der/blind_c0_der": 0.368},
                  "snr10": {"der/blind_c0_der": 0.431}}
  gaps = {"snr10": dict(difference=0.063, low=0.041, high=0.086)}
  line = evaluations.condition_summary(by_condition, gaps)
  assert line.endswith("clean 36.8%, snr10 43.1% (+6.3 [+4.1, +8.6])")
  kinds = {"snr10": {"babble": dict(difference=0.15, low=0.1, high=0.2,
                                    num_mixtures=3),
                     "hum": dict(difference=0.001, low=-0.01, high=0.02,
                                 num_mixtures=2)}}
  line = evaluations.condition_summary(by_condition, gaps, kinds)
  assert line.endswith("snr10 43.1% (+6.3 [+4.1, +8.6]; babble (3) +15.0 "
                       "[+10.0, +20.0]; hum (2) +0.1 [-1.0, +2.0])")
