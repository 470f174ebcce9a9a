"""Speaker identity and speech activity under recording conditions.

For each held-out split the manifest has (`heldout`: unseen speakers of the
voices trained on; `unseen_variant`: whole voice variants and languages never
trained on) and each condition of `augment.CONDITIONS` (clean, noise at 20 /
10 / 0 dB SNR, a simulated room, a telephone channel), it reports k-NN top-1
and EER (enrolment/test split per speaker, `speaker_metrics`) of:

  projection  the model's pooled speaker projection (when it has one);
  random      a randomly initialised encoder, mean-pooled, the best of its
              layers per cell (a deliberately generous floor);
  mfcc        MFCC c1-c20 mean/std statistics (`floors.py`).

The conditions are drawn once, from a noise/RIR bank seeded apart from the
training bank, and every clip gets the same draw in every run. The two floors
do not depend on the model, so they are computed once and cached.

With an activity head it also reports the speech-activity false alarm on
noise-only audio (coloured noise, hum and user noise files at -50 to -20
dBFS): the fraction of tokens the head calls speech.

Metric names: `<name>/<split>/<condition>/<system>_{top1,eer}`,
`<name>/noise_false_alarm`, `<name>/noise_false_alarm_<kind>` and, for
babble, `..._babble_quiet` / `..._babble_loud` (at least 10 dB under the
talkers' level, or not).
"""

from __future__ import annotations

import collections
import logging

import jax
import numpy as np

from data_pipelines import augment
from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from data_pipelines import storage
from echo_jax import embed
from echo_jax.evaluators import floors
from echo_jax.evaluators import speaker_metrics
from echo_jax.model import EchoModel

SPLITS = (manifest_lib.HELDOUT, manifest_lib.UNSEEN_VARIANT)
# Babble-only clips get a number of their own, out of the noise-only
# headline: training calls them background, but they are made of speech.
BACKGROUND_SPEECH_KINDS = ("babble",)
# The headline: every other noise kind, so a new one joins it.
NOISE_ONLY_KINDS = tuple(k for k in augment.NOISE_KINDS
                         if k not in BACKGROUND_SPEECH_KINDS)
# Noise-only clips are drawn at -50 to -20 dBFS. Babble within 10 dB of the
# talkers' level (the stream's `target_level_db`) is a crowd as loud as the
# foreground: the 3-talker training mixtures labelled speech are the same
# kind of sound. It gets its own number (`_loud`) beside the background
# babble at least 10 dB under the talkers (`_quiet`).
NOISE_ONLY_LEVELS_DB = (-50.0, -20.0)
BACKGROUND_MARGIN_DB = 10.0
QUIET_BELOW_DB = (mixtures.MixtureConfig.target_level_db
                  - BACKGROUND_MARGIN_DB)


def eval_banks(manifest_path: str, seed: int, noise_dir: str = "",
               rir_dir: str = "") -> augment.Banks:
  """Noise (babble from train speech) and RIR banks for evaluation, drawn
  apart from the training banks (another seed)."""
  cfg = augment.AugmentConfig(enabled=True, bank_seed=7919 + seed,
                              num_rooms=16, bank_clips=8, noise_dir=noise_dir,
                              rir_dir=rir_dir)
  index = mixtures.MixtureIndex.from_manifest(manifest_path,
                                              manifest_lib.TRAIN)
  speech = mixtures.babble_speech(storage.AudioStore(manifest_path), index,
                                  seed=cfg.bank_seed)
  return augment.Banks.build(cfg, speech)


def conditioned(waves: np.ndarray, lengths: np.ndarray, condition: str,
                banks: augment.Banks, seed: int) -> np.ndarray:
  """Every clip under `condition`; clip i's draw depends on (seed, i) only."""
  out = waves.copy()
  salt = augment.CONDITIONS.index(condition)
  for i, (wave, n) in enumerate(zip(waves, lengths)):
    rng = np.random.default_rng([seed, salt, i])
    out[i, :n] = augment.apply_condition(wave[:n], condition, banks, rng)
  return out


_JUDGED = {"speaker", "activity"}   # The heads this evaluator reports on.


