"""Phoneme inventory and frame-level phoneme labels from alignment TSVs.

An alignment file (the manifest's `alignment` column) holds one phoneme per row:
`start_s<TAB>end_s<TAB>phoneme`, times in seconds from the utterance start. A
header row (`start_s end_s phoneme`) and `#` comment lines are allowed.

Label convention for every frame track in the project:
  ids >= 0  phonemes, indices into the sorted `PhonemeInventory.symbols`;
  SILENCE   (-2) the alignment marks a pause/silence there (`SILENCE_SYMBOLS`,
            e.g. espeak-ng's `_`); silence is deliberately not a class;
  UNKNOWN   (-1) no label: no alignment file, a gap the alignment does not
            cover, outside the placed segment or an absent mixture slot.
Consumers that want phoneme targets only keep `labels >= 0`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import numpy as np

from data_pipelines import manifest as manifest_lib

UNKNOWN = -1
SILENCE = -2
# Pause/silence marks of espeak-ng (`_`, `_:`, `_!`, ...) and of common forced
# aligners (MFA, Kaldi); they become SILENCE, never inventory entries.
SILENCE_SYMBOLS = frozenset({"", "sil", "sp", "spn", "SIL", "<sil>", "<eps>",
                             "pau", "h#"})
INVENTORY_FILE = "phonemes.json"


def is_silence(symbol: str) -> bool:
  return symbol in SILENCE_SYMBOLS or symbol.startswith("_")


def read_alignment(path: str) -> list[tuple[float, float, str]]:
  """Rows `(start_s, end_s, phoneme)` of an alignment TSV, sorted by start."""
  rows = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      fields = line.split("\t")
      if len(fields) != 3:
        raise ValueError(f"{path}:{line_no}: expected 3 tab-separated fields "
                         f"`start_s end_s phoneme`, found {fields!r}.")
      try:
        start, end = float(fields[0]), float(fields[1])
      except ValueError:
        if not rows and line_no == 1:  # A header row.
          continue
        raise ValueError(f"{path}:{line_no}: times must be seconds, found "
                         f"{fields[:2]!r}.") from None
      if end < start:
        raise ValueError(f"{path}:{line_no}: end {end} < start {start}.")
      rows.append((start, end, fields[2].strip()))
  rows.sort(key=lambda r: r[0])
  return rows


@dataclasses.dataclass(frozen=True)
class PhonemeInventory:
  """Sorted phoneme symbols; a symbol's id is its position."""
  symbols: tuple[str, ...]

  def __post_init__(self):
    if list(self.symbols) != sorted(set(self.symbols)):
      raise ValueError("PhonemeInventory symbols must be sorted and distinct.")

  def __len__(self) -> int:
    return len(self.symbols)

  def id_of(self, symbol: str) -> int:
    """Id of `symbol`; SILENCE for pause marks, UNKNOWN if not in inventory."""
    if is_silence(symbol):
      return SILENCE
    i = int(np.searchsorted(self.symbols, symbol)) if self.symbols else 0
    return i if i < len(self.symbols) and self.symbols[i] == symbol else UNKNOWN

  @classmethod
  def from_symbols(cls, symbols: Iterable[str]) -> PhonemeInventory:
    return cls(tuple(sorted({s for s in symbols if not is_silence(s)})))

  @classmethod
  def from_manifest(cls, manifest_path: str) -> PhonemeInventory:
    """Inventory of every alignment of the manifest (all splits, so ids agree)."""
    root = os.path.dirname(os.path.abspath(manifest_path))
    symbols = set()
    for utt in manifest_lib.read_manifest(manifest_path):
      if utt.alignment:
        symbols.update(r[2] for r in read_alignment(
            os.path.join(root, utt.alignment)))
    return cls.from_symbols(symbols)

  def save(self, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # Parallel runs may save at once.
    with open(tmp, "w") as f:
      json.dump({"symbols": list(self.symbols),
                 "unknown_id": UNKNOWN, "silence_id": SILENCE}, f, indent=1)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> PhonemeInventory:
    with open(path) as f:
      return cls(tuple(json.load(f)["symbols"]))

  @classmethod
  def for_manifest(cls, manifest_path: str) -> PhonemeInventory:
    """Loads `phonemes.json` next to the manifest, building and saving it first
    if it is missing or older than the manifest."""
    path = os.path.join(os.path.dirname(os.path.abspath(manifest_path)),
                        INVENTORY_FILE)
    if (os.path.exists(path) and
        os.path.getmtime(path) >= os.path.getmtime(manifest_path)):
      return cls.load(path)
    inventory = cls.from_manifest(manifest_path)
    inventory.save(path)
    return inventory


@dataclasses.dataclass(frozen=True)
class Intervals:
  """A label track as a step function of the sample position.

  `labels[j]` holds on `[bounds[j], bounds[j+1])`; `bounds` int64 `[M]` starts
  at the int64 minimum and the gaps between alignment rows (and the tail) are
  UNKNOWN steps, so a look-up is one `searchsorted`.
  """
  bounds: np.ndarray
  labels: np.ndarray

  @classmethod
  def from_alignment(cls, path: str, inventory: PhonemeInventory,
                     sample_rate: int = manifest_lib.SAMPLE_RATE) -> Intervals:
    # An abutting row repeats the previous end as its start; `labels_at`
    # takes the last of equal bounds, so the new row wins there.
    bounds, labels = [np.iinfo(np.int64).min], [UNKNOWN]
    for start_s, end_s, symbol in read_alignment(path):
      start, end = round(start_s * sample_rate), round(end_s * sample_rate)
      if bounds[-1] - sample_rate // 1000 <= start < bounds[-1]:
        start = bounds[-1]  # Rounding of the seconds in the file (<= 1 ms).
      if start < bounds[-1]:
        raise ValueError(f"{path}: rows overlap at {start_s} s; an alignment "
                         "must be a sequence of disjoint intervals.")
      if end <= start:
        continue
      bounds += [start, end]
      labels += [inventory.id_of(symbol), UNKNOWN]
    return cls(np.array(bounds, np.int64), np.array(labels, np.int32))

  def labels_at(self, positions: np.ndarray) -> np.ndarray:
    """Label (int32) at each sample position; UNKNOWN where none covers it."""
    return self.labels[np.searchsorted(self.bounds, positions, side="right")
                       - 1]


def frame_labels(alignment_path: str, num_frames: int, hop: int, sr: int,
                 inventory: PhonemeInventory | None = None) -> np.ndarray:
  """Phoneme id per frame, int32 `[num_frames]`.

  Frame t covers samples `[t*hop, (t+1)*hop)` and takes the label of the
  interval holding its centre sample. Without `inventory`, one is built from
  this file alone (fine for a look; pass the manifest's for consistent ids).
  """
  if inventory is None:
    inventory = PhonemeInventory.from_symbols(
        r[2] for r in read_alignment(alignment_path))
  intervals = Intervals.from_alignment(alignment_path, inventory, sr)
  centres = np.arange(num_frames, dtype=np.int64) * hop + hop // 2
  return intervals.labels_at(centres)
