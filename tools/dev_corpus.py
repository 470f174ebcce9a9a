r"""A development view of a corpus: some train speakers play the held-out part.

  python -m tools.dev_corpus --manifest M [--out_dir DIR] [--every 4]
  python -m tools.eval_diarization --workdir W --manifest DIR/manifest.tsv

Choices about evaluation-time settings and training recipes (a threshold, a
label rule) must not be made on the held-out speakers that are then reported.
This writes a manifest in which every `every`-th train speaker (sorted by
name) is HELDOUT and the other train speakers stay TRAIN; the corpus's own
held-out and unseen-variant speakers are left out. Every evaluator that mixes
HELDOUT speakers and fits its back-end (PLDA) on TRAIN ones then runs on it
unchanged. The audio is not copied: `shard` and `alignment` point back into
the source corpus (relative paths, so the two folders move together).

The encoder has heard the development speakers in training, so their numbers
flatter it: use them to compare recipes and settings, and report the
held-out split.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from data_pipelines import manifest as manifest_lib
from tools import cli

_log = logging.getLogger(__name__)


def dev_utterances(utterances: list[manifest_lib.Utterance], every: int
                   ) -> list[manifest_lib.Utterance]:
  """Train utterances only; every `every`-th train speaker's are HELDOUT."""
  if every < 2:
    raise ValueError(f"--every must be >= 2 (1 leaves no train speaker); "
                     f"found {every}.")
  train = manifest_lib.speakers_of(utterances, manifest_lib.TRAIN)
  dev = set(train[::every])
  if len(dev) < 2 or len(train) - len(dev) < 2:
    raise ValueError(f"{len(train)} train speakers are too few for a "
                     f"development split every {every} (needs >= 2 on each "
                     "side).")
  return [dataclasses.replace(u, split=manifest_lib.HELDOUT)
          if u.speaker in dev else u
          for u in manifest_lib.utterances_of(utterances, manifest_lib.TRAIN)]


def write_dev_manifest(manifest_path: str, out_dir: str, every: int = 4
                       ) -> str:
  """Writes `out_dir/manifest.tsv` (see the module doc); returns its path."""
  source_root = os.path.dirname(os.path.abspath(manifest_path))
  os.makedirs(out_dir, exist_ok=True)

  def moved(path: str) -> str:
    return os.path.relpath(os.path.join(source_root, path), out_dir)

  utterances = [
      dataclasses.replace(u, shard=moved(u.shard),
                          alignment=moved(u.alignment) if u.alignment else "")
      for u in dev_utterances(manifest_lib.read_manifest(manifest_path),
                              every)]
  out = os.path.join(out_dir, "manifest.tsv")
  manifest_lib.write_manifest(out, utterances)
  splits = {s: len(manifest_lib.speakers_of(utterances, s))
            for s in (manifest_lib.TRAIN, manifest_lib.HELDOUT)}
  _log.info("Wrote %s: %d train speakers, %d development speakers (split "
            "%s), %d utterances.", out, splits[manifest_lib.TRAIN],
            splits[manifest_lib.HELDOUT], manifest_lib.HELDOUT,
            len(utterances))
  return out


def main(argv: list[str] | None = None) -> str:
  cli.setup_logging(__name__)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--manifest", default=None,
                      help="source corpus (default: the embedded default "
                      "corpus, built if needed)")
  parser.add_argument("--out_dir", default=None,
                      help="default: a `dev` folder beside the manifest")
  parser.add_argument("--every", type=int, default=4,
                      help="every N-th train speaker becomes a development "
                      "speaker")
  args = parser.parse_args(argv)
  manifest = args.manifest
  if manifest is None:
    from data_pipelines import default_corpus
    manifest = default_corpus.ensure_default_corpus()
  out_dir = args.out_dir or os.path.join(
      os.path.dirname(os.path.abspath(manifest)), "dev")
  path = write_dev_manifest(manifest, out_dir, args.every)
  print(path)
  return path


if __name__ == "__main__":
  main()
