"""The Echo model as the diarization front-end: a stage-2 checkpoint gives the
window speaker embeddings and the speech activity that `pipeline.diarize`
consumes, and the PLDA back-end is fitted on its train-speaker embeddings.
A stage-4 checkpoint (with the router) also gives, per window, the routing
slots' existence, activity and speaker embeddings that the overlap-aware
path (`overlap.diarize_overlap`) consumes.

Which params: the *online* params (`state["params"]`), not the EMA target.
The heads (RWSE, speaker projection, activity) were trained on top of the
online encoder, and the EMA target holds only an encoder, so online encoder +
heads is the one consistent set.

Both model calls are jitted once per shape with the params as an argument (a
new step's params reuse the compiled code): windows go through in batches of
`cfg.batch_windows` (last one zero-padded) and speech activity runs on
fixed-length chunks of the training clip length, `chunk_batch` at a time, so
memory is bounded and one compilation serves every recording length.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from data_pipelines import stream
from data_pipelines.framing import HOP
from echo_jax import embed, inference
from echo_jax.diarization import overlap as overlap_lib
from echo_jax.diarization import pipeline
from echo_jax.diarization import plda as plda_lib
from echo_jax.diarization import rttm
from echo_jax.model import EchoModel
from echo_jax.objectives import routing as routing_lib

_log = logging.getLogger(__name__)

# Heads a diarization checkpoint needs (stage 2 or later).
REQUIRED_HEADS = ("rwse", "speaker", "activity")
# The overlap-aware path also needs the stage-4 router.
OVERLAP_HEADS = REQUIRED_HEADS + ("router",)
METHODS = ("vbx", "overlap")
# A slot's embedding pools the tokens where it speaks alone when it has at
# least this many; else all its active tokens.
MIN_ALONE_TOKENS = 5
PLDA_FILE = "plda.npz"
# Bumped when the PLDA fitting recipe changes, so stale files are refitted.
_PLDA_RECIPE_VERSION = 1


def load_stage_model(workdir: str, step: int | None = None
                     ) -> tuple[EchoModel, dict]:
  """(EchoModel, online params) of a checkpoint that can diarize."""
  loaded = _load_for_diarization(workdir, step)
  return loaded.model, loaded.params


def _load_for_diarization(workdir: str, step: int | None = None
                          ) -> inference.Loaded:
  loaded = inference.load(workdir, step=step)
  missing = [h for h in REQUIRED_HEADS if h not in loaded.model.heads]
  if missing:
    raise ValueError(
        f"{workdir} (step {loaded.step}, stage "
        f"{loaded.config.get('stage', '?')!r}) has no {missing} head(s); its "
        f"heads are {list(loaded.model.heads)}. Diarization needs "
        f"{list(REQUIRED_HEADS)}: use a stage-2 (speaker) or later workdir.")
  return loaded


def _token_speech_probs(model: EchoModel, params: dict, waves: jax.Array
                        ) -> jax.Array:
  """[B, S] -> [B, T] per-token speech probabilities."""
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  logits = model.apply_head("activity", params, feats)[..., 0]
  return jax.nn.sigmoid(logits.astype(jnp.float32))


def _route_windows(model: EchoModel, null_weight: float, params: dict,
                   waves: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[W, N] windows -> existence [W, S] and token activity [W, S, T]
  probabilities of the router's last layer, and per-slot speaker embeddings
  [W, S, D]: the stage-2 pooling over the tokens where the slot is active
  and no other existing slot is (all its active tokens when it has fewer
  than MIN_ALONE_TOKENS such tokens)."""
  feats, _ = model.features(params, params["encoder"], model.log_mel(waves))
  # Existence and activity only: a residual router's latents are not read.
  out = model.apply_head("router", params, feats)
  existence = routing_lib.existence_probability(out["existence"][-1],
                                                null_weight)
  activity = jax.nn.sigmoid(out["activity"][-1])
  active = (activity > 0.5) & (existence > 0.5)[..., None]
  alone = active & (active.sum(1, keepdims=True) == 1)
  mask = jnp.where(alone.sum(-1, keepdims=True) >= MIN_ALONE_TOKENS, alone,
                   active)
  mask = jnp.where(mask.any(-1, keepdims=True), mask, True)
  w, s, t = activity.shape
  slot_feats = jnp.broadcast_to(feats[:, None], (w, s) + feats.shape[1:])
  embeddings = model.apply_head("speaker", params,
                                slot_feats.reshape((w * s,) + feats.shape[1:]),
                                mask.reshape(w * s, t))
  return existence, activity, embeddings.reshape(w, s, -1)


