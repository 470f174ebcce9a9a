"""Reference forward pass from an export's `model.safetensors` + `config.json`.

Depends on NumPy and safetensors only (no JAX, nothing else of echo_jax), so
this file can be copied next to an export and read as the specification of
the model: if it reproduces the JAX model, the weights and the config are
complete. Computes in float64.

  config, tensors = load("export/")
  out = forward(config, tensors, waveform)   # waveform [batch, samples]
  out["final"], out["hidden"], out.get("speaker"), ...
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def load(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config, {stable name: array}) of an export folder."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = json.load(f)
  return config, load_file(os.path.join(directory, WEIGHTS_FILE))


def sincos(positions: np.ndarray, dim: int) -> np.ndarray:
  """`[len(positions), dim]` float64: `[sin(p * w_i), cos(p * w_i)]` for
  `w_i = 10000 ** (-i / (dim / 2))`, i < dim / 2 (MAE-style 1-D table)."""
  omega = 1.0 / 10000.0**(np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.asarray(positions, np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def log_mel(config: dict, tensors: dict, waveform: np.ndarray) -> np.ndarray:
  """`[batch, samples]` 16 kHz -> normalised log-mel `[batch, frames, n_mels]`,
  frames = samples // hop: a centred STFT (reflect padding) without its last
  frame, windowed DFT as a matmul, power, mel filterbank, log, affine."""
  fe = config["frontend"]
  n_fft, win, hop = fe["n_fft"], fe["win_length"], fe["hop"]
  wave = np.asarray(waveform, np.float64)
  pad = n_fft // 2
  padded = np.pad(wave, ((0, 0), (pad, pad)), mode="reflect")
  frames = wave.shape[1] // hop
  index = (np.arange(frames)[:, None] * hop + (n_fft - win) // 2
           + np.arange(win)[None, :])
  spectrum = padded[:, index] @ _f64(tensors, "frontend.window_dft")
  real, imag = np.split(spectrum, 2, axis=-1)
  mel = (real**2 + imag**2) @ _f64(tensors, "frontend.mel_filterbank").T
  return (np.log(mel + fe["log_eps"]) - fe["mel_mean"]) / fe["mel_std"]


def layer_norm(x: np.ndarray, tensors: dict, name: str, eps: float
               ) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = np.square(x - mean).mean(-1, keepdims=True)
  return ((x - mean) / np.sqrt(var + eps) * _f64(tensors, f"{name}.scale")
          + _f64(tensors, f"{name}.bias"))


def dense(x: np.ndarray, tensors: dict, name: str) -> np.ndarray:
  return x @ _f64(tensors, f"{name}.kernel") + _f64(tensors, f"{name}.bias")


def gelu_tanh(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi)
                                  * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def attention(h: np.ndarray, tensors: dict, name: str, num_heads: int
              ) -> np.ndarray:
  """Multi-head self-attention, softmax(q k^T / sqrt(head_dim)) v."""
  batch, tokens, width = h.shape
  head_dim = width // num_heads
  q, k, v = (dense(h, tensors, f"{name}.{p}").reshape(
      batch, tokens, num_heads, head_dim) for p in ("q", "k", "v"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  y = np.einsum("bhqk,bkhd->bqhd", softmax(logits, -1), v)
  return dense(y.reshape(batch, tokens, width), tensors, f"{name}.out")


def encoder(config: dict, tensors: dict, mel: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """Pre-LN ViT over frame patches: `[batch, frames, n_mels]` ->
  (hidden `[depth, batch, tokens, width]`, final `[batch, tokens, width]`),
  tokens = frames // patch_frames (remainder frames dropped)."""
  enc = config["encoder"]
  eps, patch = enc["layer_norm_epsilon"], enc["patch_frames"]
  batch, frames, n_mels = mel.shape
  tokens = frames // patch
  patches = mel[:, :tokens * patch].reshape(batch, tokens, patch * n_mels)
  x = (dense(patches, tensors, "encoder.patch_embed")
       + sincos(np.arange(tokens), enc["width"]))
  hidden = []
  for i in range(enc["depth"]):
    block = f"encoder.blocks.{i}"
    x = x + attention(layer_norm(x, tensors, f"{block}.norm1", eps), tensors,
                      f"{block}.attn", enc["num_heads"])
    h = layer_norm(x, tensors, f"{block}.norm2", eps)
    x = x + dense(gelu_tanh(dense(h, tensors, f"{block}.mlp.fc1")), tensors,
                  f"{block}.mlp.fc2")
    hidden.append(x)
  return np.stack(hidden), layer_norm(x, tensors, "encoder.norm", eps)


