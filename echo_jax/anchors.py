"""The stage-3 anchor: a diagonal GMM over frame features of the train split,
fitted once with scikit-learn and then frozen; its posteriors are the soft
targets of the content term (S-JEPA / GMM-anchored JEPA).

Features (`AnchorSettings.kind`):
  mfcc    DCT-II (orthonormal) of the natural-log mel, first `n_mfcc`
          coefficients, plus deltas and delta-deltas (regression over +-2
          frames, edge padded): 3 * n_mfcc dims (39 for the default 13);
  logmel  the log-mel itself (`n_mels` dims).
With `normalize="utterance"` each clip's features are first mean- and
variance-normalised over its own speech frames (CMVN, as ASR front ends do):
a clip's average spectral envelope is mostly its speaker and channel, so
without it the GMM's components split speakers as much as sounds. Both are
then standardised with the fit's global mean / std (stored with the GMM).

The same `frame_features` runs on the host in NumPy (fit, from librosa's
log-mel) and on the accelerator in JAX (the jitted step, from `audio.log_mel`),
so fit and use see the same numbers. The `.npz` holds the GMM and the feature
settings it was fitted with; `load` refuses a file whose settings differ from
the config's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import scipy.fft
from sklearn import mixture as sk_mixture

from data_pipelines import framing
from data_pipelines import manifest as manifest_lib
from data_pipelines import storage

LOG_EPS = 1e-6  # As echo_jax.audio.LOG_EPS.
KINDS = ("mfcc", "logmel")
NORMALIZE = ("none", "utterance")
# CMVN statistics come from frames within this range of the clip's loudest
# (35 dB of mean log-mel power, the stream's activity rule), so padding and
# digital silence do not set them.
SPEECH_RANGE_NATS = 3.5 * np.log(10.0)
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
  """What the GMM is fitted on and how (also the key of its default file)."""
  kind: str = "mfcc"
  normalize: str = "none"    # "utterance": per-clip CMVN (module doc).
  n_mels: int = 80
  n_mfcc: int = 13
  num_components: int = 128
  var_floor: float = 1e-3    # Variance floor, in units of the global variance
                             # (features are standardised, so absolute).
  max_frames: int = 100_000  # Frames subsampled for the fit.
  max_utterances: int = 2000
  max_iter: int = 100
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Anchor feature kind {self.kind!r} is unknown; "
                       f"choose from {KINDS}.")
    if self.normalize not in NORMALIZE:
      raise ValueError(f"Anchor normalize={self.normalize!r} is unknown; "
                       f"choose from {NORMALIZE}.")

  @property
  def dim(self) -> int:
    return 3 * self.n_mfcc if self.kind == "mfcc" else self.n_mels

  def key(self) -> str:
    fields = dataclasses.asdict(self)
    if fields["normalize"] == "none":   # Files fitted before the field
      del fields["normalize"]           # existed keep their name.
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]

  @classmethod
  def from_config(cls, cfg) -> AnchorSettings:
    """From a config block holding (a subset of) the fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: cfg[k] for k in names if k in cfg})


@dataclasses.dataclass(frozen=True)
class Gmm:
  """Diagonal GMM over standardised features, float32 arrays."""
  log_weights: np.ndarray  # [K]
  means: np.ndarray        # [K, D]
  variances: np.ndarray    # [K, D], floored.
  feature_mean: np.ndarray  # [D] standardisation.
  feature_std: np.ndarray   # [D]
  settings: AnchorSettings

  def arrays(self) -> dict[str, np.ndarray]:
    return {k: getattr(self, k) for k in
            ("log_weights", "means", "variances", "feature_mean",
             "feature_std")}


# ------------------------------------------------------------------ features


def _dct_matrix(n_mels: int, n_mfcc: int) -> np.ndarray:
  """[n_mels, n_mfcc] orthonormal DCT-II (as librosa.feature.mfcc's)."""
  return scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0
                       )[:, :n_mfcc].astype(np.float32)


def _deltas(x, xp):
  """Regression deltas over +-2 frames along axis -2, edge padded."""
  pad = [(0, 0)] * (x.ndim - 2) + [(2, 2), (0, 0)]
  p = xp.pad(x, pad, mode="edge")
  n = x.shape[-2]
  return (1.0 * (p[..., 3:3 + n, :] - p[..., 1:1 + n, :])
          + 2.0 * (p[..., 4:4 + n, :] - p[..., 0:n, :])) / 10.0


