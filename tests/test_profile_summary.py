"""tools/profile_summary.py on a hand-made Perfetto trace."""

import gzip
import json
import os

import pytest

from tools import profile_summary


def _write(tmp_path, events):
  run = tmp_path / "plugins" / "profile" / "run1"
  os.makedirs(run)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  return str(tmp_path)


def _x(name, ts, dur, pid=1, tid=1):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid,
          "tid": tid}


def test_device_kernels_summed_per_step_and_by_kind(tmp_path):
  meta = [{"ph": "M", "name": "process_name", "pid": 1,
           "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2,
           "args": {"name": "/host:CPU"}}]
  events = meta + [
      _x("nvjet_hsh_128x256_1", 0, 3000), _x("nvjet_hsh_128x256_2", 5000, 3000),
      _x("loop_add_fusion_7", 9000, 1000),
      _x("cudnn_fmha_fwd", 10000, 2000, tid=2),
      _x("python_host_work", 0, 50000, pid=2),       # Not a device track.
  ]
  s = profile_summary.summarize(_write(tmp_path, events), steps=2)
  assert s["total_ms"] == pytest.approx((3 + 3 + 1 + 2) / 2)
  # Union of [0,3] [5,8] [9,10] [10,12] ms = 9 ms over a 12 ms span, 2 steps.
  assert s["busy_ms"] == pytest.approx(4.5)
  assert s["span_ms"] == pytest.approx(6.0)
  assert s["kernels"] == 2.0
  assert s["by_kind"] == pytest.approx(
      {"matmul": 3.0, "attention": 1.0, "fusion/elementwise": 0.5})
  name, kind, ms, count = s["top"][0]
  assert (name, kind, ms, count) == ("nvjet_hsh_128x256", "matmul", 3.0, 1.0)
  assert "matmul" in profile_summary.format_summary(s)


def test_enclosing_ops_are_not_counted_twice(tmp_path):
  # A CPU trace: a `cond` op encloses the eigh it runs; only leaves count.
  args = {"args": {"hlo_op": "x"}}
  events = [{**_x("cond.3", 0, 1000), **args},
            {**_x("eigh", 100, 800), **args},
            {**_x("fusion.1", 2000, 500), **args},
            _x("not_an_xla_op", 0, 9000)]
  s = profile_summary.summarize(_write(tmp_path, events))
  assert s["total_ms"] == pytest.approx(1.3)
  assert s["busy_ms"] == pytest.approx(1.3)  # Overlapping leaves once.
  assert [t[0] for t in s["top"]] == ["eigh", "fusion"]


def test_kernels_that_overlap_a_little_are_both_counted(tmp_path):
  # GPU kernel timestamps can overlap by a microsecond; neither holds the
  # other, so both count (an earlier version dropped the first).
  meta = [{"ph": "M", "name": "process_name", "pid": 1,
           "args": {"name": "/device:GPU:0"}}]
  events = meta + [_x("nvjet_a", 0, 1000), _x("loop_add_fusion", 999, 500),
                   _x("input_reduce_fusion", 1498, 500)]
  s = profile_summary.summarize(_write(tmp_path, events))
  assert s["total_ms"] == pytest.approx(2.0)
  assert s["busy_ms"] == pytest.approx(1.998)


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
    profile_summary.summarize(str(tmp_path))
