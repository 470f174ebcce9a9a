r"""Prepares a VoxCeleb2-layout audio tree into 16 kHz int16 shards + manifest.

  python -m tools.prepare_corpus --src /data/voxceleb2/dev/aac \
      --out /data/echo/vox2 [--heldout_speakers_file F | --heldout_fraction 0.2] \
      [--workers N]

(or `python -m tools.prepare_corpus ...`). Resumable: rerun the same command
after an interruption and finished chunks are kept. Prints the report; files
left out are listed with their reason in `<out>/skipped.tsv`.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from data_pipelines import manifest as manifest_lib
from data_pipelines import prepare
from data_pipelines import storage


def read_speaker_list(path: str) -> list[str]:
  """One speaker id per line; blank lines and `#` comments are ignored."""
  with open(path) as f:
    lines = (line.split("#", 1)[0].strip() for line in f)
    return [line for line in lines if line]


def crop_read_speed(manifest_path: str, crop_seconds: float = 4.0,
                    num_reads: int = 2000, seed: int = 0) -> float:
  """Random crops per second read through `storage.AudioStore` (one process)."""
  utts = manifest_lib.read_manifest(manifest_path)
  length = int(crop_seconds * manifest_lib.SAMPLE_RATE)
  rng = np.random.default_rng(seed)
  store = storage.AudioStore(manifest_path)
  picks = rng.integers(len(utts), size=num_reads)
  begin = time.perf_counter()
  for i in picks:
    u = utts[i]
    n = min(length, u.num_samples)
    store.read(u, int(rng.integers(u.num_samples - n + 1)), n)
  return num_reads / (time.perf_counter() - begin)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--src", required=True,
                      help="audio root: <src>/<speaker>/<session>/<utt>.<ext>")
  parser.add_argument("--out", required=True, help="output folder")
  split = parser.add_mutually_exclusive_group()
  split.add_argument("--heldout_speakers_file",
                     help="text file, one held-out speaker id per line")
  split.add_argument("--heldout_fraction", type=float, default=0.2,
                     help="fraction of speakers held out (seeded choice)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=None,
                      help="decoding processes (default: one per CPU)")
  parser.add_argument("--min_seconds", type=float, default=1.0)
  parser.add_argument("--chunk_size", type=int, default=256,
                      help="files per shard")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--bench_reads", type=int, default=0,
                      help="then time this many random 4 s crops from the store")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> prepare.PrepareReport:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  heldout = (read_speaker_list(args.heldout_speakers_file)
             if args.heldout_speakers_file else None)
  report = prepare.prepare_corpus(
      args.src, args.out, heldout_speakers=heldout,
      heldout_fraction=args.heldout_fraction, seed=args.seed,
      num_workers=args.workers, min_seconds=args.min_seconds,
      chunk_size=args.chunk_size, progress=not args.no_progress)
  print(report.summary())
  if args.bench_reads:
    speed = crop_read_speed(report.manifest_path, num_reads=args.bench_reads)
    print(f"AudioStore: {speed:.0f} random 4 s crops/s (one process)")
  return report


if __name__ == "__main__":
  main()
