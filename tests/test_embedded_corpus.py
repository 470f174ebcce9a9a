"""Tests for the embedded espeak-ng corpus (data_pipelines/embedded)."""

import dataclasses
import json
import os
import re
import shutil
import time

import librosa
import numpy as np
import pytest
import scipy.signal
import scipy.stats
import soundfile as sf
from sklearn import model_selection, neighbors, preprocessing

from data_pipelines import default_corpus
from data_pipelines import manifest as manifest_lib
from data_pipelines.embedded import espeak, generate, sentences, speakers

SR = manifest_lib.SAMPLE_RATE
# 10 speakers: 6 train, 2 heldout, 2 unseen_variant.
TINY = dict(seed=0, num_speakers=10, utts_per_speaker=(4, 4),
            seconds=(2.0, 5.0))
TRAIN, HELDOUT, UNSEEN = (manifest_lib.TRAIN, manifest_lib.HELDOUT,
                          manifest_lib.UNSEEN_VARIANT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("embedded") / "corpus")
  return generate.generate_corpus(root, num_workers=2, **TINY)


def _utterances(root):
  """Sorted FLAC paths of a corpus."""
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root)
                for f in fs if f.endswith(".flac"))


def _files(root):
  """{relative path: bytes} of every generated file."""
  out = {}
  for d, _, fs in os.walk(root):
    for f in fs:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def _speaker_of(path):
  return path.split(os.sep)[-3]


def test_layout_and_flac_format(corpus):
  with open(os.path.join(corpus, generate.SPEAKERS_FILE)) as f:
    meta = json.load(f)["speakers"]
  assert len(meta) == TINY["num_speakers"]
  speaker_dirs = sorted(d for d in os.listdir(corpus)
                        if os.path.isdir(os.path.join(corpus, d)))
  assert speaker_dirs == sorted(meta)
  for speaker_id, spk in meta.items():
    assert re.fullmatch(r"id\d{5}", speaker_id)
    sessions = sorted(os.listdir(os.path.join(corpus, speaker_id)))
    assert 2 <= len(sessions) <= 4
    assert sessions == sorted(s["session_id"] for s in spk["sessions"])
    for s in spk["sessions"]:
      names = sorted(os.listdir(os.path.join(corpus, speaker_id,
                                             s["session_id"])))
      n = s["num_utterances"]
      assert names == sorted([f"{i:05d}.flac" for i in range(1, n + 1)] +
                             [f"{i:05d}.phn.tsv" for i in range(1, n + 1)])
  flacs = _utterances(corpus)
  assert len(flacs) == TINY["num_speakers"] * 4
  for path in flacs:
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (
        "FLAC", "PCM_16", SR, 1)
    assert TINY["seconds"][0] <= info.frames / SR <= TINY["seconds"][1]
  # Splits are speaker-disjoint: 15% unseen-variant, 20% of the rest held out.
  splits = [spk["split"] for spk in meta.values()]
  assert (splits.count(TRAIN), splits.count(HELDOUT), splits.count(UNSEEN)
          ) == (6, 2, 2)


def test_deterministic_across_worker_counts(corpus, tmp_path):
  again = generate.generate_corpus(str(tmp_path / "again"), num_workers=1,
                                   **TINY)
  assert _files(again) == _files(corpus)
  other = generate.generate_corpus(str(tmp_path / "other"), num_workers=1,
                                   **{**TINY, "seed": 1})
  first = _utterances(corpus)[0]
  with open(first, "rb") as a, open(_utterances(other)[0], "rb") as b:
    assert a.read() != b.read()


def test_cache_resume_and_regenerate(corpus, tmp_path):
  root = str(tmp_path / "copy")
  shutil.copytree(corpus, root)
  reference = _files(root)
  # Same arguments: nothing is touched.
  mtimes = {p: os.path.getmtime(p) for p in _utterances(root)}
  start = time.time()
  assert generate.generate_corpus(root, **TINY) == root
  assert time.time() - start < 0.5
  assert {p: os.path.getmtime(p) for p in _utterances(root)} == mtimes
  # Interrupted run: marker missing, one utterance lost, a stale temp file.
  os.remove(os.path.join(root, generate.DONE_FILE))
  lost = _utterances(root)[5]
  os.remove(lost)
  stale = lost + ".tmp12345"
  with open(stale, "wb") as f:
    f.write(b"half")
  generate.generate_corpus(root, num_workers=1, **TINY)
  assert not os.path.exists(stale)
  assert _files(root) == reference
  # Other arguments regenerate the folder.
  generate.generate_corpus(root, num_workers=1,
                           **{**TINY, "num_speakers": 2})
  with open(os.path.join(root, generate.SPEAKERS_FILE)) as f:
    assert len(json.load(f)["speakers"]) == 2
  assert len({_speaker_of(p) for p in _utterances(root)}) == 2


