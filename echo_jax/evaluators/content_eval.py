"""Stage-3 evaluations of the content projection (DESIGN "Metrics"):

- factorisation gap: held-out speakers, each speaker's utterances split into
  enrolment and test; cosine k-NN speaker-ID top-1 of the pooled speaker
  projection minus that of the pooled content projection (mean over the
  utterance's tokens), in points (`speaker_metrics.factorisation_gap`);
- phoneme frame accuracy, per token (label of its centre frame; silence and
  unknown left out), of a linear probe and of cosine 1-NN, trained on
  train-speaker tokens and scored on held-out-speaker tokens, for: the content
  projection; the speaker projection applied to each token alone (what the
  speaker branch keeps per frame); the random-init encoder's RWSE features
  (the floor, from the same `model.init(PRNGKey(seed + 1))` as the speaker
  evaluator's, computed once);
- phone error rate: a linear CTC layer trained on frozen content features of
  train speakers, greedy decoding, PER on held-out speakers; the same on the
  random-init encoder's features is the floor;
- what bounds the gap from either side, on the same split: the true phone
  histograms as content (`gap_ceiling_points`), and, where the config names
  the anchor (`anchor`), the anchor GMM's own posteriors averaged over each
  clip's valid frames (`anchor_top1`, `gap_anchor_points`; the content
  projection is averaged over its valid tokens): the targets the head is
  trained to predict, so a content projection that names speakers about as
  often as they do has learnt its targets, speaker cues included.

Every value goes to the trainer's metrics (metrics.jsonl) under `<name>/`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import manifest as manifest_lib
from data_pipelines import phonemes as phonemes_lib
from echo_jax import anchors, embed, probe
from echo_jax.evaluators import phone_probe, speaker_metrics
from echo_jax.model import EchoModel
from echo_jax.terms import content_term


def _content_frames(model: EchoModel, params, waves):
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  return model.apply_head("content", params, feats, method="project")


def _speaker_frames(model: EchoModel, params, waves):
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  b, t, w = feats.shape
  frames = model.apply_head("speaker", params, feats.reshape(b * t, 1, w))
  return frames.reshape(b, t, -1)


def _rwse_frames(model: EchoModel, params, waves):
  return model.features(params, params["encoder"], model.log_mel(waves))[0]


def _pooled_anchor_posteriors(anchor_cfg, waves: np.ndarray,
                              lengths: np.ndarray) -> np.ndarray:
  """[N, K] mean anchor-GMM posteriors over each clip's frames (its valid
  length), from the features the content term's targets are computed on."""
  settings = anchors.AnchorSettings.from_config(anchor_cfg)
  arrays = content_term.anchor_gmm(anchor_cfg).arrays()
  pooled = []
  for wave, n in zip(waves, lengths):
    log_mel = anchors.host_log_mel(wave[:int(n)], settings.n_mels)
    feats = anchors.frame_features(log_mel, settings, xp=np)
    pooled.append(np.exp(np.asarray(anchors.log_posteriors(arrays, feats)))
                  .mean(0))
  return np.stack(pooled)


