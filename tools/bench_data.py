r"""Measures mixture-stream throughput (examples/s, total and per worker).

  python -m tools.bench_data --workers 2 --seconds 20
  python -m tools.bench_data --manifest /data/vox2/manifest.tsv --workers 8
  python -m tools.bench_data --synthetic /tmp/bench_corpus --workers 0

Without `--manifest` it uses the embedded default corpus; `--synthetic DIR`
writes (once) and uses a corpus of tone "speech" instead (no espeak-ng needed).
With 0 workers the examples are made in this process. Wall-clock rates
depend on what else runs on the machine; "per CPU-second" counts the CPU time
of this process and its workers, i.e. mixtures/s per fully used core.
`--profile` also prints where `make_example` spends its time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import numpy as np

from data_pipelines import augment as augment_lib
from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures
from data_pipelines import storage

# Synthetic phonemes: each symbol is a pure tone, so a frame's phoneme can be
# read back from its spectrum (the tests rely on that).
TONE_HZ = {"a": 300.0, "e": 600.0, "i": 900.0, "m": 1200.0, "n": 1500.0,
           "o": 1800.0, "s": 2100.0, "u": 2400.0}
SILENCE_SYMBOL = "_"
# The entries the trainer ships for stages 1-3 (`losses.batch_keys` of their
# objectives, and the host-side skip count).
TRAINED_KEYS = "mixture,clean,activity,speakers,skipped"


def _synthetic_utterance(rng: np.random.Generator, seconds: float, level: float,
                         sr: int) -> tuple[np.ndarray, list[tuple]]:
  """Tones of random phonemes with silent gaps: samples `[T]`, alignment rows."""
  total = int(seconds * sr)
  symbols, lengths = [], []
  done = 0
  while done < total:
    silent = rng.random() < 0.25
    length = int(rng.integers(800, 4800) if silent else rng.integers(640, 2400))
    length = min(length, total - done)
    symbols.append(SILENCE_SYMBOL if silent else
                   str(rng.choice(list(TONE_HZ))))
    lengths.append(length)
    done += length
  freqs = np.array([TONE_HZ.get(s, 0.0) for s in symbols])
  per_sample = np.repeat(freqs, lengths)
  phase = 2 * np.pi * np.cumsum(per_sample) / sr
  audio = np.where(per_sample > 0, level * np.sin(phase), 0.0)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  rows = [(b / sr, (b + n) / sr, s)
          for b, n, s in zip(starts, lengths, symbols)]
  return audio.astype(np.float32), rows


def write_synthetic_corpus(root: str, num_speakers: int = 50,
                           utts_per_speaker: int = 20,
                           seconds: tuple[float, float] = (2.0, 8.0),
                           heldout_fraction: float = 0.2, seed: int = 0,
                           sr: int = manifest_lib.SAMPLE_RATE) -> str:
  """Writes a prepared corpus (shards, alignments, manifest); returns the
  manifest path. Speaker i speaks at its own level; one shard per speaker."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "shards"), exist_ok=True)
  os.makedirs(os.path.join(root, "align"), exist_ok=True)
  num_heldout = int(round(num_speakers * heldout_fraction))
  utts = []
  for i in range(num_speakers):
    speaker = f"id{i:05d}"
    split = manifest_lib.HELDOUT if i >= num_speakers - num_heldout else (
        manifest_lib.TRAIN)
    level = 10 ** (rng.uniform(-30, -10) / 20)
    chunks, aligns = [], []
    for _ in range(utts_per_speaker):
      audio, rows = _synthetic_utterance(rng, rng.uniform(*seconds), level, sr)
      chunks.append(storage.to_int16(audio))
      aligns.append(rows)
    shard = f"shards/{speaker}.npy"
    offsets = storage.write_shard(os.path.join(root, shard), chunks)
    for j, (chunk, rows, offset) in enumerate(zip(chunks, aligns, offsets)):
      alignment = f"align/{speaker}_{j:03d}.tsv"
      with open(os.path.join(root, alignment), "w") as f:
        f.write("start_s\tend_s\tphoneme\n")
        f.writelines(f"{a:.4f}\t{b:.4f}\t{s}\n" for a, b, s in rows)
      utts.append(manifest_lib.Utterance(
          utt_id=f"{speaker}/s{j % 3}/{j:05d}", speaker=speaker,
          session=f"s{j % 3}", split=split, num_samples=len(chunk),
          shard=shard, offset=offset, alignment=alignment, sample_rate=sr))
  path = os.path.join(root, "manifest.tsv")
  manifest_lib.write_manifest(path, utts)
  return path


