"""Stage-3 anchor GMM: the JAX posteriors equal scikit-learn's, the host and
device features agree, the .npz keeps its settings."""

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import mixture as sk_mixture

from echo_jax import anchors, audio

SETTINGS = anchors.AnchorSettings(kind="mfcc", n_mfcc=4, num_components=5,
                                  var_floor=1e-3, max_frames=2000, max_iter=30)


def _clustered(n=600, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (5, dim))
  x = centres[rng.integers(0, 5, n)] + rng.normal(0, rng.uniform(0.3, 1.5, dim),
                                                  (n, dim))
  return (x * rng.uniform(0.5, 4, dim) + rng.normal(0, 5, dim)).astype(
      np.float32)


def test_posteriors_match_sklearn_predict_proba():
  x = _clustered()
  mean, std = x.mean(0), x.std(0)
  gm = sk_mixture.GaussianMixture(5, covariance_type="diag",
                                  init_params="k-means++", random_state=0,
                                  reg_covar=1e-3).fit((x - mean) / std)
  gmm = anchors.from_sklearn(gm, mean, std, SETTINGS)
  ours = np.exp(jax.jit(anchors.log_posteriors)(gmm.arrays(), jnp.asarray(x)))
  np.testing.assert_allclose(ours, gm.predict_proba((x - mean) / std),
                             atol=2e-5)
  # Batched leading axes give the same rows.
  ours_3d = np.exp(anchors.log_posteriors(gmm.arrays(), x.reshape(6, 100, -1)))
  np.testing.assert_allclose(ours_3d.reshape(600, 5), ours, atol=1e-6)


def test_fit_floors_variances_and_is_deterministic():
  x = _clustered()
  x[:, 0] = 1.0  # A constant dim: its variance must sit at the floor.
  a, b = anchors.fit(x, SETTINGS), anchors.fit(x, SETTINGS)
  assert a.variances.min() >= SETTINGS.var_floor
  np.testing.assert_array_equal(a.means, b.means)
  post = np.exp(anchors.log_posteriors(a.arrays(), x))
  assert np.all(np.isfinite(post))
  np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-5)


def test_fit_refuses_too_few_frames():
  with pytest.raises(ValueError, match="per component"):
    anchors.fit(_clustered(n=20), SETTINGS)


def test_host_and_device_features_agree():
  rng = np.random.default_rng(1)
  wave = (0.1 * rng.normal(size=16000)).astype(np.float32)
  host = anchors.frame_features(anchors.host_log_mel(wave, 80), SETTINGS,
                                xp=np)
  device = anchors.frame_features(audio.log_mel(jnp.asarray(wave)[None]),
                                  SETTINGS)[0]
  assert host.shape == device.shape == (100, 3 * SETTINGS.n_mfcc)
  np.testing.assert_allclose(np.asarray(device), host, atol=2e-3, rtol=1e-3)


def test_deltas_of_a_ramp_are_its_slope():
  ramp = np.arange(20, dtype=np.float32)[:, None] * 0.5
  d = anchors._deltas(ramp, np)  # pylint: disable=protected-access
  np.testing.assert_allclose(d[2:-2], 0.5)


def test_npz_round_trip_and_settings_check(tmp_path):
  gmm = anchors.fit(_clustered(), SETTINGS)
  path = str(tmp_path / "gmm.npz")
  anchors.save(gmm, path)
  loaded = anchors.load(path, SETTINGS)
  assert loaded.settings == SETTINGS
  np.testing.assert_array_equal(loaded.variances, gmm.variances)
  other = anchors.AnchorSettings(kind="mfcc", n_mfcc=4, num_components=6)
  with pytest.raises(ValueError, match="fitted with"):
    anchors.load(path, other)
  assert anchors.default_path("/c/manifest.tsv", SETTINGS) != \
      anchors.default_path("/c/manifest.tsv", other)


def test_fit_tool_writes_the_gmm_with_the_configs_settings(tmp_path):
  from tools import fit_anchor_gmm
  out = str(tmp_path / "gmm.npz")
  assert fit_anchor_gmm.main(["--config=experiments/stage3_content.py:smoke",
                              "--out", out, "--max_iter", "3"]) == out
  gmm = anchors.load(out)
  assert gmm.settings.max_iter == 3 and gmm.settings.num_components == 16
  assert gmm.means.shape == (16, 39)


CMVN = anchors.AnchorSettings(kind="mfcc", normalize="utterance", n_mfcc=4,
                              num_components=5)


def test_utterance_cmvn_normalises_over_speech_frames_only():
  rng = np.random.default_rng(2)
  speech = (0.1 * rng.normal(size=16000)).astype(np.float32)
  # Digital silence around the clip must not move the statistics.
  padded = np.concatenate([np.zeros(8000, np.float32), speech,
                           np.zeros(8000, np.float32)])
  log_mel = anchors.host_log_mel(padded, 80)
  feats = anchors.frame_features(log_mel, CMVN, xp=np)
  raw = anchors.frame_features(log_mel, SETTINGS, xp=np)
  loud = log_mel.mean(-1)
  speech_frames = loud > loud.max() - anchors.SPEECH_RANGE_NATS
  assert 90 <= speech_frames.sum() <= 104     # The 1 s of noise, not the pad.
  np.testing.assert_allclose(feats[speech_frames].mean(0), 0.0, atol=1e-4)
  # Hand check of one dim against its definition.
  col = raw[speech_frames, 1]
  np.testing.assert_allclose(
      feats[:, 1], (raw[:, 1] - col.mean()) / np.sqrt(col.var() + 1e-3),
      rtol=1e-4, atol=1e-4)
  # A channel gain (a constant on the log-mel) leaves them unchanged.
  np.testing.assert_allclose(
      anchors.frame_features(log_mel + 1.5, CMVN, xp=np), feats, atol=1e-3)


def test_utterance_cmvn_host_and_device_agree_per_clip():
  rng = np.random.default_rng(3)
  waves = (rng.uniform(0.01, 0.3, (2, 1)) * rng.normal(size=(2, 16000))
           ).astype(np.float32)
  device = np.asarray(anchors.frame_features(audio.log_mel(jnp.asarray(waves)),
                                             CMVN))
  for wave, dev in zip(waves, device):   # Each clip its own statistics.
    host = anchors.frame_features(anchors.host_log_mel(wave, 80), CMVN, xp=np)
    np.testing.assert_allclose(dev, host, atol=5e-3)


def test_normalize_is_checked_and_none_keeps_the_old_file_name():
  with pytest.raises(ValueError, match="normalize"):
    anchors.AnchorSettings(normalize="speaker")
  assert CMVN.key() != dataclasses.replace(CMVN, normalize="none").key()
  # The key of a "none" anchor is the hash it had before the field existed.
  fields = dataclasses.asdict(SETTINGS)
  del fields["normalize"]
  blob = json.dumps(fields, sort_keys=True).encode()
  assert SETTINGS.key() == hashlib.sha1(blob).hexdigest()[:10]


def test_save_leaves_no_temporary_and_concurrent_saves_stay_loadable(
    tmp_path):
  import threading
  gmm = anchors.fit(_clustered(), SETTINGS)
  path = str(tmp_path / "gmm.npz")
  threads = [threading.Thread(target=anchors.save, args=(gmm, path))
             for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  np.testing.assert_array_equal(anchors.load(path, SETTINGS).means, gmm.means)
  assert [p.name for p in tmp_path.iterdir()] == ["gmm.npz"]
