"""Stage-3 anchor GMM: the JAX posteriors equal scikit-learn's, the host and
device features agree, the .npz keeps its settings."""

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
