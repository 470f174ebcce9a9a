"""2-D maps of the latent space of each stage, on held-out speakers:
utterances (mean-pooled tokens) coloured by speaker, tokens coloured by the
phoneme under them, and the speaker projection where the stage has one.

Features: the EMA target encoder at the layer where the speaker evaluator
found the best k-NN top-1 (the last layer if it logged none), the same
encoder and layer the metrics table reports; the speaker projection uses the
online encoder its head was trained on. Points are reduced with PCA then
t-SNE (scikit-learn).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import matplotlib
import matplotlib.figure
import numpy as np
from sklearn import decomposition, manifold
from threadpoolctl import threadpool_limits

from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures, phonemes, stream
from data_pipelines.framing import HOP, SAMPLE_RATE
from echo_jax import embed, inference
from echo_jax.report.page import Context, Fragment, save_png
from echo_jax.report.stages import StageRun

MAX_SPEAKERS = 12          # Distinguishable colours.
UTTERANCES_PER_SPEAKER = 10
MAX_TOKENS = 1000          # t-SNE stays about 10 s on a busy core.
TOP_PHONEMES = 10          # The most frequent ones; the rest would be noise.
BATCH = 16


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out clips and their labels."""
  waves: np.ndarray          # [U, N] float32, zero-padded.
  lengths: np.ndarray        # [U] valid samples.
  speakers: np.ndarray       # [U] speaker names.
  token_phonemes: np.ndarray  # [U, T] phoneme ids (phonemes.UNKNOWN / SILENCE).
  symbols: tuple[str, ...]   # Phoneme id -> symbol.


