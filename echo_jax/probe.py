"""Probing a trained Echo encoder from a notebook: one import, no trainer.

  from echo_jax import probe
  p = probe.Probe.load("runs/cpu/stage2")            # EMA encoder, latest step
  emb = p.embed(["a.wav", wave_44k], sample_rate=44_100)
  emb.tokens        # [B, L, T, W] every encoder block, per token
  emb.heads         # {'speaker': [B, D], 'activity': [B, T], ...}
  p.speaker_knn([("a.wav", "alice"), ...], layer="projection")  # top1, eer
  probe.linear_probe(emb.frames(1), labels, groups=speakers)
  probe.plot_latent_map(probe.latent_map(x, method="tsne"), labels)

Long inputs. The encoder has positions for one training clip only, so an input
is cut into consecutive, non-overlapping chunks of that length (the last one
zero-padded), each chunk is encoded alone and the chunks' tokens are
concatenated in time. Token t therefore always covers samples
[t * P, (t + 1) * P) of the input (P = `token_samples`), whichever chunk it
came from; tokens next to a chunk boundary see only their own chunk. Tokens
not fully inside the audio are masked (`Embeddings.mask`) and zeroed; pooled
features and heads see the masked-in tokens of all chunks at once (the speaker
head pools a long file as one sequence).

Heads. A head becomes an output through `EXTRACTORS` (by head name). A head
with no entry there that reads the RWSE token features (as its
`heads.HEADS[name].init_inputs` say) is applied to them as is, so a later
stage's content or slot head shows up here without editing this file;
`Probe.load(..., extractors={name: fn})` adds or overrides one that needs more.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import audio_io
from data_pipelines import manifest as manifest_lib
from data_pipelines import phonemes as phonemes_lib
from data_pipelines import storage
from data_pipelines.framing import HOP, SAMPLE_RATE
from echo_jax import embed as embed_lib
from echo_jax import heads as heads_registry
from echo_jax import inference
from echo_jax.evaluators import speaker_metrics
from echo_jax.model import EchoModel

log = logging.getLogger(__name__)

AudioInput = str | os.PathLike | np.ndarray
Layer = int | str  # An encoder block (0-based), "rwse" or a head name.
PROJECTION = "projection"  # The speaker head's embedding.


class TokenFeatures(NamedTuple):
  """What an extractor reads: the concatenated chunks of a batch of inputs."""
  hidden: jax.Array       # [L, B, T, W] every encoder block.
  rwse: jax.Array | None  # [B, T, W] RWSE features (None: no rwse head).
  mask: jax.Array         # [B, T] bool, True for tokens inside the audio.


# (model, params, features) -> [B, T, ...] per token or [B, ...] per input;
# None: the head gives no feature.
Extractor = Callable[[EchoModel, dict, TokenFeatures], jax.Array]


def _speaker(model: EchoModel, params: dict, f: TokenFeatures) -> jax.Array:
  return model.apply_head("speaker", params, f.rwse, f.mask)  # [B, D]


def _activity(model: EchoModel, params: dict, f: TokenFeatures) -> jax.Array:
  logits = model.apply_head("activity", params, f.rwse)
  return jax.nn.sigmoid(logits.astype(jnp.float32))  # [B, T, 1] P(speech).


EXTRACTORS: Mapping[str, Extractor | None] = {
    "rwse": None,      # Its output is `Embeddings.rwse` itself.
    "speaker": _speaker,
    "arcface": None,   # Scores against the train speakers: not a feature.
    "activity": _activity,
}


def _frame_head(model: EchoModel, name: str, num_samples: int
                ) -> Extractor | None:
  """Applies head `name` to the RWSE tokens, if that is what it reads."""
  spec = heads_registry.HEADS.get(name)
  shapes = model.feature_shapes(num_samples)
  inputs = spec.init_inputs(shapes) if spec else ()
  if [x.shape for x in inputs] != [(1, shapes.tokens, shapes.width)]:
    return None
  return lambda m, params, f: m.apply_head(name, params, f.rwse)


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """Features of B inputs, padded to the longest; rows follow the inputs."""
  tokens: np.ndarray       # [B, L, T, W] encoder blocks, zero past `mask`.
  rwse: np.ndarray | None  # [B, T, W] RWSE features, zero past `mask`.
  mask: np.ndarray         # [B, T] bool, tokens fully inside the audio.
  # Head outputs by head name: per token [B, T, ...] (e.g. 'activity',
  # P(speech) [B, T, 1]) or per input [B, ...] (e.g. 'speaker' [B, D]).
  heads: dict[str, np.ndarray]
  lengths: np.ndarray      # [B] samples at 16 kHz.
  token_samples: int       # P: token t covers samples [t * P, (t + 1) * P).

  @property
  def num_tokens(self) -> int:
    return self.mask.shape[1]

  def names(self) -> list[Layer]:
    """Every valid `layer` argument: blocks, 'rwse', head outputs."""
    names: list[Layer] = list(range(self.tokens.shape[1]))
    names += ["rwse"] if self.rwse is not None else []
    names += [PROJECTION] if "speaker" in self.heads else []
    return names + [h for h in self.heads if h != "speaker"]

  def _raw(self, layer: Layer) -> np.ndarray:
    """[B, T, D] token or [B, D] pooled features of `layer`."""
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
      depth = self.tokens.shape[1]
      if not -depth <= layer < depth:
        raise ValueError(f"Layer {layer} is out of range: the encoder has "
                         f"{depth} blocks (0..{depth - 1}).")
      return self.tokens[:, layer]
    if layer == "rwse" and self.rwse is not None:
      return self.rwse
    name = "speaker" if layer == PROJECTION else layer
    if isinstance(name, str) and name in self.heads:
      out = self.heads[name]
      if out.ndim >= 3 and out.shape[1] == self.num_tokens:
        return out.reshape(*out.shape[:2], -1)  # Per token.
      return out.reshape(len(out), -1)
    raise ValueError(f"Unknown layer {layer!r}; this model has "
                     f"{self.names()}.")

  def pooled(self, layer: Layer) -> np.ndarray:
    """[B, D] per input: the mean of `layer`'s valid tokens, or the head's
    own pooled output (e.g. 'projection', the speaker embedding)."""
    x = self._raw(layer)
    if x.ndim == 2:
      return x
    w = self.mask[..., None].astype(np.float32)
    return (x * w).sum(1) / np.maximum(w.sum(1), 1.0)

  def token_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(input index [N], token index [N]) of the valid tokens, input-major:
    the rows of `frames`. Index [B, T] labels with them."""
    return np.nonzero(self.mask)

  def frames(self, layer: Layer) -> np.ndarray:
    """[N, D] valid tokens of `layer` (rows: `token_rows`). A pooled feature
    (e.g. 'projection') is repeated over its input's tokens, so token probes
    can set it against token features."""
    x = self._raw(layer)
    items, tokens = self.token_rows()
    return x[items] if x.ndim == 2 else x[items, tokens]


