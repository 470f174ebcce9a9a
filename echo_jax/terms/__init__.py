"""Objective terms by name (`config.objective.<name>`); see `base.Term`.

A new term: a module here with a `TERM`, and one entry in `TERMS`.
"""

from echo_jax.terms import activity_term, crop_term, jepa_term, speaker_term
from echo_jax.terms import content_term
from echo_jax.terms import routing_term
from echo_jax.terms.base import StepInputs, Term

TERMS: dict[str, Term] = {
    "jepa": jepa_term.TERM,
    "crop": crop_term.TERM,
    "speaker": speaker_term.TERM,
    "activity": activity_term.TERM,
    "content": content_term.TERM,
    "routing": routing_term.TERM,
}