def _cpu_seconds() -> float:
  """CPU time (user + sys) of this process and its live children (workers).

  The throughput per CPU-second does not depend on what else the machine runs.
  """
  total = time.process_time()
  tick = os.sysconf("SC_CLK_TCK")
  children = set()
  for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as f:
      children.update(f.read().split())
  for pid in children:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # Exited meanwhile.
      continue
    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime.
  return total


def _profile(manifest: str, split: str, cfg: mixtures.MixtureConfig,
             count: int, augment=None) -> None:
  index = mixtures.MixtureIndex.from_manifest(manifest, split)
  transform = mixtures.MixtureTransform(storage.AudioStore(manifest), index,
                                        cfg, augment)
  rngs = [np.random.default_rng(i) for i in range(count)]
  profiler = cProfile.Profile()
  profiler.enable()
  for i, rng in enumerate(rngs):
    transform.random_map(i % len(index.utterances), rng)
  profiler.disable()
  pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--manifest", help="Prepared corpus manifest.")
  parser.add_argument("--synthetic", metavar="DIR",
                      help="Write/use a synthetic corpus in DIR instead.")
  parser.add_argument("--split", default=manifest_lib.TRAIN)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--warmup-seconds", type=float, default=5.0,
                      help="Batches drawn before timing starts: worker "
                      "start-up, first reads of the corpus pages, the "
                      "allocator's first growth.")
  parser.add_argument("--clip-seconds", type=float, default=4.0)
  parser.add_argument("--k-max", type=int, default=3)
  parser.add_argument("--keys", default=TRAINED_KEYS,
                      help="comma-separated example entries shipped from "
                      "the workers, or 'all'. Default: what stages 1-3 "
                      "train on (stage 4 adds sources, i.e. K x the "
                      "mixture's bytes).")
  parser.add_argument("--wire-dtype", default=mixtures.DEFAULT_WIRE_DTYPE,
                      choices=mixtures.WIRE_DTYPES,
                      help="dtype the batches carry waveforms in "
                      "(config.data.wire_dtype).")
  parser.add_argument("--augment", action="store_true",
                      help="Room / noise / channel augmentation on, with the "
                      "training defaults (data_pipelines/augment.py).")
  parser.add_argument("--profile", action="store_true",
                      help="Also profile make_example in this process.")
  args = parser.parse_args(argv)

  if args.synthetic:
    manifest = os.path.join(args.synthetic, "manifest.tsv")
    if not os.path.exists(manifest):
      print(f"Writing a synthetic corpus to {args.synthetic} ...", flush=True)
      manifest = write_synthetic_corpus(args.synthetic)
  elif args.manifest:
    manifest = args.manifest
  else:
    from data_pipelines import default_corpus  # pylint: disable=g-import-not-at-top
    manifest = default_corpus.ensure_default_corpus()

  cfg = mixtures.MixtureConfig(clip_seconds=args.clip_seconds,
                               k_max=args.k_max)
  augment = augment_lib.AugmentConfig(enabled=True)
  ds = mixtures.mixture_dataset(manifest, args.split, cfg, seed=0,
                                batch_size=args.batch_size,
                                num_workers=args.workers,
                                keys=(None if args.keys == "all"
                                      else args.keys.split(",")),
                                augment=augment if args.augment else None,
                                wire_dtype=args.wire_dtype)
  it = iter(ds)
  next(it)  # Start-up (worker spawn, index pickling) is not throughput,
  start = time.perf_counter()  # nor is the first touch of each page.
  while time.perf_counter() - start < args.warmup_seconds:
    next(it)
  count, start, cpu_start = 0, time.perf_counter(), _cpu_seconds()
  while time.perf_counter() - start < args.seconds:
    next(it)
    count += args.batch_size
  elapsed = time.perf_counter() - start
  cpu = _cpu_seconds() - cpu_start
  rate = count / elapsed
  print(f"{count} mixtures ({args.clip_seconds:g} s clips, K<={args.k_max}, "
        f"batch {args.batch_size}) in {elapsed:.1f} s wall after "
        f"{args.warmup_seconds:g} s warm-up, {cpu:.1f} CPU-s "
        f"(workers={args.workers}, {args.wire_dtype} waveforms, "
        f"os.cpu_count()={os.cpu_count()}):\n"
        f"  {rate:.0f} mixtures/s total, "
        f"{rate / max(args.workers, 1):.0f} per worker, "
        f"{count / cpu:.0f} per CPU-second (main process + workers).")
  if hasattr(it, "close"):
    it.close()  # Stops workers and prefetch threads before profiling.
  if args.profile:
    _profile(manifest, args.split, cfg, count=500,
             augment=augment if args.augment else None)


if __name__ == "__main__":
  main()
