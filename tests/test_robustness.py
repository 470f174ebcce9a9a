"""Evaluation conditions and the training-free speaker floor."""

import types

import numpy as np
import pytest

from data_pipelines import augment
from data_pipelines import framing
from echo_jax.evaluators import floors
from echo_jax.evaluators import robustness
from echo_jax.evaluators import speaker_metrics

SR = framing.SAMPLE_RATE


@pytest.fixture(scope="module")
def banks():
  rng = np.random.default_rng(0)
  speech = [0.1 * rng.standard_normal(SR * 2).astype(np.float32)
            for _ in range(8)]
  return augment.Banks.build(
      augment.AugmentConfig(enabled=True, num_rooms=2, bank_clips=2), speech)


def tone_clips(freqs, per_speaker=4, seconds=1.0, seed=0):
  """A "speaker" = a harmonic tone of its own f0 with small random detuning
  and level; silence at both ends."""
  rng = np.random.default_rng(seed)
  n = int(seconds * SR)
  t = np.arange(n) / SR
  waves, labels = [], []
  for spk, f0 in enumerate(freqs):
    for _ in range(per_speaker):
      f = f0 * rng.uniform(0.99, 1.01)
      x = sum(np.sin(2 * np.pi * f * h * t) / h for h in range(1, 6))
      x = rng.uniform(0.05, 0.2) * x
      x[:1600] = 0
      x[-1600:] = 0
      waves.append(x.astype(np.float32))
      labels.append(spk)
  return np.stack(waves), np.full(len(waves), n, np.int32), np.array(labels)


@pytest.mark.parametrize("condition", ["snr0", "snr10", "snr20"])
def test_noisy_conditions_hold_their_snr(condition, banks):
  waves, lengths, _ = tone_clips([150, 300])
  noisy = robustness.conditioned(waves, lengths, condition, banks, seed=3)
  for clean, x in zip(waves, noisy):
    mask = augment.speech_samples(clean)
    snr = 10 * np.log10(augment.power(clean, mask) / augment.power(x - clean))
    assert snr == pytest.approx(float(condition[3:]), abs=1e-3)


def test_conditions_are_fixed_draws(banks):
  waves, lengths, _ = tone_clips([150, 300])
  for condition in augment.CONDITIONS:
    a = robustness.conditioned(waves, lengths, condition, banks, seed=3)
    b = robustness.conditioned(waves, lengths, condition, banks, seed=3)
    np.testing.assert_array_equal(a, b)
    if condition != "clean":
      assert not np.array_equal(a, waves)
  with pytest.raises(ValueError, match="Unknown condition"):
    augment.apply_condition(waves[0], "underwater", banks,
                            np.random.default_rng(0))


def test_mfcc_floor_separates_tone_speakers_and_not_noise():
  waves, lengths, labels = tone_clips([110, 190, 320, 550])
  stats = floors.mfcc_statistics(waves, lengths)
  assert stats.shape == (len(waves), 40)
  np.testing.assert_allclose(stats.mean(0), 0, atol=1e-6)  # z-scored.
  r = speaker_metrics.speaker_report(stats, labels)
  assert r["top1"] == 1.0 and r["eer"] < 0.05
  # The same "speakers" as white noise carry no identity: near chance.
  rng = np.random.default_rng(1)
  noise = 0.1 * rng.standard_normal(waves.shape).astype(np.float32)
  r = speaker_metrics.speaker_report(floors.mfcc_statistics(noise, lengths),
                                     labels)
  assert r["eer"] > 0.25


def test_table_lists_every_cell():
  results = {"robustness/heldout/clean/projection_top1": 0.9,
             "robustness/heldout/clean/projection_eer": 0.05,
             "robustness/heldout/clean/random_top1": 0.5,
             "robustness/heldout/clean/random_eer": 0.3,
             "robustness/unseen_variant/snr0/mfcc_top1": 0.4,
             "robustness/unseen_variant/snr0/mfcc_eer": 0.35,
             "robustness/noise_false_alarm": 0.0125}
  table = robustness.format_table(results, "robustness")
  assert "90.0 / 5.0" in table and "40.0 / 35.0" in table
  assert "unseen_variant" in table and "1.25%" in table


