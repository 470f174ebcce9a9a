"""The report's sections, in page order: (title, fn(Context) -> [Fragment]).

A stage that brings its own plots or tables adds a module here (see
`loss_curves.py` for the shape of one) and one line below; headline numbers
of new evaluator metrics go to `metrics_table.HEADLINES`, evaluations run
after training to `evaluations.EVALUATIONS`.
"""

from echo_jax.report import latent_map, loss_curves, metrics_table, timeline

SECTIONS = (
    ("Metrics", metrics_table.section),
    ("Loss curves", loss_curves.section),
    ("Latent map", latent_map.section),
    ("Diarization", timeline.section),
)
