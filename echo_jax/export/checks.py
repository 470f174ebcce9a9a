"""What an export is checked on and against: test audio, the live JAX model's
outputs, and errors measured on the outputs' scale."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from echo_jax.inference import Loaded
from echo_jax.objectives import arcface


@dataclasses.dataclass(frozen=True)
class Clip:
  """A check input: `waveform` `[batch, samples]` float32, and what it is."""
  name: str
  waveform: np.ndarray


def random_audio(unit: int, tokens: int, seed: int = 0) -> Clip:
  """Gaussian noise at speech level (std 0.1), `[2, tokens * unit]`."""
  rng = np.random.default_rng(seed)
  wave = 0.1 * rng.standard_normal((2, tokens * unit))
  return Clip(f"noise {list(wave.shape)}", wave.astype(np.float32))


def corpus_clips(manifest_path: str, unit: int, count: int,
                 max_seconds: float = 4.0) -> Clip:
  """Held-out utterances of `count` distinct speakers as one batch, cut to
  the shortest one's length (at most `max_seconds`), a multiple of `unit`."""
  utts = [u for u in manifest_lib.read_manifest(manifest_path)
          if u.split == manifest_lib.HELDOUT]
  chosen, speakers = [], set()
  for utt in utts:
    if len(chosen) < count and utt.speaker not in speakers:
      speakers.add(utt.speaker)
      chosen.append(utt)
  length = min([int(max_seconds * manifest_lib.SAMPLE_RATE)]
               + [u.num_samples for u in chosen])
  length -= length % unit
  if not chosen or length < unit:
    raise ValueError(f"{manifest_path}: no {count} held-out utterances of at "
                     f"least {unit} samples to check the export on.")
  store = storage.AudioStore(manifest_path)
  wave = np.stack([store.read(u, 0, length) for u in chosen])
  return Clip(f"{', '.join(u.utt_id for u in chosen)} {list(wave.shape)}",
              wave)


def reference_fn(loaded: Loaded, heads: Sequence[str]):
  """`waveform -> {hidden, final, <head>...}` of the live model, float32
  compute (what the exports compute; bfloat16 is a training setting)."""
  model = loaded.model
  encoder = model.encoder.clone(dtype=jnp.float32)
  params = loaded.params

  @jax.jit
  def fn(waveform):
    out = encoder.apply({"params": params["encoder"]},
                        model.log_mel(waveform))
    result = {"hidden": out["hidden"], "final": out["final"]}
    if "rwse" in heads:
      result["rwse"] = model.apply_head("rwse", params, out["hidden"])
    if "speaker" in heads:
      result["speaker"] = model.apply_head("speaker", params, result["rwse"])
    if "activity" in heads:
      result["activity"] = model.apply_head("activity", params,
                                            result["rwse"])
    if "arcface" in heads:
      result["arcface"] = arcface.cosine_similarity(
          result["speaker"], params["heads"]["arcface"]["class_weights"])
    return result

  return fn


def max_abs_errors(reference: Mapping[str, np.ndarray],
                   candidate: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Max |reference - candidate| per output the candidate has."""
  return {k: float(np.max(np.abs(np.asarray(reference[k], np.float64)
                                 - np.asarray(candidate[k], np.float64))))
          for k in candidate}


@dataclasses.dataclass
class ErrorLog:
  """Largest error per output and input set (random / corpus) of one check,
  and whether it stayed within `tolerance` of the output's scale
  (`error <= tolerance * max(1, max |reference|)`)."""
  tolerance: float
  errors: dict = dataclasses.field(default_factory=dict)
  scales: dict = dataclasses.field(default_factory=dict)

  def add(self, kind: str, reference: Mapping, candidate: Mapping) -> None:
    errors = self.errors.setdefault(kind, {})
    for key, error in max_abs_errors(reference, candidate).items():
      errors[key] = max(errors.get(key, 0.0), error)
      self.scales[key] = max(self.scales.get(key, 0.0), float(
          np.max(np.abs(reference[key]))))

  def failures(self) -> list[str]:
    return [f"{kind}/{key}: max abs error {error:.3g} > {self.tolerance:g} x "
            f"max(1, {self.scales[key]:.3g})"
            for kind, errors in self.errors.items()
            for key, error in errors.items()
            if not error <= self.tolerance * max(1.0, self.scales[key])]

  def summary(self) -> dict:
    return {"tolerance": self.tolerance, "max_abs_error": self.errors,
            "max_abs_reference": self.scales, "passed": not self.failures()}
