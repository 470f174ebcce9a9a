"""Speaker and session parameter draws for the embedded corpus.

A speaker fixes an espeak voice variant (glottal source, formant scaling,
breathiness), a language/accent (phonology, intonation), a base pitch, a pitch
range, a speaking rate and a vocal-tract-length warp `alpha`. The warp plays
the synthesized audio `alpha` times faster (resampling), which scales every
formant by `alpha`; espeak's pitch and rate are pre-divided by `alpha` so the
speaker's pitch and rate stay what was drawn. So speakers differ in spectral
envelope, not only in pitch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string

import espeakng_loader
import numpy as np

from data_pipelines import manifest as manifest_lib

ESPEAK_RATE = 22_050           # espeak-ng's native output rate.
HELDOUT_FRACTION = 0.2         # 48 train / 12 held-out of 60.

# Variants that sound like plain speech (no whisper/robot/croak effects).
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4",
            "f5", "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie",
            "Denis", "adam", "antonio", "benjamin", "david", "edward", "ian",
            "john", "linda", "max", "michel", "norbert", "paul", "quincy",
            "robert", "steph", "victor", "shelby", "aunty", "belinda")
# Mostly English accents; a few other languages read the same English text
# with their own letter-to-sound rules and intonation.
LANGUAGES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029",
             "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "de", "fr",
             "es", "nl")
_LANGUAGE_WEIGHTS = np.array([4, 4, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1], np.float64)
_DEFAULT_PITCH_HZ = (82.0, 118.0)  # espeak's voice default when a file omits it.
_WARP_RANGE = (0.88, 1.12)
_WARP_STEP_HZ = 50  # Source rates on a 50 Hz grid keep resampling ratios small.
_SESSION_ID_CHARS = string.ascii_letters + string.digits + "-_"


@dataclasses.dataclass(frozen=True)
class Session:
  session_id: str        # 11 characters, like a YouTube id in VoxCeleb2.
  num_utterances: int
  noise_db: float        # Noise floor relative to the speech RMS.
  tilt: float            # First-order spectral tilt, y[n] = x[n] + tilt x[n-1].
  gain_db: float         # Recording level relative to -20 dBFS RMS.


@dataclasses.dataclass(frozen=True)
class Speaker:
  speaker_id: str
  split: str
  voice: str             # espeak voice name, "<language>+<variant>".
  language: str
  variant: str
  pitch_factor: float    # Base pitch relative to the variant's own.
  base_f0_hz: float      # Variant's base pitch x pitch_factor (nominal).
  pitch_range: int       # Range as espeak RANGE would set it unwarped, 0-100.
  rate_wpm: float        # Speaking rate heard in the output, words/minute.
  vtl_alpha: float       # Formant scaling from the warp (>1: shorter tract).
  source_rate: int       # espeak audio is read as this rate, then -> 16 kHz.
  espeak_pitch: int      # PITCH parameter, compensated for the warp.
  espeak_range: int      # RANGE parameter, compensated for the warp.
  espeak_rate: int       # RATE parameter, compensated for the warp.
  sessions: tuple[Session, ...]


def variant_pitch_hz(variant: str) -> tuple[float, float]:
  """(base, top) pitch in Hz from the variant file's `pitch` line."""
  path = os.path.join(espeakng_loader.get_data_path(), "voices", "!v", variant)
  if not os.path.exists(path):
    raise FileNotFoundError(f"espeak-ng variant file {path} not found; expected"
                            f" one of {VARIANTS} in espeakng-loader's data.")
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      fields = line.split()
      if len(fields) >= 3 and fields[0] == "pitch":
        return float(fields[1]), float(fields[2])
  return _DEFAULT_PITCH_HZ


