"""Diarization back-end: RTTM I/O, PLDA, AHC + VBx, pipeline, DER scoring."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import soundfile
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from echo_jax.diarization import pipeline
from echo_jax.diarization import plda as plda_lib
from echo_jax.diarization import rttm
from echo_jax.diarization import scoring
from echo_jax.diarization import vbx as vbx_lib
from tools import score_rttm

Seg = rttm.Segment

# ---------------------------------------------------------------- RTTM / UEM


def test_rttm_round_trip(tmp_path):
  segments = [Seg("a", 0.0, 1.5, "s1"), Seg("a", 1.25, 2.0, "s2"),
              Seg("b", 3.125, 0.5, "x")]
  path = str(tmp_path / "x.rttm")
  rttm.write_rttm(path, segments)
  lines = open(path).read().splitlines()
  assert lines[0] == "SPEAKER a 1 0.000 1.500 <NA> <NA> s1 <NA> <NA>"
  assert all(len(line.split()) == 10 for line in lines)
  back = rttm.read_rttm(path)
  assert back == {"a": segments[:2], "b": segments[2:]}
  annotation = rttm.to_annotation(back["a"], uri="a")
  assert annotation.label_duration("s2") == pytest.approx(2.0)


def test_read_uem_and_bad_lines(tmp_path):
  path = tmp_path / "x.uem"
  path.write_text("a 1 0.0 10.0\nb 1 2.5 4.0\n")
  assert rttm.read_uem(str(path)) == {"a": [(0.0, 10.0)], "b": [(2.5, 4.0)]}
  path.write_text("a 1 0.0\n")
  with pytest.raises(ValueError, match="expected 4 UEM fields"):
    rttm.read_uem(str(path))
  bad = tmp_path / "bad.rttm"
  bad.write_text("SPEAKER a 1 0.0\n")
  with pytest.raises(ValueError, match=">= 8 fields"):
    rttm.read_rttm(str(bad))


def test_activity_to_segments():
  activity = np.array([[1, 1, 0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 1, 1, 0, 0, 1]], bool)
  got = rttm.activity_to_segments(activity, 0.5, "f", ["a", "b"],
                                  min_duration=0.75)
  assert got == [Seg("f", 0.0, 1.0, "a"), Seg("f", 1.5, 1.0, "b"),
                 Seg("f", 2.0, 1.5, "a")]

# ---------------------------------------------------------------- PLDA


def _two_cov_data(rng, num_speakers, per_speaker, between, within, mu):
  d = len(mu)
  y = rng.multivariate_normal(np.zeros(d), between, num_speakers)
  labels = np.repeat(np.arange(num_speakers), per_speaker)
  e = rng.multivariate_normal(np.zeros(d), within, len(labels))
  return mu + y[labels] + e, labels


def _random_cov(rng, d, scale):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.2 * np.eye(d))


def test_speech_regions_fill_pauses_shorter_than_the_reference_convention():
  # 10 ms frames: speech 0.5 s, pause 0.2 s, speech 0.5 s, pause 0.4 s,
  # speech 0.5 s. Pauses under 0.3 s are filled, as references are scored.
  probs = np.concatenate([np.ones(50), np.zeros(20), np.ones(50),
                          np.zeros(40), np.ones(50)])
  cfg = pipeline.DiarizationConfig(median_filter_frames=1)
  assert pipeline.MIN_PAUSE_SECONDS == cfg.min_pause_seconds == 0.3
  assert pipeline.speech_regions(probs, cfg) == [(0, 120), (160, 210)]
  no_fill = dataclasses.replace(cfg, min_pause_seconds=0.0)
  assert pipeline.speech_regions(probs, no_fill) == [(0, 50), (70, 120),
                                                     (160, 210)]


def test_two_covariance_fit_recovers_generating_covariances():
  rng = np.random.default_rng(0)
  d = 6
  between, within = _random_cov(rng, d, 3.0), _random_cov(rng, d, 1.0)
  mu = rng.normal(size=d)
  # Unequal class sizes: the moment estimate alone would be biased by W / n_k.
  x1, l1 = _two_cov_data(rng, 300, 3, between, within, mu)
  x2, l2 = _two_cov_data(rng, 300, 12, between, within, mu)
  x, labels = np.concatenate([x1, x2]), np.concatenate([l1, l2 + 300])
  mu_hat, b_hat, w_hat = plda_lib.fit_two_covariance(x, labels)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel(w_hat, within) < 0.05
  assert rel(b_hat, between) < 0.15
  assert np.allclose(mu_hat, mu, atol=0.3)


def test_plda_llr_matches_direct_gaussian_likelihoods():
  backend = plda_lib.PLDABackend.from_dict(dict(
      mean0=np.zeros(2), lda_mean=np.zeros(2), lda_matrix=np.eye(2),
      mean2=np.zeros(2), plda_mu=np.zeros(2), plda_transform=np.eye(2),
      phi=np.array([4.0, 0.5])))
  rng = np.random.default_rng(1)
  u, v = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
  expected = np.zeros(5)
  for dim, phi in enumerate([4.0, 0.5]):
    same = scipy.stats.multivariate_normal(
        np.zeros(2), [[phi + 1, phi], [phi, phi + 1]])
    diff = scipy.stats.norm(0, np.sqrt(phi + 1))
    pairs = np.stack([u[:, dim], v[:, dim]], 1)
    expected += (same.logpdf(pairs) - diff.logpdf(u[:, dim])
                 - diff.logpdf(v[:, dim]))
  np.testing.assert_allclose(backend.score_transformed(u, v), expected,
                             rtol=1e-10)


def test_plda_backend_separates_speakers_and_round_trips(tmp_path):
  rng = np.random.default_rng(2)
  d = 40
  between, within = _random_cov(rng, d, 1.0), _random_cov(rng, d, 0.3)
  mu = rng.normal(size=d)
  x, labels = _two_cov_data(rng, 150, 8, between, within, mu)
  backend = plda_lib.PLDABackend().fit(x, labels, lda_dim=20)
  assert backend.dim == 20 and np.all(np.diff(backend.phi) <= 0)
  # Training data in PLDA space: within-speaker covariance ~ I.
  z = backend.transform(x)
  resid = z - np.stack([z[labels == k].mean(0) for k in range(150)])[labels]
  within_cov = resid.T @ resid / (len(z) - 150)
  assert np.abs(np.diag(within_cov) - 1).max() < 0.2
  # Held-out speakers: same-speaker pairs outscore different-speaker ones.
  xt, lt = _two_cov_data(rng, 40, 6, between, within, mu)
  i, j = np.triu_indices(len(xt), 1)
  scores = backend.score(xt[i], xt[j])
  auc = roc_auc_score(lt[i] == lt[j], scores)
  assert auc > 0.95, auc
  # lda_dim is capped at num_classes - 1.
  assert plda_lib.PLDABackend().fit(x[:80], labels[:80], lda_dim=128).dim == 9
  backend.save(str(tmp_path / "plda.npz"))
  loaded = plda_lib.PLDABackend.load(str(tmp_path / "plda.npz"))
  np.testing.assert_array_equal(loaded.transform(xt), backend.transform(xt))
  with pytest.raises(ValueError, match="lack"):
    plda_lib.PLDABackend.from_dict({"phi": np.ones(3)})

# ---------------------------------------------------------------- VBx


def _speaker_sequence(rng, num_speakers, d=24, turns_per_speaker=3):
  """Windows from the PLDA latent model, speaker turns -> (x, phi, truth)."""
  phi = np.geomspace(30.0, 0.3, d)
  means = rng.normal(size=(num_speakers, d)) * np.sqrt(phi)
  order = np.tile(np.arange(num_speakers), turns_per_speaker)
  rng.shuffle(order)
  truth = np.concatenate([[s] * rng.integers(20, 50) for s in order])
  return means[truth] + rng.normal(size=(len(truth), d)), phi, truth


@pytest.mark.parametrize("num_speakers", [1, 2, 3, 4])
def test_vbx_merges_overclustered_init(num_speakers):
  for seed in range(2):
    rng = np.random.default_rng(10 * num_speakers + seed)
    x, phi, truth = _speaker_sequence(rng, num_speakers)
    # Over-cluster on purpose: every 10 windows start a new cluster, so the
    # init has ~10x too many speakers and VBx must merge them.
    init = np.arange(len(x)) // 10
    gamma, pi, elbo = vbx_lib.vbx(x, phi, init)
    assert gamma.shape == (len(x), init.max() + 1)
    np.testing.assert_allclose(gamma.sum(1), 1.0, atol=1e-8)
    assert np.all(np.diff(elbo) > -1e-6 * np.abs(elbo[1:])), elbo
    assert (pi > 1e-3).sum() == num_speakers
    assert adjusted_rand_score(truth, gamma.argmax(1)) == 1.0

    cfg = vbx_lib.ClusteringConfig(ahc_threshold=0.7, ahc_calibrate=False)
    ahc = vbx_lib.ahc_init(x, cfg.ahc_threshold)
    assert ahc.max() + 1 >= num_speakers
    labels = vbx_lib.cluster(x, phi, cfg)
    assert labels.max() + 1 == num_speakers
    assert adjusted_rand_score(truth, labels) == 1.0


def test_forward_backward_matches_path_enumeration():
  rng = np.random.default_rng(3)
  n, s, loop = 5, 3, 0.7
  log_lik = rng.normal(size=(n, s)) * 3
  pi = np.array([0.5, 0.3, 0.2])
  trans = loop * np.eye(s) + (1 - loop) * pi[None, :]
  gamma_ref = np.zeros((n, s))
  jumps_ref = np.zeros(s)
  total = 0.0
  for path in itertools.product(range(s), repeat=n):
    p = pi[path[0]] * np.exp(log_lik[0, path[0]])
    for t in range(1, n):
      p *= trans[path[t - 1], path[t]] * np.exp(log_lik[t, path[t]])
    total += p
    gamma_ref[np.arange(n), path] += p
    for t in range(1, n):
      # Posterior of "jumped into path[t] at t": share of the transition
      # probability that comes from the jump term.
      share = (1 - loop) * pi[path[t]] / trans[path[t - 1], path[t]]
      jumps_ref[path[t]] += p * share
  gamma, log_px, jumps = vbx_lib._forward_backward(log_lik, pi, loop)
  np.testing.assert_allclose(log_px, np.log(total), rtol=1e-10)
  np.testing.assert_allclose(gamma, gamma_ref / total, atol=1e-10)
  np.testing.assert_allclose(jumps, jumps_ref / total, atol=1e-10)


def test_vbx_is_numerically_safe_on_extreme_inputs():
  rng = np.random.default_rng(4)
  x, phi, _ = _speaker_sequence(rng, 2)
  gamma, pi, elbo = vbx_lib.vbx(x * 1e3, phi, np.arange(len(x)) % 5)
  assert np.all(np.isfinite(gamma)) and np.all(np.isfinite(pi))
  assert np.all(np.isfinite(elbo))
  gamma, pi, _ = vbx_lib.vbx(x[:1], phi, [0])  # One window.
  assert gamma.shape == (1, 1) and pi[0] == pytest.approx(1.0)


def test_ahc_subsample_matches_full_ahc():
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(3, 16)) * 5
  truth = rng.integers(0, 3, 400)
  x = centres[truth] + rng.normal(size=(400, 16))
  full = vbx_lib.ahc_init(x, 0.8)
  sub = vbx_lib.ahc_init(x, 0.8, max_windows=60)
  assert adjusted_rand_score(truth, full) == 1.0
  assert adjusted_rand_score(truth, sub) == 1.0

# ---------------------------------------------------------------- DER


def test_der_matches_hand_computed_case():
  # Reference: A 0-4, B 3-8 (overlap 3-4). Hypothesis: s1 0-3.5, s2 3.5-6,
  # s1 6-7, s2 7-9. UEM 0-10. Best mapping A->s1, B->s2.
  ref = {"f": [Seg("f", 0, 4, "A"), Seg("f", 3, 5, "B")]}
  hyp = {"f": [Seg("f", 0, 3.5, "s1"), Seg("f", 3.5, 2.5, "s2"),
               Seg("f", 6, 1, "s1"), Seg("f", 7, 2, "s2")]}
  uem = {"f": [(0.0, 10.0)]}
  got = scoring.score(ref, hyp, uem, collars=(0.0, 0.25))
  # Collar 0: total = 4 + 5 = 9 s. Missed: 3-4 has two reference speakers
  # and one hypothesis speaker -> 1 s. False alarm: 8-9 -> 1 s. Confusion:
  # 6-7 says s1 (=A) while B talks -> 1 s.
  c0 = got["collar_0.00"]
  assert (c0["missed"], c0["false_alarm"], c0["confusion"], c0["total"]) == \
      pytest.approx((1.0, 1.0, 1.0, 9.0))
  assert c0["der"] == pytest.approx(3 / 9)
  # Collar +-0.25 around reference boundaries 0, 3, 4, 8 leaves
  # [0.25, 2.75] [3.25, 3.75] [4.25, 7.75] [8.25, 10]: total = A 2.5 + 0.5,
  # B 0.5 + 3.5 = 7 s; missed [3.25, 3.75] = 0.5; false alarm [8.25, 9] =
  # 0.75; confusion [6, 7] = 1.
  c25 = got["collar_0.25"]
  assert (c25["missed"], c25["false_alarm"], c25["confusion"], c25["total"]) \
      == pytest.approx((0.5, 0.75, 1.0, 7.0))
  assert c25["der"] == pytest.approx(2.25 / 7)
  # Without a UEM the extent of ref + hyp (0-9) is scored: same numbers here.
  assert scoring.score(ref, hyp)["collar_0.00"]["der"] == pytest.approx(3 / 9)


def _frame_der(ref, hyp, start, end, collar, step=0.01):
  """Independent frame-level DER: per-frame counts + Hungarian mapping."""
  times = np.arange(start, end, step) + step / 2
  def activity(segments):
    names = sorted({s.speaker for s in segments})
    act = np.zeros((len(names), len(times)), bool)
    for s in segments:
      act[names.index(s.speaker)] |= (times > s.start) & (times < s.end)
    return act
  r, h = activity(ref), activity(hyp)
  keep = np.ones(len(times), bool)
  # Collars sit on each reference speaker's turn boundaries (same-speaker
  # overlapping segments merged first, as md-eval does).
  for row in r:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
    for t in start + edges * step:
      keep &= np.abs(times - t) > collar
  r, h = r[:, keep], h[:, keep]
  nr, nh = r.sum(0), h.sum(0)
  overlap = r.astype(float) @ h.T.astype(float)
  rows, cols = scipy.optimize.linear_sum_assignment(-overlap)
  correct = overlap[rows, cols].sum()
  missed = np.maximum(nr - nh, 0).sum() * step
  fa = np.maximum(nh - nr, 0).sum() * step
  conf = (np.minimum(nr, nh).sum() - correct) * step
  return missed, fa, conf, nr.sum() * step


def test_der_matches_frame_level_reference_on_random_cases():
  rng = np.random.default_rng(6)
  for case in range(5):
    def random_segments(names):
      out = []
      for name in names:
        for _ in range(rng.integers(1, 4)):
          start = rng.integers(0, 1800) / 100
          out.append(Seg("f", start, rng.integers(30, 400) / 100, name))
      return out
    ref = random_segments(["a", "b", "c"][:rng.integers(1, 4)])
    hyp = random_segments(["x", "y", "z", "w"][:rng.integers(1, 5)])
    got = scoring.score({"f": ref}, {"f": hyp}, {"f": [(0.0, 25.0)]})
    for collar in (0.0, 0.25):
      expected = _frame_der(ref, hyp, 0.0, 25.0, collar)
      r = got[scoring.collar_key(collar)]
      np.testing.assert_allclose(
          (r["missed"], r["false_alarm"], r["confusion"], r["total"]),
          expected, atol=0.02, err_msg=f"case {case} collar {collar}")


def test_count_accuracy_and_missing_files():
  ref = {"a": [Seg("a", 0, 1, "p"), Seg("a", 1, 1, "q")],
         "b": [Seg("b", 0, 1, "p"), Seg("b", 1, 1, "q"), Seg("b", 2, 1, "r")],
         "c": [Seg("c", 0, 2, "p")]}
  hyp = {"a": [Seg("a", 0, 1, "1"), Seg("a", 1, 1, "2")],
         "b": [Seg("b", 0, 3, "1"), Seg("b", 1, 1, "2")],
         "c": [Seg("c", 0, 1, "1"), Seg("c", 1, 1, "2"),
               Seg("c", 1.5, 0.5, "3")],
         "d": [Seg("d", 0, 2, "1")]}  # Not in the reference: all false alarm.
  got = scoring.score(ref, hyp)
  count = got["count"]
  # a: 2 == 2, b: 2 < 3, c: 3 > 1, d: 1 > 0.
  assert count == dict(accuracy=0.25, under=0.25, over=0.5, num_files=4)
  assert got["per_file"]["d"]["collar_0.00"]["false_alarm"] == pytest.approx(2)
  with pytest.raises(ValueError, match="no UEM entry"):
    scoring.score(ref, hyp, uem={"a": [(0.0, 2.0)]})


def test_score_rttm_cli(tmp_path, capsys):
  ref = [Seg("f", 0, 4, "A"), Seg("f", 3, 5, "B")]
  hyp = [Seg("f", 0, 3.5, "s1"), Seg("f", 3.5, 2.5, "s2"),
         Seg("f", 6, 1, "s1"), Seg("f", 7, 2, "s2")]
  rttm.write_rttm(str(tmp_path / "ref.rttm"), ref)
  rttm.write_rttm(str(tmp_path / "hyp.rttm"), hyp)
  (tmp_path / "u.uem").write_text("f 1 0 10\n")
  out = tmp_path / "res.json"
  score_rttm.main(["--ref", str(tmp_path / "ref.rttm"), "--hyp",
                   str(tmp_path / "hyp.rttm"), "--uem", str(tmp_path / "u.uem"),
                   "--json", str(out)])
  assert "33.33" in capsys.readouterr().out
  assert json.loads(out.read_text())["collar_0.25"]["der"] == \
      pytest.approx(2.25 / 7)

# ---------------------------------------------------------------- pipeline

SR = pipeline.SAMPLE_RATE


def _tone(rng, freq, seconds):
  t = np.arange(int(seconds * SR)) / SR
  harmonics = sum(np.sin(2 * np.pi * k * freq * t + rng.uniform(0, 6)) / k
                  for k in (1, 2, 3))
  return (0.3 * harmonics + 0.02 * rng.normal(size=len(t))).astype(np.float32)


def _fake_embed(windows):
  """Band-energy shares: a 'speaker' is its fundamental frequency, and a
  window holding two speakers lands between them (like a real embedding)."""
  spectrum = np.abs(np.fft.rfft(windows, axis=1)) ** 2
  # Bins of a 1.5 s window are 2/3 Hz apart: the first 1600 reach 1067 Hz.
  bands = np.array_split(spectrum[:, :1600], 48, axis=1)
  energy = np.stack([b.sum(1) for b in bands], 1) + 1e-6
  return energy / energy.sum(1, keepdims=True)


def _fake_activity(waveform):
  """Frame energy -> speech probability at 10 ms."""
  num_frames = int(np.ceil(len(waveform) / 160))
  frames = np.pad(waveform, (0, num_frames * 160 - len(waveform)))
  energy = (frames.reshape(num_frames, 160) ** 2).mean(1)
  return (energy > 1e-3).astype(np.float32)


@pytest.fixture(scope="module")
def fake_plda():
  rng = np.random.default_rng(7)
  windows, labels = [], []
  for speaker, freq in enumerate(rng.uniform(90, 260, 40)):
    audio = _tone(rng, freq, 4.0)
    for start in range(0, len(audio) - 24000, 4000):
      windows.append(audio[start:start + 24000])
      labels.append(speaker)
  return pipeline.fit_plda(_fake_embed(np.stack(windows)), np.array(labels),
                           pipeline.DiarizationConfig(lda_dim=20))


def _run(waveform, plda, **cfg):
  return pipeline.diarize(waveform, embed_windows=_fake_embed,
                          speech_activity=_fake_activity, plda=plda,
                          cfg=pipeline.DiarizationConfig(**cfg), file_id="t")


def test_pipeline_silent_and_short_files(fake_plda):
  rng = np.random.default_rng(8)
  assert _run(np.zeros(5 * SR, np.float32), fake_plda) == []
  assert _run(np.zeros(0, np.float32), fake_plda) == []
  short = _run(_tone(rng, 150, 0.5), fake_plda)  # Shorter than one window.
  assert len(short) == 1 and short[0].start == 0.0
  assert short[0].duration == pytest.approx(0.5, abs=0.02)
  assert _run(_tone(rng, 150, 0.03), fake_plda) == []  # < min_speech.
  with pytest.raises(ValueError, match="speech_activity must return"):
    pipeline.diarize(np.zeros(SR, np.float32), embed_windows=_fake_embed,
                     speech_activity=lambda w: np.zeros(10), plda=fake_plda)


def test_pipeline_one_and_two_speakers(fake_plda, tmp_path):
  rng = np.random.default_rng(9)
  silence = np.zeros(SR // 2, np.float32)
  one = np.concatenate([_tone(rng, 120, 5), silence, _tone(rng, 120, 4)])
  segments = _run(one, fake_plda)
  assert {s.speaker for s in segments} == {"spk0"}
  assert sum(s.duration for s in segments) == pytest.approx(9.0, abs=0.1)

  # A 0-6 s, silence, B 6.5-12.5 s, A 12.5-16.5 s, via a 44.1 kHz flac file.
  two = np.concatenate([_tone(rng, 110, 6), silence, _tone(rng, 210, 6),
                        _tone(rng, 110, 4)])
  path = str(tmp_path / "two.flac")
  soundfile.write(path, np.interp(np.arange(0, len(two), SR / 44100),
                                  np.arange(len(two)), two), 44100)
  audio = pipeline.load_audio(path)
  assert abs(len(audio) - len(two)) <= 2 and audio.dtype == np.float32
  hyp = _run(audio, fake_plda)
  ref = [Seg("t", 0, 6, "A"), Seg("t", 6.5, 6, "B"), Seg("t", 12.5, 4, "A")]
  result = scoring.score({"t": ref}, {"t": hyp}, {"t": [(0.0, 16.5)]})
  assert result["count"]["accuracy"] == 1.0
  assert result["collar_0.25"]["der"] < 0.02, result["collar_0.25"]
  assert result["collar_0.00"]["der"] < 0.08, result["collar_0.00"]
