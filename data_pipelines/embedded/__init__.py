"""Embedded default corpus: espeak-ng speech in VoxCeleb2 layout.

  from data_pipelines.embedded import generate_corpus
  root = generate_corpus("/tmp/echo_corpus", seed=0)

See `generate.py` for the layout and `speakers.py` for what makes a speaker.
"""


def __getattr__(name: str):
  # Lazy, so `python -m data_pipelines.embedded.generate` does not import the
  # module twice (runpy warns when a package pre-imports its __main__ module).
  if name == "generate_corpus":
    from data_pipelines.embedded.generate import generate_corpus
    return generate_corpus
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
