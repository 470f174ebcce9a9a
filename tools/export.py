r"""Exports a trained checkpoint for use outside this code base, and checks it.

  python -m tools.export --workdir runs/cpu/stage2 --out export/ \
      [--step N] [--weights online|ema] [--heads speaker,activity] [--clips 3]
  python -m tools.export inspect --workdir runs/cpu/stage2 [--step N] [--depth 3]

Writes into `--out`:
  model.safetensors    float32 weights under stable names (encoder, the heads
                       asked for and the heads they read, front-end constants;
                       see echo_jax/export/names.py and bundle.py)
  config.json          every size and constant of the forward pass, and the
                       naming and layout
  encoder.jax_exported serialized `jax.export` of the encoder (cpu, cuda, tpu)
  encoder.onnx         the encoder as an ONNX graph (opset 17)
  export_summary.json  files, sizes and the checks' max abs errors

Both encoder artifacts take a waveform `[batch, samples]` (16 kHz, float32,
`samples` a multiple of hop * patch_frames, both dimensions free) and return
`hidden` `[depth, batch, tokens, width]` and `final` `[batch, tokens, width]`.
Each file is checked against the live JAX model (float32) on random audio and
on held-out clips of the embedded corpus (or `--manifest`): the NumPy
reference forward (echo_jax/export/numpy_forward.py) reads only the
safetensors and the config. The exit status is 1 if a check fails.

`inspect` prints a checkpoint's tree, shapes, dtypes and parameter counts
from metadata, without reading the arrays.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import onnx

from data_pipelines import default_corpus
from echo_jax import inference
from echo_jax.export import (bundle, checkpoint_info, checks, jax_export,
                             numpy_forward, onnx_export)
from tools import cli

_log = logging.getLogger(__name__)
SUMMARY_FILE = "export_summary.json"
# Max abs error allowed, relative to max(1, max |reference|) of each output.
# The NumPy forward runs in float64: its error is JAX's float32 rounding.
TOLERANCES = {"numpy": 1e-4, "jax_export": 1e-5, "onnx": 1e-4}


def parse_export_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m tools.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a stage's workdir")
  parser.add_argument("--out", required=True, help="folder to write into")
  parser.add_argument("--step", type=int, default=None,
                      help="saved step (default: the latest)")
  parser.add_argument("--weights", choices=inference.WEIGHTS,
                      default="online", help="encoder params: online or EMA")
  parser.add_argument("--heads", default="",
                      help="comma-separated heads to export, e.g. "
                      "speaker,activity (default: none)")
  parser.add_argument("--clips", type=int, default=3,
                      help="held-out corpus clips to check on (0: none)")
  parser.add_argument("--manifest", default="",
                      help="corpus of those clips (default: the embedded "
                      "tiny corpus)")
  return parser.parse_args(argv)


def parse_inspect_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m tools.export inspect",
      description="A checkpoint's tree, shapes, dtypes and parameter counts "
      "(metadata only).")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--depth", type=int, default=None,
                      help="tree levels to list (default: all)")
  return parser.parse_args(argv)


def check_inputs(loaded: inference.Loaded, clips: int, manifest: str
                 ) -> dict[str, checks.Clip]:
  """Noise longer than the training clip and than one position block (so
  unseen positions and the coarse position table are exercised), and real
  held-out clips."""
  unit = jax_export.token_samples(loaded)
  tokens = max(loaded.num_samples // unit, jax_export.POSITION_BLOCK) + 4
  inputs = {"random": checks.random_audio(unit, tokens)}
  if clips:
    manifest = manifest or default_corpus.ensure_default_corpus(size="tiny")
    inputs["corpus"] = checks.corpus_clips(manifest, unit, clips)
  return inputs


def write_files(loaded: inference.Loaded, heads: Sequence[str], weights: str,
                out: str) -> dict[str, float]:
  """Writes the bundle, the jax.export artifact and the ONNX graph (built
  from the bundle's files); returns seconds per part."""
  seconds, t0 = {}, time.time()
  bundle.write(loaded, heads, weights, out)
  seconds["safetensors"], t0 = time.time() - t0, time.time()
  jax_export.save(jax_export.export_encoder(loaded, loaded.params["encoder"]),
                  os.path.join(out, jax_export.ARTIFACT_FILE))
  seconds["jax_export"], t0 = time.time() - t0, time.time()
  config, tensors = numpy_forward.load(out)
  onnx.save(onnx_export.build(config, tensors),
            os.path.join(out, onnx_export.MODEL_FILE))
  seconds["onnx"] = time.time() - t0
  return seconds


def run_checks(loaded: inference.Loaded, heads: Sequence[str], out: str,
               inputs: dict[str, checks.Clip]) -> dict[str, checks.ErrorLog]:
  """Each file, read back from `out`, against the live JAX model."""
  config, tensors = numpy_forward.load(out)
  artifact = jax_export.load(os.path.join(out, jax_export.ARTIFACT_FILE))
  session = onnx_export.session(os.path.join(out, onnx_export.MODEL_FILE))
  reference = checks.reference_fn(loaded, heads)
  logs = {name: checks.ErrorLog(tol) for name, tol in TOLERANCES.items()}
  for kind, clip in inputs.items():
    wave = clip.waveform
    want = {k: np.asarray(v) for k, v in reference(wave).items()}
    logs["numpy"].add(kind, want, numpy_forward.forward(config, tensors, wave))
    logs["jax_export"].add(kind, want, {
        k: np.asarray(v) for k, v in artifact.call(wave).items()})
    logs["onnx"].add(kind, want, onnx_export.run(session, wave))
  return logs


def export(workdir: str, out: str, *, step: int | None = None,
           weights: str = "online", heads: Sequence[str] = (),
           clips: int = 3, manifest: str = "") -> dict:
  """Writes every export file into `out`, checks each against the live JAX
  model and returns the summary (also written to export_summary.json)."""
  loaded = inference.load(workdir, step=step, weights=weights)
  heads = bundle.heads_to_export(heads, list(loaded.params["heads"]))
  seconds = write_files(loaded, heads, weights, out)
  inputs = check_inputs(loaded, clips, manifest)
  t0 = time.time()
  logs = run_checks(loaded, heads, out, inputs)
  seconds["checks"] = time.time() - t0
  files = (numpy_forward.WEIGHTS_FILE, numpy_forward.CONFIG_FILE,
           jax_export.ARTIFACT_FILE, onnx_export.MODEL_FILE)
  summary = {
      "workdir": os.path.abspath(workdir), "step": loaded.step,
      "weights": weights, "heads": list(heads), "out": os.path.abspath(out),
      "files": {f: os.path.getsize(os.path.join(out, f)) for f in files},
      "input": {"waveform": "[batch, samples] float32 16 kHz",
                "samples_multiple_of": jax_export.token_samples(loaded),
                "max_tokens": jax_export.MAX_TOKENS},
      "checked_on": {kind: clip.name for kind, clip in inputs.items()},
      "checks": {name: log.summary() for name, log in logs.items()},
      "failures": [f"{name}: {f}" for name, log in logs.items()
                   for f in log.failures()],
      "seconds": {k: round(v, 2) for k, v in seconds.items()},
  }
  with open(os.path.join(out, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def format_summary(summary: dict) -> str:
  lines = [f"Exported {summary['workdir']} step {summary['step']} "
           f"({summary['weights']} weights, heads {summary['heads']}) to "
           f"{summary['out']}:"]
  lines += [f"  {name:<22}{size:>12,} bytes"
            for name, size in summary["files"].items()]
  lines.append(f"Input: waveform [batch, samples], samples a multiple of "
               f"{summary['input']['samples_multiple_of']}.")
  lines.append("Max abs error against the live JAX model (tolerance x "
               "max(1, max |output|)):")
  for name, check in summary["checks"].items():
    for kind, errors in check["max_abs_error"].items():
      worst = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
      lines.append(f"  {name:<11}{kind:<8}{worst}")
    lines.append(f"  {name:<11}tolerance {check['tolerance']:g}: "
                 f"{'ok' if check['passed'] else 'FAILED'}")
  lines.append(f"Summary: {os.path.join(summary['out'], SUMMARY_FILE)}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Returns the exit status: 1 if a check failed."""
  cli.setup_logging()
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notes.
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["inspect"]:
    args = parse_inspect_args(argv[1:])
    info = checkpoint_info.read(args.workdir, args.step)
    print(checkpoint_info.report(info, args.depth))
    return 0
  args = parse_export_args(argv)
  heads = [h.strip() for h in args.heads.split(",") if h.strip()]
  summary = export(args.workdir, args.out, step=args.step,
                   weights=args.weights, heads=heads, clips=args.clips,
                   manifest=args.manifest)
  print(format_summary(summary))
  for failure in summary["failures"]:
    _log.error("Check failed: %s", failure)
  return 1 if summary["failures"] else 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (FileNotFoundError, ValueError) as e:  # Bad workdir, step or heads.
    sys.exit(f"error: {e}")