def held_out(manifest_path: str, num_samples: int, patch_frames: int
             ) -> HeldOut:
  """The first `num_samples` of up to UTTERANCES_PER_SPEAKER utterances of
  MAX_SPEAKERS held-out speakers, and the phoneme at each token's centre."""
  index = mixtures.MixtureIndex.from_manifest(manifest_path,
                                              manifest_lib.HELDOUT)
  chosen = [int(i) for spk in index.by_speaker[:MAX_SPEAKERS]
            for i in spk[:UTTERANCES_PER_SPEAKER]]
  clips = embed.load_clips(manifest_path, [index.utterances[i] for i in chosen],
                           num_samples, context="latent map")
  by_id = {index.utterances[i].utt_id: i for i in chosen}
  tokens = (num_samples // HOP) // patch_frames
  centres = (np.arange(tokens) * patch_frames + patch_frames // 2) * HOP
  labels = np.full((len(clips.utterances), tokens), phonemes.UNKNOWN, np.int32)
  for row, (utt, length) in enumerate(zip(clips.utterances, clips.lengths)):
    track = index.intervals[by_id[utt.utt_id]]
    if track is not None:
      labels[row] = np.where(centres < length, track.labels_at(centres),
                             phonemes.UNKNOWN)
  symbols = index.inventory.symbols if index.inventory else ()
  return HeldOut(clips.waves, clips.lengths,
                 np.array([u.speaker for u in clips.utterances]), labels,
                 symbols)


def _layer_tokens(model, encoder_params, waves, layer: int):
  return model.encoder.apply({"params": encoder_params},
                             model.log_mel(waves))["hidden"][layer]


def to_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
  """[n, d] -> [n, 2]: PCA to <= 50 dims, then t-SNE (PCA alone for n < 8)."""
  x = np.asarray(x, np.float64)
  x = decomposition.PCA(min(50, *x.shape), random_state=seed).fit_transform(x)
  if len(x) < 8:
    return x[:, :2] if x.shape[1] >= 2 else np.pad(x, ((0, 0), (0, 1)))
  perplexity = float(min(30, (len(x) - 1) / 3))
  # One OpenMP thread: on a loaded 2-core machine t-SNE's default thread
  # count ran 10x slower (oversubscription).
  with threadpool_limits(1):
    return manifold.TSNE(2, perplexity=perplexity, init="pca",
                         random_state=seed).fit_transform(x)


def _scatter(ax, points, labels, title, names=None):
  """One colour per label (tab10, or tab20 past 10 labels), legend outside."""
  values = sorted(set(labels.tolist()))
  colours = matplotlib.colormaps["tab10" if len(values) <= 10 else "tab20"]
  for i, label in enumerate(values):
    at = labels == label
    ax.scatter(points[at, 0], points[at, 1], s=9, color=colours(i % 20),
               label=names[label] if names else str(label))
  ax.set_title(title, fontsize=10)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=7, markerscale=1.5, loc="center left",
            bbox_to_anchor=(1.0, 0.5), frameon=False)


def stage_features(run: StageRun, layer: int, seed: int = 0) -> dict:
  """Pooled and token features of the held-out clips for `run`'s encoder."""
  ema = inference.load(run.workdir, weights="ema")
  manifest_path = stream.resolve_manifest(ema.config.data)
  data = held_out(manifest_path, ema.num_samples, ema.model.patch_frames)
  tokens_fn = jax.jit(functools.partial(_layer_tokens, ema.model, layer=layer))
  tokens = embed.batched(lambda w: tokens_fn(ema.params["encoder"], w),
                         data.waves, batch_size=BATCH)      # [U, T, W]
  mask = np.asarray(embed.token_mask(ema.model, data.lengths,
                                     data.waves.shape[-1]))
  pooled = (tokens * mask[..., None]).sum(1) / np.maximum(
      mask.sum(1, keepdims=True), 1)
  labelled = data.token_phonemes >= 0
  ids, counts = np.unique(data.token_phonemes[labelled], return_counts=True)
  top = ids[np.argsort(-counts)[:TOP_PHONEMES]]
  rows, cols = np.nonzero(np.isin(data.token_phonemes, top) & mask)
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.permutation(len(rows))[:MAX_TOKENS])
  out = dict(pooled=pooled, speakers=data.speakers,
             tokens=tokens[rows[keep], cols[keep]],
             phonemes=data.token_phonemes[rows[keep], cols[keep]],
             symbols=data.symbols, projection=None,
             token_ms=1000 * HOP * ema.model.patch_frames // SAMPLE_RATE)
  if "speaker" in ema.model.heads:
    online = inference.load(run.workdir)
    project = embed.jit_with_model(embed.speaker_embeddings, online.model)
    out["projection"] = embed.batched(
        lambda w, n: project(online.params, w, n), data.waves, data.lengths,
        batch_size=BATCH)
  return out


def plot(features: dict, layer: int, title: str) -> matplotlib.figure.Figure:
  panels = 3 if features["projection"] is not None else 2
  fig = matplotlib.figure.Figure(figsize=(5.2 * panels, 4.2))
  axes = fig.subplots(1, panels)
  _scatter(axes[0], to_2d(features["pooled"]), features["speakers"],
           f"utterances by speaker (layer {layer}, mean-pooled)")
  if len(features["tokens"]):
    _scatter(axes[1], to_2d(features["tokens"]), features["phonemes"],
             f"{features['token_ms']} ms tokens by phoneme (layer {layer}, "
             f"top {TOP_PHONEMES})",
             names=dict(enumerate(features["symbols"])))
  else:
    axes[1].set_title("no phoneme alignments in this corpus", fontsize=10)
  if panels == 3:
    _scatter(axes[2], to_2d(features["projection"]), features["speakers"],
             "utterances by speaker (speaker projection)")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def section(ctx: Context) -> list[Fragment]:
  figures = []
  for run in ctx.stages:
    best = run.final.get("speaker/target_best_layer")
    layer = (int(best) if best is not None
             else run.config.model.encoder.depth - 1)
    features = stage_features(run, layer)
    figures.append(save_png(
        plot(features, layer, run.stage.name), ctx, f"latent_{run.stage.name}",
        f"{run.stage.name}: t-SNE of {len(features['pooled'])} held-out "
        f"utterances of {len(set(features['speakers']))} speakers and "
        f"{len(features['tokens'])} of their tokens (EMA encoder, layer "
        f"{layer}" + ("; speaker projection on the online encoder)."
                      if features["projection"] is not None else ").")))
  return [Fragment("Latent map", figures=tuple(figures))] if figures else []
