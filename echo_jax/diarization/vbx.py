"""AHC initialisation and VBx clustering of embedding sequences.

VBx (Landini et al., "Bayesian HMM clustering of x-vector sequences (VBx) in
speaker diarization", 2022): windows x_t in the PLDA space (within-speaker
covariance I, between-speaker diag(phi)) are emitted by an HMM whose states
are speakers; speaker s has latent y_s ~ N(0, I) and x_t ~ N(sqrt(phi) * y_s,
I). Transitions: stay with `loop_prob`, otherwise jump to speaker j with prior
pi_j (possibly the same one). Mean-field VB alternates the speaker posteriors
q(y_s), the HMM state posteriors gamma (forward-backward) and pi; Fa scales the
emission log-likelihoods (windows overlap, so they are not independent) and Fb
the prior on y (larger Fb -> fewer speakers). Speakers nobody needs lose their
prior mass, so the number of speakers is inferred.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance
from scipy.special import logsumexp, softmax
from sklearn.mixture import GaussianMixture


@dataclasses.dataclass
class ClusteringConfig:
  """AHC + VBx settings (BUT VBx defaults for 1.5 s / 0.25 s windows)."""
  # AHC merges while average cosine similarity > threshold; with
  # `ahc_calibrate` the threshold is an offset from the per-file crossing point
  # of a two-Gaussian fit to the similarities (as in the BUT recipe). Meant to
  # over-cluster a little: VBx merges, it never splits.
  ahc_threshold: float = -0.015
  ahc_calibrate: bool = True
  # AHC is O(W^2) memory/time: above this many windows it runs on an evenly
  # spaced subsample and the rest join the nearest centroid (cosine).
  max_ahc_windows: int = 5000
  Fa: float = 0.3
  Fb: float = 17.0
  loop_prob: float = 0.99
  max_iters: int = 40
  epsilon: float = 1e-6
  init_smoothing: float = 7.0  # Hard AHC labels -> softmax(one_hot * this).
  # Speakers whose VBx prior pi ends below this are dropped before labelling.
  min_speaker_prior: float = 1e-3


def _calibrated_crossing(similarities: np.ndarray, seed: int = 0) -> float:
  """Score where a tied-variance 2-Gaussian fit's weighted densities cross."""
  gmm = GaussianMixture(2, covariance_type="tied", random_state=seed)
  gmm.fit(similarities[:, None])
  (m1, m2), (w1, w2) = gmm.means_[:, 0], gmm.weights_
  var = float(gmm.covariances_.ravel()[0])
  if abs(m2 - m1) < 1e-9:
    return float((m1 + m2) / 2)
  return float((m1 + m2) / 2 + var * np.log(w1 / w2) / (m2 - m1))


