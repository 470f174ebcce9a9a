"""The stack's HTML report (matplotlib PNGs, no server): `page.write` runs
the sections of `sections.SECTIONS` over the stages' runs and the
evaluations' results. `python -m tools.stack` builds it."""