def _to_mono(item: AudioInput, index: int, sample_rate: int) -> np.ndarray:
  """One input -> float32 [N] at 16 kHz, checked like `audio_io.read_audio`."""
  if isinstance(item, (str, os.PathLike)):
    return audio_io.read_audio(os.fspath(item)).samples
  if not isinstance(item, np.ndarray) and not hasattr(item, "__array__"):
    raise TypeError(f"Input {index} is a {type(item).__name__}; expected a "
                    "file path or a waveform array ([samples] or [channels, "
                    "samples]).")
  return audio_io.condition(np.asarray(item, np.float32), sample_rate,
                           f"input {index}").samples


def _encode(model: EchoModel, params: dict, waves: jax.Array) -> jax.Array:
  """[B, S] chunks -> [L (+1 RWSE), B, T, W] float32 token features."""
  hidden = model.encoder.apply({"params": params["encoder"]},
                               model.log_mel(waves))["hidden"]
  if "rwse" in model.heads:
    rwse = model.apply_head("rwse", params, hidden)
    hidden = jnp.concatenate([hidden, rwse[None].astype(hidden.dtype)], 0)
  return hidden.astype(jnp.float32)


def _apply_extractors(model: EchoModel, extractors: Mapping[str, Extractor],
                      params: dict, hidden: jax.Array, rwse, mask: jax.Array
                      ) -> dict[str, jax.Array]:
  f = TokenFeatures(hidden, rwse, mask)
  return {name: jnp.asarray(fn(model, params, f), jnp.float32)
          for name, fn in extractors.items()}


