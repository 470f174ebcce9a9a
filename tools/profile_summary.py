r"""Where a traced step's device time goes: totals by kernel and by kind.

Reads the Perfetto trace that `jax.profiler.trace(dir,
create_perfetto_trace=True)` writes (`<dir>/plugins/profile/*/*.trace.json.gz`)
and sums the durations of the events on the device's tracks (GPU streams, or
the XLA ops of a CPU host), so no TensorBoard is needed:

  python -m tools.profile_summary /tmp/trace [--top 25] [--steps 3]

Kinds are read from kernel names (cuBLAS / cuDNN / XLA fusion names); they
say whether a step is bound by matmuls or by the elementwise and reduction
work around them. `busy_ms` (the union of the device events, streams that
overlap counted once) against `span_ms` (first event's start to last event's
end) shows how long the device sat idle: kernel-launch gaps, host syncs.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

# Kernel-name patterns -> kind, first match wins (lower-case names).
KINDS = (
    ("attention", r"fmha|flash|cudnn|attention|softmax"),
    ("matmul", r"gemm|nvjet|cublas|cutlass|xmma|wgmma|\bdot|dot\.|dot_|"
               r"matmul|convolution|ynn"),   # ynn: XLA:CPU's YNNPACK dots.
    ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic.update.slice|"
                       r"gather|scatter"),
    ("reduction", r"reduce|reduction"),
    ("fusion/elementwise", r"fusion|loop|input|add|multiply|select|convert"),
)


def trace_file(trace_dir: str) -> str:
  """The newest Perfetto trace below `trace_dir`."""
  found = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                    recursive=True)
  if not found:
    raise FileNotFoundError(f"No *.trace.json.gz below {trace_dir}: trace with "
                            "jax.profiler.trace(dir, create_perfetto_trace="
                            "True).")
  return max(found, key=os.path.getmtime)


def kind_of(name: str) -> str:
  low = name.lower()
  for kind, pattern in KINDS:
    if re.search(pattern, low):
      return kind
  return "other"


def _base_name(name: str) -> str:
  """`fusion.123` / `loop_add_fusion_7` -> one name for all their copies."""
  return re.sub(r"([._]\d+)+$", "", name)


def device_events(trace: dict) -> list[dict]:
  """Complete events ('X') on device tracks: a process named like a GPU/TPU,
  else (a CPU backend) the host threads that run XLA ops."""
  names = {e["pid"]: e.get("args", {}).get("name", "")
           for e in trace["traceEvents"]
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, n in names.items()
            if re.search(r"/device:(GPU|TPU)|gpu|tpu", n, re.I)
            and "host" not in n.lower()}
  events = [e for e in trace["traceEvents"]
            if e.get("ph") == "X" and "dur" in e]
  if device:
    events = [e for e in events if e["pid"] in device]
  else:  # CPU backend: XLA's ops carry an `hlo_op` / `long_name` argument.
    events = [e for e in events if "hlo_op" in e.get("args", {})
              or "long_name" in e.get("args", {})]
  return leaves(events)


def leaves(events: list[dict]) -> list[dict]:
  """The events that hold no other event of their track (a `cond` or `call`
  op encloses the ops it runs: counting both would count that time twice).
  Only an event that ends within another is held by it: consecutive GPU
  kernels whose recorded times overlap by a little are both leaves."""
  by_track = collections.defaultdict(list)
  for e in events:
    by_track[(e["pid"], e.get("tid"))].append(e)
  out = []
  end = lambda e: e["ts"] + e["dur"]
  for track in by_track.values():
    track.sort(key=lambda e: (e["ts"], -e["dur"]))
    parent = set()
    stack: list[int] = []
    for i, e in enumerate(track):
      while stack and (end(track[stack[-1]]) <= e["ts"]
                       or end(track[stack[-1]]) < end(e)):
        stack.pop()
      if stack:
        parent.add(stack[-1])
      stack.append(i)
    out += [e for i, e in enumerate(track) if i not in parent]
  return out


def busy_us(events: list[dict]) -> float:
  """Length of the union of the events' intervals (overlaps counted once)."""
  busy, end = 0.0, float("-inf")
  for e in sorted(events, key=lambda e: e["ts"]):
    start, stop = e["ts"], e["ts"] + e["dur"]
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def summarize(trace_dir: str, steps: int = 1) -> dict:
  """`{"total_ms", "busy_ms", "span_ms", "kernels", "by_kind": {kind: ms},
  "top": [(name, kind, ms, count)]}`, per step (times and counts divided by
  the `steps` traced)."""
  with gzip.open(trace_file(trace_dir), "rt") as f:
    trace = json.load(f)
  events = device_events(trace)
  by_name: dict[str, float] = collections.defaultdict(float)
  count: collections.Counter = collections.Counter()
  for e in events:
    name = _base_name(e.get("name", "?"))
    by_name[name] += e["dur"] / 1e3 / steps       # us -> ms per step.
    count[name] += 1
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, ms in by_name.items():
    by_kind[kind_of(name)] += ms
  top = sorted(by_name.items(), key=lambda kv: -kv[1])
  span = (max(e["ts"] + e["dur"] for e in events)
          - min(e["ts"] for e in events)) if events else 0.0
  return {"total_ms": sum(by_name.values()),
          "busy_ms": busy_us(events) / 1e3 / steps,
          "span_ms": span / 1e3 / steps, "kernels": len(events) / steps,
          "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
          "top": [(n, kind_of(n), ms, count[n] / steps) for n, ms in top]}


def format_summary(summary: dict, top: int = 25) -> str:
  total = summary["total_ms"] or float("nan")
  lines = [f"device time per step: {summary['total_ms']:.2f} ms (summed over "
           "tracks; overlapping streams count twice)",
           f"busy {summary['busy_ms']:.2f} ms of a {summary['span_ms']:.2f} ms "
           f"span per step ({summary['kernels']:.0f} device ops): idle "
           f"{summary['span_ms'] - summary['busy_ms']:.2f} ms"]
  for kind, ms in summary["by_kind"].items():
    lines.append(f"  {kind:20s} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
  lines.append(f"top {top} kernels/ops:")
  for name, kind, ms, n in summary["top"][:top]:
    lines.append(f"  {ms:9.3f} ms {100 * ms / total:5.1f}% x{n:<5.1f} "
                 f"[{kind}] {name[:90]}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--steps", type=int, default=1,
                      help="steps in the trace (totals are divided by it)")
  args = parser.parse_args(argv)
  print(format_summary(summarize(args.trace_dir, args.steps), args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
