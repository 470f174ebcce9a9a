"""The framework-neutral bundle: `model.safetensors` + `config.json`.

The safetensors file holds float32 tensors under the stable names of
`echo_jax.export.names` (encoder, the chosen heads) plus two front-end
constants, `frontend.window_dft` `[win_length, 2 * (n_fft // 2 + 1)]` (x @ it
= [Re, Im] of the Hann-windowed real DFT) and `frontend.mel_filterbank`
`[n_mels, n_fft // 2 + 1]` (librosa's Slaney mel basis), so a reader needs
neither librosa nor JAX. `config.json` holds every size and constant the
forward pass needs (`echo_jax/export/numpy_forward.py` reads only these two
files) and documents the naming and the layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from safetensors.numpy import save_file

from data_pipelines import framing
from echo_jax import audio
from echo_jax import heads as heads_registry
from echo_jax.export import names
from echo_jax.export.numpy_forward import CONFIG_FILE, WEIGHTS_FILE
from echo_jax.inference import Loaded
from echo_jax.models import heads as heads_lib

FORMAT = "echo-jax-export"
FORMAT_VERSION = 1
# STFT settings of `echo_jax.audio.log_mel` (its defaults, used by the model).
N_FFT, WIN_LENGTH = 512, 400
# Heads read other heads' outputs: exporting one exports what it reads.
HEAD_INPUTS = {"speaker": ("rwse",), "activity": ("rwse",),
               "arcface": ("rwse", "speaker")}

NAMING = (
    "Dotted paths of the Flax tree: blocks_{i} -> blocks.{i}; the fused "
    "attn.qkv projection is split into attn.q, attn.k, attn.v (columns "
    "grouped by head: [width, num_heads * head_dim]).")
LAYOUT = (
    "float32. Every *.kernel is [in, out] (y = x @ kernel + bias); LayerNorm "
    "has scale and bias. frontend.* are constants, not learned.")
FORWARD = (
    "waveform [B, N] 16 kHz -> log-mel [B, N // hop, n_mels]: reflect-pad "
    "n_fft // 2 each side, frame t = padded[t * hop + (n_fft - win_length) // 2"
    " :+ win_length] @ frontend.window_dft -> power re^2 + im^2 -> "
    "@ frontend.mel_filterbank.T -> (log(mel + log_eps) - mel_mean) / mel_std. "
    "Encoder: patches of patch_frames frames ([B, T, patch_frames * n_mels], "
    "frames past T * patch_frames dropped) -> patch_embed + sin-cos positions "
    "([sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (width / 2))) -> depth "
    "pre-LN blocks x += attn(norm1(x)); x += fc2(gelu_tanh(fc1(norm2(x)))) "
    "(attention softmax(q k^T / sqrt(head_dim)) v, no mask) -> hidden = every "
    "block's output, final = norm(last). Heads: see "
    "echo_jax/export/numpy_forward.py.")


def heads_to_export(requested: Sequence[str], available: Sequence[str]
                    ) -> list[str]:
  """The requested heads plus the heads they read, in registry order.

  Raises ValueError for a name the registry lacks or the checkpoint lacks.
  """
  unknown = [h for h in requested if h not in heads_registry.HEADS]
  if unknown:
    raise ValueError(f"Unknown heads {unknown}; known heads are "
                     f"{sorted(heads_registry.HEADS)}.")
  wanted = set(requested)
  for head in requested:
    wanted.update(HEAD_INPUTS.get(head, ()))
  missing = sorted(wanted - set(available))
  if missing:
    raise ValueError(
        f"The checkpoint has no {missing} head(s) (it has {sorted(available)});"
        " export a later stage's checkpoint or drop them from --heads.")
  return [h for h in heads_registry.HEADS if h in wanted]


def frontend_config(loaded: Loaded) -> dict:
  model = loaded.model
  return {
      "sample_rate": framing.SAMPLE_RATE, "hop": framing.HOP, "n_fft": N_FFT,
      "win_length": WIN_LENGTH, "window": "hann (periodic)",
      "pad_mode": "reflect", "center": True, "drop_last_frame": True,
      "n_mels": model.n_mels, "mel_scale": "slaney", "power": 2.0,
      "log_eps": audio.LOG_EPS, "mel_mean": float(model.mel_mean),
      "mel_std": float(model.mel_std)}


def frontend_tensors(n_mels: int) -> dict[str, np.ndarray]:
  return {"frontend.window_dft": audio.windowed_dft(WIN_LENGTH, N_FFT),
          "frontend.mel_filterbank": audio.mel_basis(
              framing.SAMPLE_RATE, N_FFT, n_mels)}


def head_config(loaded: Loaded, head: str) -> dict:
  """What a head's forward needs besides its weights."""
  m = loaded.config.model
  if head == "rwse":
    return {"groups": int(m.rwse_heads)}
  if head == "speaker":
    module = loaded.model.heads["speaker"]
    pooling = heads_lib.AttentiveStatsPooling  # SpeakerHead keeps its defaults.
    return {"embed_dim": int(module.embed_dim),
            "attention_dim": int(module.attention_dim),
            "global_context": bool(pooling.global_context),
            "var_floor": float(pooling.var_floor),
            "layer_norm": bool(module.layer_norm), "layer_norm_epsilon": 1e-6}
  if head == "activity":
    module = loaded.model.heads["activity"]
    if not isinstance(module, heads_lib.ActivityHead):
      return {"hidden": 0}                  # One Dense per token.
    return {"hidden": int(module.hidden), "kernel": int(module.kernel),
            "var_floor": float(module.var_floor), "layer_norm_epsilon": 1e-6}
  if head == "arcface":
    return {"classes": int(loaded.params["heads"]["arcface"]["class_weights"]
                           .shape[0]), "output": "cosine similarities"}
  return {}


