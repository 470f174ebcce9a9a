"""Room / noise / channel augmentation of the mixture stream."""

import dataclasses

import ml_collections
import numpy as np
import pytest
import scipy.signal

from data_pipelines import augment
from data_pipelines import default_corpus
from data_pipelines import framing
from data_pipelines import mixtures
from data_pipelines import storage
from data_pipelines import stream

SR = framing.SAMPLE_RATE
SMALL = augment.AugmentConfig(enabled=True, num_rooms=3, bank_clips=3)


@pytest.fixture(scope="module")
def manifest():
  return default_corpus.ensure_default_corpus(size="tiny")


@pytest.fixture(scope="module")
def index(manifest):
  return mixtures.MixtureIndex.from_manifest(manifest, "train")


def transform(manifest, index, **overrides):
  cfg = mixtures.MixtureConfig(clip_seconds=2.0, k_max=2)
  return mixtures.MixtureTransform(storage.AudioStore(manifest), index, cfg,
                                   dataclasses.replace(SMALL, **overrides))


def snr_db(speech, noisy, mask=None):
  return 10 * np.log10(augment.power(speech, mask)
                       / augment.power(noisy - speech))


@pytest.mark.parametrize("target", [0.0, 10.0, 20.0])
def test_noise_lands_at_the_requested_snr(target):
  rng = np.random.default_rng(0)
  speech = np.zeros(SR * 2, np.float32)
  speech[8000:24000] = 0.1 * rng.standard_normal(16000)
  mask = np.zeros(len(speech), bool)
  mask[8000:24000] = True
  noise = augment.coloured_noise(rng, len(speech), 1.0)
  noisy = augment.add_noise(speech, noise, target, mask)
  # Speech power over its active samples, noise power over the whole clip.
  assert snr_db(speech, noisy, mask) == pytest.approx(target, abs=1e-3)


def test_rirs_keep_the_direct_path_at_lag_zero():
  banks = augment.Banks.build(SMALL, speech=[np.ones(SR, np.float32)])
  for room in banks.rooms:
    for rir in room:
      assert np.argmax(np.abs(rir)) == 0 and rir[0] == pytest.approx(1.0)
  rir = banks.rooms[0][0]
  # A click at a frame boundary: its reverberant copy starts there, exactly.
  dry = np.zeros(SR, np.float32)
  dry[8000] = 1.0
  wet = augment.convolve(dry, rir)
  assert np.all(wet[:8000] == 0) and wet[8000] == pytest.approx(1.0)


def test_reverberant_source_keeps_the_dry_activity(manifest, index):
  tr = transform(manifest, index, p_reverb=1.0, p_noise=0.0, p_eq=0.0,
                 p_bandlimit=0.0, p_telephone=0.0, gain_db=0.0,
                 p_noise_only=0.0)
  for i in range(4):
    wet = tr.random_map(i, np.random.default_rng(i))
    rng = np.random.default_rng(i)
    rng.random()  # The transform's noise-only draw comes first.
    dry = mixtures.make_example(tr.store, index, tr.cfg, rng, anchor=i)
    # Same draws: the labels are the dry source's, and the dry mixture is kept.
    np.testing.assert_array_equal(wet["activity"], dry["activity"])
    np.testing.assert_array_equal(wet["clean"], dry["mixture"])
    for slot in range(int(wet["num_speakers"])):
      w, d = wet["sources"][slot], dry["sources"][slot]
      onset = np.flatnonzero(d)[0]
      assert np.all(w[:onset] == 0)            # Nothing before the dry onset,
      assert not np.allclose(w, d)             # but a reverberant image,
      xcorr = scipy.signal.correlate(w, d, mode="full", method="fft")
      assert np.argmax(xcorr) == len(d) - 1    # aligned with the dry source.


def test_noise_only_examples_hold_noise_and_no_activity(manifest, index):
  tr = transform(manifest, index, p_noise_only=1.0)
  for i in range(4):
    ex = tr.random_map(i, np.random.default_rng(i))
    assert int(ex["num_speakers"]) == 0
    assert not ex["activity"].any() and np.all(ex["speakers"] == -1)
    assert not ex["clean"].any()
    level = 10 * np.log10(augment.power(ex["mixture"]))
    lo, hi = SMALL.noise_only_level_db
    assert lo - 6.5 <= level <= hi + 6.5      # +- the channel gain.


