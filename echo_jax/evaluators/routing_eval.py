"""Routing on held-out-speaker mixtures: count accuracy (per-K confusion,
under/over), PIT accuracy (K >= 2), latent SI-SDR and SI-SDRi of matched
slots, and the same for the trivial baseline (every slot = the mixture's
latent). Definitions in `routing_metrics`.

Slots come from the online params (what the router was trained on); targets
and the mixture latent from the EMA target encoder, as in training.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import numpy as np

from data_pipelines import stream
from echo_jax import inference
from echo_jax.evaluators import routing_metrics
from echo_jax.evaluators.eval_mixtures import HeldoutMixtures
from echo_jax.model import EchoModel
from echo_jax.objectives import routing as routing_lib
from echo_jax.terms import routing_term

_log = logging.getLogger(__name__)


def route_and_targets(model: EchoModel, target_layers: int,
                      null_weight: float, params: dict, target: dict,
                      mixture: jax.Array, sources: jax.Array
                      ) -> dict[str, jax.Array]:
  """Last decoder layer's slots and the latents they are scored against.

  Args:
    null_weight: the training's null-slot weight (existence calibration:
      `routing.existence_probability`).
    mixture: `[B, N]`; sources: `[B, K, N]`.
  Returns:
    latents `[B, S, T, C]`, existence `[B, S]` probabilities, activity
    `[B, S, T]` probabilities, targets `[B, K, T, C]`, mixture_latent
    `[B, T, C]`.
  """
  mel = model.log_mel(mixture)
  feats, _ = model.features(params, params["encoder"], mel)
  out = routing_term.route(model, params, feats, mel, target)
  targets = routing_term.source_targets(model, target, sources, target_layers)
  # The mixture's log-mel is already here: one EMA pass, no second log-mel.
  mixture_latent = routing_term.ema_latent(model, target, mel, target_layers)
  return {"latents": out["latents"][-1],
          "existence": routing_lib.existence_probability(
              out["existence"][-1], null_weight),
          "activity": jax.nn.sigmoid(out["activity"][-1]),
          "targets": targets, "mixture_latent": mixture_latent}


def evaluate_routing(forward, params: dict, target: dict,
                     mixtures: HeldoutMixtures, num_mixtures: int,
                     batch_size: int) -> dict:
  """Scores `forward` (a jitted `route_and_targets` without the model) on
  mixtures 0..num_mixtures-1; returns `RoutingScores.summary()` plus the
  settings."""
  num_slots = None
  scores = None
  for start in range(0, num_mixtures, batch_size):
    examples = [mixtures.example(i) for i in
                range(start, min(start + batch_size, num_mixtures))]
    real = len(examples)
    examples += [examples[-1]] * (batch_size - real)  # One compiled shape.
    out = jax.device_get(forward(
        params, target, np.stack([e["mixture"] for e in examples]),
        np.stack([e["sources"] for e in examples])))
    if scores is None:
      num_slots = out["existence"].shape[1]
      scores = routing_metrics.RoutingScores(mixtures.cfg.k_max, num_slots)
    for b in range(real):
      k = int(examples[b]["num_speakers"])
      scores.add(out["latents"][b], out["existence"][b],
                 out["targets"][b, :k], out["mixture_latent"][b])
  results = scores.summary()
  results.update(num_mixtures=num_mixtures, seconds=mixtures.cfg.clip_seconds,
                 k_min=mixtures.cfg.k_min, k_max=mixtures.cfg.k_max,
                 num_slots=num_slots, seed=mixtures.seed)
  return results


def flat_metrics(results: dict, prefix: str) -> dict[str, float]:
  """`evaluate_routing` output -> flat {prefix/name: value} scalars."""
  count = results["count"]
  out = {f"{prefix}/count_accuracy": count["accuracy"],
         f"{prefix}/count_under": count["under"],
         f"{prefix}/count_over": count["over"],
         f"{prefix}/pit_accuracy": results["pit_accuracy"],
         f"{prefix}/si_sdr": results["si_sdr"],
         f"{prefix}/si_sdri": results["si_sdri"],
         f"{prefix}/baseline_pit_accuracy": results["baseline"]["pit_accuracy"],
         f"{prefix}/baseline_si_sdr": results["baseline"]["si_sdr"]}
  out.update({f"{prefix}/count_accuracy_k{k}": v
              for k, v in count["accuracy_per_k"].items()})
  out.update({f"{prefix}/si_sdr_k{k}": v
              for k, v in results.get("si_sdr_per_k", {}).items()})
  out.update({f"{prefix}/baseline_si_sdr_k{k}": v for k, v in
              results["baseline"].get("si_sdr_per_k", {}).items()})
  return {k: float(v) for k, v in out.items()}


def format_report(results: dict) -> str:
  count = results["count"]
  k_max, slots = results["k_max"], results["num_slots"]
  rows = [f"count accuracy {100 * count['accuracy']:.1f}% (under"
          f" {100 * count['under']:.1f}%, over {100 * count['over']:.1f}%);"
          " confusion (rows: true K, columns: predicted 0.."
          f"{slots}):"]
  for k in range(k_max + 1):
    rows.append(f"  K={k}: " + " ".join(f"{n:4d}" for n in
                                        count["confusion"][k]))
  base = results["baseline"]
  rows.append(f"PIT accuracy {100 * results['pit_accuracy']:.1f}% over"
              f" {results['pit_sources']} sources of K >= 2 mixtures"
              f" (baseline {100 * base['pit_accuracy']:.1f}%)")
  rows.append(f"latent SI-SDR {results['si_sdr']:+.2f} dB, SI-SDRi"
              f" {results['si_sdri']:+.2f} dB (baseline: mixture latent"
              f" {base['si_sdr']:+.2f} dB)")
  if results.get("si_sdr_per_k"):
    rows.append("  by K: " + ", ".join(
        f"K={k} {v:+.2f} dB (baseline {base['si_sdr_per_k'][k]:+.2f})"
        for k, v in results["si_sdr_per_k"].items()))
  rows.append(f"{results['num_mixtures']} held-out mixtures of"
              f" {results['seconds']:g} s, K in [{results['k_min']},"
              f" {k_max}], seed {results['seed']}")
  return "\n".join(rows)


def write_json(path: str, results: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(f"{path}.tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(f"{path}.tmp", path)


class RoutingEvaluator:
  """Trainer evaluator: `run(model, state) -> {name/...: value}`.

  Config (`config.evals.<name>`): every, num_mixtures, seconds, k_min, k_max,
  batch_size, target_layers (default 4: the JEPA targets), optional json
  (a path to write the full results, confusion matrix included).
  """

  def __init__(self, name: str, config, model: EchoModel, manifest_path: str,
               seed: int):
    self.name, self.every, self.config = name, config.every, config
    self.mixtures = HeldoutMixtures(manifest_path, seconds=config.seconds,
                                    k_min=config.k_min, k_max=config.k_max,
                                    seed=seed, clamp_k_max=True)
    self._model = None
    self._forward = None

  def forward(self, model: EchoModel):
    if self._model is not model:  # Jitted once; params are arguments.
      self._model = model
      self._forward = jax.jit(functools.partial(
          route_and_targets, model, self.config.get("target_layers", 4),
          self.config.get("null_weight", 1.0)))
    return self._forward

  def run(self, model: EchoModel, state: dict) -> dict[str, float]:
    results = evaluate_routing(
        self.forward(model), state["params"], state["target"], self.mixtures,
        self.config.num_mixtures, self.config.batch_size)
    _log.info("%s:\n%s", self.name, format_report(results))
    if self.config.get("json", None):
      write_json(self.config.json, results)
    return flat_metrics(results, self.name)


def evaluate_workdir(workdir: str, *, num_mixtures: int, batch_size: int,
                     seed: int = 0, manifest_path: str | None = None) -> dict:
  """`evaluate_routing` of a stage-4 workdir's latest checkpoint on its
  corpus's held-out speakers (mixtures of its clip length and K range)."""
  online = inference.load(workdir)
  if "router" not in online.model.heads:
    raise ValueError(f"{workdir} has no router head (its heads are "
                     f"{list(online.model.heads)}); routing needs a stage-4 "
                     "checkpoint.")
  ema = inference.load(workdir, weights="ema")
  config = online.config
  mixtures = HeldoutMixtures(
      manifest_path or stream.resolve_manifest(config.data),
      seconds=config.data.clip_seconds, k_min=config.data.k_min,
      k_max=config.data.k_max, seed=seed, clamp_k_max=True)
  forward = jax.jit(functools.partial(
      route_and_targets, online.model,
      config.objective.routing.target_layers,
      config.objective.routing.null_weight))
  results = evaluate_routing(forward, online.params, ema.params["encoder"],
                             mixtures, num_mixtures, batch_size)
  results.update(workdir=workdir, step=online.step)
  return results


def summary_line(stage: str, results: dict) -> str:
  """One console line: count, PIT and SI-SDR against the baseline."""
  base = results["baseline"]
  return (f"{stage}: speaker count accuracy"
          f" {100 * results['count']['accuracy']:.1f}%, PIT accuracy"
          f" {100 * results['pit_accuracy']:.1f}% (baseline"
          f" {100 * base['pit_accuracy']:.1f}%), latent SI-SDR"
          f" {results['si_sdr']:+.2f} dB (mixture latent"
          f" {base['si_sdr']:+.2f} dB, SI-SDRi {results['si_sdri']:+.2f} dB)"
          f" on {results['num_mixtures']} held-out mixtures")