def _frame_db(audio, hop=160, win=400):
  rms = librosa.feature.rms(y=audio, frame_length=win, hop_length=hop,
                            center=True)[0]
  return 20 * np.log10(rms + 1e-9)


def test_phoneme_tracks_cover_audio_and_match_energy(corpus):
  for path in _utterances(corpus):
    audio, sr = sf.read(path, dtype="float32")
    rows = generate.read_phonemes(path[:-len(".flac")] + ".phn.tsv")
    assert rows[0][0] == 0.0
    assert abs(rows[-1][1] - len(audio) / sr) <= 1 / sr
    for (_, end, _), (start, _, _) in zip(rows, rows[1:]):
      assert end == start
    assert all(end > start and label and not label.startswith(("'", ",", "_"))
               for start, end, label in rows)
    assert rows[0][2] == rows[-1][2] == generate.SILENCE

    db = _frame_db(audio)
    frame_t = np.arange(len(db)) * 0.01
    speech = np.zeros(len(db), bool)
    for start, end, label in rows:
      if label != generate.SILENCE:
        speech[(frame_t >= start) & (frame_t < end)] = True
    # Pauses/padding carry only the noise floor; phonemes carry the speech.
    assert np.median(db[speech]) > np.median(db[~speech]) + 20
    # The labelled speech starts and ends where the energy does (an unwarped
    # timeline would be off by up to 12% of the utterance).
    floor = np.median(db[~speech])
    loud = np.nonzero(db > floor + 20)[0]
    first_phone = next(s for s, _, lab in rows if lab != generate.SILENCE)
    last_phone = max(e for _, e, lab in rows if lab != generate.SILENCE)
    assert abs(frame_t[loud[0]] - first_phone) < 0.12
    assert abs(frame_t[loud[-1]] - last_phone) < 0.12


def _utterance_features(path):
  """(log median F0, mean MFCC 1-19 over voiced frames) of one file."""
  audio, sr = sf.read(path, dtype="float32")
  f0 = librosa.yin(audio, fmin=50, fmax=500, sr=sr, frame_length=1024,
                   hop_length=160)
  db = _frame_db(audio)[:len(f0)]
  f0 = f0[:len(db)]
  voiced = db > db.max() - 30
  mfcc = librosa.feature.mfcc(y=audio, sr=sr, n_mfcc=20, n_fft=400,
                              hop_length=160)[1:, :len(db)]
  return np.log(np.median(f0[voiced])), mfcc[:, voiced].mean(axis=1)


def _loo_nearest_centroid(features, labels):
  x = preprocessing.StandardScaler().fit_transform(features)
  return model_selection.cross_val_score(
      neighbors.NearestCentroid(), x, labels,
      cv=model_selection.LeaveOneOut()).mean()


def test_speakers_are_distinct_beyond_pitch(corpus):
  paths = _utterances(corpus)
  labels = np.array([_speaker_of(p) for p in paths])
  log_f0, mfcc = map(np.array, zip(*map(_utterance_features, paths)))
  chance = 1 / TINY["num_speakers"]
  everything = _loo_nearest_centroid(np.column_stack([log_f0, mfcc]), labels)
  # Pitch-normalised spectra: remove from each MFCC what log-F0 explains
  # linearly, so only the spectral envelope is left to tell speakers apart.
  design = np.column_stack([np.ones_like(log_f0), log_f0])
  coef, *_ = np.linalg.lstsq(design, mfcc, rcond=None)
  envelope = _loo_nearest_centroid(mfcc - design @ coef, labels)
  assert everything >= 0.85, everything
  assert envelope >= 0.6 > 3 * chance, envelope

  # Measured pitch follows the drawn base pitch (warp compensated).
  with open(os.path.join(corpus, generate.SPEAKERS_FILE)) as f:
    meta = json.load(f)["speakers"]
  ids = sorted(meta)
  measured = [np.median(log_f0[labels == i]) for i in ids]
  drawn = [np.log(meta[i]["base_f0_hz"]) for i in ids]
  assert scipy.stats.spearmanr(measured, drawn)[0] > 0.7


