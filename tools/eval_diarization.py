r"""Blind DER of a stage-2 (or later) Echo checkpoint on held-out mixtures.

  python -m tools.eval_diarization --workdir runs/cpu/stage2 \
      --num_mixtures 200 --json out.json [--out_dir eval_rttm] [--seconds 10] \
      [--condition snr10]

Mixtures of held-out speakers with unknown K in [k_min, k_max] from the
checkpoint's corpus (or --manifest). Prints DER (collar 0 and 0.25 s each
side), missed / false alarm / confusion and speaker-count accuracy, blind and
with oracle speech activity (see echo_jax/evaluators/diarization_eval.py).
"""

from __future__ import annotations

import argparse

from data_pipelines import augment
from echo_jax import diarizer as diarizer_lib
from echo_jax.evaluators import diarization_eval
from tools import cli
from tools import diarize as diarize_tool


def main(argv: list[str] | None = None) -> dict:
  cli.setup_logging(__name__, "echo_jax")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--manifest", default=None,
                      help="corpus: PLDA on its train speakers, mixtures of"
                      " its held-out ones (default: the checkpoint's corpus)")
  parser.add_argument("--num_mixtures", type=int, default=200)
  parser.add_argument("--seconds", type=float, default=10.0,
                      help="mixture length (several 1.5 s windows)")
  parser.add_argument("--k_min", type=int, default=1)
  parser.add_argument("--k_max", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--condition", default="clean",
                      choices=augment.CONDITIONS,
                      help="the same mixtures under noise (snrN), a room or a"
                      " telephone channel, scored against the clean labels")
  parser.add_argument("--json", default=None, help="write results here")
  parser.add_argument("--out_dir", default=None,
                      help="write RTTMs, UEM and results.json here")
  diarize_tool.add_config_flags(parser)
  args = parser.parse_args(argv)

  diarizer = diarizer_lib.EchoDiarizer.from_workdir(
      args.workdir, cfg=diarize_tool.config_from_args(args))
  manifest = args.manifest or diarizer.train_manifest
  if not manifest:
    raise SystemExit("No manifest: the checkpoint's corpus was not found;"
                     " pass --manifest.")
  diarizer.load_or_fit_plda(manifest)
  results = diarization_eval.evaluate_blind_der(
      diarizer, manifest, num_mixtures=args.num_mixtures, seconds=args.seconds,
      k_min=args.k_min, k_max=args.k_max, seed=args.seed,
      out_dir=args.out_dir, condition=args.condition)
  results.update(workdir=args.workdir, step=diarizer.step, manifest=manifest,
                 condition=args.condition)
  return cli.print_and_save(results, diarization_eval.format_report(results),
                            args.json)


if __name__ == "__main__":
  main()