class EchoDiarizer:
  """Blind diarization with a stage-2 Echo model (`pipeline.diarize` inside).

  Args:
    model, params: from `load_stage_model` (or a training state's params).
    chunk_samples: speech-activity chunk length, normally the training clip
      length (`clip_samples(config)`): positions stay inside what the model saw.
    cfg: pipeline settings (`DiarizationConfig`).
    plda: fitted back-end; `fit_plda` / `load_or_fit_plda` set it.
    chunk_batch: activity chunks per model call.
    null_weight: the stage-4 training's null-slot weight, which calibrates
      the router's existence (`routing.existence_probability`).
  """

  def __init__(self, model: EchoModel, params: dict, *, chunk_samples: int,
               cfg: pipeline.DiarizationConfig | None = None,
               plda: plda_lib.PLDABackend | None = None,
               chunk_batch: int = 8, null_weight: float = 1.0):
    missing = [h for h in REQUIRED_HEADS if h not in params["heads"]]
    if missing:
      raise ValueError(f"params have no {missing} head(s) (found"
                       f" {sorted(params['heads'])}); diarization needs a"
                       " stage-2 or later model.")
    patch = HOP * model.patch_frames
    if chunk_samples < patch:
      raise ValueError(f"chunk_samples={chunk_samples} is shorter than one"
                       f" token ({patch} samples).")
    self.model, self.params = model, params
    self.cfg = cfg or pipeline.DiarizationConfig()
    self.plda = plda
    self.chunk_samples = int(chunk_samples)
    self.chunk_batch = int(chunk_batch)
    self._embed = embed.jit_with_model(embed.speaker_embeddings, model)
    self._speech = jax.jit(functools.partial(_token_speech_probs, model))
    self._route = (jax.jit(functools.partial(_route_windows, model,
                                             null_weight))
                   if "router" in params["heads"] else None)
    # Overlap-aware path: windows of the training clip length (positions the
    # router saw), 50% hop.
    self.overlap_cfg = overlap_lib.OverlapConfig(
        window_seconds=self.chunk_samples / manifest_lib.SAMPLE_RATE)
    self.workdir: str | None = None
    self.step: int | None = None
    self.train_manifest: str | None = None

  @classmethod
  def from_workdir(cls, workdir: str,
                   cfg: pipeline.DiarizationConfig | None = None
                   ) -> "EchoDiarizer":
    """Diarizer of the latest checkpoint in `workdir` (PLDA not yet fitted)."""
    loaded = _load_for_diarization(workdir)
    routing = loaded.config.objective.get("routing") or {}
    diarizer = cls(loaded.model, loaded.params,
                   chunk_samples=loaded.num_samples, cfg=cfg,
                   null_weight=routing.get("null_weight", 1.0))
    diarizer.workdir, diarizer.step = workdir, loaded.step
    try:
      diarizer.train_manifest = stream.resolve_manifest(loaded.config.data)
    except FileNotFoundError as e:
      _log.warning("Training manifest of %s not found (%s); pass a manifest"
                   " to fit_plda.", workdir, e)
    return diarizer

  @property
  def has_router(self) -> bool:
    """Whether the overlap-aware path is available (a stage-4 model)."""
    return self._route is not None

  def route_windows(self, windows: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[W, S] windows -> existence [W, slots], frame activity
    [W, slots, S // 160] at 10 ms, slot embeddings [W, slots, D]."""
    if self._route is None:
      raise ValueError("This model has no router head; the overlap-aware"
                       " path needs a stage-4 (routing) checkpoint. Use the"
                       " VBx path (method 'vbx').")
    windows = np.asarray(windows, np.float32)
    batch = self.chunk_batch
    outs = []
    for start in range(0, len(windows), batch):
      rows = windows[start:start + batch]
      real = len(rows)
      rows = np.pad(rows, ((0, batch - real), (0, 0)))
      outs.append([np.asarray(a)[:real] for a in self._route(self.params,
                                                             rows)])
    existence, tokens, embeddings = (np.concatenate(parts)
                                     for parts in zip(*outs))
    frames = np.repeat(tokens, self.model.patch_frames, axis=-1)
    num_frames = windows.shape[1] // HOP
    frames = np.pad(frames, ((0, 0), (0, 0),
                             (0, max(0, num_frames - frames.shape[-1]))),
                    mode="edge")[..., :num_frames]
    return existence, frames, embeddings

  def diarize_waveform_overlap(self, waveform: np.ndarray,
                               file_id: str = "file", *,
                               cfg: overlap_lib.OverlapConfig | None = None
                               ) -> list[rttm.Segment]:
    """[N] 16 kHz -> segments by the overlap-aware path (overlapping
    segments where two speakers talk at once)."""
    if self.plda is None:
      raise RuntimeError("No PLDA back-end: call fit_plda() or"
                         " load_or_fit_plda() first.")
    return overlap_lib.diarize_overlap(
        waveform, route_windows=self.route_windows, plda=self.plda,
        cfg=cfg or self.overlap_cfg, file_id=file_id)

  @property
  def window_samples(self) -> int:
    return int(round(self.cfg.window_seconds / pipeline.FRAME_SECONDS)
               ) * HOP

  def embed_windows(self, windows: np.ndarray) -> np.ndarray:
    """[W, S] float32 16 kHz windows -> [W, D] speaker embeddings."""
    windows = np.asarray(windows, np.float32)
    if windows.ndim != 2:
      raise ValueError(f"windows must be [W, samples]; found {windows.shape}.")
    if windows.shape[1] < HOP * self.model.patch_frames:
      raise ValueError(f"windows of {windows.shape[1]} samples are shorter"
                       f" than one token ({HOP * self.model.patch_frames}).")
    if len(windows) == 0:
      return np.zeros((0, self.model.speaker_dim), np.float32)
    return embed.batched(lambda w: self._embed(self.params, w), windows,
                         batch_size=self.cfg.batch_windows)

  def speech_activity(self, waveform: np.ndarray) -> np.ndarray:
    """[N] float32 16 kHz -> [N // 160] speech probabilities at 10 ms.

    Chunks of `chunk_samples` every half chunk, the last one ending at the
    recording's last whole frame (`overlap.window_starts`); a recording
    shorter than one chunk is padded by mirroring (`pipeline.pad_to`).
    Overlapping chunk outputs are averaged, so no frame sits only at a chunk
    edge where the model has one-sided context. Token probabilities are
    repeated over their `patch_frames` frames; frames after a chunk's last
    whole token take that token's value.
    """
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 1:
      raise ValueError(f"waveform must be [N] mono; found {waveform.shape}.")
    num_frames = len(waveform) // HOP
    if num_frames == 0:
      return np.zeros(0, np.float32)
    chunk = self.chunk_samples
    chunk_frames = chunk // HOP
    starts = overlap_lib.window_starts(num_frames, chunk_frames,
                                       max(1, chunk_frames // 2))
    padded = pipeline.pad_to(waveform, starts[-1] * HOP + chunk)
    rows = np.stack([padded[s * HOP:s * HOP + chunk] for s in starts])
    tokens = embed.batched(lambda w: self._speech(self.params, w), rows,
                           batch_size=self.chunk_batch)
    frame_probs = np.repeat(tokens, self.model.patch_frames, axis=1)
    frame_probs = np.pad(
        frame_probs, ((0, 0), (0, chunk_frames - frame_probs.shape[1])),
        mode="edge")
    total = np.zeros(starts[-1] + chunk_frames)
    count = np.zeros(starts[-1] + chunk_frames)
    for s, p in zip(starts, frame_probs):
      total[s:s + chunk_frames] += p
      count[s:s + chunk_frames] += 1
    return (total[:num_frames] / count[:num_frames]).astype(np.float32)

  def fit_plda(self, manifest_path: str | None = None, *,
               split: str = manifest_lib.TRAIN, windows_per_utterance: int = 3,
               max_utterances_per_speaker: int | None = None, seed: int = 0,
               save: bool = True) -> plda_lib.PLDABackend:
    """Fits the PLDA on `window_seconds` windows cut from `split` utterances.

    Windows start at seeded random offsets (an utterance shorter than a
    window gives one zero-padded window). With `save` and a workdir, writes
    `<workdir>/plda.npz` with a record of how it was fitted.
    """
    manifest_path = manifest_path or self.train_manifest
    if not manifest_path:
      raise ValueError("fit_plda needs a manifest of train speakers; pass"
                       " manifest_path.")
    windows, labels = plda_windows(
        manifest_path, self.window_samples, split=split,
        windows_per_utterance=windows_per_utterance,
        max_utterances_per_speaker=max_utterances_per_speaker, seed=seed)
    embeddings = self.embed_windows(windows)
    self.plda = pipeline.fit_plda(embeddings, labels, self.cfg)
    _log.info("PLDA fitted on %d windows of %d speakers (dim %d).",
                 len(labels), len(set(labels)), self.plda.dim)
    if save and self.workdir:
      record = self._plda_record(manifest_path, split, windows_per_utterance,
                                 max_utterances_per_speaker, seed)
      path = epath.Path(self.workdir) / PLDA_FILE
      tmp = path.parent / f"{PLDA_FILE}.tmp"
      with tmp.open("wb") as f:
        np.savez(f, record=np.array(json.dumps(record, sort_keys=True)),
                 **self.plda.to_dict())
      tmp.replace(path)  # Atomic overwrite of a stale file.
    return self.plda

  def load_or_fit_plda(self, manifest_path: str | None = None,
                       **fit_kwargs) -> plda_lib.PLDABackend:
    """`<workdir>/plda.npz` when it was fitted the same way, else `fit_plda`."""
    manifest_path = manifest_path or self.train_manifest
    if self.workdir:
      path = epath.Path(self.workdir) / PLDA_FILE
      if path.exists():
        want = self._plda_record(
            manifest_path, fit_kwargs.get("split", manifest_lib.TRAIN),
            fit_kwargs.get("windows_per_utterance", 3),
            fit_kwargs.get("max_utterances_per_speaker"),
            fit_kwargs.get("seed", 0))
        with path.open("rb") as f, np.load(f) as data:
          found = (json.loads(str(data["record"])) if "record" in data.files
                   else None)
          if found == json.loads(json.dumps(want, sort_keys=True)):
            self.plda = plda_lib.PLDABackend.from_dict(
                {k: data[k] for k in data.files if k != "record"})
            _log.info("Loaded PLDA from %s.", path)
            return self.plda
        _log.info("%s was fitted differently (found %s, want %s);"
                     " refitting.", path, found, want)
    return self.fit_plda(manifest_path, **fit_kwargs)

  def _plda_record(self, manifest_path, split, windows_per_utterance,
                   max_utterances_per_speaker, seed) -> dict:
    return dict(version=_PLDA_RECIPE_VERSION, step=self.step,
                manifest=os.path.abspath(manifest_path) if manifest_path
                else None, split=split,
                window_samples=self.window_samples, lda_dim=self.cfg.lda_dim,
                windows_per_utterance=windows_per_utterance,
                max_utterances_per_speaker=max_utterances_per_speaker,
                seed=seed)

  def diarize_waveform(self, waveform: np.ndarray, file_id: str = "file", *,
                       speech_activity=None,
                       cfg: pipeline.DiarizationConfig | None = None
                       ) -> list[rttm.Segment]:
    """[N] 16 kHz -> segments; `speech_activity` overrides the model's
    ([N] -> [N // 160] probabilities), e.g. with oracle activity."""
    if self.plda is None:
      raise RuntimeError("No PLDA back-end: call fit_plda() or"
                         " load_or_fit_plda() first.")
    return pipeline.diarize(
        waveform, embed_windows=self.embed_windows,
        speech_activity=speech_activity or self.speech_activity,
        plda=self.plda, cfg=cfg or self.cfg, file_id=file_id)

  def diarize_file(self, path: str, file_id: str | None = None, *,
                   method: str = "vbx") -> list[rttm.Segment]:
    """Any wav/flac (any rate, channels) -> RTTM segments (file id: the file
    name without extension, spaces replaced by '_'). `method`: 'vbx' (one
    speaker per frame) or 'overlap' (overlap-aware; needs a router)."""
    if method not in METHODS:
      raise ValueError(f"method={method!r}; choose from {METHODS}.")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Audio file {path} does not exist.")
    waveform = pipeline.load_audio(path)
    file_id = file_id or file_id_of(path)
    if method == "overlap":
      return self.diarize_waveform_overlap(waveform, file_id)
    return self.diarize_waveform(waveform, file_id)


def file_id_of(path: str) -> str:
  """RTTM file id of an audio path: base name without extension, no spaces."""
  return os.path.splitext(os.path.basename(path))[0].replace(" ", "_")


def plda_windows(manifest_path: str, window_samples: int, *,
                 split: str = manifest_lib.TRAIN,
                 windows_per_utterance: int = 3,
                 max_utterances_per_speaker: int | None = None, seed: int = 0,
                 skips: collections.Counter | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Windows [M, window_samples] and speaker labels [M] from `split`.

  An utterance whose shard is missing, truncated or corrupt gives no window:
  it is logged (`storage.read_or_skip`: one line naming it, its shard and the
  reason) and counted by reason in `skips`; the other utterances' windows
  are the same as without it. Raises only if fewer than 2 speakers remain.
  """
  chosen = manifest_lib.first_per_speaker(
      manifest_lib.utterances_of(manifest_lib.read_manifest(manifest_path),
                                 split), max_utterances_per_speaker)
  num_speakers = len({u.speaker for u in chosen})
  if num_speakers < 2:
    raise ValueError(f"PLDA needs >= 2 speakers of split {split!r} in"
                     f" {manifest_path}; found {num_speakers}.")
  store = storage.AudioStore(manifest_path)
  rng = np.random.default_rng(seed)
  skipped: collections.Counter = collections.Counter()
  windows, labels = [], []
  for u in chosen:
    if u.num_samples <= window_samples:
      crops = [(0, u.num_samples)]
    else:  # Drawn before reading: a skip leaves the others' windows as is.
      crops = [(int(start), window_samples) for start in rng.integers(
          0, u.num_samples - window_samples + 1, size=windows_per_utterance)]
    got = []
    for start, length in crops:
      audio, _ = storage.read_or_skip(store, u, start, length, skips=skipped,
                                      context="PLDA windows")
      if audio is None:
        break
      w = np.zeros(window_samples, np.float32)
      w[:length] = audio
      got.append(w)
    else:
      windows += got
      labels += [u.speaker] * len(got)
  if skips is not None:
    skips.update(skipped)
  num_skipped = sum(skipped.values())
  if num_skipped:
    _log.warning("PLDA windows: left out %d of %d utterances of %s (%s).",
                 num_skipped, len(chosen), manifest_path,
                 storage.skip_summary(skipped))
  if len(set(labels)) < 2:
    raise ValueError(
        f"PLDA needs >= 2 speakers of split {split!r} in {manifest_path};"
        f" {len(set(labels))} remain after leaving out {num_skipped}"
        f" unreadable utterances ({storage.skip_summary(skipped)}; the files"
        " are named in the warnings above). Re-prepare the corpus"
        " (tools/prepare_corpus.py) or restore its shards.")
  return np.stack(windows).astype(np.float32), np.array(labels)