def frame_features(log_mel, settings: AnchorSettings, xp=jnp):
  """Raw (unstandardised) features `[..., frames, dim]` of natural-log mel
  `[..., frames, n_mels]`, one clip per leading index (the span CMVN
  normalises over); `xp` is `jnp` (in the step) or `np` (the fit)."""
  if settings.kind == "logmel":
    feats = log_mel
  else:
    c = log_mel @ _dct_matrix(settings.n_mels, settings.n_mfcc)
    d = _deltas(c, xp)
    feats = xp.concatenate([c, d, _deltas(d, xp)], axis=-1)
  if settings.normalize == "utterance":
    feats = speech_cmvn(feats, log_mel, xp)
  return feats


def speech_cmvn(feats, log_mel, xp=jnp, eps: float = 1e-3):
  """`feats [..., F, D]` minus their mean, over their std, both taken over the
  clip's speech frames: those whose mean log-mel is within
  `SPEECH_RANGE_NATS` of the clip's loudest frame."""
  loudness = log_mel.mean(-1)                                    # [..., F]
  speech = loudness > loudness.max(-1, keepdims=True) - SPEECH_RANGE_NATS
  w = speech.astype(feats.dtype)[..., None]
  count = w.sum(-2, keepdims=True)                               # >= 1
  mean = (feats * w).sum(-2, keepdims=True) / count
  var = (xp.square(feats - mean) * w).sum(-2, keepdims=True) / count
  return (feats - mean) / xp.sqrt(var + eps)


