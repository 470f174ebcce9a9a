"""The one trainer on the smoke config: learning, sharding, resume, init_from
and NaN handling. Uses the tiny embedded corpus (built once, cached)."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax import checkpointing, losses, sharding, trainer
from echo_jax.model import build_model, clip_samples
from experiments import stage1_jepa
from smoke_configs import smoke


def smoke_config(**overrides):
  return smoke(stage1_jepa.get_config, **overrides)


def read_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def test_loss_decreases(tmp_path):
  config = smoke_config(total_steps=40, **{"optim.lr": 3e-3,
                                           "checkpoint.every": 100})
  trainer.train(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  rows = {r["step"]: r for r in rows if "train/loss" in r}
  # The cross-crop term's own MSE need not fall in 40 steps (SIGReg spreads
  # the embeddings it compares); the masked prediction and the total must.
  for key, factor in (("jepa/loss", 0.7), ("train/loss", 0.9)):
    first = np.mean([rows[s][key] for s in range(1, 6)])
    last = np.mean([rows[s][key] for s in range(36, 41)])
    assert last < factor * first, (key, first, last)


def test_sharded_equals_unsharded(tmp_path):
  config = smoke_config(total_steps=3)
  trainer.train(config, str(tmp_path / "one"), mesh=one_device_mesh())
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  assert mesh.devices.shape == (2, 4)
  trainer.train(config, str(tmp_path / "eight"), mesh=mesh)
  one, eight = read_losses(str(tmp_path / "one")), read_losses(
      str(tmp_path / "eight"))
  assert one.keys() == eight.keys() == {1, 2, 3}
  np.testing.assert_allclose([one[s] for s in one], [eight[s] for s in one],
                             rtol=2e-4)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_resume_continues_exactly(tmp_path, mesh_shape):
  def mesh():
    data, fsdp = mesh_shape
    return sharding.make_mesh({"data": data, "fsdp": fsdp},
                              devices=jax.devices()[:data * fsdp])
  config = smoke_config(total_steps=6, **{"checkpoint.every": 3})
  workdir = str(tmp_path)
  trainer.train(config, workdir, mesh=mesh())
  uninterrupted = read_losses(workdir)
  final, _, _ = checkpointing.load_state(workdir)
  # Simulate a crash after step 3: the step-6 checkpoint never happened.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  trainer.train(config, workdir, mesh=mesh())
  resumed = read_losses(workdir)
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)],
                             [uninterrupted[s] for s in (4, 5, 6)], rtol=1e-5)
  again, _, _ = checkpointing.load_state(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               final["params"], again["params"])


def test_init_from_mismatch_names_parameter(tmp_path):
  first = str(tmp_path / "stage_a")
  trainer.train(smoke_config(total_steps=1), first, mesh=one_device_mesh())
  wider = smoke_config(total_steps=1, **{"init_from.workdir": first,
                                         "model.encoder.mlp_dim": 96})
  with pytest.raises(ValueError, match=r"encoder/blocks_0/.*expected.*96"):
    trainer.train(wider, str(tmp_path / "stage_b"), mesh=one_device_mesh())


def test_init_from_restores_trees(tmp_path):
  first = str(tmp_path / "stage_a")
  trainer.train(smoke_config(total_steps=2), first, mesh=one_device_mesh())
  saved, _, step = checkpointing.load_state(first)
  assert step == 2
  config = smoke_config(total_steps=2, **{"init_from.workdir": first,
                                          "optim.lr": 0.0})
  # With lr 0 the encoder stays what init_from loaded.
  second = str(tmp_path / "stage_b")
  trainer.train(config, second, mesh=one_device_mesh())
  loaded, config_dict, _ = checkpointing.load_state(second)
  assert config_dict["init_from"]["workdir"] == first
  jax.tree.map(np.testing.assert_array_equal, saved["params"]["encoder"],
               loaded["params"]["encoder"])


def test_nan_stops_run_and_keeps_checkpoint(tmp_path, monkeypatch):
  real_loss = losses.stage_loss

  def poisoned(model, objective, params, target, batch, rng, step, *rest):
    loss, metrics = real_loss(model, objective, params, target, batch, rng,
                              step, *rest)
    return jnp.where(step >= 4, jnp.nan, loss), metrics

  monkeypatch.setattr(losses, "stage_loss", poisoned)
  config = smoke_config(total_steps=6, **{"checkpoint.every": 3})
  with pytest.raises(trainer.NonFiniteLossError, match="step 5"):
    trainer.train(config, str(tmp_path), mesh=one_device_mesh())
  state, _, step = checkpointing.load_state(str(tmp_path))
  assert step == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_nan_between_log_steps_is_named_and_nothing_saved(tmp_path,
                                                          monkeypatch):
  # Metrics reach the host every 3rd step only; step 5 goes non-finite and
  # steps 5, 6 must not move the state; the check before the step-6 save
  # names step 5 and the step-3 checkpoint stays the latest.
  real_loss = losses.stage_loss

  def poisoned(model, objective, params, target, batch, rng, step, *rest):
    loss, metrics = real_loss(model, objective, params, target, batch, rng,
                              step, *rest)
    return jnp.where(step == 4, jnp.inf, loss), metrics

  monkeypatch.setattr(losses, "stage_loss", poisoned)
  config = smoke_config(total_steps=7, log_every=3,
                        **{"checkpoint.every": 3})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"at step 5 .*checkpoint \(step 3\) is intact"):
    trainer.train(config, str(tmp_path), mesh=one_device_mesh())
  _, _, step = checkpointing.load_state(str(tmp_path))
  assert step == 3
  assert sorted(read_losses(str(tmp_path))) == [3]


def test_init_from_reads_only_the_named_trees(tmp_path, monkeypatch):
  first = str(tmp_path / "stage_a")
  trainer.train(smoke_config(total_steps=2), first, mesh=one_device_mesh())
  abstract = jax.eval_shape(lambda: trainer.init_state(
      build_model(smoke_config()), smoke_config(),
      clip_samples(smoke_config())))
  requested = []
  real_restore = checkpointing.ocp.PyTreeCheckpointer.restore

  def spy(self, path, args=None, **kw):
    requested.append(args.item)
    return real_restore(self, path, args=args, **kw)

  monkeypatch.setattr(checkpointing.ocp.PyTreeCheckpointer, "restore", spy)
  trees = checkpointing.restore_trees(
      os.path.join(first, "checkpoints"), ("params/encoder", "target"),
      abstract)
  assert set(trees) == {"params/encoder", "target"}
  # What orbax was asked to read: those two trees, no optimizer state.
  assert len(requested) == 1
  assert set(requested[0]) == {"params", "target"}
  assert set(requested[0]["params"]) == {"encoder"}
  saved, _, _ = checkpointing.load_state(first)
  jax.tree.map(np.testing.assert_array_equal, saved["target"],
               trees["target"])


def test_frozen_groups_stay_and_lr_multipliers_apply(tmp_path):
  config = smoke_config(total_steps=2, **{
      "optim.lr": 3e-3, "optim.warmup_steps": 0,
      "optim.freeze": ("^encoder/",),
      "optim.lr_mult": (("^predictor/blocks_0/", 0.0),)})
  init = trainer.init_state(
      trainer.build_model(config), config,
      trainer.clip_samples(config))
  trainer.train(config, str(tmp_path), mesh=one_device_mesh())
  state, _, _ = checkpointing.load_state(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, init["params"]["encoder"],
               state["params"]["encoder"])
  jax.tree.map(np.testing.assert_array_equal,
               init["params"]["predictor"]["blocks_0"],
               state["params"]["predictor"]["blocks_0"])
  # The rest of the predictor trains at the full rate.
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(init["params"]["predictor"]["out_proj"]),
      jax.tree.leaves(state["params"]["predictor"]["out_proj"]))]
  assert all(moved)


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
  real_write = trainer.metric_writer.MetricWriter.write

  def write_then_preempt(self, step, metrics, **kw):
    real_write(self, step, metrics, **kw)
    if step == 2 and "train/loss" in metrics:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(trainer.metric_writer.MetricWriter, "write",
                      write_then_preempt)
  config = smoke_config(total_steps=6, **{"checkpoint.every": 100})
  with pytest.raises(trainer.Preempted, match="saved step 3 of 6"):
    trainer.train(config, str(tmp_path), mesh=one_device_mesh())
  # The signal came while step 2 was logged, after that step's stop check:
  # the next step is saved and the run stops.
  _, _, step = checkpointing.load_state(str(tmp_path))
  assert step == 3
  assert sorted(read_losses(str(tmp_path))) == [1, 2, 3]


def test_widen_batch_scales_pcm16_waveforms_only():
  from data_pipelines import storage
  pcm = np.array([[-32768, -1, 0, 1, 32767]], np.int16)
  batch = {"mixture": jnp.asarray(pcm), "speakers": jnp.array([[3, -1]]),
           "activity": jnp.ones((1, 2))}
  wide = trainer.widen_batch(batch)
  assert wide["mixture"].dtype == jnp.float32
  np.testing.assert_array_equal(wide["mixture"], storage.to_float(pcm))
  for key in ("speakers", "activity"):
    assert wide[key] is batch[key]


def test_stage_loss_adds_the_cross_crop_term():
  config = smoke_config(**{"objective.crop.weight": 0.7})
  model = build_model(config)
  num_samples = clip_samples(config)
  params = model.init(jax.random.key(0), num_samples)
  wave = jax.random.normal(jax.random.key(1), (4, num_samples)) * 0.1
  total, metrics = jax.jit(lambda p: losses.stage_loss(
      model, config.objective, p, p["encoder"], {"mixture": wave},
      jax.random.key(2), 0))(params)
  np.testing.assert_allclose(
      total, metrics["jepa/total"] + 0.7 * metrics["crop/total"], rtol=1e-5)
  assert metrics["crop/loss"] > 0 and metrics["crop/sigreg"] > 0
