"""Packed audio storage: int16 shards read through memory maps.

Compressed audio is decoded once, at preparation time. Each shard is a flat
`.npy` int16 array holding many utterances back to back; the manifest says
where each one starts. A random crop is then a slice of a memory map: no
decoding, no file open per example, and the page cache does the rest.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import manifest as manifest_lib

INT16_SCALE = 32768.0


def to_int16(audio: np.ndarray) -> np.ndarray:
  """float waveform in [-1, 1] -> int16 (clipped)."""
  return np.clip(np.round(audio * INT16_SCALE), -32768, 32767).astype(np.int16)


def write_shard(path: str, chunks: list[np.ndarray]) -> list[int]:
  """Writes int16 chunks back to back into one `.npy` shard, atomically.

  Returns each chunk's offset (in samples) inside the shard.
  """
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
  data = (np.concatenate(chunks) if chunks else np.zeros(0, np.int16))
  tmp = f"{path}.tmp.npy"
  np.save(tmp, data.astype(np.int16, copy=False))
  os.replace(tmp, path)
  return [int(o) for o in offsets[:-1]]


class AudioStore:
  """Random access to the samples of a prepared corpus.

  Opens each shard lazily as a read-only memory map, so the object is cheap to
  create and safe to pickle into grain worker processes (maps are re-opened).
  """

  def __init__(self, manifest_path: str):
    self.root = os.path.dirname(os.path.abspath(manifest_path))
    self._maps: dict[str, np.ndarray] = {}

  def __getstate__(self):
    return {"root": self.root, "_maps": {}}

  def _shard(self, name: str) -> np.ndarray:
    if name not in self._maps:
      self._maps[name] = np.load(os.path.join(self.root, name), mmap_mode="r")
    return self._maps[name]

  def read(self, utt: manifest_lib.Utterance, start: int = 0,
           length: int | None = None) -> np.ndarray:
    """Returns float32 samples `[length]` of `utt` from `start` (in samples)."""
    length = utt.num_samples - start if length is None else length
    if start < 0 or length < 0 or start + length > utt.num_samples:
      raise ValueError(f"Crop [{start}, {start + length}) is outside "
                       f"{utt.utt_id} ({utt.num_samples} samples).")
    begin = utt.offset + start
    samples = self._shard(utt.shard)[begin:begin + length]
    return samples.astype(np.float32) / INT16_SCALE