class RobustnessEvaluator:
  """`run(model, state) -> {name: value}`; config: every, seconds,
  batch_size, max_utterances_per_speaker, conditions, noise_only_clips,
  noise_dir, rir_dir."""

  def __init__(self, name: str, config, model: EchoModel, manifest_path: str,
               seed: int):
    self.name, self.every, self.seed = name, config.every, seed
    self.batch_size = config.batch_size
    self.judged = bool(_JUDGED & set(model.heads))
    if not self.judged:  # E.g. stage 1: skip the clips, banks and floors.
      logging.info("%s: the model has no %s head; nothing to evaluate.", name,
                   " or ".join(sorted(_JUDGED)))
      return
    self.conditions = tuple(config.conditions)
    unknown = set(self.conditions) - set(augment.CONDITIONS)
    if unknown:
      raise ValueError(f"{name}: unknown conditions {sorted(unknown)}; known: "
                       f"{augment.CONDITIONS}.")
    self.num_samples = int(config.seconds * manifest_lib.SAMPLE_RATE)
    all_utts = manifest_lib.read_manifest(manifest_path)
    self.sets = {}
    for split in SPLITS:
      utts = manifest_lib.first_per_speaker(
          manifest_lib.utterances_of(all_utts, split),
          config.max_utterances_per_speaker)
      skips = collections.Counter()
      clips = embed.load_clips(manifest_path, utts, self.num_samples,
                               skips=skips, context=name)
      speakers = sorted({u.speaker for u in clips.utterances})
      if len(speakers) < 2:
        logging.info("%s: split %s has %d speakers; not evaluated.", name,
                     split, len(speakers))
        continue
      labels = np.array([speakers.index(u.speaker) for u in clips.utterances])
      self.sets[split] = (clips, labels)
      logging.info("%s: %s: %d utterances of %d speakers (%d unreadable).",
                   name, split, len(labels), len(speakers), sum(skips.values()))
    if not self.sets:
      raise ValueError(f"{name}: {manifest_path} has no held-out split with "
                       f">= 2 speakers (looked for {SPLITS}).")
    self.banks = eval_banks(manifest_path, seed, config.noise_dir,
                            config.rir_dir)
    self.noise_only_clips = config.noise_only_clips
    self._waves = {}
    self._floors = None
    self._pooled_layers = embed.jit_with_model(embed.pooled_layers, model)
    self._speaker_embeddings = embed.jit_with_model(
        embed.speaker_embeddings, model)
    self._random_params = model.init(jax.random.PRNGKey(seed + 1),
                                     self.num_samples)

  def _cells(self):
    for split, (clips, labels) in self.sets.items():
      for condition in self.conditions:
        key = (split, condition)
        if key not in self._waves:
          self._waves[key] = conditioned(clips.waves, clips.lengths,
                                         condition, self.banks, self.seed)
        yield split, condition, self._waves[key], clips.lengths, labels

  def _report(self, emb, labels, prefix: str) -> dict:
    r = speaker_metrics.speaker_report(emb, labels, seed=self.seed)
    return {f"{prefix}_top1": r["top1"], f"{prefix}_eer": r["eer"]}

  def floors(self) -> dict:
    """The random-encoder and MFCC floors of every cell (computed once)."""
    if self._floors is None:
      out = {}
      for split, condition, waves, lengths, labels in self._cells():
        prefix = f"{self.name}/{split}/{condition}"
        layers = embed.batched(
            lambda w, n: self._pooled_layers(self._random_params["encoder"],
                                             w, n),
            waves, lengths, batch_size=self.batch_size, axis=1)
        per_layer = [self._report(e, labels, "r") for e in layers]
        out[f"{prefix}/random_top1"] = max(r["r_top1"] for r in per_layer)
        out[f"{prefix}/random_eer"] = min(r["r_eer"] for r in per_layer)
        out.update(self._report(floors.mfcc_statistics(waves, lengths),
                                labels, f"{prefix}/mfcc"))
      self._floors = out
    return self._floors

  def noise_false_alarm(self, params: dict) -> dict:
    """Fraction of noise-only tokens the activity head calls speech (the
    headline: non-speech kinds; babble-only clips per kind)."""
    kinds = [k for k in NOISE_ONLY_KINDS + BACKGROUND_SPEECH_KINDS
             if k in self.banks.noise]
    rng = np.random.default_rng([self.seed, 99])
    waves = np.zeros((self.noise_only_clips, self.num_samples), np.float32)
    kind_of, levels_db = [], []
    for i in range(self.noise_only_clips):
      kind = kinds[i % len(kinds)]
      noise = self.banks.noise_clip(kind, self.num_samples, rng)
      level_db = rng.uniform(*NOISE_ONLY_LEVELS_DB)
      waves[i] = noise * np.float32(10 ** (level_db / 20)
                                    / np.sqrt(augment.power(noise)))
      kind_of.append(kind)
      levels_db.append(level_db)
    speech = embed.batched(lambda w: self._activity(params, w), waves,
                           batch_size=self.batch_size)
    return false_alarm_rates(speech, kind_of, self.name, levels_db)

  def run(self, model: EchoModel, state: dict) -> dict:
    if not self.judged:
      return {}
    params = state["params"]
    heads = params["heads"]
    if not hasattr(self, "_activity"):
      self._activity = jax.jit(
          lambda p, w: model.apply_head(
              "activity", p, model.features(p, p["encoder"],
                                            model.log_mel(w))[0])[..., 0] > 0)
    results = dict(self.floors())
    if "speaker" in heads:
      for split, condition, waves, lengths, labels in self._cells():
        emb = embed.batched(
            lambda w, n: self._speaker_embeddings(params, w, n), waves,
            lengths, batch_size=self.batch_size)
        results.update(self._report(
            emb, labels, f"{self.name}/{split}/{condition}/projection"))
    if "activity" in heads and self.noise_only_clips:
      results.update(self.noise_false_alarm(params))
    logging.info("%s:\n%s", self.name, format_table(results, self.name))
    return results