def export_config(loaded: Loaded, heads: Sequence[str], weights: str,
                  tensors: dict[str, np.ndarray]) -> dict:
  """The `config.json` of an export (sizes, constants, naming, layout)."""
  enc = loaded.model.encoder
  return {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "source": {"workdir": os.path.abspath(loaded.workdir),
                 "step": loaded.step, "weights": weights,
                 "stage": loaded.config.get("stage", ""),
                 "variant": loaded.config.get("variant", "")},
      "frontend": frontend_config(loaded),
      "encoder": {"width": enc.width, "depth": enc.depth,
                  "num_heads": enc.num_heads,
                  "head_dim": enc.width // enc.num_heads,
                  "mlp_dim": enc.mlp_dim, "patch_frames": enc.patch_frames,
                  "n_mels": enc.n_mels, "layer_norm_epsilon": 1e-6,
                  "activation": "gelu_tanh", "positions": "sincos_1d",
                  "trained_clip_samples": loaded.num_samples},
      "heads": {h: head_config(loaded, h) for h in heads},
      "naming": NAMING, "layout": LAYOUT, "forward": FORWARD,
      "tensors": {k: list(v.shape) for k, v in tensors.items()},
  }


def bundle_tensors(loaded: Loaded, heads: Sequence[str]
                   ) -> dict[str, np.ndarray]:
  """Stable name -> float32 array for the encoder, `heads` and front end."""
  trees = {"encoder": loaded.params["encoder"],
           "heads": {h: loaded.params["heads"][h] for h in heads}}
  flat = names.flatten(trees)
  flat.update(frontend_tensors(loaded.model.n_mels))
  return dict(sorted(flat.items()))


def write(loaded: Loaded, heads: Sequence[str], weights: str, out_dir: str
          ) -> dict:
  """Writes `model.safetensors` and `config.json` into `out_dir`; returns the
  config."""
  tensors = bundle_tensors(loaded, heads)
  config = export_config(loaded, heads, weights, tensors)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE),
            metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=1)
  return config
