"""Corpus preparation: a VoxCeleb2-layout audio tree -> packed 16 kHz shards.

This is the only place that scans corpus directories.
`<src>/<speaker>/<session>/<utt>.<ext>` files are read with the one audio
reader (`audio_io.read_audio`: PyAV for AAC/MP4/MP3, soundfile for WAV/FLAC/
OGG, downmixed to mono, resampled to 16 kHz with soxr, NaN/Inf refused,
samples beyond [-1, 1] peak-normalised rather than clipped) and stored as int16
in shards (`storage.write_shard`), one shard per chunk of `chunk_size` files.
Training then reads `<out_dir>/manifest.tsv` only.

Output folder:
  manifest.tsv          one row per stored utterance (`manifest.write_manifest`)
  skipped.tsv           path, reason, detail of every file left out
  prepare_info.json     the arguments, the report of the last run and the
                        files peak-normalised (`rescaled`: path, peak)
  shards/chunk_*.npy    int16 samples
  parts/chunk_*.tsv     per-chunk manifests; parts/chunk_*.json marks a chunk done
  alignments/<spk>/<session>/<utt>.phn.tsv   copied phoneme tracks

Resumable: chunks are cut from the sorted file list, so a chunk's content is a
function of the source tree; a finished chunk (its `.json` marker, written last,
holds a fingerprint of its files and settings) is reused on a rerun.

Symlinked folders are followed, each real folder and file once (a symlink loop
or a second link to a scanned folder adds nothing). With `num_workers` > 1 the
decoding processes die with the preparing process, `kill -9` included.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import ctypes
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Collection, Sequence

import numpy as np
import tqdm

from data_pipelines import audio_io
from data_pipelines import manifest as manifest_lib
from data_pipelines import storage

log = logging.getLogger(__name__)

# The one audio reader's decoders and extensions (`audio_io`).
PYAV_EXTS = audio_io.PYAV_EXTS
SOUNDFILE_EXTS = audio_io.SOUNDFILE_EXTS
AUDIO_EXTS = audio_io.AUDIO_EXTS
ALIGNMENT_SUFFIX = ".phn.tsv"

# Skip reasons (the `reason` column of skipped.tsv and keys of report.skipped).
BAD_LAYOUT = "bad_layout"            # Not at <speaker>/<session>/<utt>.<ext>.
DUPLICATE = "duplicate_utt_id"       # Same <speaker>/<session>/<stem> twice,
                                     # or a second link to the same real file.
UNREADABLE = audio_io.UNREADABLE     # Decoder error: corrupt, truncated, ...
NO_AUDIO_STREAM = audio_io.NO_AUDIO_STREAM  # A container without audio.
EMPTY = audio_io.EMPTY               # Zero bytes or zero samples.
TOO_SHORT = "too_short"              # Under min_seconds.
NON_FINITE = audio_io.NON_FINITE     # NaN or Inf samples.
SILENT = "silent"                    # All zero once stored as int16.
BAD_ALIGNMENT = "bad_alignment"      # A .phn.tsv next to it that does not parse.

# Bump when the stored bytes of a chunk would change. 2: samples beyond
# [-1, 1] are peak-normalised instead of clipped.
FORMAT_VERSION = 2
_SHARD_DIR, _PART_DIR, _ALIGN_DIR = "shards", "parts", "alignments"
MANIFEST_NAME, SKIPPED_NAME, INFO_NAME = (
    "manifest.tsv", "skipped.tsv", "prepare_info.json")


@dataclasses.dataclass
class PrepareReport:
  """What `prepare_corpus` did. `skipped` counts files per skip reason."""
  num_files: int        # Audio files found under the source root.
  num_written: int      # Utterances in the manifest.
  num_converted: int    # Written files that were downmixed and/or resampled.
  skipped: dict[str, int]
  hours: float          # Total stored audio.
  manifest_path: str
  num_speakers: int = 0
  num_heldout_speakers: int = 0
  num_chunks: int = 0
  num_chunks_reused: int = 0  # Finished by an earlier run and kept.
  skipped_path: str = ""
  num_rescaled: int = 0  # Written files peak-normalised (beyond [-1, 1]).

  def summary(self) -> str:
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
    return (
        f"{self.num_written}/{self.num_files} files written "
        f"({self.hours:.2f} h, {self.num_converted} downmixed/resampled, "
        f"{self.num_rescaled} peak-normalised), "
        f"{self.num_speakers} speakers ({self.num_heldout_speakers} held out), "
        f"{self.num_chunks} chunks ({self.num_chunks_reused} reused); "
        f"skipped {sum(self.skipped.values())}"
        + (f" ({skipped}) -> {self.skipped_path}" if skipped else "")
        + f"\nmanifest: {self.manifest_path}")


@dataclasses.dataclass(frozen=True)
class SourceFile:
  path: str
  speaker: str
  session: str
  stem: str

  @property
  def utt_id(self) -> str:
    return f"{self.speaker}/{self.session}/{self.stem}"


@dataclasses.dataclass(frozen=True)
class Skip:
  path: str
  reason: str
  detail: str = ""


# A file that cannot be stored; `reason` is one of the skip reasons.
BadAudio = audio_io.BadAudio


def _split_ext(name: str) -> tuple[str, str]:
  stem, ext = os.path.splitext(name)
  return stem, ext.lower()


def scan_corpus(src_root: str) -> tuple[list[SourceFile], list[Skip]]:
  """Sorted audio files of a `<speaker>/<session>/<utt>.<ext>` tree.

  Returns (files, skips): audio files at another depth, second files with an
  already seen utt id (e.g. `a.wav` next to `a.m4a`) and second links to an
  already seen real file are skipped. Symlinked folders are followed, each
  real folder once: a symlink loop, or a second link to a scanned folder, is
  not descended into (logged).
  """
  if not os.path.isdir(src_root):
    raise FileNotFoundError(
        f"Source folder {src_root!r} does not exist; expected a VoxCeleb2-layout"
        " tree <src>/<speaker>/<session>/<utt>.m4a (or .wav/.flac/...).")
  paths = []
  visited = {os.path.realpath(src_root)}
  # followlinks: corpora are often assembled from symlinked speaker folders.
  for dirpath, dirnames, filenames in os.walk(src_root, followlinks=True):
    dirnames.sort()
    keep = []
    for name in dirnames:
      real = os.path.realpath(os.path.join(dirpath, name))
      if real in visited:
        log.warning("Not scanning %s again: it is %s, already scanned "
                    "(symlink loop or second link).",
                    os.path.join(dirpath, name), real)
        continue
      visited.add(real)
      keep.append(name)
    dirnames[:] = keep
    paths += [os.path.join(dirpath, f) for f in filenames
              if _split_ext(f)[1] in AUDIO_EXTS]
  paths.sort()
  files, skips, seen, seen_real = [], [], set(), {}
  for path in paths:
    parts = os.path.relpath(path, src_root).split(os.sep)
    if len(parts) != 3:
      skips.append(Skip(path, BAD_LAYOUT, "expected <speaker>/<session>/<utt>"))
      continue
    f = SourceFile(path, parts[0], parts[1], _split_ext(parts[2])[0])
    try:
      st = os.stat(path)
    except OSError as e:  # A dangling symlink, a file gone meanwhile, ...
      skips.append(Skip(path, UNREADABLE, f"{type(e).__name__}: {e}"))
      continue
    real = (st.st_dev, st.st_ino)  # One stat; links and hard links alike.
    if f.utt_id in seen:
      skips.append(Skip(path, DUPLICATE, f.utt_id))
      continue
    if real in seen_real:
      skips.append(Skip(path, DUPLICATE, f"same file as {seen_real[real]}"))
      continue
    seen.add(f.utt_id)
    seen_real[real] = path
    files.append(f)
  return files, skips


def load_audio(path: str, min_seconds: float = 1.0
               ) -> tuple[np.ndarray, audio_io.Audio]:
  """Reads one file (`audio_io.read_audio`) as 16 kHz mono int16 `[time]`.

  Returns (samples, how it was read: `converted`, `rescaled`, ...). Raises
  `BadAudio` with a skip reason for anything not storable: undecodable, empty,
  non-finite (from `read_audio`), shorter than `min_seconds`, or silent.
  """
  audio = audio_io.read_audio(path)
  seconds = len(audio.samples) / manifest_lib.SAMPLE_RATE
  if seconds < min_seconds:
    raise BadAudio(TOO_SHORT, f"{seconds:.3f} s < {min_seconds} s")
  samples = storage.to_int16(audio.samples)  # Within [-1, 1]: no clipping.
  if not samples.any():
    raise BadAudio(SILENT, "all samples are 0")
  return samples, audio


def _check_alignment(path: str) -> None:
  """Raises BadAudio unless every row is `start_s end_s phoneme`."""
  with open(path, newline="") as f:
    for i, row in enumerate(csv.reader(f, delimiter="\t"), 1):
      try:
        start, end = float(row[0]), float(row[1])
        ok = len(row) == 3 and 0 <= start <= end
      except (ValueError, IndexError):
        ok = False
      if not ok:
        raise BadAudio(BAD_ALIGNMENT,
                       f"{path} row {i}: {row}; expected start_s\\tend_s\\tphoneme")


def _copy_atomic(src: str, dst: str) -> None:
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copyfile(src, f"{dst}.tmp")
  os.replace(f"{dst}.tmp", dst)


@dataclasses.dataclass(frozen=True)
class _ChunkJob:
  index: int
  files: tuple[SourceFile, ...]
  out_dir: str
  min_seconds: float
  fingerprint: str

  @property
  def name(self) -> str:
    return f"chunk_{self.index:06d}"


def _paths(out_dir: str, name: str) -> tuple[str, str, str]:
  """(shard, part manifest, done marker) paths of one chunk."""
  return (os.path.join(out_dir, _SHARD_DIR, f"{name}.npy"),
          os.path.join(out_dir, _PART_DIR, f"{name}.tsv"),
          os.path.join(out_dir, _PART_DIR, f"{name}.json"))


def _fingerprint(files: Sequence[SourceFile], min_seconds: float) -> str:
  """Changes when a chunk's files (path, size, mtime) or settings change."""
  h = hashlib.sha1(f"{FORMAT_VERSION} {min_seconds!r}".encode())
  for f in files:
    st = os.stat(f.path)
    h.update(f"\n{f.path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
  return h.hexdigest()


def _chunk_is_done(job: _ChunkJob) -> bool:
  shard, part, marker = _paths(job.out_dir, job.name)
  if not all(map(os.path.exists, (shard, part, marker))):
    return False
  with open(marker) as f:
    return json.load(f).get("fingerprint") == job.fingerprint


def _prepare_chunk(job: _ChunkJob) -> int:
  """Decodes one chunk into its shard + part manifest; returns its file count.

  Runs in a worker process. The marker is written last, so a chunk interrupted
  anywhere before is redone on the next run.
  """
  shard_path, part_path, marker_path = _paths(job.out_dir, job.name)
  samples, kept, skips, converted, rescaled = [], [], [], 0, []
  for f in job.files:
    try:
      audio, how = load_audio(f.path, job.min_seconds)
      align_src = os.path.join(os.path.dirname(f.path), f.stem + ALIGNMENT_SUFFIX)
      has_alignment = os.path.exists(align_src)
      if has_alignment:
        _check_alignment(align_src)
    except BadAudio as e:
      skips.append(Skip(f.path, e.reason, e.detail))
      continue
    except OSError as e:  # Gone or unreadable since the scan.
      skips.append(Skip(f.path, UNREADABLE, f"{type(e).__name__}: {e}"))
      continue
    alignment = ""
    if has_alignment:
      alignment = os.path.join(_ALIGN_DIR, f.speaker, f.session,
                               f.stem + ALIGNMENT_SUFFIX)
      _copy_atomic(align_src, os.path.join(job.out_dir, alignment))
    samples.append(audio)
    kept.append((f, alignment))
    converted += how.converted
    if how.rescaled:
      rescaled.append((f.path, how.peak))
  offsets = storage.write_shard(shard_path, samples)
  shard_rel = os.path.relpath(shard_path, job.out_dir)
  manifest_lib.write_manifest(part_path, [
      manifest_lib.Utterance(
          utt_id=f.utt_id, speaker=f.speaker, session=f.session,
          split=manifest_lib.TRAIN,  # Placeholder: the split is set at merge.
          num_samples=len(audio), shard=shard_rel, offset=offset,
          source_path=f.path, alignment=alignment)
      for (f, alignment), audio, offset in zip(kept, samples, offsets)])
  marker = {"fingerprint": job.fingerprint, "num_converted": converted,
            "rescaled": rescaled,
            "skipped": [dataclasses.astuple(s) for s in skips]}
  with open(f"{marker_path}.tmp", "w") as fp:
    json.dump(marker, fp)
  os.replace(f"{marker_path}.tmp", marker_path)
  return len(job.files)


def choose_heldout(speakers: Sequence[str],
                   heldout_speakers: Collection[str] | None,
                   heldout_fraction: float, seed: int) -> set[str]:
  """Held-out speakers: the given ones present, else a seeded random choice.

  The choice takes round(heldout_fraction * len(speakers)) of the sorted
  speakers with `np.random.default_rng(seed)`, so it is reproducible.
  """
  if isinstance(heldout_speakers, str):
    raise TypeError(f"heldout_speakers must be a collection of speaker ids, "
                    f"found the string {heldout_speakers!r}; wrap it in a list.")
  if heldout_speakers is not None:
    wanted = set(heldout_speakers)
    present = wanted & set(speakers)
    if wanted and not present:
      raise ValueError(
          f"None of the {len(wanted)} held-out speakers given (e.g. "
          f"{sorted(wanted)[:3]}) is in the corpus (e.g. {list(speakers)[:3]});"
          " check the speaker list matches the corpus' speaker folder names.")
    if len(present) < len(wanted):
      log.warning("%d of %d held-out speakers are not in the corpus.",
                  len(wanted) - len(present), len(wanted))
    return present
  if not 0 <= heldout_fraction <= 1:
    raise ValueError(f"heldout_fraction must be in [0, 1]; got {heldout_fraction}.")
  num = round(heldout_fraction * len(speakers))
  rng = np.random.default_rng(seed)
  return {str(s) for s in rng.choice(sorted(speakers), size=num, replace=False)}


def write_skipped(path: str, skips: Sequence[Skip]) -> None:
  """skipped.tsv: header `path reason detail`, then one row per skip."""
  with open(f"{path}.tmp", "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    writer.writerows(dataclasses.astuple(s) for s in skips)
  os.replace(f"{path}.tmp", path)


def read_skipped(path: str) -> list[Skip]:
  with open(path, newline="") as f:
    return [Skip(**row) for row in csv.DictReader(f, delimiter="\t")]


_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def _watch_parent(parent_pid: int, period: float = 1.0) -> None:
  while os.getppid() == parent_pid:
    time.sleep(period)
  os._exit(1)  # Orphaned: re-parented to init or a subreaper.


def _die_with_parent(parent_pid: int) -> None:
  """Pool worker initializer: the worker dies with the process that made it.

  Without it a `kill -9` of the preparing process leaves its workers running
  as orphans (they hold the task queue's write end, so never see EOF). On
  Linux the kernel sends SIGKILL when the parent goes (PR_SET_PDEATHSIG; it
  fires when the *thread* that spawned the worker exits: ProcessPoolExecutor
  spawns from the submitting thread or its manager thread, both alive for as
  long as the pool); elsewhere a thread polls the parent pid once a second.
  """
  armed = False
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
      armed = False
  if os.getppid() != parent_pid:  # Died before the signal was armed.
    os._exit(1)
  if not armed:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="watch-parent").start()


def _run_chunks(jobs: Sequence[_ChunkJob], num_workers: int,
                bar: tqdm.tqdm) -> None:
  if num_workers <= 1:
    for job in jobs:
      bar.update(_prepare_chunk(job))
    return
  # spawn, not fork: the parent may hold JAX/XLA threads, which fork breaks.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=ctx, initializer=_die_with_parent,
      initargs=(os.getpid(),)) as ex:
    futures = [ex.submit(_prepare_chunk, job) for job in jobs]
    try:
      for future in concurrent.futures.as_completed(futures):
        bar.update(future.result())
    except BaseException:
      ex.shutdown(cancel_futures=True)  # Finished chunks stay for the rerun.
      raise


