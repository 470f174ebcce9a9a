"""LDA + two-covariance PLDA back-end for speaker embeddings.

Model (two-covariance PLDA): an embedding of speaker k is
`x = mu + y_k + e`, `y_k ~ N(0, B)` (between-speaker), `e ~ N(0, W)`
(within-speaker). A linear map `T` with `T W T^T = I`, `T B T^T = diag(phi)`
diagonalises both; that space is what VBx consumes (`transform`, `phi`).

Pre-processing before PLDA (as in the Kaldi / BUT VBx recipes): centre and
length-normalise the raw embeddings, LDA to `lda_dim`, centre again and
length-normalise to norm sqrt(lda_dim) (so per-dimension variance is ~1).
"""

from __future__ import annotations

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

_KEYS = ("mean0", "lda_mean", "lda_matrix", "mean2", "plda_mu",
         "plda_transform", "phi")


def _length_norm(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return scale * x / np.maximum(norm, 1e-12)


def _class_stats(x: np.ndarray, labels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> (class index per row [N], counts [K], per-class sums [K, D])."""
  _, index = np.unique(labels, return_inverse=True)
  counts = np.bincount(index).astype(np.float64)
  sums = np.zeros((len(counts), x.shape[1]))
  np.add.at(sums, index, x)
  return index, counts, sums


def simultaneous_diagonalisation(between: np.ndarray, within: np.ndarray
                                 ) -> tuple[np.ndarray, np.ndarray]:
  """-> (T [D, D], phi [D] descending) with T W T^T = I, T B T^T = diag(phi)."""
  chol = np.linalg.cholesky(within)
  chol_inv = np.linalg.inv(chol)
  m = chol_inv @ between @ chol_inv.T
  phi, vecs = np.linalg.eigh((m + m.T) / 2)
  order = np.argsort(phi)[::-1]
  return vecs[:, order].T @ chol_inv, np.maximum(phi[order], 0.0)


def fit_two_covariance(x: np.ndarray, labels: np.ndarray, *, em_iters: int = 10
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ML two-covariance PLDA by EM, started from the moment estimates.

  Args:
    x: [N, D] embeddings (already pre-processed).
    labels: [N] speaker labels (any hashable dtype numpy can sort).
    em_iters: EM iterations after the closed-form start.
  Returns:
    (mu [D], between B [D, D], within W [D, D]).
  """
  x = np.asarray(x, np.float64)
  n, d = x.shape
  index, counts, sums = _class_stats(x, np.asarray(labels))
  num_classes = len(counts)
  if num_classes < 2:
    raise ValueError(f"PLDA needs >= 2 speakers; found {num_classes}.")
  if n <= num_classes:
    raise ValueError(
        f"PLDA needs some speakers with >= 2 embeddings; found {n} embeddings"
        f" for {num_classes} speakers.")
  mu = x.mean(0)
  means = sums / counts[:, None]
  resid = x - means[index]
  within = resid.T @ resid / (n - num_classes)
  centred_means = means - mu
  # Class means carry W / n_k of within-class noise; subtract it out.
  between = (centred_means.T @ centred_means / num_classes
             - within * np.mean(1.0 / counts))
  evals, evecs = np.linalg.eigh((between + between.T) / 2)
  floor = 1e-4 * max(float(np.trace(within)) / d, 1e-12)
  between = (evecs * np.maximum(evals, floor)) @ evecs.T
  within = within + floor * np.eye(d)  # Keeps W invertible for D > N - K.

  z_all = x - mu
  scatter = z_all.T @ z_all
  for _ in range(em_iters):
    t, phi = simultaneous_diagonalisation(between, within)
    phi = np.maximum(phi, 1e-10)
    t_inv = np.linalg.inv(t)
    s = (sums - counts[:, None] * mu) @ t.T           # [K, D] per-class sums.
    post_var = 1.0 / (1.0 / phi + counts[:, None])    # [K, D] diagonal.
    post_mean = post_var * s                          # [K, D]
    b_new = (np.diag(post_var.sum(0)) + post_mean.T @ post_mean) / num_classes
    cross = s.T @ post_mean
    w_new = (t @ scatter @ t.T - cross - cross.T
             + (post_mean * counts[:, None]).T @ post_mean
             + np.diag((post_var * counts[:, None]).sum(0))) / n
    between = t_inv @ b_new @ t_inv.T
    within = t_inv @ w_new @ t_inv.T
    between, within = (between + between.T) / 2, (within + within.T) / 2
  return mu, between, within


class PLDABackend:
  """Centre/length-norm -> LDA -> centre/length-norm -> diagonalised PLDA.

  After `fit` (or `from_dict`), `transform` maps raw embeddings [N, D] to the
  PLDA space [N, d] with within-speaker covariance I and between-speaker
  covariance diag(`phi`), `phi` sorted descending.
  """

  def __init__(self) -> None:
    self.params: dict[str, np.ndarray] | None = None

  def fit(self, embeddings: np.ndarray, labels: np.ndarray, lda_dim: int = 128,
          *, em_iters: int = 10) -> "PLDABackend":
    """Fits on train-speaker embeddings [N, D] with speaker labels [N]."""
    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(labels) != len(x):
      raise ValueError(f"expected embeddings [N, D] and labels [N]; found"
                       f" {x.shape} and {labels.shape}.")
    num_classes = len(np.unique(labels))
    dim = min(lda_dim, num_classes - 1, x.shape[1])
    if dim < 1:
      raise ValueError(f"LDA needs >= 2 speakers; found {num_classes}.")
    mean0 = x.mean(0)
    x1 = _length_norm(x - mean0)
    lda = LinearDiscriminantAnalysis(solver="svd", n_components=dim)
    lda.fit(x1, labels)
    lda_mean, lda_matrix = lda.xbar_, lda.scalings_[:, :dim]
    x2 = (x1 - lda_mean) @ lda_matrix
    mean2 = x2.mean(0)
    x3 = _length_norm(x2 - mean2, np.sqrt(dim))
    mu, between, within = fit_two_covariance(x3, labels, em_iters=em_iters)
    t, phi = simultaneous_diagonalisation(between, within)
    self.params = dict(mean0=mean0, lda_mean=lda_mean, lda_matrix=lda_matrix,
                       mean2=mean2, plda_mu=mu, plda_transform=t, phi=phi)
    return self

  def _p(self) -> dict[str, np.ndarray]:
    if self.params is None:
      raise RuntimeError(
          "PLDABackend is not fitted; call fit() or from_dict().")
    return self.params

  @property
  def phi(self) -> np.ndarray:
    """[d] between-speaker variances in the PLDA space, descending."""
    return self._p()["phi"]

  @property
  def dim(self) -> int:
    return int(self._p()["phi"].shape[0])

  def transform(self, x: np.ndarray) -> np.ndarray:
    """Raw embeddings [N, D] -> PLDA space [N, d] (float64)."""
    p = self._p()
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != p["mean0"].shape[0]:
      raise ValueError(f"expected embeddings [N, {p['mean0'].shape[0]}];"
                       f" found {x.shape}.")
    x1 = _length_norm(x - p["mean0"])
    x2 = (x1 - p["lda_mean"]) @ p["lda_matrix"]
    x3 = _length_norm(x2 - p["mean2"], np.sqrt(x2.shape[1]))
    return (x3 - p["plda_mu"]) @ p["plda_transform"].T

  def score_transformed(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Same-vs-different-speaker log-likelihood ratio of pairs in PLDA space.

    Per dimension, (u, v) is N(0, [[phi+1, phi], [phi, phi+1]]) for one speaker
    and N(0, (phi+1) I) for two; the LLR is the closed-form difference.
    Args: u, v: [N, d]. Returns: [N].
    """
    phi = self.phi
    a, b = phi + 1.0, phi
    det = 2.0 * phi + 1.0  # a^2 - b^2
    quad_same = (a * (u * u + v * v) - 2.0 * b * u * v) / det
    quad_diff = (u * u + v * v) / a
    per_dim = (-0.5 * np.log(det) + np.log(a) - 0.5 * (quad_same - quad_diff))
    return per_dim.sum(-1)

  def score(self, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """LLR of raw embedding pairs x1[i], x2[i] ([N, D] each) -> [N]."""
    return self.score_transformed(self.transform(x1), self.transform(x2))

  def to_dict(self) -> dict[str, np.ndarray]:
    """Plain numpy arrays, e.g. for `np.savez(path, **backend.to_dict())`."""
    return {k: np.array(v) for k, v in self._p().items()}

  @classmethod
  def from_dict(cls, params: dict[str, np.ndarray]) -> "PLDABackend":
    missing = set(_KEYS) - set(params)
    if missing:
      raise ValueError(f"PLDA parameters lack {sorted(missing)}; expected"
                       f" {list(_KEYS)}. Re-fit and save with to_dict().")
    backend = cls()
    backend.params = {k: np.asarray(params[k], np.float64) for k in _KEYS}
    return backend

  def save(self, path: str) -> None:
    """Writes an .npz next to a checkpoint."""
    np.savez(path, **self.to_dict())

  @classmethod
  def load(cls, path: str) -> "PLDABackend":
    with np.load(path) as data:
      return cls.from_dict({k: data[k] for k in data.files})
