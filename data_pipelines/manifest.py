"""Manifests: one row per utterance; training reads these, never directories.

A manifest is a TSV file with a header row. Paths in it (`shard`, `alignment`)
are relative to the manifest's own folder, so a prepared corpus can be moved
or copied (to a bucket, another disk) as one folder.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterable, Sequence

from data_pipelines.framing import SAMPLE_RATE  # Everything stored is 16 kHz mono.
TRAIN, HELDOUT = "train", "heldout"
# Held out of training with whole voice variants and languages (the embedded
# corpus); evaluators that read HELDOUT never see these speakers by accident.
UNSEEN_VARIANT = "unseen_variant"
SPLITS = (TRAIN, HELDOUT, UNSEEN_VARIANT)


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One stored utterance.

  `shard`/`offset`/`num_samples` locate its int16 samples inside a packed shard
  (see `storage.py`); `source_path` is where it was read from originally;
  `alignment` is an optional phoneme track (TSV `start_s end_s phoneme`).
  """
  utt_id: str          # "<speaker>/<session>/<utt>", unique.
  speaker: str
  session: str
  split: str           # One of SPLITS (speaker-disjoint).
  num_samples: int
  shard: str           # Shard file name, relative to the manifest folder.
  offset: int          # First sample inside the shard.
  source_path: str = ""
  alignment: str = ""  # Relative to the manifest folder; "" when absent.
  sample_rate: int = SAMPLE_RATE

  @property
  def duration(self) -> float:
    return self.num_samples / self.sample_rate


_FIELDS = [f.name for f in dataclasses.fields(Utterance)]
_INT_FIELDS = {"num_samples", "offset", "sample_rate"}


def write_manifest(path: str, utterances: Iterable[Utterance]) -> None:
  """Writes atomically (tmp file + rename) so a crash never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(_FIELDS + ["duration"])
    for u in utterances:
      writer.writerow([getattr(u, k) for k in _FIELDS] + [f"{u.duration:.3f}"])
  os.replace(tmp, path)


def read_manifest(path: str) -> list[Utterance]:
  """Reads a manifest written by `write_manifest`; checks its columns."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = set(_FIELDS) - set(reader.fieldnames or ())
    if missing:
      raise ValueError(
          f"Manifest {path} lacks columns {sorted(missing)}; expected {_FIELDS}."
          " Re-create it with tools/prepare_corpus.py.")
    return [
        Utterance(**{k: int(row[k]) if k in _INT_FIELDS else row[k]
                     for k in _FIELDS})
        for row in reader
    ]


def speakers_of(utterances: Sequence[Utterance], split: str | None = None
                ) -> list[str]:
  """Sorted distinct speakers, optionally of one split."""
  return sorted({u.speaker for u in utterances
                 if split is None or u.split == split})


def utterances_of(utterances: Sequence[Utterance], split: str
                  ) -> list[Utterance]:
  """The utterances of one split, in manifest order."""
  return [u for u in utterances if u.split == split]


def first_per_speaker(utterances: Sequence[Utterance], limit: int | None,
                      max_speakers: int | None = None) -> list[Utterance]:
  """The first `limit` utterances (manifest order) of each speaker, speakers
  sorted by name, the first `max_speakers` of them when given."""
  by_speaker: dict[str, list[Utterance]] = {}
  for u in utterances:
    by_speaker.setdefault(u.speaker, []).append(u)
  speakers = sorted(by_speaker)[:max_speakers]
  return [u for spk in speakers for u in by_speaker[spk][:limit]]