def host_log_mel(wave: np.ndarray, n_mels: int) -> np.ndarray:
  """[samples] -> [samples // hop, n_mels] natural-log mel, librosa's
  computation of what `echo_jax.audio.log_mel` computes on the device."""
  mel = librosa.feature.melspectrogram(
      y=wave.astype(np.float32), sr=framing.SAMPLE_RATE, n_fft=512,
      hop_length=framing.HOP, win_length=400, window="hann", center=True,
      pad_mode="reflect", power=2.0, n_mels=n_mels)
  return np.log(mel.T[:len(wave) // framing.HOP] + LOG_EPS).astype(np.float32)


# ---------------------------------------------------------------- posteriors


def log_posteriors(arrays, features: jax.Array) -> jax.Array:
  """Component log-posteriors `[..., K]` of raw features `[..., D]` (JAX).

  `arrays` is `Gmm.arrays()` (NumPy or traced). Equals
  `log(GaussianMixture.predict_proba)` of the standardised features.
  """
  x = (features - arrays["feature_mean"]) / arrays["feature_std"]
  precision = 1.0 / arrays["variances"]                         # [K, D]
  hp = jax.lax.Precision.HIGHEST
  # sum_d (x - mu)^2 p = x^2 . p - 2 x . (mu p) + mu^2 . p, as matmuls.
  quad = (jnp.matmul(x * x, precision.T, precision=hp)
          - 2.0 * jnp.matmul(x, (arrays["means"] * precision).T, precision=hp)
          + jnp.sum(arrays["means"] ** 2 * precision, -1))
  log_det = jnp.sum(jnp.log(arrays["variances"]), -1)           # [K]
  dim = arrays["means"].shape[-1]
  log_joint = (arrays["log_weights"]
               - 0.5 * (quad + log_det + dim * np.log(2.0 * np.pi)))
  return jax.nn.log_softmax(log_joint, axis=-1)


def token_targets(frame_log_post: jax.Array, patch_frames: int,
                  num_tokens: int) -> jax.Array:
  """[B, F, K] frame log-posteriors -> [B, T, K] token distributions: the
  mean of the posteriors of the `patch_frames` frames under each token."""
  b, _, k = frame_log_post.shape
  post = jnp.exp(frame_log_post[:, :num_tokens * patch_frames])
  return post.reshape(b, num_tokens, patch_frames, k).mean(2)


# ----------------------------------------------------------------- fit, I/O


def fit(features: np.ndarray, settings: AnchorSettings) -> Gmm:
  """Fits the GMM on raw features `[N, D]` (subsampled to `max_frames`)."""
  features = np.asarray(features, np.float32)
  rng = np.random.default_rng(settings.seed)
  if len(features) > settings.max_frames:
    features = features[rng.choice(len(features), settings.max_frames,
                                   replace=False)]
  if len(features) < 10 * settings.num_components:
    raise ValueError(
        f"Anchor GMM: {len(features)} frames for {settings.num_components} "
        "components; need >= 10 per component. Use fewer components or more "
        "utterances.")
  mean, std = features.mean(0), np.maximum(features.std(0), 1e-6)
  x = (features - mean) / std
  gm = sk_mixture.GaussianMixture(
      n_components=settings.num_components, covariance_type="diag",
      init_params="k-means++", reg_covar=settings.var_floor,
      max_iter=settings.max_iter, random_state=settings.seed)
  gm.fit(x)
  if not gm.converged_:
    _log.warning("Anchor GMM: EM did not converge in %d iterations "
                    "(lower bound %.3f); using it anyway.", settings.max_iter,
                    gm.lower_bound_)
  return from_sklearn(gm, mean, std, settings)


def from_sklearn(gm: sk_mixture.GaussianMixture, feature_mean: np.ndarray,
                 feature_std: np.ndarray, settings: AnchorSettings) -> Gmm:
  """A fitted diagonal `GaussianMixture` over (x - mean) / std as a `Gmm`.

  sklearn's `reg_covar` already adds `var_floor` to every variance; the
  explicit floor only matters for a model fitted with another `reg_covar`.
  """
  if gm.covariance_type != "diag":
    raise ValueError(f"The anchor GMM is diagonal; found covariance_type="
                     f"{gm.covariance_type!r}.")
  return Gmm(log_weights=np.log(gm.weights_).astype(np.float32),
             means=gm.means_.astype(np.float32),
             variances=np.maximum(gm.covariances_, settings.var_floor
                                  ).astype(np.float32),
             feature_mean=np.asarray(feature_mean, np.float32),
             feature_std=np.asarray(feature_std, np.float32),
             settings=settings)


def save(gmm: Gmm, path: str) -> None:
  """Writes `path` atomically. The temporary name is unique, so runs that
  fit the same missing anchor at once (an ablation launched side by side)
  each replace it whole rather than write into one file together."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=".gmm.", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, settings=json.dumps(dataclasses.asdict(gmm.settings)),
               **gmm.arrays())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load(path: str, expected: AnchorSettings | None = None) -> Gmm:
  with np.load(path) as z:
    settings = AnchorSettings(**json.loads(str(z["settings"])))
    gmm = Gmm(**{k: z[k] for k in ("log_weights", "means", "variances",
                                   "feature_mean", "feature_std")},
              settings=settings)
  if expected is not None and settings != expected:
    raise ValueError(
        f"Anchor GMM {path} was fitted with {settings}, but the config asks "
        f"for {expected}. Delete the file (it is refitted) or point "
        "config.objective.content.anchor.path elsewhere.")
  return gmm


def default_path(manifest_path: str, settings: AnchorSettings) -> str:
  """Beside the manifest, keyed by the settings: one fit per corpus."""
  return os.path.join(os.path.dirname(os.path.abspath(manifest_path)),
                      "anchors", f"gmm_{settings.kind}_{settings.key()}.npz")


def train_features(manifest_path: str, settings: AnchorSettings,
                   split: str = manifest_lib.TRAIN) -> np.ndarray:
  """Raw features `[N, D]` of up to `max_utterances` utterances of `split`
  (a seeded draw), frames of all of them concatenated."""
  utts = [u for u in manifest_lib.read_manifest(manifest_path)
          if u.split == split]
  if not utts:
    raise ValueError(f"{manifest_path} has no {split!r} utterances to fit "
                     "the anchor GMM on.")
  rng = np.random.default_rng(settings.seed)
  if len(utts) > settings.max_utterances:
    utts = [utts[i] for i in sorted(rng.choice(
        len(utts), settings.max_utterances, replace=False))]
  store = storage.AudioStore(manifest_path)
  feats = []
  for utt in utts:
    audio, _ = storage.read_or_skip(store, utt, 0, utt.num_samples,
                                    context="anchor GMM")
    if audio is None or len(audio) <= 512:
      continue
    feats.append(frame_features(host_log_mel(audio, settings.n_mels),
                                settings, xp=np))
  return np.concatenate(feats, 0)


def load_or_fit(path: str, manifest_path: str,
                settings: AnchorSettings) -> Gmm:
  """The GMM at `path` (checked against `settings`), fitted on the train
  split of `manifest_path` and saved there first if the file is missing."""
  if os.path.exists(path):
    return load(path, settings)
  _log.info("Anchor GMM %s missing: fitting %d components on %s frames "
               "of %s ...", path, settings.num_components, settings.kind,
               manifest_path)
  gmm = fit(train_features(manifest_path, settings), settings)
  save(gmm, path)
  _log.info("Anchor GMM saved to %s.", path)
  return gmm


def shapes(settings: AnchorSettings) -> dict[str, jax.ShapeDtypeStruct]:
  k, d = settings.num_components, settings.dim
  f32 = jnp.float32
  return {"log_weights": jax.ShapeDtypeStruct((k,), f32),
          "means": jax.ShapeDtypeStruct((k, d), f32),
          "variances": jax.ShapeDtypeStruct((k, d), f32),
          "feature_mean": jax.ShapeDtypeStruct((d,), f32),
          "feature_std": jax.ShapeDtypeStruct((d,), f32)}


def describe(gmm: Gmm) -> str:
  weights = np.exp(gmm.log_weights)
  return (f"{len(weights)} components over {gmm.means.shape[1]}-d "
          f"{gmm.settings.kind}; weights {weights.min():.4f}.."
          f"{weights.max():.4f}")