def rwse(tensors: dict, hidden: np.ndarray) -> np.ndarray:
  """Per-group softmax over layers, weighted sum plus the last layer:
  `[depth, batch, tokens, width]` -> `[batch, tokens, width]`."""
  weights = softmax(_f64(tensors, "heads.rwse.layer_logits"), -1)
  per_channel = np.repeat(weights.T, hidden.shape[-1] // weights.shape[0],
                          axis=1)                     # [depth, width]
  return (hidden * per_channel[:, None, None, :]).sum(0) + hidden[-1]


def _mean_std(x: np.ndarray, weights: np.ndarray, floor: float):
  mean = (weights * x).sum(1)
  var = (weights * np.square(x - mean[:, None])).sum(1)
  return mean, np.sqrt(np.maximum(var, floor))


def _with_clip_context(x: np.ndarray, floor: float) -> np.ndarray:
  """`[x_t; mean; std]` per token, the statistics uniform over the clip."""
  uniform = np.full(x.shape[:2] + (1,), 1.0 / x.shape[1])
  context = np.concatenate(_mean_std(x, uniform, floor), -1)
  return np.concatenate(
      [x, np.broadcast_to(context[:, None], x.shape[:2] + context.shape[-1:])],
      -1)


def speaker(config: dict, tensors: dict, features: np.ndarray) -> np.ndarray:
  """Attentive statistics pooling (channel-wise, global context) -> Dense:
  `[batch, tokens, width]` -> `[batch, speaker_dim]` (not normalised)."""
  cfg = config["heads"]["speaker"]
  floor, name = cfg["var_floor"], "heads.speaker"
  h = np.tanh(dense(_with_clip_context(features, floor), tensors,
                    f"{name}.pooling.attention_hidden"))
  alpha = softmax(dense(h, tensors, f"{name}.pooling.attention_logits"), 1)
  pooled = np.concatenate(_mean_std(features, alpha, floor), -1)
  embedding = dense(pooled, tensors, f"{name}.projection")
  if cfg["layer_norm"]:
    embedding = layer_norm(embedding, tensors, f"{name}.norm",
                           cfg["layer_norm_epsilon"])
  return embedding


def activity(config: dict, tensors: dict, features: np.ndarray) -> np.ndarray:
  """Speech logits `[batch, tokens, 1]`: one Dense per token (`hidden` 0),
  or [h_t; mean; std over the clip] -> LayerNorm -> Dense -> GELU, plus a
  residual GELU(temporal convolution, zero-padded to keep the length),
  -> Dense."""
  cfg, name = config["heads"].get("activity", {}), "heads.activity"
  if not cfg.get("hidden"):
    return dense(features, tensors, name)
  x = _with_clip_context(features, cfg["var_floor"])
  h = gelu_tanh(dense(layer_norm(x, tensors, f"{name}.norm",
                                 cfg["layer_norm_epsilon"]),
                      tensors, f"{name}.hidden"))
  kernel = _f64(tensors, f"{name}.temporal.kernel")   # [taps, in, out].
  taps, tokens = kernel.shape[0], h.shape[1]
  left = (taps - 1) // 2
  padded = np.pad(h, ((0, 0), (left, taps - 1 - left), (0, 0)))
  conv = sum(padded[:, j:j + tokens] @ kernel[j] for j in range(taps))
  h = h + gelu_tanh(conv + _f64(tensors, f"{name}.temporal.bias"))
  return dense(h, tensors, f"{name}.logit")


def arcface_cosines(tensors: dict, embedding: np.ndarray) -> np.ndarray:
  """Cosine of each speaker embedding with each training speaker's centre:
  `[batch, speaker_dim]` -> `[batch, classes]`."""
  def unit(x):
    return x / np.sqrt(np.maximum((x**2).sum(-1, keepdims=True), 1e-12))
  return unit(embedding) @ unit(_f64(tensors, "heads.arcface.class_weights")).T


def forward(config: dict, tensors: dict, waveform: np.ndarray) -> dict:
  """Every output the export holds weights for, from `[batch, samples]`:
  `hidden`, `final`, and per exported head `rwse` [batch, tokens, width],
  `speaker` [batch, speaker_dim], `activity` [batch, tokens, 1] (speech
  logits), `arcface` [batch, classes] (cosines)."""
  heads = config["heads"]
  hidden, final = encoder(config, tensors, log_mel(config, tensors, waveform))
  out = {"hidden": hidden, "final": final}
  if "rwse" in heads:
    out["rwse"] = rwse(tensors, hidden)
  if "speaker" in heads:
    out["speaker"] = speaker(config, tensors, out["rwse"])
  if "activity" in heads:
    out["activity"] = activity(config, tensors, out["rwse"])
  if "arcface" in heads:
    out["arcface"] = arcface_cosines(tensors, out["speaker"])
  return out


def _f64(tensors: dict, name: str) -> np.ndarray:
  if name not in tensors:
    raise KeyError(f"{name} is not in the export; it has "
                   f"{len(tensors)} tensors, e.g. {sorted(tensors)[:3]}.")
  return np.asarray(tensors[name], np.float64)