def test_frames_buried_under_the_noise_are_not_speech():
  hop = framing.HOP
  activity = np.zeros((2, 6), np.float32)
  activity[0, :4] = 1.0
  sources = np.zeros((2, 6 * hop), np.float32)
  # Frame amplitudes 1, 0.5, 0.1, 0.01: 0, -6, -20, -40 dB against a unit
  # noise in every frame.
  for frame, amp in enumerate([1.0, 0.5, 0.1, 0.01]):
    sources[0, frame * hop:(frame + 1) * hop] = amp
  noise = np.ones(6 * hop, np.float32)
  out = augment.audible_activity(activity, sources, noise, 0.0)
  np.testing.assert_array_equal(out[0], [1, 0, 0, 0, 0, 0])
  out = augment.audible_activity(activity, sources, noise, -25.0)
  np.testing.assert_array_equal(out[0], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(out[1], 0)
  np.testing.assert_array_equal(activity[0, :4], 1)   # Input untouched.


def test_bridge_fills_inner_gaps_only():
  mask = np.array([[0, 1, 0, 0, 1, 0, 0, 0, 1, 0],
                   [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
  # Gaps of 2 and 3 frames between True ones; the edges are not gaps.
  np.testing.assert_array_equal(augment.bridge_gaps(mask, 0), mask)
  np.testing.assert_array_equal(augment.bridge_gaps(mask, 2)[0],
                                [0, 1, 1, 1, 1, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(augment.bridge_gaps(mask, 3)[0],
                                [0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(augment.bridge_gaps(mask, 9)[1], 0)


def test_buried_frames_inside_a_turn_stay_speech():
  hop = framing.HOP
  activity = np.zeros((1, 8), np.float32)
  activity[0, :7] = 1.0
  activity[0, 4] = 0.0                      # A pause in the dry source.
  # Audible, buried, audible, buried, pause, audible, buried, silent.
  amps = [1.0, 0.01, 1.0, 0.01, 0.0, 1.0, 0.01, 0.0]
  sources = np.repeat(np.float32(amps), hop)[None]
  noise = np.ones(8 * hop, np.float32)
  plain = augment.audible_activity(activity, sources, noise, -10.0)
  np.testing.assert_array_equal(plain[0], [1, 0, 1, 0, 0, 1, 0, 0])
  bridged = augment.audible_activity(activity, sources, noise, -10.0, 3)
  # Frame 1 lies between audible frames; frame 3 too, but its neighbour is
  # a dry pause, which stays a pause; frame 6 ends the turn buried.
  np.testing.assert_array_equal(bridged[0], [1, 1, 1, 1, 0, 1, 0, 0])
  with pytest.raises(ValueError, match="bridge_buried_seconds"):
    augment.AugmentConfig(bridge_buried_seconds=-0.1)


def test_noisy_examples_label_only_audible_speech(manifest, index):
  quiet = dict(p_reverb=0.0, p_eq=0.0, p_bandlimit=0.0, p_telephone=0.0,
               gain_db=0.0, p_noise_only=0.0)
  noisy = transform(manifest, index, p_noise=1.0, snr_db=(0.0, 0.0), **quiet)
  dry = transform(manifest, index, p_noise=0.0, **quiet)
  dropped = 0
  for i in range(6):
    ex = noisy.random_map(i, np.random.default_rng(i))
    ref = dry.random_map(i, np.random.default_rng(i))
    assert np.all(ex["activity"] <= ref["activity"])   # Only ever removed,
    dropped += int(ref["activity"].sum() - ex["activity"].sum())
    # and every frame kept holds its source above the noise's floor.
    noise = ex["mixture"] - ex["clean"]
    f = ex["activity"].shape[1]
    for slot in range(int(ex["num_speakers"])):
      kept = ex["activity"][slot] > 0
      floor = 10 ** (SMALL.min_local_snr_db / 10) * (1 - 1e-4)
      assert np.all(augment.frame_energy(ex["sources"][slot], f)[kept]
                    >= augment.frame_energy(noise, f)[kept] * floor)
  assert dropped > 0                       # At 0 dB SNR some frames are buried.


def test_noise_only_babble_is_background_unless_switched_off(manifest, index):
  babble = transform(manifest, index, p_noise_only=1.0, noise_kinds=("babble",),
                     **NO_CHANNEL)
  ex = babble.random_map(0, np.random.default_rng(0))
  assert ex["mixture"].any() and not ex["activity"].any()
  assert int(ex["num_speakers"]) == 0
  level = 10 * np.log10(augment.power(ex["mixture"]))
  lo, hi = SMALL.noise_only_level_db
  assert lo - 0.5 <= level <= hi + 0.5
  off = transform(manifest, index, p_noise_only=1.0, noise_kinds=("babble",),
                  noise_only_babble=0.0)
  ex = off.random_map(0, np.random.default_rng(0))
  assert not ex["mixture"].any() and not ex["activity"].any()


@pytest.mark.parametrize("noise_only", [True, False])
def test_babble_weight_sets_babble_share(noise_only):
  name = "noise_only_babble" if noise_only else "noise_babble"

  def babble_share(weight):
    cfg = augment.AugmentConfig(noise_kinds=("coloured", "babble", "hum"),
                                **{name: weight})
    picks = [cfg.pick_noise_kind(np.random.default_rng(i), noise_only)
             for i in range(3000)]
    return picks.count("babble") / len(picks)
  assert abs(babble_share(1.0) - 1 / 3) < 0.03
  assert abs(babble_share(3.0) - 3 / 5) < 0.03
  assert babble_share(0.0) == 0.0
  with pytest.raises(ValueError, match=name):
    augment.AugmentConfig(**{name: -1.0})


def best_crop_match(clip, x):
  """Best normalised correlation of `x` with any crop of `clip`."""
  xcorr = scipy.signal.correlate(clip, x, mode="valid", method="fft")
  energy = np.sqrt(np.convolve(clip ** 2, np.ones(len(x)), mode="valid"))
  return np.max(np.abs(xcorr) / (energy * np.linalg.norm(x) + 1e-12))


NO_CHANNEL = dict(p_eq=0.0, p_bandlimit=0.0, p_telephone=0.0, gain_db=0.0)


def test_noise_only_examples_draw_fresh_noise_not_the_bank(manifest, index):
  tr = transform(manifest, index, p_noise_only=1.0, noise_kinds=("hum",),
                 bank_clips=1, **NO_CHANNEL)
  clip = tr.banks.noise["hum"][0]
  assert best_crop_match(clip, clip[100:100 + 2 * SR]) > 0.99  # The probe.
  for i in range(3):
    x = tr.random_map(i, np.random.default_rng(i))["mixture"]
    assert best_crop_match(clip, x) < 0.9


def test_training_babble_is_fresh_talkers_not_the_bank(manifest, index):
  tr = transform(manifest, index, p_noise_only=0.0, p_noise=1.0,
                 p_reverb=0.0, noise_kinds=("babble",), bank_clips=1,
                 **NO_CHANNEL)
  clip = tr.banks.noise["babble"][0]
  for i in range(3):
    ex = tr.random_map(i, np.random.default_rng(i))
    noise = ex["mixture"] - ex["clean"]
    assert augment.power(noise) > 0
    assert best_crop_match(clip, noise) < 0.9
  # Fresh babble is made like the bank's: 4-7 level-matched talkers.
  fresh = augment.babble(tr.banks.speech, np.random.default_rng(0), 2 * SR)
  assert 3.5 < augment.power(fresh) < 7.5


def test_babble_talkers_are_unit_power_whatever_their_stored_type():
  rng = np.random.default_rng(0)
  # One talker, shorter than the clip (looped), stored as int16.
  talker = (3000 * np.sin(np.arange(SR) * 0.05)
            * (1 + rng.random(SR))).astype(np.int16)
  one = augment.babble([talker], np.random.default_rng(1), 3 * SR)
  assert augment.power(one) == pytest.approx(1.0, rel=1e-4)
  # The same samples as floats at another level give the same babble.
  as_float = talker.astype(np.float32) / 123.0
  np.testing.assert_allclose(
      augment.babble([as_float], np.random.default_rng(1), 3 * SR), one,
      rtol=1e-4, atol=1e-5)
  # Four talkers of very different levels: summed at equal power.
  talkers = [talker // d for d in (1, 3, 10, 30)]
  four = augment.babble(talkers, np.random.default_rng(2), 3 * SR)
  assert 2.5 < augment.power(four) < 6.0
  # An empty (skipped) utterance adds nothing and draws no offset.
  assert augment.power(augment.babble([np.zeros(0, np.int16)],
                                      np.random.default_rng(3), SR)) == 0.0


def test_no_op_settings_leave_the_mixture_dry(manifest, index):
  tr = transform(manifest, index, p_reverb=0.0, p_noise=0.0, p_eq=0.0,
                 p_bandlimit=0.0, p_telephone=0.0, gain_db=0.0,
                 p_noise_only=0.0)
  ex = tr.random_map(3, np.random.default_rng(3))
  np.testing.assert_array_equal(ex["mixture"], ex["clean"])


def test_telephone_removes_the_upper_band():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(SR).astype(np.float32)
  y = augment.telephone(x)
  f, p = scipy.signal.welch(y, SR, nperseg=1024)
  in_band = p[(f > 500) & (f < 3000)].mean()
  # The band-pass and the 8 kHz rate leave the top band > 30 dB down.
  assert p[f > 4500].mean() < 1e-3 * in_band
  assert len(y) == len(x)


def test_equaliser_changes_the_spectrum_but_not_wildly():
  rng = np.random.default_rng(1)
  x = rng.standard_normal(SR).astype(np.float32)
  y = augment.equalise(x, np.random.default_rng(2))
  f, px = scipy.signal.welch(x, SR, nperseg=512)
  _, py = scipy.signal.welch(y, SR, nperseg=512)
  ratio_db = 10 * np.log10(py[1:] / px[1:])
  assert np.ptp(ratio_db) > 3.0 and np.abs(ratio_db).max() < 30.0


def test_stream_is_deterministic_and_worker_independent(manifest, index):
  cfg = mixtures.MixtureConfig(clip_seconds=2.0, k_max=2)
  kw = dict(seed=5, batch_size=4, index=index, augment=SMALL,
            keys=("mixture", "clean", "activity", "num_speakers"))
  runs = []
  for workers in (0, 0, 1):
    it = iter(mixtures.mixture_dataset(manifest, "train", cfg,
                                       num_workers=workers, **kw))
    runs.append([next(it) for _ in range(2)])
  for other in runs[1:]:
    for a, b in zip(runs[0], other):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  # Augmented: the mixture is not the dry one.
  assert any(not np.array_equal(b["mixture"], b["clean"]) for b in runs[0])


def test_augment_config_names_unknown_fields():
  data = ml_collections.ConfigDict(dict(augment=dict(enabled=True, p_rverb=1)))
  with pytest.raises(ValueError, match="p_rverb"):
    stream.augment_config(data)
  with pytest.raises(ValueError, match="p_noise"):
    augment.AugmentConfig(p_noise=1.5)
  with pytest.raises(FileNotFoundError, match="noise_dir"):
    augment.AugmentConfig(noise_dir="/nonexistent/musan")


def test_user_noise_and_rir_folders(tmp_path):
  import soundfile as sf
  rng = np.random.default_rng(0)
  (tmp_path / "musan" / "noise" / "free-sound").mkdir(parents=True)
  (tmp_path / "rirs" / "smallroom" / "Room001").mkdir(parents=True)
  for i in range(3):
    sf.write(tmp_path / "musan" / "noise" / "free-sound" / f"n{i}.wav",
             0.1 * rng.standard_normal(SR * 2), SR)
    rir = np.concatenate([np.zeros(40), [0.8], 0.1 * rng.standard_normal(800)
                          * np.exp(-np.arange(800) / 200)])
    sf.write(tmp_path / "rirs" / "smallroom" / "Room001" / f"r{i}.wav", rir, SR)
  (tmp_path / "musan" / "noise" / "broken.wav").write_bytes(b"not audio")
  cfg = augment.AugmentConfig(enabled=True, noise_kinds=("coloured",),
                              noise_dir=str(tmp_path / "musan"),
                              rir_dir=str(tmp_path / "rirs"), bank_clips=2)
  banks = augment.Banks.build(cfg)
  assert set(banks.noise) == {"coloured", "files"}
  assert len(banks.noise["files"]) == 2
  assert len(banks.rooms) == 1 and len(banks.rooms[0]) == 3
  assert all(np.argmax(np.abs(r)) == 0 for r in banks.rooms[0])


def test_folded_equaliser_is_the_biquad_then_the_tilt():
  # The tilt FIR folded into the biquad's numerator (one float32 pass) is
  # the two-stage float64 filter it replaced, up to float32 rounding.
  x = np.random.default_rng(0).standard_normal(SR).astype(np.float32)
  for f0, gain_db, q, tilt in [(150, 10, 2.0, 0.6), (3000, -10, 0.5, -0.6),
                               (1000, 3, 1.0, 0.0)]:
    peak = augment._peaking(f0, gain_db, q)
    two_stage = scipy.signal.sosfilt(peak[None], x)
    two_stage[1:] -= tilt * two_stage[:-1].copy()
    two_stage /= 1 + abs(tilt)
    b, a = augment.eq_coefficients(peak, tilt)
    y = scipy.signal.lfilter(b, a, x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, two_stage,
                               atol=2e-5 * np.abs(two_stage).max())


@pytest.mark.parametrize("length", [1, 700, 9000, 20000, 31000, 52000, 64000])
def test_block_convolution_is_the_linear_convolution(length):
  rng = np.random.default_rng(length)
  rir = rng.standard_normal(6000).astype(np.float32) * np.exp(
      -np.arange(6000) / 800).astype(np.float32)
  n, onset = 64000, int(rng.integers(64000 - length + 1))
  source = np.zeros(n, np.float32)
  source[onset:onset + length] = rng.standard_normal(length)
  want = np.convolve(source.astype(np.float64), rir)[:n]
  for got in (augment.convolve(source, rir),
              augment.convolve(source, rir, (onset, onset + length),
                               augment.rir_spectrum(rir))):
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert not got[:onset].any() and not got[onset + length + 5999:].any()


def test_frame_mask_power_is_the_sample_mask_power():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(50 * framing.HOP).astype(np.float32)
  frames = (rng.random(50) < 0.4).astype(np.float32)
  by_sample = augment.power(x, augment.frame_mask(frames, len(x)))
  assert augment.power(x, frames) == pytest.approx(by_sample, rel=1e-5)
  assert augment.power(x, np.zeros(50, np.float32)) == 0.0
  with pytest.raises(ValueError, match="frames"):
    augment.power(x, frames[:-1])


def test_mu_law_table_is_the_companding_formula():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, 4000) ** 3
  peak, mu = np.abs(x).max(), 255.0
  y = np.sign(x) * np.log1p(mu * np.abs(x) / peak) / np.log1p(mu)
  y = np.round(y * 127.0) / 127.0
  want = np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu * peak
  np.testing.assert_allclose(augment.mu_law(x, peak), want, rtol=1e-12,
                             atol=1e-15)


def test_cached_rir_spectra_stay_in_their_process():
  import pickle
  banks = augment.Banks.build(SMALL, speech=[np.ones(SR, np.float32)])
  rir, spectrum = banks.rir(0, 1)
  assert rir is banks.rooms[0][1] and banks.spectra
  np.testing.assert_array_equal(spectrum, augment.rir_spectrum(rir))
  assert not pickle.loads(pickle.dumps(banks)).spectra


def test_training_babble_draws_on_the_whole_train_split(manifest, index):
  tr = transform(manifest, index, noise_kinds=("babble",))
  speech = tr.banks.speech
  assert len(speech) == len(index.utterances)
  store = storage.AudioStore(manifest)
  for i in (0, len(speech) - 1):
    utt = index.utterances[i]
    stored = store.read(utt, 0, min(utt.num_samples,
                                    mixtures.BABBLE_SECONDS * SR), raw=True)
    assert speech[i].dtype == np.int16
    np.testing.assert_array_equal(speech[i], stored)
    np.testing.assert_array_equal(
        speech[i] / storage.INT16_SCALE, store.read(utt, 0, len(stored)))
