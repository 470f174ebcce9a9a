"""Diarization back-end: RTTM I/O, LDA + PLDA, AHC + VBx, pipeline, DER.

The VBx function itself is `echo_jax.diarization.vbx.vbx` (not re-exported
here: the name would hide the `vbx` module).
"""

from echo_jax.diarization.pipeline import DiarizationConfig
from echo_jax.diarization.pipeline import diarize
from echo_jax.diarization.pipeline import fit_plda
from echo_jax.diarization.pipeline import load_audio
from echo_jax.diarization.plda import PLDABackend
from echo_jax.diarization.rttm import Segment
from echo_jax.diarization.rttm import read_rttm
from echo_jax.diarization.rttm import read_uem
from echo_jax.diarization.rttm import write_rttm
from echo_jax.diarization.scoring import score
from echo_jax.diarization.vbx import ClusteringConfig
from echo_jax.diarization.vbx import ahc_init
from echo_jax.diarization.vbx import cluster
