"""Fault injection, trainer side: a failed save stops the run at once with one
line and no partial folder; SIGTERM exits distinctly; a workdir takes one
trainer; a changed config on resume warns; impossible counts fail; resumed
steps are logged once."""

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import grain
import jax
import pytest

from echo_jax import checkpointing, main as main_lib, metric_writer, sharding
from echo_jax import trainer
from experiments import stage1_jepa
from smoke_configs import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**overrides):
  return smoke(stage1_jepa.get_config, **overrides)


def one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def logged_steps(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["step"] for r in rows if "train/loss" in r]


def test_disk_full_during_save_stops_at_once(tmp_path, monkeypatch):
  real_save = grain.checkpoint.CheckpointHandler.save

  def full_disk(self, directory, *args, **kwargs):
    if re.search(r"/6(\.|/)", str(directory)):  # The step-6 save.
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, directory, *args, **kwargs)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full_disk)
  workdir = str(tmp_path)
  with pytest.raises(checkpointing.CheckpointSaveError) as info:
    trainer.train(config(total_steps=20, **{"checkpoint.every": 3}), workdir,
                  mesh=one_device_mesh())
  message = str(info.value)
  assert "\n" not in message
  assert "disk full" in message and "(step 3) is intact" in message
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpointing.committed_steps(ckpt_dir)[-1] == 3
  assert not [p for p in os.listdir(ckpt_dir) if "tmp" in p]
  assert max(logged_steps(workdir)) <= 7  # Stopped at once, not 10 later.
  state, _, step = checkpointing.load_state(workdir)
  assert step == 3


def test_preempted_run_raises_and_main_exits_distinctly(monkeypatch):
  def preempted(config, workdir):
    raise trainer.Preempted(4, 6)

  monkeypatch.setattr(trainer, "train", preempted)
  for flag, value in (("_CONFIG", None), ("_WORKDIR", "x"),
                      ("_DISTRIBUTED", False)):
    monkeypatch.setattr(main_lib, flag, type("Flag", (), {"value": value}))
  with pytest.raises(SystemExit) as info:
    main_lib.main([])
  assert info.value.code == trainer.EXIT_PREEMPTED != 0


def test_second_sigterm_says_nothing_was_saved():
  script = textwrap.dedent("""
      import os, signal, time
      from echo_jax import preemption
      with preemption.Preemption() as p:
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
      """)
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == -15
  assert "not saved" in done.stderr


def test_one_trainer_per_workdir(tmp_path):
  with checkpointing.workdir_lock(str(tmp_path)):
    with pytest.raises(RuntimeError, match="Another trainer"):
      trainer.train(config(total_steps=1), str(tmp_path),
                    mesh=one_device_mesh())
  trainer.train(config(total_steps=1), str(tmp_path), mesh=one_device_mesh())


@pytest.mark.parametrize("field,value", [("total_steps", -5),
                                         ("log_every", 0),
                                         ("checkpoint.every", 0)])
def test_impossible_counts_fail(tmp_path, field, value):
  with pytest.raises(ValueError, match=f"config.{field}"):
    trainer.train(config(**{field: value}), str(tmp_path))


def test_resume_warns_on_changed_config_and_logs_steps_once(tmp_path, caplog):
  workdir = str(tmp_path)
  trainer.train(config(total_steps=6, **{"checkpoint.every": 3}), workdir,
                mesh=one_device_mesh())
  # A crash after step 3: the step-6 checkpoint is gone, its rows are not.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  with caplog.at_level(logging.WARNING):
    trainer.train(config(total_steps=7, **{"checkpoint.every": 3,
                                           "optim.lr": 5e-4}),
                  workdir, mesh=one_device_mesh())
  warning = " ".join(r.getMessage() for r in caplog.records
                     if "differs from the saved" in r.getMessage())
  assert "optim.lr" in warning and "total_steps: 6 -> 7" in warning
  assert logged_steps(workdir) == list(range(1, 8))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(r["data/skipped_utterances"] == 0 for r in rows
             if "train/loss" in r)


def test_drop_rows_after_handles_a_torn_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
  assert metric_writer.drop_rows_after(str(path), 2) == 2
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
