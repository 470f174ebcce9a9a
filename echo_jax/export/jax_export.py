"""The encoder as a serialized `jax.export` artifact, waveform in.

Input: `waveform` float32 `[batch, samples]` at 16 kHz with both dimensions
symbolic; `samples` must be a multiple of `hop * patch_frames` (one token:
640 samples at 4-frame patches), i.e. `samples = unit * tokens`. Trim or pad
audio to that; the live model reflect-pads the true end, so results equal the
live model's on inputs of exactly that length. Output: a dict with `hidden`
`[depth, batch, tokens, width]` (every block) and `final`
`[batch, tokens, width]` (final LayerNorm), float32. At most
`MAX_TOKENS` tokens (positions past it are NaN).

The live path cannot be exported with a symbolic time axis: `audio.log_mel`
and `vit.sincos_1d` build NumPy index and position tables from the (static)
length. `encoder_fn` therefore runs the encoder's own Flax submodules (Dense,
Block, LayerNorm, same params) behind a front end and a position table that
take symbolic lengths; `tools/export.py` checks it against the live
encoder (`checks.reference_fn`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from data_pipelines import framing
from echo_jax import audio
from echo_jax.export.bundle import N_FFT, WIN_LENGTH
from echo_jax.export.numpy_forward import sincos
from echo_jax.inference import Loaded
from echo_jax.models import vit

ARTIFACT_FILE = "encoder.jax_exported"
# Positions come from two tables, t = BLOCK * coarse + fine, so they are exact
# to float32 rounding at any length up to MAX_TOKENS (21.8 min of 20 ms
# tokens) without a table that long.
POSITION_BLOCK = 256
MAX_TOKENS = POSITION_BLOCK * POSITION_BLOCK
# Platforms the artifact is lowered for (the tests run it on cpu only).
PLATFORMS = ("cpu", "cuda", "tpu")


def token_samples(loaded: Loaded) -> int:
  """Samples per token: the input length must be a multiple of it."""
  return framing.HOP * loaded.model.patch_frames


def position_tables(width: int) -> tuple[np.ndarray, np.ndarray]:
  """float32 (coarse `[BLOCK, width]` at t = BLOCK * j, fine `[BLOCK, width]`
  at t = j): sin-cos rows whose angle-sum combination gives any t."""
  steps = np.arange(POSITION_BLOCK)
  return (sincos(steps * POSITION_BLOCK, width).astype(np.float32),
          sincos(steps, width).astype(np.float32))


def positions(tokens, width: int) -> jax.Array:
  """`vit.sincos_1d(tokens, width)` for a possibly symbolic `tokens`:
  sin(a + b) = sin a cos b + cos a sin b, cos(a + b) = cos a cos b - sin a
  sin b, with a from the coarse table and b from the fine one."""
  coarse, fine = position_tables(width)
  t = jax.lax.iota(jnp.int32, tokens)
  # mode='fill': past MAX_TOKENS the coarse row is NaN, not a wrong position.
  sin_a, cos_a = jnp.split(
      jnp.take(coarse, t // POSITION_BLOCK, axis=0, mode="fill"), 2, axis=1)
  sin_b, cos_b = jnp.split(jnp.take(fine, t % POSITION_BLOCK, axis=0), 2,
                           axis=1)
  return jnp.concatenate([sin_a * cos_b + cos_a * sin_b,
                          cos_a * cos_b - sin_a * sin_b], axis=1)


def log_mel(loaded: Loaded, waveform: jax.Array) -> jax.Array:
  """`EchoModel.log_mel` for `samples` a multiple of the hop (symbolic ok):
  frames are cut by reshaping into hop-long chunks instead of a gather table.
  `[batch, samples]` -> `[batch, samples // hop, n_mels]`."""
  model, hop = loaded.model, framing.HOP
  batch, samples = waveform.shape
  frames = samples // hop
  pad, offset = N_FFT // 2, (N_FFT - WIN_LENGTH) // 2
  padded = jnp.pad(waveform.astype(jnp.float32), ((0, 0), (pad, pad)),
                   mode="reflect")
  # Frame t is padded[offset + t * hop :+ WIN_LENGTH]: chunks t, t + 1 and
  # the head of t + 2 of the hop-long chunks that start at `offset`.
  chunks = padded[:, offset:offset + (frames + 2) * hop].reshape(
      batch, frames + 2, hop)
  framed = jnp.concatenate(
      [chunks[:, :-2], chunks[:, 1:-1], chunks[:, 2:, :WIN_LENGTH - 2 * hop]],
      axis=-1)
  spectrum = jnp.matmul(framed, audio.windowed_dft(WIN_LENGTH, N_FFT),
                        precision=jax.lax.Precision.HIGHEST)
  real, imag = jnp.split(spectrum, 2, axis=-1)
  mel = jnp.matmul(real**2 + imag**2,
                   audio.mel_basis(framing.SAMPLE_RATE, N_FFT, model.n_mels).T,
                   precision=jax.lax.Precision.HIGHEST)
  return audio.normalize_log_mel(jnp.log(mel + audio.LOG_EPS), model.mel_mean,
                                 model.mel_std)


def encoder_fn(loaded: Loaded, encoder_params: dict):
  """`waveform [batch, samples] -> {'hidden', 'final'}` in float32 with the
  encoder's own submodules; `samples` a multiple of `token_samples`."""
  enc = loaded.model.encoder

  def fn(waveform: jax.Array) -> dict[str, jax.Array]:
    mel = log_mel(loaded, waveform)
    batch, frames, n_mels = mel.shape
    tokens = frames // enc.patch_frames
    patches = mel.reshape(batch, tokens, enc.patch_frames * n_mels)
    x = nn.Dense(enc.width).apply(
        {"params": encoder_params["patch_embed"]}, patches)
    x = x + positions(tokens, enc.width)
    hidden = []
    for i in range(enc.depth):
      x = vit.Block(enc.num_heads, enc.mlp_dim, jnp.float32).apply(
          {"params": encoder_params[f"blocks_{i}"]}, x)
      hidden.append(x)
    final = nn.LayerNorm(epsilon=1e-6).apply(
        {"params": encoder_params["norm"]}, x)
    return {"hidden": jnp.stack(hidden), "final": final}

  return fn


def export_encoder(loaded: Loaded, encoder_params: dict,
                   platforms: tuple[str, ...] = PLATFORMS) -> export.Exported:
  """Exports `encoder_fn` with symbolic `batch` and `tokens`; float32
  matmuls at full precision on every platform (no TF32 / bf16 passes)."""
  batch, tokens = export.symbolic_shape(
      "batch, tokens", constraints=(f"tokens <= {MAX_TOKENS}",))
  spec = jax.ShapeDtypeStruct((batch, token_samples(loaded) * tokens),
                              jnp.float32)
  with jax.default_matmul_precision("highest"):
    return export.export(jax.jit(encoder_fn(loaded, encoder_params)),
                         platforms=platforms)(spec)


def save(exported: export.Exported, path: str) -> int:
  """Writes the serialized artifact; returns its size in bytes."""
  data = exported.serialize()
  with open(path, "wb") as f:
    f.write(data)
  return len(data)


def load(path: str) -> export.Exported:
  """Reads an artifact written by `save`; call it as `exported.call(wave)`."""
  with open(path, "rb") as f:
    return export.deserialize(bytearray(f.read()))