def _centroid_and_f0(audio):
  f0 = librosa.yin(audio, fmin=50, fmax=500, sr=SR, frame_length=1024,
                   hop_length=160)
  db = _frame_db(audio)[:len(f0)]
  voiced = db > db.max() - 30
  centroid = librosa.feature.spectral_centroid(
      y=audio, sr=SR, n_fft=1024, hop_length=160)[0][:len(db)]
  return np.median(centroid[voiced]), np.median(f0[:len(db)][voiced])


def test_vocal_tract_warp_moves_formants_not_pitch():
  base = speakers.draw_speaker(0, 0, TRAIN, "m3", "en-US", (3, 3))
  session = dataclasses.replace(
      base.sessions[0], noise_db=-80.0, tilt=0.0,
      eq_db=(0.0,) * len(speakers.EQ_CENTRES_HZ), highpass_hz=0.0,
      lowpass_hz=8000.0)

  def render(alpha):
    source_rate = int(round(speakers.ESPEAK_RATE * alpha / 50) * 50)
    a = source_rate / speakers.ESPEAK_RATE
    pitch, range_, rate = speakers.espeak_prosody(
        "m3", pitch_factor=1.0, pitch_range=50, rate_wpm=170.0, alpha=a)
    spk = dataclasses.replace(
        base, voice="en-us+m3", variant="m3", source_rate=source_rate,
        vtl_alpha=a, pitch_factor=1.0, pitch_range=50, rate_wpm=170.0,
        espeak_pitch=pitch, espeak_range=range_, espeak_rate=rate)
    rng = np.random.default_rng(7)
    return generate.render_utterance(spk, session, rng, (3.0, 6.0))

  short, long_ = render(1.12), render(0.88)
  assert short.text == long_.text
  c_short, f0_short = _centroid_and_f0(short.audio)
  c_long, f0_long = _centroid_and_f0(long_.audio)
  assert c_short / c_long > 1.12          # Formants scaled (1.12/0.88=1.27).
  assert abs(np.log(f0_short / f0_long)) < np.log(1.04)  # Pitch held.
  assert abs(np.log(len(short.audio) / len(long_.audio))) < np.log(1.15)


def test_phoneme_label():
  assert generate.phoneme_label("'aU") == "aU"
  assert generate.phoneme_label(",oU") == "oU"
  assert generate.phoneme_label("_:") == generate.SILENCE
  assert generate.phoneme_label("_") == generate.SILENCE
  assert generate.phoneme_label("(en)") is None
  assert generate.phoneme_label("") is None


def test_sentence_length_and_determinism():
  for n in (2, 8, 20):
    text = sentences.sentence(np.random.default_rng(n), n)
    assert n <= len(text.split()) <= n + 12
    assert text == sentences.sentence(np.random.default_rng(n), n)
    assert text[0].isupper() and text[-1] in ".?"


def _voice_sets(speaker_list, split):
  chosen = [s for s in speaker_list if s.split == split]
  return {s.variant for s in chosen}, {s.language for s in chosen}


def test_default_size_splits_keep_variants_and_languages_out():
  voices = speakers.usable_voices()
  # Every bundled variant is drawn from (or was skipped with a reason).
  assert (set(voices.variants) | {n for n, _ in voices.skipped}
          ) >= set(speakers.bundled_variants())
  size = default_corpus.SIZES["default"]
  drawn = speakers.draw_speakers(default_corpus.SEED, size["num_speakers"],
                                 size["utts_per_speaker"], voices)
  counts = {k: sum(s.split == k for s in drawn) for k in manifest_lib.SPLITS}
  assert counts == {TRAIN: 163, HELDOUT: 41, UNSEEN: 36}
  assert counts == speakers.split_sizes(size["num_speakers"])
  train_v, train_l = _voice_sets(drawn, TRAIN)
  held_v, held_l = _voice_sets(drawn, HELDOUT)
  unseen_v, unseen_l = _voice_sets(drawn, UNSEEN)
  assert not unseen_v & (train_v | held_v)
  assert not unseen_l & (train_l | held_l)
  assert held_v <= train_v  # New speakers of seen variants.
  # Wide coverage: every usable variant, many languages, in training or out.
  assert train_v | unseen_v == set(voices.variants)
  assert len(train_l | held_l | unseen_l) >= 30
  assert len(unseen_v) >= 15 and len(unseen_l) >= 5
  # Pure function of the seed.
  assert drawn == speakers.draw_speakers(
      default_corpus.SEED, size["num_speakers"], size["utts_per_speaker"],
      voices)
  other = speakers.draw_speakers(1, size["num_speakers"],
                                 size["utts_per_speaker"], voices)
  assert _voice_sets(other, UNSEEN) != (unseen_v, unseen_l)
  # Sessions of one speaker have different channels.
  assert all(len({x.eq_db for x in s.sessions}) == len(s.sessions)
             for s in drawn)


