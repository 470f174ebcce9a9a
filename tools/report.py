"""Prints the held-out speaker numbers and loss curve ends of finished stages.

  python -m tools.report runs/cpu/stage1 runs/cpu/stage2
"""

from __future__ import annotations

import sys

from echo_jax.report import stages


def read_rows(workdir: str) -> list[dict]:
  """Training rows in step order, then evaluation rows."""
  train, evals = stages.read_metrics(workdir)
  return train + evals


def last(rows: list[dict], key: str):
  values = [r[key] for r in rows if key in r]
  return values[-1] if values else None


def summarize(workdir: str) -> list[str]:
  rows = read_rows(workdir)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  lines = [f"{workdir}: {len(losses)} steps logged"]
  if losses:
    head, tail = losses[:10], losses[-10:]
    lines.append(f"  train/loss: first-10 mean {sum(head) / len(head):.4f} -> "
                 f"last-10 mean {sum(tail) / len(tail):.4f}")
  for label, prefix in (("random-init encoder (best layer)", "random_best"),
                        ("EMA target encoder (best layer)", "target_best"),
                        ("speaker projection", "projection")):
    top1 = last(rows, f"speaker/{prefix}_top1")
    if top1 is None:
      continue
    eer_key = (f"speaker/{prefix}_eer" if prefix == "projection" else
               f"speaker/{prefix.split('_')[0]}_L"
               f"{int(last(rows, f'speaker/{prefix}_layer'))}_eer")
    eer = last(rows, eer_key)
    lines.append(f"  held-out speakers, {label}: k-NN top-1 {100 * top1:.1f}%"
                 f", EER {100 * eer:.1f}%")
  return lines


def main(workdirs: list[str]) -> None:
  for workdir in workdirs:
    print("\n".join(summarize(workdir)))


if __name__ == "__main__":
  main(sys.argv[1:])
