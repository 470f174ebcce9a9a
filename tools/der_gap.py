r"""How far apart two blind-diarization runs on the same mixtures are.

  python -m tools.eval_diarization --workdir W --json clean.json
  python -m tools.eval_diarization --workdir W --condition snr10 --json snr10.json
  python -m tools.der_gap clean.json snr10.json [--json gap.json]

Takes two `eval_diarization` results (--json or results.json of --out_dir)
on the same mixtures: a condition against clean, or one checkpoint or
setting against another. Prints OTHER's blind DER at collar 0 minus BASE's,
with a 95% paired-bootstrap interval over the mixtures
(`diarization_eval.der_difference`), and, where OTHER added noise, the same
per noise kind.
"""

from __future__ import annotations

import argparse
import json

from echo_jax.evaluators import diarization_eval
from tools import cli


def main(argv: list[str] | None = None) -> dict:
  cli.setup_logging(__name__)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("base", help="eval_diarization results (JSON)")
  parser.add_argument("other", help="results on the same mixtures (JSON)")
  parser.add_argument("--json", default=None, help="write the gaps here")
  args = parser.parse_args(argv)
  runs = []
  for path in (args.base, args.other):
    with open(path) as f:
      run = json.load(f)
    if "blind_per_file_c0" not in run:
      raise SystemExit(f"{path} has no per-mixture errors "
                       "(blind_per_file_c0): rerun tools.eval_diarization.")
    runs.append(run)
  results = dict(
      all=diarization_eval.der_difference(*runs),
      by_noise_kind=diarization_eval.der_difference_by_noise_kind(*runs))

  def row(name: str, gap: dict, n: int) -> str:
    return (f"{name:>10} {n:>9} {100 * gap['difference']:>+8.2f}"
            f"   [{100 * gap['low']:+.2f}, {100 * gap['high']:+.2f}]")
  rows = [f"{'mixtures':>10} {'count':>9} {'DER diff':>8}   95% interval "
          "(points)",
          row("all", results["all"], len(runs[1]["blind_per_file_c0"]))]
  rows += [row(kind, gap, gap["num_mixtures"])
           for kind, gap in results["by_noise_kind"].items()]
  return cli.print_and_save(results, "\n".join(rows), args.json)


if __name__ == "__main__":
  main()