def _remove_stale_chunks(out_dir: str, names: set[str]) -> None:
  """Deletes chunk files of an earlier run over a larger file list."""
  for sub in (_SHARD_DIR, _PART_DIR):
    folder = os.path.join(out_dir, sub)
    for name in os.listdir(folder):
      if name.startswith("chunk_") and name.split(".")[0] not in names:
        os.remove(os.path.join(folder, name))


def prepare_corpus(src_root: str, out_dir: str, *,
                   heldout_speakers: Collection[str] | None = None,
                   heldout_fraction: float = 0.2, seed: int = 0,
                   num_workers: int | None = None, min_seconds: float = 1.0,
                   chunk_size: int = 256, progress: bool = True
                   ) -> PrepareReport:
  """Prepares `<src_root>/<speaker>/<session>/<utt>.<ext>` into `out_dir`.

  Args:
    src_root: the audio tree (VoxCeleb2 layout).
    out_dir: output folder (see the module docstring); reruns resume in it.
    heldout_speakers: speakers of the HELDOUT split; those absent are ignored.
    heldout_fraction: without `heldout_speakers`, the fraction of speakers
      held out, chosen with `seed`.
    num_workers: decoding processes; None: one per CPU; 0 or 1: in-process.
    min_seconds: shorter files are skipped.
    chunk_size: files per shard.
    progress: show a progress bar over files.

  Returns:
    A `PrepareReport`; the manifest is `<out_dir>/manifest.tsv`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
  src_root, out_dir = os.path.abspath(src_root), os.path.abspath(out_dir)
  files, scan_skips = scan_corpus(src_root)
  if not files:
    raise ValueError(
        f"No usable audio under {src_root!r} ({len(scan_skips)} at a wrong "
        f"depth or duplicated); expected <speaker>/<session>/<utt>.<ext> with "
        f"ext in {sorted(AUDIO_EXTS)}.")
  for sub in (_SHARD_DIR, _PART_DIR, _ALIGN_DIR):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

  jobs = []
  for index, start in enumerate(range(0, len(files), chunk_size)):
    chunk = tuple(files[start:start + chunk_size])
    jobs.append(_ChunkJob(index, chunk, out_dir, min_seconds,
                          _fingerprint(chunk, min_seconds)))
  _remove_stale_chunks(out_dir, {job.name for job in jobs})
  todo = [job for job in jobs if not _chunk_is_done(job)]
  num_reused = len(jobs) - len(todo)
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  num_workers = min(num_workers, len(todo))
  with tqdm.tqdm(total=len(files), initial=len(files) - sum(
      len(job.files) for job in todo), unit="file", disable=not progress,
                 desc="prepare") as bar:
    _run_chunks(todo, num_workers, bar)

  # Merge: parts in chunk order, then the speaker-disjoint split.
  utterances, skips, converted, rescaled = [], list(scan_skips), 0, []
  for job in jobs:
    _, part_path, marker_path = _paths(out_dir, job.name)
    utterances += manifest_lib.read_manifest(part_path)
    with open(marker_path) as f:
      marker = json.load(f)
    converted += marker["num_converted"]
    rescaled += [tuple(row) for row in marker.get("rescaled", [])]
    skips += [Skip(*row) for row in marker["skipped"]]
  speakers = manifest_lib.speakers_of(utterances)
  heldout = choose_heldout(speakers, heldout_speakers, heldout_fraction, seed)
  utterances = [dataclasses.replace(
      u, split=manifest_lib.HELDOUT if u.speaker in heldout else manifest_lib.TRAIN)
                for u in utterances]
  manifest_path = os.path.join(out_dir, MANIFEST_NAME)
  skipped_path = os.path.join(out_dir, SKIPPED_NAME)
  skips.sort(key=lambda s: s.path)
  write_skipped(skipped_path, skips)
  manifest_lib.write_manifest(manifest_path, utterances)

  report = PrepareReport(
      num_files=len(files) + len(scan_skips), num_written=len(utterances),
      num_converted=converted,
      skipped=dict(sorted(collections.Counter(s.reason for s in skips).items())),
      hours=sum(u.duration for u in utterances) / 3600,
      manifest_path=manifest_path, num_speakers=len(speakers),
      num_heldout_speakers=len(heldout), num_chunks=len(jobs),
      num_chunks_reused=num_reused, skipped_path=skipped_path,
      num_rescaled=len(rescaled))
  info = {"src_root": src_root,
          "heldout_speakers": sorted(heldout_speakers)
          if heldout_speakers is not None else None,
          "heldout_fraction": heldout_fraction, "seed": seed,
          "min_seconds": min_seconds, "chunk_size": chunk_size,
          "report": dataclasses.asdict(report),
          "rescaled": [list(row) for row in rescaled]}
  with open(os.path.join(out_dir, f"{INFO_NAME}.tmp"), "w") as f:
    json.dump(info, f, indent=1)
  os.replace(os.path.join(out_dir, f"{INFO_NAME}.tmp"),
             os.path.join(out_dir, INFO_NAME))
  log.info("Prepared %s: %s", src_root, report.summary())
  if rescaled:
    log.warning("%d files had samples beyond [-1, 1] and were peak-normalised "
                "(not clipped), e.g. %s (peak %.4g); all are listed under "
                "\"rescaled\" in %s.", len(rescaled), rescaled[0][0],
                rescaled[0][1], os.path.join(out_dir, INFO_NAME))
  if not utterances:
    log.warning("No audio was written; see %s.", skipped_path)
  return report