def test_false_alarm_headline_is_noise_only_and_babble_is_apart():
  speech = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
  out = robustness.false_alarm_rates(speech, ["coloured", "hum", "babble"],
                                     "r")
  assert out == {"r/noise_false_alarm": 1 / 8,
                 "r/noise_false_alarm_coloured": 1 / 4,
                 "r/noise_false_alarm_hum": 0.0,
                 "r/noise_false_alarm_babble": 3 / 4}
  table = robustness.format_table(out, "r")
  assert "noise-only audio: 12.50%" in table
  assert "babble-only audio: 75.00%" in table
  assert "r/noise_false_alarm" not in robustness.false_alarm_rates(
      speech[2:], ["babble"], "r")


def test_babble_false_alarm_splits_at_ten_db_under_the_talkers():
  # Talkers at -25 dBFS: babble at <= -35 dBFS is background ("quiet").
  assert robustness.QUIET_BELOW_DB == -35.0
  speech = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1],
                     [1, 1, 0, 0]], bool)
  out = robustness.false_alarm_rates(
      speech, ["babble", "babble", "babble", "hum"], "r",
      levels_db=[-45.0, -22.0, -35.0, -22.0])
  assert out["r/noise_false_alarm_babble"] == 6 / 12
  assert out["r/noise_false_alarm_babble_quiet"] == 2 / 8
  assert out["r/noise_false_alarm_babble_loud"] == 4 / 4
  assert "r/noise_false_alarm_hum_quiet" not in out
  assert out["r/noise_false_alarm"] == 2 / 4
  table = robustness.format_table(out, "r")
  assert "(<= -35 dBFS): 25.00%; as loud as them: 100.00%" in table


def test_heldout_mixtures_under_a_condition_keep_their_labels():
  from data_pipelines import default_corpus
  from echo_jax.evaluators.eval_mixtures import HeldoutMixtures
  manifest = default_corpus.ensure_default_corpus(size="tiny")
  kw = dict(seconds=3.0, k_min=1, k_max=2, seed=4)
  clean = HeldoutMixtures(manifest, **kw)
  noisy = HeldoutMixtures(manifest, condition="snr10", **kw)
  added = []                      # The kind each example's noise came from.
  noise_clip = noisy.banks.noise_clip
  noisy.banks.noise_clip = lambda kind, *a: (added.append(kind)
                                             or noise_clip(kind, *a))
  for i in range(3):
    a, b = clean.example(i), noisy.example(i)
    assert b["noise_kind"] == added[-1] and "noise_kind" not in a
    np.testing.assert_array_equal(a["activity"], b["activity"])
    np.testing.assert_array_equal(a["sources"], b["sources"])
    mask = augment.frame_mask(a["activity"], len(a["mixture"]))
    snr = 10 * np.log10(augment.power(a["mixture"], mask)
                        / augment.power(b["mixture"] - a["mixture"]))
    assert snr == pytest.approx(10.0, abs=1e-2)
  with pytest.raises(ValueError, match="Unknown condition"):
    HeldoutMixtures(manifest, condition="snr5", **kw)


def test_a_model_without_speaker_or_activity_head_is_skipped_cheaply():
  config = types.SimpleNamespace(every=1, batch_size=4)
  model = types.SimpleNamespace(heads={"rwse": None})
  # No manifest is read and no bank is built: the path does not even exist.
  ev = robustness.RobustnessEvaluator("robustness", config, model,
                                      "/nonexistent/manifest.tsv", seed=0)
  assert ev.run(model, {"params": {"heads": {}}}) == {}
  assert not hasattr(ev, "banks")
