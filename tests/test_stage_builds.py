"""Every stage x variant builds: its terms, heads and data keys agree, and
init plus one train step trace (`jax.eval_shape`, nothing is computed)."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import framing, stream
from echo_jax import losses, trainer
from echo_jax.model import build_model, clip_samples
from experiments import common
from tools import bench_data

STAGES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(
    os.path.dirname(common.__file__), "stage*.py")))

ENTRIES = {  # Shapes of the stream's entries, [B, ...] added below.
    "mixture": lambda n, k: ((n,), jnp.float32),
    "clean": lambda n, k: ((n,), jnp.float32),
    "sources": lambda n, k: ((k, n), jnp.float32),
    "speakers": lambda n, k: ((k,), jnp.int32),
    "activity": lambda n, k: ((k, n // framing.HOP), jnp.float32),
    "phonemes": lambda n, k: ((k, n // framing.HOP), jnp.int32),
    "num_speakers": lambda n, k: ((), jnp.int32),
}


def test_stages_found():
  assert {"stage1_jepa", "stage2_speaker"} <= set(STAGES)


@pytest.mark.parametrize("variant", common.VARIANTS)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_builds(stage, variant):
  config = importlib.import_module(f"experiments.{stage}").get_config(variant)
  losses.check_objective(config.objective, config.model.heads)
  stream.mixture_config(config.data)  # Every data field is known.
  model = build_model(config, num_classes=16)
  n = clip_samples(config)
  state = jax.eval_shape(lambda: trainer.init_state(model, config, n))
  assert set(state["params"]["heads"]) == set(config.model.heads)
  b, k = 2, config.data.k_max
  batch = {}
  for key in losses.batch_keys(config.objective):
    shape, dtype = ENTRIES[key](n, k)
    batch[key] = jax.ShapeDtypeStruct((b,) + shape, dtype)
  step = trainer.make_train_step(model, config)
  new_state, metrics, failed_at = jax.eval_shape(
      step, state, batch, jax.ShapeDtypeStruct((), jnp.int32))
  jax.tree.map(lambda a, b: np.testing.assert_equal(
      (a.shape, a.dtype), (b.shape, b.dtype)), state, new_state)
  assert metrics["train/loss"].shape == () and failed_at.shape == ()


def test_unknown_data_field_is_named():
  config = importlib.import_module("experiments.stage1_jepa").get_config(
      "smoke")
  with config.unlocked():
    config.data.gain_dbb = 3.0
  with pytest.raises(ValueError, match="unknown fields.*gain_dbb"):
    stream.mixture_config(config.data)


def test_every_mixture_field_is_settable():
  config = importlib.import_module("experiments.stage1_jepa").get_config(
      "smoke")
  with config.unlocked():
    config.data.max_skips = 7
    config.data.activity_rel_db = -30.0
  mixture = stream.mixture_config(config.data)
  assert mixture.max_skips == 7 and mixture.activity_rel_db == -30.0


def test_data_benchmark_ships_what_stages_1_to_3_train_on():
  trained = {key for stage in STAGES[:3] for key in losses.batch_keys(
      importlib.import_module(f"experiments.{stage}").get_config(
          "cpu").objective)}
  assert set(bench_data.TRAINED_KEYS.split(",")) == trained | {"skipped"}
