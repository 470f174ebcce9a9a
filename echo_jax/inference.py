"""Loading a trained Echo model for inference: the one place that turns a
stage's workdir into (model, params), for diarization, evaluation tools,
benchmarks and notebooks. No trainer needed.

  loaded = inference.load("runs/cpu/stage2")            # latest, online params
  loaded = inference.load(workdir, step=400, weights="ema", mesh=mesh)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections

from echo_jax import checkpointing
from echo_jax.model import EchoModel, build_model, clip_samples

WEIGHTS = ("online", "ema")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A stage's model and params as saved at `step` in `workdir`."""
  model: EchoModel
  params: dict          # {'encoder', 'predictor', 'heads'}.
  config: ml_collections.ConfigDict
  step: int
  workdir: str

  @property
  def num_samples(self) -> int:
    """The training clip length: inputs the model saw positions for."""
    return clip_samples(self.config)


def load(workdir: str, *, step: int | None = None, weights: str = "online",
         mesh: jax.sharding.Mesh | None = None) -> Loaded:
  """Model rebuilt from the saved config, and its params.

  Args:
    step: a saved step (None: the latest).
    weights: 'online' (what the heads were trained with) or 'ema' (the EMA
      target encoder in place of the online one; heads unchanged).
    mesh: shard params over it (FSDP rule of `echo_jax.sharding`); None: one
      device. Any mesh reads a checkpoint written on any other.
  """
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r}; choose from {WEIGHTS}.")
  state, config_dict, step = checkpointing.load_state(workdir, step, mesh=mesh)
  config = ml_collections.ConfigDict(config_dict)
  heads = state["params"]["heads"]
  num_classes = (int(heads["arcface"]["class_weights"].shape[0])
                 if "arcface" in heads else 0)
  model = build_model(config, num_classes)
  expected = jax.eval_shape(
      functools.partial(model.init, num_samples=clip_samples(config)),
      jax.random.PRNGKey(0))
  checkpointing.check_same_tree(expected, state["params"],
                                what=f"Loading {workdir} step {step}")
  params = dict(state["params"])
  if weights == "ema":
    params["encoder"] = state["target"]
  return Loaded(model, params, config, int(step), workdir)