def test_tiny_corpus_unseen_speakers_are_unseen(corpus):
  with open(os.path.join(corpus, generate.SPEAKERS_FILE)) as f:
    meta = json.load(f)
  drawn = [speakers.Speaker(**{**m, "sessions": ()})
           for m in meta["speakers"].values()]
  train_v, train_l = _voice_sets(drawn, TRAIN)
  unseen_v, unseen_l = _voice_sets(drawn, UNSEEN)
  assert unseen_v and not unseen_v & train_v
  assert unseen_l and not unseen_l & train_l
  assert set(meta["voices"]["unseen_variants"]) >= unseen_v
  # Phoneme tracks for every speaker of every split.
  tracks = {_speaker_of(os.path.join(d, f)) for d, _, fs in os.walk(corpus)
            for f in fs if f.endswith(generate.PHONEME_SUFFIX)}
  assert tracks == set(meta["speakers"])


def test_channel_filter_follows_session_eq():
  session = speakers.draw_session(np.random.default_rng(3), 2)
  flat = dataclasses.replace(session, eq_db=(0.0,) * 6, tilt=0.0,
                             highpass_hz=0.0, lowpass_hz=8000.0)
  freqs, response = scipy.signal.freqz(generate.channel_filter(flat),
                                       worN=[500.0, 2000.0, 6000.0], fs=SR)
  np.testing.assert_allclose(np.abs(response), 1.0, atol=0.05)
  band = dataclasses.replace(flat, eq_db=(0.0, 0.0, 6.0, 0.0, 0.0, 0.0),
                             lowpass_hz=3400.0, highpass_hz=300.0)
  _, response = scipy.signal.freqz(generate.channel_filter(band),
                                   worN=[60.0, 600.0, 7000.0], fs=SR)
  db = 20 * np.log10(np.abs(response))
  assert db[0] < -20 and abs(db[1] - 6.0) < 1.0 and db[2] < -20
  # Linear phase: symmetric taps, so centred filtering keeps the alignment.
  taps = generate.channel_filter(band)
  np.testing.assert_allclose(taps, taps[::-1])


def test_default_corpus_manifest_records_the_splits():
  assert default_corpus.EMBEDDED_VERSION == generate.CORPUS_VERSION
  assert default_corpus.SPEAKERS_FILE == generate.SPEAKERS_FILE
  path = default_corpus.ensure_default_corpus(size="tiny")
  utts = manifest_lib.read_manifest(path)
  counts = {k: len(manifest_lib.speakers_of(utts, k))
            for k in manifest_lib.SPLITS}
  assert counts == {TRAIN: 6, HELDOUT: 2, UNSEEN: 2}
  assert all(u.alignment for u in utts)
  raw = os.path.join(os.path.dirname(os.path.dirname(path)), "raw")
  splits = default_corpus.embedded_splits(raw)
  assert all(u.split == splits[u.speaker] for u in utts)
  assert "unseen_variant: 2 speakers" in default_corpus.summarize(path)


def test_klatt_noise_is_seeded_whatever_came_before():
  # Klatt voices draw noise from libc's rand(): the same call must give the
  # same samples whatever this process synthesized before.
  def speak(voice):
    tts = espeak.Espeak()
    try:
      tts.set_voice(voice)
      return tts.synthesize("Anna carried the basket.", rand_seed=5).samples
    finally:
      tts.close()

  first = speak("en+caleb")
  speak("cs+Reed")
  assert np.array_equal(first, speak("en+caleb"))
