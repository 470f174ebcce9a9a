"""Packed audio storage: int16 shards read through memory maps.

Compressed audio is decoded once, at preparation time. Each shard is a flat
`.npy` int16 array holding many utterances back to back; the manifest says
where each one starts. A random crop is then a slice of a memory map: no
decoding, no file open per example, and the page cache does the rest.

A damaged shard (missing, truncated, corrupt header) must not stop a run that
reads many utterances: `read_or_skip` is the one place such a read becomes a
counted skip with a log line naming the utterance, the shard file and the
reason; every reader of many utterances (the mixture stream, the evaluators'
held-out clips, PLDA fitting) goes through it.
"""

from __future__ import annotations

import collections
import logging
import os

import numpy as np

from data_pipelines import manifest as manifest_lib

log = logging.getLogger(__name__)

INT16_SCALE = 32768.0

# Why a stored utterance could not be read (keys of the `skips` counters).
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
SKIP_REASONS = {
    UNREADABLE: "shard missing or unreadable",
    TRUNCATED: "shard shorter than the manifest says",
}


class ShardError(OSError, ValueError):
  """A shard that cannot be opened; the message names the file.

  Both an OSError (a missing file was a FileNotFoundError) and a ValueError
  (a truncated or corrupt `.npy` was numpy's ValueError), so callers that
  caught either keep catching it.
  """


def to_int16(audio: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """float waveform in [-1, 1] -> int16 (rounded, clipped; into `out` when
  given)."""
  scaled = audio * INT16_SCALE
  np.round(scaled, out=scaled)
  np.clip(scaled, -32768, 32767, out=scaled)
  if out is None:
    return scaled.astype(np.int16)
  np.copyto(out, scaled, casting="unsafe")  # Exact: integers in range.
  return out


def to_float(samples: np.ndarray, out: np.ndarray | None = None
             ) -> np.ndarray:
  """Stored int16 samples -> float32 in [-1, 1), in one pass (into `out`
  when given). Exact: 1 / 32768 is a power of two."""
  return np.multiply(samples, np.float32(1.0 / INT16_SCALE), out=out,
                     dtype=np.float32)


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

  def shard_path(self, name: str) -> str:
    return os.path.join(self.root, name)

  def _shard(self, name: str) -> np.ndarray:
    if name not in self._maps:
      path = self.shard_path(name)
      try:
        self._maps[name] = np.load(path, mmap_mode="r")
      except (OSError, ValueError, EOFError) as e:
        # numpy names no file ("mmap length is greater than file size").
        raise ShardError(f"Shard {path} is unreadable: {type(e).__name__}: "
                         f"{e}") from e
    return self._maps[name]

  def read(self, utt: manifest_lib.Utterance, start: int = 0,
           length: int | None = None, *, raw: bool = False) -> np.ndarray:
    """Returns float32 samples `[length]` of `utt` from `start` (in samples);
    with `raw`, the stored int16 samples (a read-only view of the map)."""
    length = utt.num_samples - start if length is None else length
    if start < 0 or length < 0 or start + length > utt.num_samples:
      raise ValueError(f"Crop [{start}, {start + length}) is outside "
                       f"{utt.utt_id} ({utt.num_samples} samples).")
    begin = utt.offset + start
    samples = self._shard(utt.shard)[begin:begin + length]
    return samples if raw else to_float(samples)


def read_or_skip(store: AudioStore, utt: manifest_lib.Utterance,
                 start: int = 0, length: int | None = None, *,
                 skips: collections.Counter | None = None, context: str = "",
                 raw: bool = False
                 ) -> tuple[np.ndarray | None, str | None]:
  """`store.read` (`raw`: int16) that turns a damaged shard into a skip.

  Returns `(samples [length], None)`, or `(None, reason)` with `reason` a
  `SKIP_REASONS` key: UNREADABLE (the shard is missing or does not open),
  TRUNCATED (it holds fewer samples than the manifest says). A skip is counted
  in `skips` (by reason) and logged as one warning line naming `context`, the
  utterance, the shard file and the reason. A crop outside the utterance is a
  caller's error and still raises.
  """
  length = utt.num_samples - start if length is None else length
  try:
    audio = store.read(utt, start, length, raw=raw)
    reason, detail = (None, "") if len(audio) == length else (
        TRUNCATED, f"{len(audio)} of {length} samples")
  except ShardError as e:
    audio, reason, detail = None, UNREADABLE, str(e.__cause__ or e)
  if reason is None:
    return audio, None
  if skips is not None:
    skips[reason] += 1
  log.warning("%sskipped %s [%d, +%d) in %s: %s (%s): %s",
              f"{context}: " if context else "", utt.utt_id, start, length,
              store.shard_path(utt.shard), reason, SKIP_REASONS[reason], detail)
  return None, reason


def skip_summary(skips: collections.Counter) -> str:
  """"3 unreadable, 1 truncated" (reasons sorted); "" when nothing skipped."""
  return ", ".join(f"{n} {r}" for r, n in sorted(skips.items()) if n)
