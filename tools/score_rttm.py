"""Scores hypothesis RTTM(s) against reference RTTM(s): DER + count accuracy.

  python -m tools.score_rttm --ref REF.rttm[,REF2.rttm] --hyp HYP.rttm \
      [--uem ALL.uem] [--collars 0,0.25] [--json out.json]

Collars are seconds on EACH side of reference boundaries. Without --uem each
file is scored over the extent of its reference + hypothesis segments.
"""

from __future__ import annotations

import argparse

from echo_jax.diarization import rttm
from echo_jax.diarization import scoring
from tools import cli


def _read_many(paths: str) -> dict[str, list[rttm.Segment]]:
  merged: dict[str, list[rttm.Segment]] = {}
  for path in paths.split(","):
    for file_id, segments in rttm.read_rttm(path).items():
      if file_id in merged:
        raise ValueError(f"File id {file_id!r} appears in more than one of"
                         f" {paths}; each file must come from one RTTM.")
      merged[file_id] = segments
  return merged


def format_table(results: dict) -> str:
  rows = [f"{'collar(+-s)':>11} {'DER%':>7} {'miss%':>7} {'FA%':>7}"
          f" {'conf%':>7} {'total(s)':>10}"]
  for key, r in results.items():
    if key.startswith("collar_"):
      rows.append(f"{r['collar_each_side']:>11.2f} {100 * r['der']:>7.2f}"
                  f" {100 * r['missed_rate']:>7.2f}"
                  f" {100 * r['false_alarm_rate']:>7.2f}"
                  f" {100 * r['confusion_rate']:>7.2f} {r['total']:>10.2f}")
  c = results["count"]
  rows.append(f"speaker count: accuracy {100 * c['accuracy']:.2f}%  under"
              f" {100 * c['under']:.2f}%  over {100 * c['over']:.2f}%"
              f"  ({c['num_files']} files)")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ref", required=True, help="comma-separated RTTMs")
  parser.add_argument("--hyp", required=True, help="comma-separated RTTMs")
  parser.add_argument("--uem", default=None)
  parser.add_argument("--collars", default="0,0.25",
                      help="comma-separated, seconds each side")
  parser.add_argument("--json", default=None, help="write results here")
  args = parser.parse_args(argv)
  uem = rttm.read_uem(args.uem) if args.uem else None
  results = scoring.score(_read_many(args.ref), _read_many(args.hyp), uem,
                          [float(c) for c in args.collars.split(",")])
  return cli.print_and_save(results, format_table(results), args.json)


if __name__ == "__main__":
  main()