class ContentEvaluator:
  """`run(model, state) -> {name: value}`; config: every, seconds,
  batch_size, max_utterances_per_speaker, train_utterances, probe_frames,
  ctc_steps, ctc_lr, random_floor, and optionally anchor (the content term's
  `anchor` block)."""

  def __init__(self, name: str, config, model: EchoModel, manifest_path: str,
               seed: int):
    self.name, self.every, self.seed = name, config.every, seed
    self.config = config
    self.batch_size = config.batch_size
    num_samples = int(config.seconds * manifest_lib.SAMPLE_RATE)
    self.num_tokens = model.num_tokens(num_samples)
    inventory = phonemes_lib.PhonemeInventory.for_manifest(manifest_path)
    self.num_phones = len(inventory)
    utts = [u for u in manifest_lib.read_manifest(manifest_path) if u.alignment]
    held = probe.corpus_utterances(
        manifest_path, split=manifest_lib.HELDOUT,
        per_speaker=config.max_utterances_per_speaker)
    held = [u for u in held if u.alignment]
    train = [u for u in utts if u.split == manifest_lib.TRAIN]
    rng = np.random.default_rng(seed)
    if len(train) > config.train_utterances:
      train = [train[i] for i in sorted(rng.choice(
          len(train), config.train_utterances, replace=False))]
    if len({u.speaker for u in held}) < 2 or not train:
      raise ValueError(
          f"{name}: needs phoneme alignments for >= 2 held-out speakers and "
          f"some train speakers in {manifest_path}; found "
          f"{len({u.speaker for u in held})} and {len(train)} utterances.")
    self.sets = {}
    for split, chosen in (("train", train), ("heldout", held)):
      clips = embed.load_clips(manifest_path, chosen, num_samples,
                               context=name)
      labels = np.stack([phone_probe.token_labels(
          phone_probe.alignment_path(manifest_path, u), inventory,
          self.num_tokens, model.patch_frames, int(n))
          for u, n in zip(clips.utterances, clips.lengths)])
      seqs = [phone_probe.phone_sequence(
          phone_probe.alignment_path(manifest_path, u), inventory,
          min(config.seconds, u.num_samples / manifest_lib.SAMPLE_RATE))
          for u in clips.utterances]
      speakers = sorted({u.speaker for u in clips.utterances})
      self.sets[split] = dict(
          waves=clips.waves, lengths=clips.lengths, labels=labels, seqs=seqs,
          token_lengths=np.asarray(
              embed.token_mask(model, jnp.asarray(clips.lengths),
                               num_samples)).sum(1),
          speaker_ids=np.array([speakers.index(u.speaker)
                                for u in clips.utterances]))
    # Token subsets for the frame probes (fixed for the run).
    self.frame_pick = {
        split: self._pick(s["labels"], config.probe_frames, rng)
        for split, s in self.sets.items()}
    self._fns = {f.__name__: jax.jit(lambda p, w, f=f: f(model, p, w))
                 for f in (_content_frames, _speaker_frames, _rwse_frames)}
    self._speaker_embeddings = embed.jit_with_model(embed.speaker_embeddings,
                                                    model)
    self.random_floor = None
    if config.random_floor:
      random_params = model.init(jax.random.PRNGKey(seed + 1), num_samples)
      self.random_floor = self._frame_metrics(
          self._frames("_rwse_frames", random_params), "random")
    self.anchor_pooled = None
    if config.get("anchor"):
      self.anchor_pooled = _pooled_anchor_posteriors(
          config.anchor, self.sets["heldout"]["waves"],
          self.sets["heldout"]["lengths"])
    logging.info("%s: %d train / %d held-out utterances with alignments, %d "
                 "phonemes.", name, len(self.sets["train"]["waves"]),
                 len(self.sets["heldout"]["waves"]), self.num_phones)

  @staticmethod
  def _pick(labels: np.ndarray, count: int, rng) -> np.ndarray:
    flat = np.flatnonzero(labels.reshape(-1) >= 0)
    if len(flat) > count:
      flat = np.sort(rng.choice(flat, count, replace=False))
    return flat

  def _frames(self, fn_name: str, params) -> dict[str, np.ndarray]:
    fn = self._fns[fn_name]
    return {split: embed.batched(lambda w: fn(params, w), s["waves"],
                                 batch_size=self.batch_size)
            for split, s in self.sets.items()}

  def _frame_metrics(self, frames: dict, prefix: str, ctc: bool = True
                     ) -> dict:
    out = {}
    flat = {}
    for split, s in self.sets.items():
      f = frames[split].reshape(-1, frames[split].shape[-1])
      pick = self.frame_pick[split]
      flat[split] = (f[pick], s["labels"].reshape(-1)[pick])
    (xtr, ytr), (xte, yte) = flat["train"], flat["heldout"]
    linear = probe.linear_probe(
        np.concatenate([xtr, xte]), np.concatenate([ytr, yte]),
        test=np.r_[np.zeros(len(ytr), bool), np.ones(len(yte), bool)],
        seed=self.seed, max_iter=300)
    out[f"{self.name}/{prefix}_phone_linear"] = linear["accuracy"]
    out[f"{self.name}/phone_chance"] = linear["chance"]
    out[f"{self.name}/{prefix}_phone_knn"] = speaker_metrics.frame_knn_accuracy(
        xtr, ytr, xte, yte)
    if ctc:
      tr, te = self.sets["train"], self.sets["heldout"]
      head = phone_probe.train_ctc_head(
          frames["train"], tr["token_lengths"], tr["seqs"], self.num_phones,
          steps=self.config.ctc_steps, lr=self.config.ctc_lr, seed=self.seed)
      hyps = phone_probe.decode(head, frames["heldout"], te["token_lengths"])
      out[f"{self.name}/{prefix}_per"] = phone_probe.phone_error_rate(
          te["seqs"], hyps)
    return out

  def run(self, model: EchoModel, state: dict) -> dict:
    params = state["params"]
    content = self._frames("_content_frames", params)
    results = self._frame_metrics(content, "content")
    results.update(self._frame_metrics(
        self._frames("_speaker_frames", params), "speaker", ctc=False))
    held = self.sets["heldout"]
    mask = np.asarray(embed.token_mask(model, jnp.asarray(held["lengths"]),
                                       held["waves"].shape[-1]))
    pooled_content = ((content["heldout"] * mask[..., None]).sum(1)
                      / np.maximum(mask.sum(1, keepdims=True), 1))
    pooled_speaker = embed.batched(
        lambda w, n: self._speaker_embeddings(params, w, n), held["waves"],
        held["lengths"], batch_size=self.batch_size)
    gap = speaker_metrics.factorisation_gap(
        pooled_speaker, pooled_content, held["speaker_ids"], seed=self.seed)
    results.update({f"{self.name}/{k}": v for k, v in gap.items()})
    ceiling = speaker_metrics.factorisation_gap(
        pooled_speaker,
        phone_probe.phone_histograms(held["labels"], self.num_phones),
        held["speaker_ids"], seed=self.seed)
    results[f"{self.name}/phone_histogram_top1"] = ceiling["content_top1"]
    results[f"{self.name}/gap_ceiling_points"] = ceiling["gap_points"]
    if self.anchor_pooled is not None:
      anchor = speaker_metrics.factorisation_gap(
          pooled_speaker, self.anchor_pooled, held["speaker_ids"],
          seed=self.seed)
      results[f"{self.name}/anchor_top1"] = anchor["content_top1"]
      results[f"{self.name}/gap_anchor_points"] = anchor["gap_points"]
    if self.random_floor:
      results.update(self.random_floor)
    return results


def summary_line(stage: str, results: dict) -> str:
  """One console line of a content evaluation ({metric: value} without the
  evaluator's name prefix)."""
  r = results
  ceiling = (f"; {r['gap_ceiling_points']:+.1f} with the true phones as "
             "content" if "gap_ceiling_points" in r else "")
  if "gap_anchor_points" in r:
    ceiling += (f", {r['gap_anchor_points']:+.1f} with the anchor GMM's "
                "posteriors")
  return (f"{stage}: factorisation gap {r['gap_points']:+.1f} points (held-out "
          f"speaker top-1 {100 * r['speaker_top1']:.1f}% speaker projection, "
          f"{100 * r['content_top1']:.1f}% content projection{ceiling}); "
          f"phoneme frame "
          f"accuracy (linear) content {100 * r['content_phone_linear']:.1f}%, "
          f"speaker {100 * r['speaker_phone_linear']:.1f}%, random encoder "
          f"{100 * r.get('random_phone_linear', float('nan')):.1f}%; PER "
          f"{100 * r['content_per']:.1f}% (random encoder "
          f"{100 * r.get('random_per', float('nan')):.1f}%)")
