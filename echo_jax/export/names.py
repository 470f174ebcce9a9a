"""Stable, framework-neutral names for exported parameters.

A checkpoint's Flax tree becomes a flat `{name: float32 array}` map whose
names are dotted paths that do not depend on Flax, e.g.

  encoder.patch_embed.kernel           [patch_frames * n_mels, width]
  encoder.blocks.0.norm1.scale         [width]
  encoder.blocks.0.attn.q.kernel       [width, width]   (also k, v)
  encoder.blocks.0.attn.out.kernel     [width, width]
  encoder.blocks.0.mlp.fc1.kernel      [width, mlp_dim]
  encoder.norm.bias                    [width]
  heads.rwse.layer_logits              [groups, depth]
  heads.speaker.projection.kernel      [2 * width, speaker_dim]

Layout: every `kernel` is `[in, out]` (y = x @ kernel + bias, the transpose
of a PyTorch `Linear.weight`); LayerNorm has `scale` and `bias`. The encoder's
fused qkv projection is split into `q`, `k` and `v`: a kernel column
`s * width + h * head_dim + d` of the fused `[width, 3 * width]` matrix is
component s (q, k, v) of head h, so each part's columns are grouped by head
(`[width, num_heads * head_dim]`). `flatten` and `unflatten` are exact
inverses, so an export can be read back into Flax.

Rules (everything else is the Flax path joined by dots):
  blocks_{i}            -> blocks.{i}
  attn.qkv.{kernel,bias} -> attn.{q,k,v}.{kernel,bias}
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

_QKV = ("q", "k", "v")
_BLOCK = re.compile(r"^blocks_(\d+)$")


def _flat_paths(tree: Mapping, prefix: tuple[str, ...] = ()):
  for key in sorted(tree):
    node = tree[key]
    if isinstance(node, Mapping):
      yield from _flat_paths(node, prefix + (str(key),))
    else:
      yield prefix + (str(key),), node


def _public_parts(path: tuple[str, ...]) -> list[str]:
  parts = []
  for part in path:
    match = _BLOCK.match(part)
    parts += ["blocks", match.group(1)] if match else [part]
  return parts


def flatten(trees: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
  """`{'encoder': tree, 'heads': {name: tree}}` -> `{stable name: array}`.

  Arrays come back as float32 NumPy arrays (copied to the host), keys sorted.
  """
  flat = {}
  for path, value in _flat_paths(trees):
    value = np.asarray(value, dtype=np.float32)
    parts = _public_parts(path)
    if parts[-2:-1] == ["qkv"]:
      for name, part in zip(_QKV, np.split(value, 3, axis=-1)):
        # Contiguous: safetensors writes the raw buffer, ignoring strides.
        flat[".".join(parts[:-2] + [name, parts[-1]])] = (
            np.ascontiguousarray(part))
    else:
      flat[".".join(parts)] = value
  return dict(sorted(flat.items()))


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """Inverse of `flatten`: the nested Flax tree (q, k, v fused again)."""
  tree: dict = {}
  pending_qkv: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  for name, value in flat.items():
    parts = name.split(".")
    path: list[str] = []
    i = 0
    while i < len(parts):  # 'blocks', '3' -> 'blocks_3'.
      if parts[i] == "blocks" and i + 1 < len(parts) and parts[i + 1].isdigit():
        path.append(f"blocks_{parts[i + 1]}")
        i += 2
      else:
        path.append(parts[i])
        i += 1
    if len(path) >= 2 and path[-2] in _QKV and path[-3:-2] == ["attn"]:
      key = tuple(path[:-2] + ["qkv", path[-1]])
      pending_qkv.setdefault(key, {})[path[-2]] = value
      continue
    _set(tree, path, value)
  for key, parts in pending_qkv.items():
    missing = [p for p in _QKV if p not in parts]
    if missing:
      raise KeyError(f"{'.'.join(key)}: the export lacks its {missing} part(s)"
                     "; q, k and v come together.")
    _set(tree, list(key),
         np.concatenate([parts[p] for p in _QKV], axis=-1))
  return tree


def _set(tree: dict, path: list[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
