"""Generates the embedded default corpus: espeak-ng speech in VoxCeleb2 layout.

  python -m data_pipelines.embedded.generate --out /tmp/echo_corpus --seed 0

Writes `<out>/<speaker_id>/<session_id>/<utt>.flac` (16 kHz mono, 16-bit), a
phoneme track `<utt>.phn.tsv` next to each (rows `start_s end_s phoneme`,
contiguous, covering the whole file, pauses and padding labelled `sil`) and
`<out>/speakers.json` (every speaker's and session's parameters, with split,
and the espeak-ng voices used, held out and skipped).
Every utterance is a pure function of (seed, speaker, session, utterance), so
the corpus is byte-identical for a seed whatever the worker count, and an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time

import numpy as np
import scipy.signal
import soundfile as sf
import tqdm

from data_pipelines import manifest as manifest_lib
from data_pipelines.embedded import espeak as espeak_lib
from data_pipelines.embedded import sentences
from data_pipelines.embedded import speakers as speakers_lib

SAMPLE_RATE = manifest_lib.SAMPLE_RATE
SILENCE = "sil"
PHONEME_SUFFIX = ".phn.tsv"
SPEAKERS_FILE = "speakers.json"
DONE_FILE = ".embedded_corpus_done"
# Bump when a change alters the generated audio, so old caches are redone.
# 2: every variant, many languages, session channels; 3: libc rand() seeded.
CORPUS_VERSION = 3
_PAD_SECONDS = (0.15, 0.9)    # Total leading + trailing silence.
_TARGET_RMS_DB = -20.0
_MAX_ATTEMPTS = 10
_CHANNEL_TAPS = 257           # Odd: linear phase, centred with no delay.
_TEMP_NAME = re.compile(r"\.tmp\d+$")  # f"{final}.tmp{pid}", see _run_job.


@dataclasses.dataclass(frozen=True)
class Utterance:
  """Rendered audio `[num_samples]` float32 at 16 kHz and its phoneme track.

  `segments` are (start sample, end sample, label), contiguous from 0 to
  num_samples.
  """
  audio: np.ndarray
  segments: list[tuple[int, int, str]]
  text: str


def phoneme_label(mnemonic: str) -> str | None:
  """espeak phoneme mnemonic -> label; None for non-phoneme markers.

  Pauses (`_`, `_:`, `_!`...) become `sil`; stress marks (`'` primary, `,`
  secondary) are dropped so one phoneme has one label; `(en)`-style language
  switch markers are not phonemes.
  """
  if not mnemonic or (mnemonic.startswith("(") and mnemonic.endswith(")")):
    return None
  if mnemonic.startswith("_"):
    return SILENCE
  return mnemonic.lstrip("',") or None


def _segments(events: list[tuple[int, str]], num_speech: int, lead: int,
              total: int) -> list[tuple[int, int, str]]:
  """Phoneme onsets (in output samples, before padding) -> contiguous track."""
  starts: list[tuple[int, str]] = [(0, SILENCE)]
  for pos, mnemonic in events:
    label = phoneme_label(mnemonic)
    if label is not None:
      starts.append((min(max(pos, 0), num_speech) + lead, label))
  starts.append((lead + num_speech, SILENCE))
  segments: list[tuple[int, int, str]] = []
  for (start, label), (end, _) in zip(starts, starts[1:] + [(total, "")]):
    if end <= start:
      continue  # Zero-length: a marker at the same sample as the next one.
    if segments and segments[-1][2] == label == SILENCE:
      segments[-1] = (segments[-1][0], end, label)
    else:
      segments.append((start, end, label))
  return segments


def _warp(samples: np.ndarray, source_rate: int) -> np.ndarray:
  """espeak samples, read as `source_rate`, resampled to 16 kHz float32."""
  g = math.gcd(SAMPLE_RATE, source_rate)
  x = samples.astype(np.float32) / 32768.0
  return scipy.signal.resample_poly(x, SAMPLE_RATE // g, source_rate // g
                                    ).astype(np.float32)


@functools.lru_cache(maxsize=64)
def channel_filter(session: speakers_lib.Session) -> np.ndarray:
  """Linear-phase FIR `[taps]`: the session's EQ, band limit and tilt.

  Linear phase so that filtering (centred) moves no phoneme boundary.
  """
  freqs = np.linspace(0.0, SAMPLE_RATE / 2, 257)
  gain_db = np.interp(np.log(np.maximum(freqs, 20.0)),
                      np.log(speakers_lib.EQ_CENTRES_HZ), session.eq_db)
  gain = 10 ** (gain_db / 20)
  gain *= np.abs(1 + session.tilt * np.exp(-1j * np.pi * freqs
                                           / (SAMPLE_RATE / 2)))
  if session.lowpass_hz < SAMPLE_RATE / 2:  # 4th-order roll-off.
    gain /= np.sqrt(1 + (freqs / session.lowpass_hz) ** 8)
  if session.highpass_hz > 0:               # 2nd-order roll-off.
    gain /= np.sqrt(1 + (session.highpass_hz / np.maximum(freqs, 1.0)) ** 4)
  return scipy.signal.firwin2(_CHANNEL_TAPS, freqs, gain, fs=SAMPLE_RATE)


def _through_channel(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
  return scipy.signal.oaconvolve(x, taps, mode="same")


def render_utterance(speaker: speakers_lib.Speaker,
                     session: speakers_lib.Session, rng: np.random.Generator,
                     seconds: tuple[float, float]) -> Utterance:
  """Synthesizes one utterance of `speaker` lasting within `seconds`.

  The text length is adapted until the speech plus padding fits the range.
  """
  lo, hi = seconds
  target = rng.uniform(lo, hi)
  # Aim the speech at the target minus typical padding.
  num_words = max(1, round((target - np.mean(_PAD_SECONDS))
                           * speaker.rate_wpm / 60.0))
  for _ in range(_MAX_ATTEMPTS):
    text = sentences.sentence(rng, num_words)
    tts = espeak_lib.Espeak()
    try:
      tts.set_voice(speaker.voice)
      tts.set_prosody(rate=speaker.espeak_rate, pitch=speaker.espeak_pitch,
                      pitch_range=speaker.espeak_range)
      synth = tts.synthesize(text, rand_seed=int(rng.integers(2**31)))
    finally:
      tts.close()
    speech = _warp(synth.samples, speaker.source_rate)
    speech_s = len(speech) / SAMPLE_RATE
    pad_lo = max(_PAD_SECONDS[0], lo - speech_s)
    pad_hi = min(_PAD_SECONDS[1], hi - speech_s)
    if pad_lo <= pad_hi:
      break
    # Too long or too short: rescale the word count towards the target, by
    # at least one word so the loop cannot stall.
    wanted = round(len(text.split()) * (target - np.mean(_PAD_SECONDS))
                   / max(speech_s, 1e-3))
    if speech_s > lo:
      num_words = max(1, min(num_words - 1, wanted))
    else:
      num_words = max(num_words + 1, wanted)
  else:
    raise RuntimeError(
        f"Could not fit an utterance of {speaker.speaker_id} into {seconds} s "
        f"in {_MAX_ATTEMPTS} attempts (last speech {speech_s:.2f} s); expected"
        f" a range at least {_PAD_SECONDS[1] - _PAD_SECONDS[0]:.2f} s wide "
        "and above ~1.5 s.")
  pad = rng.uniform(pad_lo, pad_hi)
  lead = int(round(pad * rng.uniform(0.3, 0.7) * SAMPLE_RATE))
  trail = int(round(pad * SAMPLE_RATE)) - lead
  # Recording channel of the session (EQ, band limit, tilt) over the speech
  # and its noise floor, then the level.
  taps = channel_filter(session)
  voiced = _through_channel(
      np.concatenate([np.zeros(lead), speech, np.zeros(trail)]), taps)
  active = voiced[np.abs(voiced) > 1e-3 * np.abs(voiced).max()]
  level_db = _TARGET_RMS_DB + session.gain_db + rng.uniform(-1.5, 1.5)
  voiced *= 10 ** (level_db / 20) / np.sqrt(np.mean(active ** 2) + 1e-12)
  noise = _through_channel(rng.normal(0.0, 1.0, len(voiced)), taps)
  noise *= 10 ** ((level_db + session.noise_db) / 20) / np.sqrt(
      np.mean(noise ** 2) + 1e-12)
  audio = voiced + noise
  peak = np.max(np.abs(audio))
  if peak > 0.99:
    audio = audio * (0.99 / peak)
  events = [(int(round(pos * SAMPLE_RATE / speaker.source_rate)), name)
            for pos, name in synth.phonemes]
  return Utterance(audio=audio.astype(np.float32),
                   segments=_segments(events, len(speech), lead, len(audio)),
                   text=text)


def write_phonemes(path: str, segments: list[tuple[int, int, str]]) -> None:
  """Header-less TSV `start_s end_s phoneme`; k/16000 is exact in 7 decimals."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for start, end, label in segments:
      f.write(f"{start / SAMPLE_RATE:.7f}\t{end / SAMPLE_RATE:.7f}\t{label}\n")
  os.replace(tmp, path)