def false_alarm_rates(speech: np.ndarray, kind_of, name: str,
                      levels_db=None) -> dict:
  """Speech calls [clips, tokens] of noise-only clips of kinds `kind_of` ->
  the share per kind and, over the `NOISE_ONLY_KINDS` clips, the headline;
  with the clips' `levels_db` (dBFS), background-speech kinds also split at
  `QUIET_BELOW_DB` into `_quiet` and `_loud`."""
  kind_of = np.asarray(kind_of)
  noise = np.isin(kind_of, NOISE_ONLY_KINDS)
  out = ({f"{name}/noise_false_alarm": float(speech[noise].mean())}
         if noise.any() else {})
  for kind in dict.fromkeys(kind_of):
    of_kind = kind_of == kind
    out[f"{name}/noise_false_alarm_{kind}"] = float(speech[of_kind].mean())
    if levels_db is None or kind not in BACKGROUND_SPEECH_KINDS:
      continue
    quiet = np.asarray(levels_db) <= QUIET_BELOW_DB
    for part, clips in (("quiet", of_kind & quiet), ("loud", of_kind & ~quiet)):
      if clips.any():
        out[f"{name}/noise_false_alarm_{kind}_{part}"] = float(
            speech[clips].mean())
  return out


def format_table(results: dict, name: str) -> str:
  """Top-1 / EER per cell and system, one row per (split, condition)."""
  rows = sorted({tuple(k.split("/")[1:3]) for k in results
                 if k.count("/") == 3})
  systems = ("projection", "random", "mfcc")
  lines = [f"{'split':16s}{'condition':11s}" + "".join(
      f"{s + ' top1/EER %':>24s}" for s in systems)]
  for split, condition in rows:
    cells = []
    for s in systems:
      top1 = results.get(f"{name}/{split}/{condition}/{s}_top1")
      eer = results.get(f"{name}/{split}/{condition}/{s}_eer")
      cells.append("-" if top1 is None else
                   f"{100 * top1:.1f} / {100 * eer:.1f}")
    lines.append(f"{split:16s}{condition:11s}" + "".join(
        f"{c:>24s}" for c in cells))
  fa = results.get(f"{name}/noise_false_alarm")
  if fa is not None:
    lines.append(f"speech-activity false alarm on noise-only audio: "
                 f"{100 * fa:.2f}% of tokens")
  for kind in BACKGROUND_SPEECH_KINDS:
    fa = results.get(f"{name}/noise_false_alarm_{kind}")
    if fa is not None:
      lines.append(f"speech-activity false alarm on {kind}-only audio: "
                   f"{100 * fa:.2f}% of tokens")
    parts = {part: results.get(f"{name}/noise_false_alarm_{kind}_{part}")
             for part in ("quiet", "loud")}
    if any(v is not None for v in parts.values()):
      fmt = lambda v: "-" if v is None else f"{100 * v:.2f}%"
      lines.append(
          f"  {BACKGROUND_MARGIN_DB:g}+ dB under the talkers (<= "
          f"{QUIET_BELOW_DB:g} dBFS): {fmt(parts['quiet'])}; "
          f"as loud as them: {fmt(parts['loud'])}")
  return "\n".join(lines)
