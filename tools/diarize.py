r"""Blind diarization of audio files with a stage-2 (or later) Echo checkpoint.

  python -m tools.diarize --workdir runs/cpu/stage2 --out rttm_dir \
      a.wav b.m4a folder/ ... [--Fb 17 --loop_prob 0.99 ...]
  python -m tools.diarize --method overlap --workdir runs/cpu/stage4 ...

`--method vbx` (default): 1.5 s windows, speech activity, PLDA + AHC + VBx,
one speaker per frame. `--method overlap` (stage-4 checkpoints, which have
the router): routing slots in windows of the training clip length with 50%
hop, per-slot embeddings clustered by VBx with a per-window cannot-link
assignment, overlap-added activities, so overlapped speech gets two
speakers (`echo_jax/diarization/overlap.py`; the `DiarizationConfig` flags
below belong to the VBx path).

Audio is read as corpus preparation reads it (`data_pipelines.audio_io`):
wav, flac, ogg, m4a/aac/mp4, mp3, any sample rate and channel count
(downmixed, resampled to 16 kHz); a file with NaN/Inf samples fails with its
name, one with samples beyond [-1, 1] is peak-normalised (with a warning). A
folder stands for the audio files directly inside it (not its subfolders).
Writes `<out>/<name>.rttm` per file
(name: file name without extension). The PLDA back-end is loaded from
`<workdir>/plda.npz`, or fitted on the checkpoint's training corpus (train
speakers) and saved there. Files that fail are logged, skipped and counted;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from data_pipelines import audio_io
from echo_jax import diarizer as diarizer_lib
from echo_jax.diarization import pipeline
from echo_jax.diarization import rttm
from tools import cli

_log = logging.getLogger(__name__)


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, found {text!r}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """One `--<field>` flag per `DiarizationConfig` field, default as there."""
  group = parser.add_argument_group("DiarizationConfig")
  for field in dataclasses.fields(pipeline.DiarizationConfig):
    default = field.default
    kind = _bool if isinstance(default, bool) else type(default)
    group.add_argument(f"--{field.name}", type=kind, default=default,
                       help=f"default {default}")


def config_from_args(args: argparse.Namespace) -> pipeline.DiarizationConfig:
  return pipeline.DiarizationConfig(**{
      f.name: getattr(args, f.name)
      for f in dataclasses.fields(pipeline.DiarizationConfig)})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True,
                      help="stage-2 (or later) training workdir")
  parser.add_argument("--out", required=True, help="folder for the RTTMs")
  parser.add_argument("--plda_manifest", default=None,
                      help="manifest whose train speakers fit the PLDA"
                      " (default: the checkpoint's training corpus)")
  parser.add_argument("--method", choices=diarizer_lib.METHODS,
                      default="vbx", help="vbx: one speaker per frame;"
                      " overlap: overlap-aware (needs a stage-4 router)")
  parser.add_argument("--refit_plda", action="store_true",
                      help="fit the PLDA even if plda.npz matches")
  parser.add_argument("files", nargs="+",
                      help="audio files, or folders of audio files")
  add_config_flags(parser)
  return parser.parse_args(argv)


def expand_inputs(paths: list[str]) -> tuple[list[str], list[str]]:
  """(audio files, errors): a folder stands for the audio files directly in
  it (sorted); a folder without any is an error naming it."""
  files, errors = [], []
  for path in paths:
    if not os.path.isdir(path):
      files.append(path)
      continue
    found = sorted(
        os.path.join(path, name) for name in os.listdir(path)
        if audio_io.extension(name) in audio_io.AUDIO_EXTS
        and os.path.isfile(os.path.join(path, name)))
    if not found:
      errors.append(
          f"{path} is a folder with no audio files directly inside "
          f"({', '.join(sorted(audio_io.AUDIO_EXTS))}); pass audio files, or "
          "folders that hold them (subfolders are not searched).")
    else:
      _log.info("%s: %d audio files.", path, len(found))
    files += found
  return files, errors


def main(argv: list[str] | None = None) -> int:
  """Returns the number of files that failed (exit status 1 if any)."""
  cli.setup_logging(__name__, "echo_jax")
  args = parse_args(argv)
  files, input_errors = expand_inputs(args.files)
  for error in input_errors:
    _log.error("Skipped %s", error)
  ids: dict[str, str] = {}
  for path in files:
    file_id = diarizer_lib.file_id_of(path)
    if file_id in ids and ids[file_id] != path:
      raise SystemExit(
          f"{path} and {ids[file_id]} would both write {file_id}.rttm; rename"
          " one or diarize them in separate runs.")
    ids[file_id] = path

  diarizer = diarizer_lib.EchoDiarizer.from_workdir(
      args.workdir, cfg=config_from_args(args))
  if args.method == "overlap" and not diarizer.has_router:
    raise SystemExit(f"--method overlap needs a stage-4 (routing) checkpoint;"
                     f" {args.workdir} has no router head. Use --method vbx.")
  if args.refit_plda:
    diarizer.fit_plda(args.plda_manifest)
  else:
    diarizer.load_or_fit_plda(args.plda_manifest)
  os.makedirs(args.out, exist_ok=True)

  failed = len(input_errors)
  for file_id, path in ids.items():
    try:
      segments = diarizer.diarize_file(path, file_id, method=args.method)
    except (OSError, RuntimeError, ValueError) as e:
      # Unreadable / missing / malformed audio: skip it, keep the others.
      failed += 1
      _log.error("Skipped %s: %s: %s", path, type(e).__name__, e)
      continue
    out_path = os.path.join(args.out, f"{file_id}.rttm")
    rttm.write_rttm(out_path, segments)
    _log.info("%s: %d segments, %d speakers -> %s", path, len(segments),
                 len({s.speaker for s in segments}), out_path)
  _log.info("Diarized %d of %d inputs; %d failed.",
            len(ids) + len(input_errors) - failed,
            len(ids) + len(input_errors), failed)
  return failed


if __name__ == "__main__":
  sys.exit(1 if main() else 0)