def espeak_prosody(variant: str, pitch_factor: float, pitch_range: int,
                   rate_wpm: float, alpha: float) -> tuple[int, int, int]:
  """espeak (PITCH, RANGE, RATE) that give the wanted prosody after the warp.

  The warp multiplies every frequency by `alpha` and the tempo by `alpha`, so
  espeak must produce F0 / alpha and rate / alpha. In espeak-ng's SetPitch2
  (wavegen.c) F0 = B g(PITCH) + 18 V - r (18 - c / 2) with B = base - 9 Hz,
  V the voice's range, r = V RANGE / 50, c the intonation contour and
  g(p) = 2 ** ((p - 50) / 50). Dividing r by alpha handles the contour terms;
  B g + 18 V / alpha gives the PITCH below.
  """
  base_hz, top_hz = variant_pitch_hz(variant)
  # voices.c: pitch_base = (base - 9) << 12, pitch_range = (top - base) * 108.
  v_over_b = (top_hz - base_hz) * 108 / 4096 / (base_hz - 9)
  gain = pitch_factor / alpha + 18 * v_over_b * (1 / alpha - 1)
  espeak_pitch = int(np.clip(round(50 + 50 * math.log2(max(gain, 0.5))),
                             0, 100))
  espeak_range = int(np.clip(round(pitch_range / alpha), 0, 100))
  return espeak_pitch, espeak_range, int(round(rate_wpm / alpha))


def _session_id(rng: np.random.Generator) -> str:
  return "".join(_SESSION_ID_CHARS[i]
                 for i in rng.integers(len(_SESSION_ID_CHARS), size=11))


def _split_counts(rng: np.random.Generator, total: int, parts: int
                  ) -> list[int]:
  """`total` utterances over `parts` sessions, each at least one."""
  cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def draw_speaker(seed: int, index: int, num_speakers: int,
                 utts_per_speaker: tuple[int, int]) -> Speaker:
  """Speaker `index` of a corpus: a pure function of (seed, index)."""
  rng = np.random.default_rng([seed, 1, index])
  # Cycle through a shuffled variant list so speakers spread over variants.
  order = np.random.default_rng([seed, 0]).permutation(len(VARIANTS))
  variant = VARIANTS[order[index % len(VARIANTS)]]
  language = LANGUAGES[rng.choice(len(LANGUAGES),
                                  p=_LANGUAGE_WEIGHTS / _LANGUAGE_WEIGHTS.sum())]
  pitch_factor = float(np.clip(np.exp(rng.normal(0.0, 0.15)), 0.7, 1.45))
  pitch_range = int(rng.integers(20, 86))
  rate_wpm = float(rng.uniform(135.0, 205.0))
  source_rate = int(round(ESPEAK_RATE * rng.uniform(*_WARP_RANGE)
                          / _WARP_STEP_HZ) * _WARP_STEP_HZ)
  alpha = source_rate / ESPEAK_RATE
  espeak_pitch, espeak_range, espeak_rate = espeak_prosody(
      variant, pitch_factor, pitch_range, rate_wpm, alpha)
  lo, hi = utts_per_speaker
  num_utts = int(rng.integers(lo, hi + 1))
  num_sessions = int(min(rng.integers(2, 4), num_utts))
  counts = (_split_counts(rng, num_utts, num_sessions) if num_sessions > 1
            else [num_utts])
  sessions = tuple(
      Session(session_id=_session_id(rng), num_utterances=n,
              noise_db=float(rng.uniform(-55.0, -35.0)),
              tilt=float(rng.uniform(-0.3, 0.3)),
              gain_db=float(rng.uniform(-4.0, 4.0)))
      for n in counts)
  num_heldout = int(round(HELDOUT_FRACTION * num_speakers))
  split = (manifest_lib.HELDOUT if index >= num_speakers - num_heldout
           else manifest_lib.TRAIN)
  return Speaker(
      speaker_id=f"id{index + 1:05d}", split=split,
      voice=f"{language}+{variant}", language=language, variant=variant,
      pitch_factor=pitch_factor,
      base_f0_hz=variant_pitch_hz(variant)[0] * pitch_factor,
      pitch_range=pitch_range, rate_wpm=rate_wpm, vtl_alpha=alpha,
      source_rate=source_rate, espeak_pitch=espeak_pitch,
      espeak_range=espeak_range, espeak_rate=espeak_rate, sessions=sessions)
