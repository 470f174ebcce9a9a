"""Training-free speaker floors a learnt speaker space has to beat.

`mfcc_statistics`: per clip, the mean and standard deviation over frames of
MFCC c1-c20 (c0, the level, left out), z-scored over the evaluated set, and
compared by cosine. On clean single-engine speech this floor is strong (it
beat the first demo model's speaker projection), so it is reported beside the
random-init encoder in every cell.
"""

from __future__ import annotations

import librosa
import numpy as np

from data_pipelines import framing


def mfcc_statistics(waves: np.ndarray, lengths: np.ndarray,
                    n_mfcc: int = 20) -> np.ndarray:
  """[U, N] clips (first `lengths` samples valid) -> [U, 2 * n_mfcc]."""
  rows = []
  for wave, n in zip(waves, lengths):
    mfcc = librosa.feature.mfcc(
        y=np.asarray(wave[:max(int(n), framing.HOP * 4)], np.float32),
        sr=framing.SAMPLE_RATE, n_mfcc=n_mfcc + 1, n_fft=400,
        hop_length=framing.HOP)[1:]
    rows.append(np.concatenate([mfcc.mean(1), mfcc.std(1)]))
  stats = np.stack(rows)
  return (stats - stats.mean(0)) / np.maximum(stats.std(0), 1e-8)
