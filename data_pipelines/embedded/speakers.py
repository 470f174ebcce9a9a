"""Speaker and session parameter draws for the embedded corpus.

A speaker fixes an espeak voice variant (glottal source, formant scaling,
breathiness), a language/accent (phonology, intonation), a base pitch, a pitch
range, a speaking rate and a vocal-tract-length warp `alpha`. The warp plays
the synthesized audio `alpha` times faster (resampling), which scales every
formant by `alpha`; espeak's pitch and rate are pre-divided by `alpha` so the
speaker's pitch and rate stay what was drawn. So speakers differ in spectral
envelope, not only in pitch. A session adds a recording channel: a smooth
random EQ, a band limit, a spectral tilt, a level and a noise floor.

Splits (speaker-disjoint):
  train           speakers of the seen voice variants and languages;
  heldout         other speakers of variants (and languages) train has;
  unseen_variant  speakers whose variant *and* language no train or heldout
                  speaker has: whole variants and whole languages kept out.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import string

import espeakng_loader
import numpy as np

from data_pipelines import manifest as manifest_lib

log = logging.getLogger(__name__)

ESPEAK_RATE = 22_050           # espeak-ng's native output rate.
HELDOUT_FRACTION = 0.2         # Of the seen-variant speakers.
UNSEEN_FRACTION = 0.15         # Of all speakers: 36 of 240, 2 of 10.
UNSEEN_VARIANT_FRACTION = 0.2  # Of the usable variants, kept out of training.
UNSEEN_LANGUAGE_FRACTION = 0.2  # Of the non-English languages, likewise.

# English accents read the English text natively; never held out, so every
# split has them and the phoneme inventory is mostly shared.
ENGLISH = ("en-US", "en", "en-GB-scotland", "en-GB-x-rp", "en-029",
           "en-US-nyc", "en-GB-x-gbclan", "en-GB-x-gbcwmd")
ENGLISH_SHARE = 0.4
# Latin-script languages: they read the English text with their own
# letter-to-sound rules and intonation (a foreign accent). Non-Latin-script
# voices would switch the whole text to English, so add nothing.
OTHER_LANGUAGES = (
    "af", "an", "bs", "ca", "cs", "cy", "da", "de", "eo", "es", "es-419", "et",
    "eu", "fi", "fr", "ga", "gd", "hr", "ht", "hu", "ia", "id", "io", "is",
    "it", "kl", "la", "lb", "lfn", "lt", "lv", "mi", "ms", "mt", "nb", "nl",
    "om", "pap", "pl", "pt", "pt-BR", "qu", "ro", "sk", "sl", "sq", "sv", "sw",
    "tn", "tr", "uz", "vi")
_PROBE_TEXT = "Anna carried the small basket to the market."
_DEFAULT_PITCH_HZ = (82.0, 118.0)  # espeak's voice default when a file omits it.
_WARP_RANGE = (0.82, 1.20)
_WARP_STEP_HZ = 50  # Source rates on a 50 Hz grid keep resampling ratios small.
_SESSION_ID_CHARS = string.ascii_letters + string.digits + "-_"
# Session EQ: gains (dB) at these centres, interpolated over log-frequency.
EQ_CENTRES_HZ = (100.0, 250.0, 600.0, 1500.0, 3500.0, 7000.0)


@dataclasses.dataclass(frozen=True)
class Session:
  session_id: str        # 11 characters, like a YouTube id in VoxCeleb2.
  num_utterances: int
  noise_db: float        # Noise floor relative to the speech RMS.
  tilt: float            # First-order spectral tilt, y[n] = x[n] + tilt x[n-1].
  gain_db: float         # Recording level relative to -20 dBFS RMS.
  eq_db: tuple[float, ...] = (0.0,) * len(EQ_CENTRES_HZ)  # At EQ_CENTRES_HZ.
  highpass_hz: float = 0.0   # Band limit; 0 / 8000: none.
  lowpass_hz: float = 8000.0


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


@dataclasses.dataclass(frozen=True)
class Voices:
  """The usable variants and languages, and those that failed (name, reason)."""
  variants: tuple[str, ...]
  languages: tuple[str, ...]
  skipped: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class VoiceSplit:
  """Which variants and languages each split draws from."""
  seen_variants: tuple[str, ...]
  seen_languages: tuple[str, ...]
  unseen_variants: tuple[str, ...]
  unseen_languages: tuple[str, ...]


def _variant_dir() -> str:
  return os.path.join(espeakng_loader.get_data_path(), "voices", "!v")


def bundled_variants() -> tuple[str, ...]:
  """Every voice variant file espeakng-loader ships, sorted."""
  return tuple(sorted(os.listdir(_variant_dir())))


def _probe(voice: str) -> str | None:
  """None when `voice` synthesizes audible speech with phonemes, else why not."""
  from data_pipelines.embedded import espeak as espeak_lib  # Needs the library.
  tts = espeak_lib.Espeak()
  try:
    tts.set_voice(voice)
    synth = tts.synthesize(_PROBE_TEXT)
  except (ValueError, RuntimeError) as e:
    return str(e)
  finally:
    tts.close()
  if not synth.phonemes or np.abs(synth.samples).max(initial=0) < 100:
    return "no audible speech or no phoneme events"
  return None


@functools.cache
def usable_voices() -> Voices:
  """Probes every bundled variant and candidate language; skips failures."""
  variants, languages, skipped = [], [], []
  for names, usable, voice in ((bundled_variants(), variants, "en-US+{}"),
                               (ENGLISH + OTHER_LANGUAGES, languages, "{}")):
    for name in names:
      reason = _probe(voice.format(name))
      if reason:
        skipped.append((name, reason))
      else:
        usable.append(name)
  if skipped:
    log.warning("espeak-ng: skipped %d of %d voices that fail: %s",
                len(skipped), len(variants) + len(languages) + len(skipped),
                "; ".join(f"{n} ({r})" for n, r in skipped))
  if not variants or not any(l in ENGLISH for l in languages):
    raise RuntimeError(f"No usable espeak-ng variant or English voice in "
                       f"{espeakng_loader.get_data_path()} (skipped: "
                       f"{skipped}); reinstall espeakng-loader.")
  return Voices(tuple(variants), tuple(languages), tuple(skipped))


def split_voices(seed: int, voices: Voices) -> VoiceSplit:
  """Seeded choice of the variants and (non-English) languages kept out."""
  rng = np.random.default_rng([seed, 3])
  variants = [voices.variants[i]
              for i in rng.permutation(len(voices.variants))]
  others = [l for l in voices.languages if l not in ENGLISH]
  others = [others[i] for i in rng.permutation(len(others))]
  num_v = max(1, round(UNSEEN_VARIANT_FRACTION * len(variants)))
  num_l = max(1, round(UNSEEN_LANGUAGE_FRACTION * len(others))) if others else 0
  if len(variants) < 2 or len(others) < 2:
    raise ValueError(f"Expected >= 2 usable variants and non-English "
                     f"languages to hold some out, found {voices}.")
  seen_languages = [l for l in voices.languages if l not in others[:num_l]]
  return VoiceSplit(seen_variants=tuple(variants[num_v:]),
                    seen_languages=tuple(seen_languages),
                    unseen_variants=tuple(variants[:num_v]),
                    unseen_languages=tuple(others[:num_l]))


def split_sizes(num_speakers: int) -> dict[str, int]:
  """Speakers per split: 240 -> 163 / 41 / 36; 10 -> 6 / 2 / 2."""
  unseen = round(UNSEEN_FRACTION * num_speakers)
  heldout = round(HELDOUT_FRACTION * (num_speakers - unseen))
  return {manifest_lib.TRAIN: num_speakers - unseen - heldout,
          manifest_lib.HELDOUT: heldout, manifest_lib.UNSEEN_VARIANT: unseen}


def variant_pitch_hz(variant: str) -> tuple[float, float]:
  """(base, top) pitch in Hz from the variant file's `pitch` line."""
  path = os.path.join(_variant_dir(), variant)
  if not os.path.exists(path):
    raise FileNotFoundError(f"espeak-ng variant file {path} not found; expected"
                            f" one of {bundled_variants()}.")
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
  v_over_b = (top_hz - base_hz) * 108 / 4096 / max(base_hz - 9, 10.0)
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


