"""Speaker identity on held-out speakers: k-NN top-1 (cosine, enrolment/test
split per speaker) and verification EER over all trial pairs.

It embeds the same held-out clips with up to three encoders: the EMA target
(mean-pooled, per layer), the stage-2 speaker projection when the model has
one, and a randomly initialised encoder as the floor (computed once); beside
it, the training-free MFCC-statistics floor (`floors.py`, `mfcc_*`). The same
under noise, rooms and channels, and on unseen voice variants: robustness.py.

`{target,random}_best_*` report the held-out numbers of one layer chosen on
*train* speakers (k-NN top-1 over `layer_select_speakers` of them), never on
the held-out speakers they are reported on.
"""

from __future__ import annotations

import collections
import logging

import jax
import numpy as np

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from echo_jax import embed
from echo_jax.evaluators import floors
from echo_jax.evaluators import speaker_metrics
from echo_jax.model import EchoModel


class SpeakerEvaluator:
  """`run(model, state) -> {name: value}`; config: every, seconds, batch_size,
  max_utterances_per_speaker, random_floor, layer_select_speakers (0: choose
  the best layer on the held-out speakers themselves, flagged in the log)."""

  def __init__(self, name: str, config, model: EchoModel, manifest_path: str,
               seed: int):
    self.name, self.every = name, config.every
    self.batch_size = config.batch_size
    self.seed = seed
    all_utts = manifest_lib.read_manifest(manifest_path)
    utts = manifest_lib.first_per_speaker(
        manifest_lib.utterances_of(all_utts, manifest_lib.HELDOUT),
        config.max_utterances_per_speaker)
    speakers = sorted({u.speaker for u in utts})
    if len(speakers) < 2:
      raise ValueError(f"{name}: needs >= 2 held-out speakers in "
                       f"{manifest_path}, found {len(speakers)}.")
    self.labels = np.array([speakers.index(u.speaker) for u in utts])
    self._pooled_layers = embed.jit_with_model(embed.pooled_layers, model)
    self._speaker_embeddings = embed.jit_with_model(embed.speaker_embeddings,
                                                    model)
    num_samples = int(config.seconds * manifest_lib.SAMPLE_RATE)
    # A held-out utterance whose shard is damaged is left out (one warning
    # line naming it, its shard and the reason), not fatal; only too few
    # speakers left is. `skipped` / `skip_reasons` keep the count.
    skips = collections.Counter()
    clips = embed.load_clips(manifest_path, utts, num_samples, skips=skips,
                             context=name)
    self.waves, self.lengths = clips.waves, clips.lengths
    self.skipped = sum(skips.values())
    self.skip_reasons = dict(skips)
    if self.skipped:
      utts = list(clips.utterances)
      speakers = sorted({u.speaker for u in utts})
      logging.warning("%s: left out %d unreadable held-out utterances (%s).",
                      name, self.skipped, storage.skip_summary(skips))
      if len(speakers) < 2:
        raise ValueError(
            f"{name}: {self.skipped} held-out utterances of {manifest_path} "
            f"are unreadable ({storage.skip_summary(skips)}; the files are "
            f"named in the warnings above) and {len(speakers)} speakers remain;"
            " needs >= 2. Re-prepare the corpus (tools/prepare_corpus.py) or "
            "restore its shards.")
      self.labels = np.array([speakers.index(u.speaker) for u in utts])
    self.select = self._selection_set(
        name, manifest_path, all_utts, num_samples,
        config.get("layer_select_speakers", 40))
    self.random_floor = None
    if config.random_floor:
      random_params = model.init(jax.random.PRNGKey(seed + 1), num_samples)
      self.random_floor = self._layer_metrics(random_params["encoder"],
                                              "random")
      self.random_floor.update(self._report(
          floors.mfcc_statistics(self.waves, self.lengths), "mfcc"))
    logging.info("%s: %d held-out utterances of %d speakers.", name,
                 len(utts), len(speakers))

  @staticmethod
  def _selection_set(name, manifest_path, all_utts, num_samples,
                     num_speakers: int):
    """(waves, lengths, labels) of train speakers for choosing a layer, or
    None (then the choice falls back to the held-out set, with a warning)."""
    utts = manifest_lib.first_per_speaker(
        manifest_lib.utterances_of(all_utts, manifest_lib.TRAIN), 8,
        max_speakers=num_speakers) if num_speakers else []
    clips = embed.load_clips(manifest_path, utts, num_samples,
                             context=f"{name} (layer choice)") if utts else None
    speakers = sorted({u.speaker for u in clips.utterances}) if clips else []
    if len(speakers) < 2:
      logging.warning("%s: no train speakers to choose a layer on; *_best_* "
                      "is chosen on the held-out speakers it reports.", name)
      return None
    labels = np.array([speakers.index(u.speaker) for u in clips.utterances])
    return clips.waves, clips.lengths, labels

  def _report(self, embeddings: np.ndarray, prefix: str) -> dict:
    r = speaker_metrics.speaker_report(embeddings, self.labels, seed=self.seed)
    return {f"{self.name}/{prefix}_top1": r["top1"],
            f"{self.name}/{prefix}_eer": r["eer"]}

  def _layer_metrics(self, encoder_params, prefix: str) -> dict:
    layers = embed.batched(
        lambda w, n: self._pooled_layers(encoder_params, w, n), self.waves,
        self.lengths, batch_size=self.batch_size, axis=1)
    results = {}
    for layer, emb in enumerate(layers):
      results.update(self._report(emb, f"{prefix}_L{layer}"))
    top1 = [results[f"{self.name}/{prefix}_L{l}_top1"]
            for l in range(len(layers))]
    choice = top1
    if self.select is not None:
      waves, lengths, labels = self.select
      choice = [speaker_metrics.speaker_report(e, labels, seed=self.seed)
                ["top1"] for e in embed.batched(
                    lambda w, n: self._pooled_layers(encoder_params, w, n),
                    waves, lengths, batch_size=self.batch_size, axis=1)]
    best = int(np.argmax(choice))
    results[f"{self.name}/{prefix}_best_layer"] = best
    results[f"{self.name}/{prefix}_best_top1"] = top1[best]
    return results

  def run(self, model: EchoModel, state: dict) -> dict:
    results = self._layer_metrics(state["target"], "target")
    if "speaker" in state["params"]["heads"]:
      emb = embed.batched(
          lambda w, n: self._speaker_embeddings(state["params"], w, n),
          self.waves, self.lengths, batch_size=self.batch_size)
      results.update(self._report(emb, "projection"))
    if self.random_floor:
      results.update(self.random_floor)
    results[f"{self.name}/skipped_utterances"] = self.skipped
    return results
