r"""Fits stage 3's anchor GMM (diagonal, k-means++ init, variance floor) on
frame features of a corpus's train split and saves it as `.npz` with its
feature settings (`echo_jax/anchors.py`). Stage 3 runs the same fit on its
first step when the file is missing; run this beforehand to choose where it
goes or to fit it once for several runs.

  python -m tools.fit_anchor_gmm --config=experiments/stage3_content.py:cpu \
      [--manifest /data/echo/vox2/manifest.tsv] [--out gmm.npz] \
      [--num_components 256 --kind logmel ...]

Settings come from the config's `objective.content.anchor` block, then the
flags. Without `--out` the file goes where the stage looks for it: beside
the manifest, named by the settings (`anchors.default_path`); with `--out`,
train with `--config.objective.content.anchor.path=<out>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from data_pipelines import stream
from echo_jax import anchors
from echo_jax.report import stages as stages_lib
from tools import cli


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="experiments/stage3_content.py:cpu",
                      help="stage config FILE:VARIANT holding the settings")
  parser.add_argument("--manifest", default=None,
                      help="corpus manifest (default: the config's corpus)")
  parser.add_argument("--out", default=None, help="output .npz")
  for field in dataclasses.fields(anchors.AnchorSettings):
    parser.add_argument(f"--{field.name}", type=field.type if isinstance(
        field.type, type) else type(field.default), default=None)
  return parser.parse_args(argv)


def main(argv=None) -> str:
  cli.setup_logging("echo_jax", __name__)
  args = parse_args(argv)
  path, _, variant = args.config.partition(":")
  config = stages_lib.load_config(
      stages_lib.Stage(0, "anchor", path), variant or "cpu")
  anchor = config.objective.content.anchor
  settings = anchors.AnchorSettings.from_config(anchor)
  changed = {f.name: getattr(args, f.name)
             for f in dataclasses.fields(anchors.AnchorSettings)
             if getattr(args, f.name) is not None}
  settings = dataclasses.replace(settings, **changed)
  manifest = args.manifest or stream.resolve_manifest(config.data)
  out = args.out or anchor.path or anchors.default_path(manifest, settings)
  tick = time.time()
  features = anchors.train_features(manifest, settings)
  gmm = anchors.fit(features, settings)
  anchors.save(gmm, out)
  print(f"{anchors.describe(gmm)}; fitted on {min(len(features), settings.max_frames)}"
        f" of {len(features)} frames in {time.time() - tick:.0f} s -> {out}")
  return out


if __name__ == "__main__":
  main()