def draw_session(rng: np.random.Generator, num_utterances: int) -> Session:
  """A recording channel: smooth EQ (+-6 dB), often a band limit, a level."""
  lowpass = 8000.0
  if rng.random() < 0.4:  # Some sessions sound like narrower microphones.
    lowpass = float(rng.uniform(3800.0, 7500.0))
  return Session(session_id=_session_id(rng), num_utterances=num_utterances,
                 noise_db=float(rng.uniform(-60.0, -30.0)),
                 tilt=float(rng.uniform(-0.5, 0.5)),
                 gain_db=float(rng.uniform(-8.0, 8.0)),
                 eq_db=tuple(float(g) for g in
                             rng.uniform(-6.0, 6.0, len(EQ_CENTRES_HZ))),
                 highpass_hz=float(rng.choice([0.0, rng.uniform(60.0, 300.0)])),
                 lowpass_hz=lowpass)


def draw_speaker(seed: int, index: int, split: str, variant: str,
                 language: str, utts_per_speaker: tuple[int, int]) -> Speaker:
  """Speaker `index` of a corpus: a pure function of its arguments."""
  rng = np.random.default_rng([seed, 1, index])
  pitch_factor = float(np.clip(np.exp(rng.normal(0.0, 0.22)), 0.6, 1.7))
  pitch_range = int(rng.integers(10, 101))
  rate_wpm = float(rng.uniform(115.0, 235.0))
  source_rate = int(round(ESPEAK_RATE * rng.uniform(*_WARP_RANGE)
                          / _WARP_STEP_HZ) * _WARP_STEP_HZ)
  alpha = source_rate / ESPEAK_RATE
  espeak_pitch, espeak_range, espeak_rate = espeak_prosody(
      variant, pitch_factor, pitch_range, rate_wpm, alpha)
  lo, hi = utts_per_speaker
  num_utts = int(rng.integers(lo, hi + 1))
  num_sessions = int(min(rng.integers(2, 5), num_utts))
  counts = (_split_counts(rng, num_utts, num_sessions) if num_sessions > 1
            else [num_utts])
  return Speaker(
      speaker_id=f"id{index + 1:05d}", split=split,
      voice=f"{language}+{variant}", language=language, variant=variant,
      pitch_factor=pitch_factor,
      base_f0_hz=variant_pitch_hz(variant)[0] * pitch_factor,
      pitch_range=pitch_range, rate_wpm=rate_wpm, vtl_alpha=alpha,
      source_rate=source_rate, espeak_pitch=espeak_pitch,
      espeak_range=espeak_range, espeak_rate=espeak_rate,
      sessions=tuple(draw_session(rng, n) for n in counts))


