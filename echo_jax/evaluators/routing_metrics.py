"""Separation metrics of routing slots (NumPy), as DESIGN "Metrics" defines:

- count accuracy: a mixture is right when its number of existing slots
  (existence probability > 0.5) equals K; plus under/over rates and the
  confusion matrix (rows: true K, columns: predicted count);
- PIT accuracy (mixtures with K >= 2): after Hungarian matching of slots to
  sources by latent MSE, the fraction of sources whose matched slot is closer
  (MSE) to that source's target than to any other source's target;
- latent SI-SDR: between a matched slot's latent sequence and the source's
  target, both zero-meaned per channel over time and flattened (eps 1e-8);
  SI-SDRi subtracts the SI-SDR of the mixture's latent against the target.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

SI_SDR_CLIP_DB = 80.0  # A perfect (scaled) copy reads +80 dB, not +inf.


def si_sdr(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-8,
           clip_db: float = SI_SDR_CLIP_DB) -> float:
  """Scale-invariant SDR in dB of `[T, C]` latents (zero-meaned per channel
  over time, then flattened), clipped to +-`clip_db`."""
  est = np.asarray(estimate, np.float64)
  ref = np.asarray(reference, np.float64)
  if est.shape != ref.shape:
    raise ValueError(f"si_sdr: estimate {est.shape} != reference {ref.shape}.")
  est = (est - est.mean(0, keepdims=True)).ravel()
  ref = (ref - ref.mean(0, keepdims=True)).ravel()
  scale = (est @ ref + eps) / (ref @ ref + eps)
  target = scale * ref
  noise = est - target
  value = 10.0 * np.log10((target @ target + eps) / (noise @ noise + eps))
  return float(np.clip(value, -clip_db, clip_db))


def mse_matrix(estimates: np.ndarray, references: np.ndarray) -> np.ndarray:
  """`[S, T, C]`, `[K, T, C]` -> `[S, K]` mean squared errors."""
  e = np.asarray(estimates, np.float64)
  r = np.asarray(references, np.float64)
  return np.mean(np.square(e[:, None] - r[None]), axis=(-2, -1))


def match_by_mse(slots: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """`[S, T, C]` slots, `[K, T, C]` targets (K <= S) -> `[K]` slot per source
  (Hungarian on latent MSE)."""
  rows, cols = linear_sum_assignment(mse_matrix(slots, targets).T)
  slot_of = np.empty(len(targets), np.int64)
  slot_of[rows] = cols
  return slot_of


def pit_correct(matched: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """`[K, T, C]` matched slot latents (row k matched to source k), `[K, T, C]`
  targets -> `[K]` bool: slot k strictly closer to target k than to any other
  target."""
  mse = mse_matrix(matched, targets)                      # [K (slot), K]
  own = np.diag(mse)
  others = np.where(np.eye(len(mse), dtype=bool), np.inf, mse).min(1)
  return own < others


def count_report(true_k: np.ndarray, predicted: np.ndarray, k_max: int,
                 num_slots: int) -> dict:
  """Count accuracy, under/over rates, and the confusion matrix
  `[k_max + 1, num_slots + 1]` (row: true K, column: predicted count)."""
  true_k, predicted = np.asarray(true_k), np.asarray(predicted)
  n = max(len(true_k), 1)
  confusion = np.zeros((k_max + 1, num_slots + 1), np.int64)
  np.add.at(confusion, (true_k, predicted), 1)
  per_k = {int(k): float(np.mean(predicted[true_k == k] == k))
           for k in np.unique(true_k)}
  return dict(accuracy=float(np.sum(predicted == true_k) / n),
              under=float(np.sum(predicted < true_k) / n),
              over=float(np.sum(predicted > true_k) / n),
              accuracy_per_k=per_k, confusion=confusion.tolist(),
              num_mixtures=int(len(true_k)))


@dataclasses.dataclass
class RoutingScores:
  """Accumulates per-mixture results; `summary()` gives the metrics."""
  k_max: int
  num_slots: int
  true_k: list = dataclasses.field(default_factory=list)
  predicted_k: list = dataclasses.field(default_factory=list)
  pit: list = dataclasses.field(default_factory=list)           # K >= 2.
  baseline_pit: list = dataclasses.field(default_factory=list)
  si_sdr: list = dataclasses.field(default_factory=list)        # K >= 1.
  mixture_si_sdr: list = dataclasses.field(default_factory=list)
  source_k: list = dataclasses.field(default_factory=list)      # Its K.

  def add(self, slots: np.ndarray, existence: np.ndarray,
          targets: np.ndarray, mixture_latent: np.ndarray) -> None:
    """One mixture: slots `[S, T, C]`, existence probabilities `[S]`, the K
    present sources' targets `[K, T, C]`, the mixture's latent `[T, C]`."""
    k = len(targets)
    self.true_k.append(k)
    self.predicted_k.append(int(np.sum(existence > 0.5)))
    if k == 0:
      return
    matched = slots[match_by_mse(slots, targets)]
    # The trivial baseline: every existing slot is the mixture latent.
    baseline = np.broadcast_to(mixture_latent, targets.shape)
    if k >= 2:
      self.pit += pit_correct(matched, targets).tolist()
      self.baseline_pit += pit_correct(baseline, targets).tolist()
    for est, ref in zip(matched, targets):
      self.si_sdr.append(si_sdr(est, ref))
      self.mixture_si_sdr.append(si_sdr(mixture_latent, ref))
      self.source_k.append(k)

  def summary(self) -> dict:
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    sdr, mix = np.array(self.si_sdr), np.array(self.mixture_si_sdr)
    source_k = np.array(self.source_k)
    # Per K as well: a K = 1 mixture's latent is its source's (+80 dB, the
    # clip), which lifts the all-K baseline mean far above what it is on the
    # mixtures that need separating.
    per_k = lambda xs: {int(k): float(np.mean(xs[source_k == k]))  # noqa: E731
                        for k in np.unique(source_k)}
    return dict(
        count=count_report(np.array(self.true_k, np.int64),
                           np.array(self.predicted_k, np.int64), self.k_max,
                           self.num_slots),
        pit_accuracy=mean(self.pit), pit_sources=len(self.pit),
        si_sdr=mean(self.si_sdr),
        si_sdri=mean((sdr - mix).tolist()),
        si_sdr_per_k=per_k(sdr),
        baseline=dict(pit_accuracy=mean(self.baseline_pit),
                      si_sdr=mean(self.mixture_si_sdr), si_sdri=0.0,
                      si_sdr_per_k=per_k(mix)),
        num_sources=len(self.si_sdr))