def read_phonemes(path: str) -> list[tuple[float, float, str]]:
  """Reads a track written by `write_phonemes`."""
  rows = []
  with open(path) as f:
    for line in f:
      start, end, label = line.rstrip("\n").split("\t")
      rows.append((float(start), float(end), label))
  return rows


@dataclasses.dataclass(frozen=True)
class _Job:
  out_root: str
  seed: int
  seconds: tuple[float, float]
  speaker_index: int
  session_index: int
  utt_index: int          # 1-based within the session.
  speaker: speakers_lib.Speaker

  @property
  def flac_path(self) -> str:
    session = self.speaker.sessions[self.session_index]
    return os.path.join(self.out_root, self.speaker.speaker_id,
                        session.session_id, f"{self.utt_index:05d}.flac")


def _run_job(job: _Job) -> float:
  """Renders and writes one utterance unless present; returns its seconds."""
  flac = job.flac_path
  phn = flac[:-len(".flac")] + PHONEME_SUFFIX
  if os.path.exists(flac) and os.path.exists(phn):
    return sf.info(flac).frames / SAMPLE_RATE
  rng = np.random.default_rng([job.seed, 2, job.speaker_index,
                               job.session_index, job.utt_index])
  utt = render_utterance(job.speaker, job.speaker.sessions[job.session_index],
                         rng, job.seconds)
  os.makedirs(os.path.dirname(flac), exist_ok=True)
  write_phonemes(phn, utt.segments)
  tmp = f"{flac}.tmp{os.getpid()}"
  sf.write(tmp, utt.audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
  os.replace(tmp, flac)
  return len(utt.audio) / SAMPLE_RATE


def _worker_init() -> None:
  # Fail fast in each worker if the library cannot load, before any job.
  espeak_lib.Espeak().close()


def _config_hash(config: dict) -> str:
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()
                        ).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _clear_previous(out_root: str, config_hash: str) -> None:
  """Removes what an earlier run with other arguments generated here."""
  path = os.path.join(out_root, SPEAKERS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  if old.get("config_hash") == config_hash:
    # Same corpus, interrupted: keep finished files, drop half-written ones.
    for d, _, files in os.walk(out_root):
      for name in files:
        if _TEMP_NAME.search(name):
          os.remove(os.path.join(d, name))
    return
  print(f"{out_root} holds an embedded corpus with other arguments "
        f"({old.get('config')}); regenerating it.", file=sys.stderr)
  for speaker_id in old.get("speakers", {}):
    shutil.rmtree(os.path.join(out_root, speaker_id), ignore_errors=True)
  for name in (DONE_FILE, SPEAKERS_FILE):
    if os.path.exists(os.path.join(out_root, name)):
      os.remove(os.path.join(out_root, name))


def generate_corpus(out_root: str, *, seed: int = 0, num_speakers: int = 240,
                    utts_per_speaker: tuple[int, int] = (12, 24),
                    seconds: tuple[float, float] = (2.0, 8.0),
                    num_workers: int | None = None) -> str:
  """Generates (or finds cached) the embedded corpus under `out_root`.

  Speakers and splits as `speakers.draw_speakers` makes them, over every
  usable espeak-ng variant (those that fail are skipped and logged).

  Returns `out_root`. A second call with the same arguments returns at once;
  an interrupted call resumes; other arguments regenerate the folder.
  `num_workers` (default: all cores) does not change the output.
  """
  if num_speakers < 1 or not 1 <= utts_per_speaker[0] <= utts_per_speaker[1]:
    raise ValueError(f"Expected num_speakers >= 1 and 1 <= min <= max utts, "
                     f"found {num_speakers}, {utts_per_speaker}.")
  if not 0 < seconds[0] < seconds[1]:
    raise ValueError(f"Expected 0 < seconds[0] < seconds[1], found {seconds}.")
  config = dict(version=CORPUS_VERSION, seed=seed, num_speakers=num_speakers,
                utts_per_speaker=list(utts_per_speaker), seconds=list(seconds))
  config_hash = _config_hash(config)
  done_path = os.path.join(out_root, DONE_FILE)
  if os.path.exists(done_path):
    with open(done_path) as f:
      if f.read().strip() == config_hash:
        return out_root
  start = time.time()
  os.makedirs(out_root, exist_ok=True)
  _clear_previous(out_root, config_hash)
  voices = speakers_lib.usable_voices()
  speakers = speakers_lib.draw_speakers(seed, num_speakers,
                                        tuple(utts_per_speaker), voices)
  _write_json(os.path.join(out_root, SPEAKERS_FILE), dict(
      config=config, config_hash=config_hash,
      voices=dict(**dataclasses.asdict(speakers_lib.split_voices(seed, voices)),
                  skipped=voices.skipped),
      speakers={s.speaker_id: dataclasses.asdict(s) for s in speakers}))
  jobs = [_Job(out_root, seed, tuple(seconds), i, j, k + 1, spk)
          for i, spk in enumerate(speakers)
          for j, session in enumerate(spk.sessions)
          for k in range(session.num_utterances)]
  num_workers = min(num_workers or os.cpu_count() or 1, len(jobs))
  bar = dict(total=len(jobs), desc="embedded corpus", unit="utt")
  if num_workers == 1:
    durations = [_run_job(job) for job in tqdm.tqdm(jobs, **bar)]
  else:
    # fork is fastest and needs no `__main__` guard, but forking a process
    # whose JAX runtime already runs threads can deadlock; spawn then.
    ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules
                                      else "fork")
    with ctx.Pool(num_workers, initializer=_worker_init) as pool:
      durations = list(tqdm.tqdm(pool.imap_unordered(_run_job, jobs,
                                                     chunksize=4), **bar))
  with open(done_path + ".tmp", "w") as f:
    f.write(config_hash + "\n")
  os.replace(done_path + ".tmp", done_path)
  counts = collections.Counter(s.split for s in speakers)
  print(f"Embedded corpus at {out_root}: {num_speakers} speakers "
        f"({', '.join(f'{n} {k}' for k, n in counts.items())}) over "
        f"{len({s.variant for s in speakers})} variants and "
        f"{len({s.language for s in speakers})} languages "
        f"({len(voices.skipped)} voices skipped), {len(jobs)} "
        f"utterances, {sum(durations) / 3600:.2f} h, generated in "
        f"{time.time() - start:.1f} s with {num_workers} workers.",
        file=sys.stderr)
  return out_root


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="Corpus folder.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_speakers", type=int, default=240)
  parser.add_argument("--utts_per_speaker", type=int, nargs=2, default=(12, 24))
  parser.add_argument("--seconds", type=float, nargs=2, default=(2.0, 8.0))
  parser.add_argument("--num_workers", type=int, default=None)
  args = parser.parse_args(argv)
  generate_corpus(args.out, seed=args.seed, num_speakers=args.num_speakers,
                  utts_per_speaker=tuple(args.utts_per_speaker),
                  seconds=tuple(args.seconds), num_workers=args.num_workers)


if __name__ == "__main__":
  main()
