"""The embedded default corpus, generated and prepared once, then cached.

  python -m data_pipelines.default_corpus [--size tiny]

prints the manifest path and a summary. Folder: `<root>/<size>/raw` (the
generated espeak-ng VoxCeleb2-layout tree) and `<root>/<size>/prepared`
(shards + manifest.tsv), then `<root>/<size>/built.json` (the settings it was
built with; a mismatch rebuilds); root is $ECHO_JAX_DATA, else ~/.cache/echo_jax.
The manifest's splits are the generator's: train, heldout (new speakers of
seen voice variants) and unseen_variant (variants and languages train lacks).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import json
import os

from data_pipelines import manifest as manifest_lib
from data_pipelines import prepare

ROOT_ENV = "ECHO_JAX_DATA"

# generate_corpus arguments per size. Splits (embedded/speakers.py): 240 ->
# 163 train / 41 heldout / 36 unseen_variant; 10 -> 6 / 2 / 2.
SIZES = {
    # About 4,300 utterances (~5.5 h); minutes on 2 cores.
    "default": dict(num_speakers=240, utts_per_speaker=(12, 24),
                    seconds=(2.0, 8.0)),
    # For tests: builds in seconds.
    "tiny": dict(num_speakers=10, utts_per_speaker=(6, 6), seconds=(2.0, 4.0)),
}
SEED = 0
MIN_SECONDS = 1.0
# Bump with embedded/generate.py's CORPUS_VERSION, so cached builds redo.
EMBEDDED_VERSION = 3
SPEAKERS_FILE = "speakers.json"  # Written by the generator beside the audio.
_RECORD_NAME = "built.json"


def default_root() -> str:
  return os.environ.get(ROOT_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "echo_jax")


@contextlib.contextmanager
def _lock(path: str):
  """Inter-process lock, so parallel test runs build the corpus once."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build_record(size: str) -> dict:
  """Everything the cached corpus depends on; a change rebuilds it."""
  return {"size": size, "seed": SEED, "generate": SIZES[size],
          "embedded_version": EMBEDDED_VERSION, "min_seconds": MIN_SECONDS,
          "format_version": prepare.FORMAT_VERSION}


def embedded_splits(raw_dir: str) -> dict[str, str]:
  """{speaker id: split} as the generator drew them (its speakers.json)."""
  path = os.path.join(raw_dir, SPEAKERS_FILE)
  with open(path) as f:
    splits = {k: v["split"] for k, v in json.load(f)["speakers"].items()}
  unknown = set(splits.values()) - set(manifest_lib.SPLITS)
  if unknown:
    raise ValueError(f"{path} has splits {sorted(unknown)}; expected only "
                     f"{manifest_lib.SPLITS}. Delete the folder to rebuild.")
  return splits


def _apply_splits(manifest_path: str, splits: dict[str, str]) -> None:
  """Rewrites the manifest's split column from `splits`."""
  utts = manifest_lib.read_manifest(manifest_path)
  manifest_lib.write_manifest(manifest_path, [
      dataclasses.replace(u, split=splits[u.speaker]) for u in utts])


def _is_built(base: str, size: str) -> bool:
  record_path = os.path.join(base, _RECORD_NAME)
  if not (os.path.exists(record_path) and os.path.exists(
      os.path.join(base, "prepared", prepare.MANIFEST_NAME))):
    return False
  with open(record_path) as f:
    # Through JSON both sides, so tuples compare equal to lists.
    return json.load(f) == json.loads(json.dumps(_build_record(size)))


def ensure_default_corpus(root: str | None = None, *, size: str = "default",
                          num_workers: int | None = None,
                          progress: bool = False) -> str:
  """Generates (espeak-ng) and prepares the default corpus if needed.

  Returns the path of its manifest.tsv; instant when already cached.
  """
  if size not in SIZES:
    raise ValueError(f"Unknown default corpus size {size!r}; "
                     f"expected one of {sorted(SIZES)}.")
  base = os.path.join(os.path.abspath(root or default_root()), size)
  raw_dir, out_dir = os.path.join(base, "raw"), os.path.join(base, "prepared")
  manifest_path = os.path.join(out_dir, prepare.MANIFEST_NAME)
  if _is_built(base, size):
    return manifest_path
  os.makedirs(base, exist_ok=True)
  with _lock(os.path.join(base, ".lock")):
    if _is_built(base, size):  # Built by another process meanwhile.
      return manifest_path
    # Deferred: generation needs espeak-ng, which reading a cached corpus doesn't.
    from data_pipelines.embedded.generate import generate_corpus
    generate_corpus(raw_dir, seed=SEED, num_workers=num_workers, **SIZES[size])
    splits = embedded_splits(raw_dir)
    # prepare knows two splits; every non-train speaker goes in as held out,
    # then the generator's own split names are written over them.
    prepare.prepare_corpus(
        raw_dir, out_dir, seed=SEED, num_workers=num_workers,
        heldout_speakers=[k for k, v in splits.items()
                          if v != manifest_lib.TRAIN],
        min_seconds=MIN_SECONDS, progress=progress)
    _apply_splits(manifest_path, splits)
    record_path = os.path.join(base, _RECORD_NAME)
    with open(f"{record_path}.tmp", "w") as f:  # Last: marks the build done.
      json.dump(_build_record(size), f)
    os.replace(f"{record_path}.tmp", record_path)
  return manifest_path


def summarize(manifest_path: str) -> str:
  """One line per split: speakers, utterances, hours, aligned utterances."""
  utts = manifest_lib.read_manifest(manifest_path)
  lines = []
  for split in manifest_lib.SPLITS:
    us = manifest_lib.utterances_of(utts, split)
    if not us and split == manifest_lib.UNSEEN_VARIANT:
      continue  # Corpora prepared from real data have no such split.
    lines.append(
        f"{split}: {len(manifest_lib.speakers_of(us))} speakers, {len(us)} "
        f"utterances, {sum(u.duration for u in us) / 3600:.3f} h, "
        f"{sum(bool(u.alignment) for u in us)} with alignments")
  per_speaker = collections.Counter(u.speaker for u in utts)
  if per_speaker:
    lines.append(f"utterances per speaker: {min(per_speaker.values())}-"
                 f"{max(per_speaker.values())}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="default")
  parser.add_argument("--root", default=None,
                      help=f"cache folder (default: ${ROOT_ENV} or ~/.cache/echo_jax)")
  parser.add_argument("--workers", type=int, default=None)
  args = parser.parse_args(argv)
  path = ensure_default_corpus(args.root, size=args.size,
                               num_workers=args.workers, progress=True)
  print(path)
  print(summarize(path))


if __name__ == "__main__":
  main()
