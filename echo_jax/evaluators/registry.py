"""Evaluators chosen by `config.evals.<name>.type` (a plain dict, no
importlib): each is built once and then `run(model, state) -> {name: value}`
every `config.evals.<name>.every` steps and at the end."""

from __future__ import annotations

from echo_jax.evaluators.content_eval import ContentEvaluator
from echo_jax.evaluators.diarization_eval import DiarizationEvaluator
from echo_jax.evaluators.robustness import RobustnessEvaluator
from echo_jax.evaluators.routing_eval import RoutingEvaluator
from echo_jax.evaluators.speaker_eval import SpeakerEvaluator
from echo_jax.model import EchoModel

EVALUATORS = {"speaker": SpeakerEvaluator, "diarization": DiarizationEvaluator,
              "routing": RoutingEvaluator, "content": ContentEvaluator,
              "robustness": RobustnessEvaluator}


def build(config, model: EchoModel, manifest_path: str) -> list:
  evaluators = []
  for name, cfg in sorted(config.evals.items()):
    if cfg.type not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={cfg.type!r} is unknown; "
                       f"known types: {sorted(EVALUATORS)}.")
    evaluators.append(EVALUATORS[cfg.type](name, cfg, model, manifest_path,
                                           config.seed))
  return evaluators