@dataclasses.dataclass(frozen=True)
class Probe:
  """An encoder (and its stage's heads) ready to embed audio.

  `num_samples` is the chunk length: the training clip, whose positions the
  encoder has. `chunk_batch` chunks go through the encoder per call (one
  compilation serves any input).
  """
  model: EchoModel
  params: dict
  num_samples: int
  extractors: Mapping[str, Extractor | None] = dataclasses.field(
      default_factory=dict)
  chunk_batch: int = 8

  @classmethod
  def load(cls, workdir: str, *, step: int | None = None,
           weights: str = "ema", mesh: jax.sharding.Mesh | None = None,
           extractors: Mapping[str, Extractor | None] | None = None,
           chunk_batch: int = 8) -> Probe:
    """From any stage's workdir (`inference.load`). weights='ema' (default)
    probes the EMA target encoder, as JEPA probes do; 'online' is the one
    the heads were trained with. `extractors` add to or override
    `EXTRACTORS`."""
    loaded = inference.load(workdir, step=step, weights=weights, mesh=mesh)
    return cls(loaded.model, loaded.params, loaded.num_samples,
               dict(extractors or {}), chunk_batch)

  @property
  def token_samples(self) -> int:
    return HOP * self.model.patch_frames

  @property
  def chunk_samples(self) -> int:
    """The clip length in whole tokens, so chunks keep the token grid."""
    return self.model.num_tokens(self.num_samples) * self.token_samples

  @functools.cached_property
  def head_extractors(self) -> dict[str, Extractor]:
    """The heads that give an output, in the model's order."""
    chosen = {}
    for name in self.model.heads:
      if name in self.extractors:
        fn = self.extractors[name]
      elif name in EXTRACTORS:
        fn = EXTRACTORS[name]
      else:
        fn = _frame_head(self.model, name, self.num_samples)
        if fn is None:
          log.warning("Head %r reads more than the RWSE tokens and has no "
                      "extractor; pass extractors={%r: fn} to see it.",
                      name, name)
      if fn is not None:
        chosen[name] = fn
    return chosen

  @functools.cached_property
  def _encode_fn(self):
    return jax.jit(functools.partial(_encode, self.model))

  @functools.cached_property
  def _heads_fn(self):
    return jax.jit(functools.partial(_apply_extractors, self.model,
                                     self.head_extractors))

  def embed(self, inputs: Sequence[AudioInput], *,
            sample_rate: int = SAMPLE_RATE) -> Embeddings:
    """Token, RWSE and head features of files or waveforms.

    Args:
      inputs: audio files (any format `audio_io.read_audio` reads) and/or
        waveforms [samples] or [channels, samples] (channels averaged); a
        2-D array is a batch of waveforms (its rows).
      sample_rate: rate of the waveforms (files carry their own); others
        are resampled to 16 kHz.
    """
    if isinstance(inputs, (str, os.PathLike)) or (
        isinstance(inputs, np.ndarray) and inputs.ndim == 1):
      raise TypeError("Expected a list of inputs; wrap one input in [...].")
    if len(inputs) == 0:
      raise ValueError("No audio to embed: `inputs` is empty.")
    if sample_rate <= 0:
      raise ValueError(f"sample_rate must be > 0; found {sample_rate}.")
    waves = [_to_mono(x, i, sample_rate) for i, x in enumerate(inputs)]
    lengths = np.array([len(w) for w in waves], np.int64)
    size = self.chunk_samples
    counts = [max(1, -(-len(w) // size)) for w in waves]
    chunks = np.concatenate([
        np.pad(w, (0, n * size - len(w))).reshape(n, size)
        for w, n in zip(waves, counts)])
    feats = embed_lib.batched(functools.partial(self._encode_fn, self.params),
                              chunks, batch_size=self.chunk_batch, axis=1)
    return self._assemble(feats, counts, lengths)

  def _assemble(self, feats: np.ndarray, counts: list[int],
                lengths: np.ndarray) -> Embeddings:
    """[L', chunks, Tc, W] chunk features -> per-input token sequences."""
    per_chunk = feats.shape[2]
    num_tokens = max(counts) * per_chunk
    mask = (np.arange(num_tokens)[None] <
            np.maximum(lengths // self.token_samples, 1)[:, None])
    padded = np.zeros((len(counts), feats.shape[0], num_tokens,
                       feats.shape[3]), np.float32)
    starts = np.cumsum([0] + counts)
    for i, n in enumerate(counts):
      sequence = feats[:, starts[i]:starts[i] + n]
      padded[i, :, :n * per_chunk] = sequence.reshape(feats.shape[0], -1,
                                                      feats.shape[3])
    padded *= mask[:, None, :, None]
    depth = self.model.encoder.depth
    tokens, rwse = padded[:, :depth], (padded[:, depth] if padded.shape[1] >
                                       depth else None)
    heads = {}
    if self.head_extractors:
      out = self._heads_fn(self.params, np.moveaxis(tokens, 1, 0), rwse, mask)
      heads = {k: np.asarray(v) for k, v in out.items()}
    return Embeddings(tokens, rwse, mask, heads, lengths, self.token_samples)

  def speaker_knn(self, items: Sequence[tuple[AudioInput, str]], *,
                  layer: Layer = PROJECTION, sample_rate: int = SAMPLE_RATE,
                  seed: int = 0) -> dict[str, float]:
    """Speaker ID top-1 (cosine 1-NN, enrolment/test split per speaker) and
    EER over all pairs (`speaker_metrics.speaker_report`) of `layer`'s pooled
    features of (input, speaker) pairs."""
    if len(items) == 0:
      raise ValueError("speaker_knn needs (input, speaker) pairs; got none.")
    inputs, speakers = zip(*items)
    emb = self.embed(list(inputs), sample_rate=sample_rate)
    return speaker_scores(emb, speakers, layer, seed=seed)


def speaker_scores(emb: Embeddings, speakers: Sequence,
                   layer: Layer = PROJECTION, *, seed: int = 0
                   ) -> dict[str, float]:
  """{'top1', 'eer'} of `emb.pooled(layer)` with one speaker per input."""
  speakers = np.asarray(speakers)
  if len(np.unique(speakers)) < 2:
    raise ValueError(f"Speaker scores need >= 2 speakers; found "
                     f"{np.unique(speakers).tolist()}.")
  return speaker_metrics.speaker_report(emb.pooled(layer), speakers,
                                        seed=seed)


def linear_probe(features: np.ndarray, labels: np.ndarray, *,
                 groups: np.ndarray | None = None,
                 test: np.ndarray | None = None, test_fraction: float = 0.3,
                 seed: int = 0, max_iter: int = 500) -> dict[str, float]:
  """Logistic-regression accuracy of `labels` from `features` on held-out rows.

  Args:
    features: [N, D]; labels: [N] (integer labels < 0, e.g. unlabelled or
      silent phoneme tokens, are left out).
    groups: [N] e.g. speakers: the test rows are whole groups
      (`test_fraction` of them), so no speaker is on both sides.
    test: [N] bool, a given split (overrides `groups`). Neither: random rows.

  Returns:
    accuracy; chance (the train set's most frequent label, on the test
    rows); num_train, num_test, num_classes.
  """
  from sklearn import linear_model, model_selection, pipeline, preprocessing
  x, y = np.asarray(features, np.float32), np.asarray(labels)
  if x.ndim != 2 or len(x) != len(y) or y.ndim != 1:
    raise ValueError(f"Expected features [N, D] and labels [N]; found "
                     f"{x.shape} and {y.shape}.")
  keep = y >= 0 if np.issubdtype(y.dtype, np.integer) else np.ones(len(y), bool)
  if test is not None:
    test = np.asarray(test, bool)
    if test.shape != y.shape:
      raise ValueError(f"Expected test [N] = {y.shape}; found {test.shape}.")
  else:
    splitter = (model_selection.GroupShuffleSplit if groups is not None
                else model_selection.ShuffleSplit)
    rows = np.flatnonzero(keep)
    _, test_rows = next(splitter(n_splits=1, test_size=test_fraction,
                                 random_state=seed).split(
        rows, groups=None if groups is None else np.asarray(groups)[rows]))
    test = np.zeros(len(y), bool)
    test[rows[test_rows]] = True
  train, test = keep & ~test, keep & test
  if len(np.unique(y[train])) < 2 or not test.any():
    raise ValueError(f"The split leaves {train.sum()} train rows with "
                     f"{len(np.unique(y[train]))} classes and {test.sum()} "
                     "test rows; a probe needs >= 2 classes and a test row.")
  classifier = pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(max_iter=max_iter))
  classifier.fit(x[train], y[train])
  values, counts = np.unique(y[train], return_counts=True)
  return {"accuracy": float(classifier.score(x[test], y[test])),
          "chance": float(np.mean(y[test] == values[np.argmax(counts)])),
          "num_train": int(train.sum()), "num_test": int(test.sum()),
          "num_classes": int(len(values))}


def corpus_utterances(manifest_path: str, *, split: str = manifest_lib.HELDOUT,
                      per_speaker: int | None = None
                      ) -> list[manifest_lib.Utterance]:
  """The first `per_speaker` utterances of each speaker of `split`, speakers
  sorted, in manifest order."""
  utts = [u for u in manifest_lib.read_manifest(manifest_path)
          if u.split == split]
  if not utts:
    raise ValueError(f"{manifest_path} has no utterance of split {split!r}.")
  by_speaker: dict[str, list] = {}
  for u in utts:
    by_speaker.setdefault(u.speaker, []).append(u)
  return [u for s in sorted(by_speaker) for u in by_speaker[s][:per_speaker]]


def read_utterances(manifest_path: str,
                    utterances: Sequence[manifest_lib.Utterance]
                    ) -> list[np.ndarray]:
  """Whole waveforms (float32 [N], 16 kHz) of stored utterances."""
  store = storage.AudioStore(manifest_path)
  return [store.read(u) for u in utterances]


def token_phonemes(manifest_path: str,
                   utterances: Sequence[manifest_lib.Utterance],
                   num_tokens: int, token_samples: int
                   ) -> tuple[np.ndarray, phonemes_lib.PhonemeInventory]:
  """Phoneme id per token of utterances embedded from their start.

  Token t takes the label at its centre sample, t * P + P // 2 (P =
  `token_samples`), as `phonemes.frame_labels` does for frames. Ids as in
  `phonemes.py`: >= 0 phonemes of the manifest's inventory, SILENCE (-2),
  UNKNOWN (-1: no alignment, past the end).

  Returns:
    labels int32 [U, num_tokens] (index with `Embeddings.token_rows`), and
    the inventory (`symbols[id]` names a phoneme).
  """
  try:
    inventory = phonemes_lib.PhonemeInventory.for_manifest(manifest_path)
  except PermissionError:  # A read-only corpus: build it in memory.
    inventory = phonemes_lib.PhonemeInventory.from_manifest(manifest_path)
  root = os.path.dirname(os.path.abspath(manifest_path))
  centres = np.arange(num_tokens, dtype=np.int64) * token_samples + (
      token_samples // 2)
  labels = np.full((len(utterances), num_tokens), phonemes_lib.UNKNOWN,
                   np.int32)
  for i, u in enumerate(utterances):
    if u.alignment:
      track = phonemes_lib.Intervals.from_alignment(
          os.path.join(root, u.alignment), inventory, u.sample_rate)
      inside = centres < u.num_samples
      labels[i, inside] = track.labels_at(centres[inside])
  return labels, inventory


def latent_map(features: np.ndarray, *, method: str = "tsne", seed: int = 0,
               perplexity: float | None = None) -> np.ndarray:
  """[N, D] -> [N, 2] points: t-SNE (perplexity min(30, (N - 1) / 3) unless
  given) or PCA, from scikit-learn."""
  from sklearn import decomposition, manifold
  x = np.asarray(features, np.float32)
  if x.ndim != 2 or len(x) < 3:
    raise ValueError(f"Expected features [N >= 3, D]; found {x.shape}.")
  if method == "pca":
    return decomposition.PCA(n_components=2, random_state=seed).fit_transform(x)
  if method == "tsne":
    perplexity = perplexity or min(30.0, (len(x) - 1) / 3)
    return manifold.TSNE(n_components=2, perplexity=perplexity, init="pca",
                         random_state=seed).fit_transform(x)
  raise ValueError(f"Unknown method {method!r}; choose 'tsne' or 'pca'.")


def plot_latent_map(points: np.ndarray, labels: Sequence, *, ax=None,
                    title: str = "", max_legend: int = 20):
  """Scatter of [N, 2] points coloured by label (speaker, phoneme, ...);
  returns the matplotlib Axes. The legend lists up to `max_legend` labels."""
  import matplotlib.pyplot as plt
  points, labels = np.asarray(points), np.asarray(labels)
  if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
    raise ValueError(f"Expected points [N, 2] and labels [N]; found "
                     f"{points.shape} and {labels.shape}.")
  ax = ax or plt.subplots(figsize=(6, 5))[1]
  classes = np.unique(labels)
  cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
  for i, c in enumerate(classes):
    at = labels == c
    ax.scatter(points[at, 0], points[at, 1], s=8, color=cmap(i % cmap.N),
               label=str(c) if i < max_legend else None)
  ax.legend(fontsize="small", markerscale=2, frameon=False, loc="upper left",
            bbox_to_anchor=(1, 1))  # Outside: points fill the axes.
  ax.set(title=title, xticks=[], yticks=[])
  return ax
