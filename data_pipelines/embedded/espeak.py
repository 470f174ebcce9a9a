"""A small ctypes wrapper over libespeak-ng as shipped by `espeakng-loader`.

espeak-ng keeps its synthesis state in C globals, so one process holds one
synthesizer and it is not thread-safe: use a process pool, one `Espeak()` per
worker. Only the calls the embedded corpus needs are wrapped: choose a voice,
set prosody, synthesize text into int16 samples plus phoneme events.
"""

from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import espeakng_loader
import numpy as np

# Values from espeak-ng's speak_lib.h (API version 1.52).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
# espeak_PARAMETER ids.
RATE, VOLUME, PITCH, RANGE, WORDGAP = 1, 2, 3, 4, 7


class _EventId(ctypes.Union):
  _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p),
              ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
  _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
              ("text_position", ctypes.c_int), ("length", ctypes.c_int),
              ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
              ("user_data", ctypes.c_void_p), ("id", _EventId)]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
    ctypes.POINTER(_Event))


@dataclasses.dataclass(frozen=True)
class Synthesis:
  """One synthesized text.

  `phonemes` holds (start sample, mnemonic) in the order espeak emitted them;
  each phoneme lasts until the next one starts (or the audio ends).
  """
  samples: np.ndarray                # int16 `[num_samples]`
  sample_rate: int
  phonemes: list[tuple[int, str]]


_LIVE: list["Espeak"] = []  # At most one loaded library per process.
# The Klatt voices' noise source calls the C library's rand(), which neither
# espeak_ng_SetRandSeed nor reloading espeak resets: seed it per synthesis.
_LIBC = ctypes.CDLL(None)
_LIBC.srand.argtypes = [ctypes.c_uint]
_LIBC.srand.restype = None


def _load_library() -> tuple[ctypes.CDLL, int]:
  """dlopens libespeak-ng and initialises it; returns (library, sample rate)."""
  lib = ctypes.CDLL(espeakng_loader.get_library_path())
  lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_int]
  lib.espeak_Initialize.restype = ctypes.c_int
  lib.espeak_Terminate.restype = ctypes.c_int
  lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
  lib.espeak_SetSynthCallback.restype = None
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetVoiceByName.restype = ctypes.c_int
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  lib.espeak_SetParameter.restype = ctypes.c_int
  lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
  lib.espeak_ng_SetRandSeed.restype = None
  lib.espeak_Synth.argtypes = [
      ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
      ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),
      ctypes.c_void_p]
  lib.espeak_Synth.restype = ctypes.c_int
  data_path = espeakng_loader.get_data_path()
  rate = lib.espeak_Initialize(
      _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(),
      _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
  if rate <= 0:
    raise RuntimeError(
        f"espeak_Initialize failed (returned {rate}) with data path "
        f"{data_path!r}; expected a sample rate. Reinstall espeakng-loader.")
  return lib, rate


class Espeak:
  """espeak-ng loaded afresh: output depends only on the calls made on it.

  espeak-ng keeps function-level statics that no API call resets (e.g. the
  pitch-flutter phase in wavegen.c), so a long-lived instance makes each
  utterance depend on everything synthesized before it in the process. A new
  `Espeak()` closes the previous one (dlclose) and dlopens the library again,
  which resets them; that costs about a millisecond.
  """

  def __init__(self):
    for old in _LIVE:
      old.close()
    self._lib, self.sample_rate = _load_library()
    _LIVE.append(self)
    self._chunks: list[np.ndarray] = []
    self._phonemes: list[tuple[int, str]] = []
    # Keep a reference so the C side never calls a collected trampoline.
    self._callback = _SynthCallback(self._on_audio)
    self._lib.espeak_SetSynthCallback(self._callback)

  def _on_audio(self, wav, num_samples, events) -> int:
    if num_samples > 0 and wav:
      self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
    i = 0
    while events[i].type != _EVENT_LIST_TERMINATED:
      ev = events[i]
      if ev.type == _EVENT_PHONEME:
        # id.string is 8 bytes and only NUL-terminated when shorter.
        name = bytes(ev.id.string).split(b"\0", 1)[0].decode("utf-8", "replace")
        self._phonemes.append((int(ev.sample), name))
      i += 1
    return 0  # 0 = go on synthesizing.

  def close(self) -> None:
    """Terminates espeak and unloads the library (idempotent)."""
    if self._lib is None:
      return
    self._lib.espeak_Terminate()
    handle = self._lib._handle
    self._lib = None
    _ctypes.dlclose(handle)
    _LIVE.remove(self)

  def _library(self) -> ctypes.CDLL:
    if self._lib is None:
      raise RuntimeError("This Espeak was closed (a newer Espeak() replaced it"
                         " or close() was called); create a new one.")
    return self._lib

  def set_voice(self, name: str) -> None:
    """Selects a voice such as "en-us+m3" (language + optional variant)."""
    status = self._library().espeak_SetVoiceByName(name.encode())
    if status != _EE_OK:
      raise ValueError(f"espeak-ng has no voice {name!r} (status {status}); "
                       "expected '<language>[+<variant>]' from espeak-ng-data.")

  def set_prosody(self, *, rate: int, pitch: int, pitch_range: int,
                  word_gap: int = 0) -> None:
    """rate in words/minute (80-450); pitch and range in espeak's 0-100 units.

    Pitch 50 is the voice's own base; each +-50 doubles/halves it.
    """
    for param, value in ((RATE, rate), (PITCH, pitch), (RANGE, pitch_range),
                         (WORDGAP, word_gap)):
      status = self._library().espeak_SetParameter(param, int(value), 0)
      if status != _EE_OK:
        raise ValueError(f"espeak_SetParameter({param}, {value}) failed with "
                         f"status {status}.")

  def synthesize(self, text: str, rand_seed: int = 0) -> Synthesis:
    """Speaks `text` with the current voice; returns samples and phonemes.

    `rand_seed` reseeds espeak's internal noise and libc's rand() (used by
    the Klatt voices) so output is reproducible.
    """
    self._chunks, self._phonemes = [], []
    lib = self._library()
    lib.espeak_ng_SetRandSeed(rand_seed)
    _LIBC.srand(rand_seed & 0xFFFFFFFF)
    data = text.encode("utf-8") + b"\0"
    buf = ctypes.create_string_buffer(data, len(data))
    status = lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0,
                                    _CHARS_UTF8, None, None)
    if status != _EE_OK:
      raise RuntimeError(f"espeak_Synth failed with status {status} on "
                         f"{text!r}.")
    samples = (np.concatenate(self._chunks) if self._chunks
               else np.zeros(0, np.int16))
    return Synthesis(samples=samples.astype(np.int16, copy=False),
                     sample_rate=self.sample_rate,
                     phonemes=list(self._phonemes))