def ahc_init(embeddings: np.ndarray, threshold: float, *,
             calibrate: bool = False, max_windows: int = 5000,
             seed: int = 0) -> np.ndarray:
  """Average-linkage AHC on cosine similarity.

  Args:
    embeddings: [N, D].
    threshold: clusters are merged while their average cosine similarity is
      above this (an offset from the calibrated crossing when `calibrate`).
    calibrate: per-file calibration (needs >= 10 window pairs; with fewer, the
      crossing is taken as 0, i.e. the threshold is used as is).
    max_windows: above this, AHC runs on an evenly spaced subsample of this
      many windows and every window goes to its nearest cluster centroid.
  Returns:
    [N] int labels 0..S-1.
  """
  x = np.asarray(embeddings, np.float64)
  n = len(x)
  if n == 0:
    return np.zeros(0, np.int64)
  if n == 1:
    return np.zeros(1, np.int64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  subset = (np.arange(n) if n <= max_windows else
            np.unique(np.linspace(0, n - 1, max_windows).round().astype(int)))
  distance = scipy.spatial.distance.pdist(x[subset], "cosine")  # 1 - cos.
  offset = 0.0
  if calibrate and len(distance) >= 10:
    similarity = 1.0 - distance
    if len(similarity) > 200_000:  # The fit needs no more points than this.
      rng = np.random.default_rng(seed)
      similarity = rng.choice(similarity, 200_000, replace=False)
    offset = _calibrated_crossing(similarity, seed)
  linkage = scipy.cluster.hierarchy.linkage(distance, method="average")
  sub_labels = scipy.cluster.hierarchy.fcluster(
      linkage, t=1.0 - (offset + threshold), criterion="distance") - 1
  if len(subset) == n:
    return _compact(sub_labels)
  centroids = np.stack([x[subset][sub_labels == k].mean(0)
                        for k in range(sub_labels.max() + 1)])
  return _compact(np.argmax(x @ centroids.T, axis=1))


def _compact(labels: np.ndarray) -> np.ndarray:
  """Relabels to 0..K-1 in order of first appearance."""
  _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
  rank = np.argsort(np.argsort(first))
  return rank[inverse].astype(np.int64)


def _forward_backward(log_lik: np.ndarray, pi: np.ndarray, loop_prob: float
                      ) -> tuple[np.ndarray, float, np.ndarray]:
  """HMM posteriors in log space for transitions loop*I + (1-loop)*1 pi^T.

  The special transition structure makes each step O(S) instead of O(S^2).
  Args:
    log_lik: [N, S] emission log-likelihoods.
    pi: [S] jump prior (also the initial-state distribution).
  Returns:
    (gamma [N, S] state posteriors, log p(X), expected jumps into each
    speaker [S] summed over t >= 1).
  """
  n, s = log_lik.shape
  with np.errstate(divide="ignore"):  # pi_j == 0 -> log 0 = -inf is fine.
    log_pi = np.log(pi)
  log_jump = np.log1p(-loop_prob)
  fw = np.empty((n, s))
  bw = np.empty((n, s))
  fw[0] = log_lik[0] + log_pi
  bw[-1] = 0.0
  stay, leave = loop_prob, 1.0 - loop_prob
  # errstate once outside the loops: it costs more than a step inside them.
  with np.errstate(divide="ignore"):  # pi_j == 0 -> log 0 = -inf is fine.
    for t in range(1, n):
      prev = fw[t - 1]
      peak = prev.max()
      a = np.exp(prev - peak)
      fw[t] = log_lik[t] + peak + np.log(stay * a + leave * a.sum() * pi)
    for t in range(n - 2, -1, -1):
      c = log_lik[t + 1] + bw[t + 1]
      peak = c.max()
      b = np.exp(c - peak)
      bw[t] = peak + np.log(stay * b + leave * (pi @ b))
  log_px = float(logsumexp(fw[-1]))
  gamma = np.exp(fw + bw - log_px)
  # Expected jumps into j at t: p(x_<t) (1-loop) pi_j p(x_t|j) p(x_>t|j) / p(X).
  fw_total = logsumexp(fw[:-1], axis=1, keepdims=True)            # [N-1, 1]
  jumps = np.exp(fw_total + log_jump + log_pi + log_lik[1:] + bw[1:] - log_px)
  return gamma, log_px, jumps.sum(0)


def vbx(x: np.ndarray, phi: np.ndarray, init_labels: np.ndarray, *,
        Fa: float = 0.3, Fb: float = 17.0, loop_prob: float = 0.99,
        max_iters: int = 40, epsilon: float = 1e-6,
        init_smoothing: float = 7.0
        ) -> tuple[np.ndarray, np.ndarray, list[float]]:
  """Bayesian HMM clustering (VBx) of a window sequence.

  Args:
    x: [N, d] windows in the diagonalised PLDA space (see plda.py).
    phi: [d] between-speaker variances of that space.
    init_labels: [N] ints (e.g. from `ahc_init`); one VBx speaker per label.
    Fa, Fb, loop_prob: acoustic scale, speaker-prior scale, HMM self-loop.
    max_iters, epsilon: stop when the ELBO improves by less than epsilon.
    init_smoothing: hard labels become softmax(one_hot * init_smoothing).
  Returns:
    (gamma [N, S] window-to-speaker posteriors, pi [S] speaker priors,
    ELBO per iteration).
  """
  x = np.asarray(x, np.float64)
  phi = np.asarray(phi, np.float64)
  n, d = x.shape
  if phi.shape != (d,):
    raise ValueError(
        f"phi must be [{d}] to match x [N, {d}]; found {phi.shape}.")
  if not 0.0 <= loop_prob < 1.0:
    raise ValueError(f"loop_prob must be in [0, 1); found {loop_prob}.")
  if len(init_labels) != n:
    raise ValueError(f"init_labels must be [{n}]; found {len(init_labels)}.")
  labels = _compact(np.asarray(init_labels))
  num_speakers = int(labels.max()) + 1
  gamma = softmax(np.eye(num_speakers)[labels] * init_smoothing, axis=1)
  pi = np.full(num_speakers, 1.0 / num_speakers)
  const = -0.5 * (np.sum(x * x, axis=1) + d * np.log(2 * np.pi))  # [N]
  rho = x * np.sqrt(phi)                                          # [N, d]
  history: list[float] = []
  for _ in range(max_iters):
    # q(y_s) = N(alpha_s, diag(inv_l_s)): Gaussian update given gamma.
    inv_l = 1.0 / (1.0 + (Fa / Fb) * gamma.sum(0)[:, None] * phi)  # [S, d]
    alpha = (Fa / Fb) * inv_l * (gamma.T @ rho)                    # [S, d]
    # E_q[log N(x_t; sqrt(phi) y_s, I)], scaled by Fa.
    log_lik = Fa * (rho @ alpha.T - 0.5 * ((inv_l + alpha ** 2) @ phi)
                    + const[:, None])                              # [N, S]
    gamma, log_px, jumps = _forward_backward(log_lik, pi, loop_prob)
    kl = -0.5 * Fb * np.sum(np.log(inv_l) - inv_l - alpha ** 2 + 1.0)
    history.append(float(log_px - kl))
    pi = gamma[0] + jumps
    pi = pi / pi.sum()
    if len(history) > 1 and history[-1] - history[-2] < epsilon:
      break
  return gamma, pi, history


def cluster_with_posteriors(x: np.ndarray, phi: np.ndarray,
                            cfg: ClusteringConfig
                            ) -> tuple[np.ndarray, np.ndarray]:
  """AHC init -> VBx -> prune speakers with pi < cfg.min_speaker_prior.

  Returns:
    (labels [N] ints 0..K-1, posteriors [N, K] over the kept speakers,
    renormalised; column k belongs to label k).
  """
  n = len(x)
  if n == 0:
    return np.zeros(0, np.int64), np.zeros((0, 0))
  init = ahc_init(x, cfg.ahc_threshold, calibrate=cfg.ahc_calibrate,
                  max_windows=cfg.max_ahc_windows)
  gamma, pi, _ = vbx(x, phi, init, Fa=cfg.Fa, Fb=cfg.Fb,
                     loop_prob=cfg.loop_prob, max_iters=cfg.max_iters,
                     epsilon=cfg.epsilon, init_smoothing=cfg.init_smoothing)
  keep = pi >= cfg.min_speaker_prior
  keep[np.argmax(pi)] = True  # Never prune everyone.
  gamma = gamma[:, keep]
  winners = np.argmax(gamma, axis=1)
  # Speakers that win no window are dropped too; order by first appearance.
  used, first = np.unique(winners, return_index=True)
  used = used[np.argsort(first)]
  posteriors = gamma[:, used]
  posteriors /= np.maximum(posteriors.sum(1, keepdims=True), 1e-300)
  return np.argmax(posteriors, axis=1).astype(np.int64), posteriors


def cluster(x: np.ndarray, phi: np.ndarray, cfg: ClusteringConfig
            ) -> np.ndarray:
  """[N, d] PLDA-space windows -> [N] speaker labels 0..K-1 (K inferred)."""
  return cluster_with_posteriors(x, phi, cfg)[0]