def _language(rng: np.random.Generator, languages: tuple[str, ...]) -> str:
  """English accents get ENGLISH_SHARE of speakers when there are others."""
  english = [l for l in languages if l in ENGLISH]
  others = [l for l in languages if l not in ENGLISH]
  pool = english if (not others or (english and rng.random() < ENGLISH_SHARE)
                     ) else others
  return pool[int(rng.integers(len(pool)))]


def draw_speakers(seed: int, num_speakers: int,
                  utts_per_speaker: tuple[int, int],
                  voices: Voices) -> list[Speaker]:
  """All speakers: train first, then heldout, then unseen_variant.

  Train speakers cycle through the seen variants (each used before any
  repeats); held-out speakers cycle through the variants train used, so they
  are new speakers of seen variants; unseen-variant speakers cycle through the
  held-out variants and speak a held-out language.
  """
  plan = split_voices(seed, voices)
  sizes = split_sizes(num_speakers)
  train_variants = [plan.seen_variants[i % len(plan.seen_variants)]
                    for i in range(sizes[manifest_lib.TRAIN])]
  seen_by_train = list(dict.fromkeys(train_variants)) or list(
      plan.seen_variants)
  rng = np.random.default_rng([seed, 4])
  assignments = (
      [(manifest_lib.TRAIN, v, _language(rng, plan.seen_languages))
       for v in train_variants] +
      [(manifest_lib.HELDOUT, seen_by_train[i % len(seen_by_train)],
        _language(rng, plan.seen_languages))
       for i in range(sizes[manifest_lib.HELDOUT])] +
      [(manifest_lib.UNSEEN_VARIANT,
        plan.unseen_variants[i % len(plan.unseen_variants)],
        plan.unseen_languages[int(rng.integers(len(plan.unseen_languages)))])
       for i in range(sizes[manifest_lib.UNSEEN_VARIANT])])
  return [draw_speaker(seed, i, split, variant, language,
                       tuple(utts_per_speaker))
          for i, (split, variant, language) in enumerate(assignments)]
