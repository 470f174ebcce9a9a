r"""The whole stack in one command: every stage in order, the evaluations, and
an HTML report.

  python -m tools.stack --variant cpu [--runs runs/cpu] [--stages 1,2] \
      [--config.data.manifest=/data/echo/vox2/manifest.tsv ...]

Stages are the files `experiments/stage<N>_*.py`, run in order of N as
`python -m echo_jax.main --config=FILE:VARIANT --workdir=<runs>/stage<N>`
(any `--config.<field>=<value>` given here goes to every stage whose config
has that field; one that no selected stage has is an error). Each resumes
from its workdir; a finished one (its `total_steps` checkpoint saved) is
skipped. Each stage's output goes to the console and to
`<runs>/logs/<stage>.log`. Then the evaluations of
`echo_jax/report/evaluations.py` (blind diarization of the last stage that
can diarize; cached while the checkpoint is unchanged), then
`<runs>/report/index.html` with its PNGs (`echo_jax/report/sections.py`).

Exit status: 0 done; a failed stage stops the stack with that stage's
status (75: preempted after saving, rerun the same command to resume); 1 if a
report section failed (the page shows which). SIGTERM is passed on to the
running stage, which saves and exits 75.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax

from echo_jax import checkpointing, trainer
from echo_jax.report import evaluations, page, sections
from echo_jax.report import stages as stages_lib
from tools import cli
from tools import report as console_report

_log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")

# (stage, variant, workdir, overrides, log path) -> exit status.
Runner = Callable[[stages_lib.Stage, str, str, Sequence[str], str], int]


# An absl log line: level letter, date, time, thread, file:line] message.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] (.*)$")
_STEP_LINE = re.compile(r"^step (\d+): (.*)$")
_PER_LAYER = re.compile(r"_L\d+_")


def _read_only_note(message: str) -> bool:
  # Orbax warns each time a checkpoint is opened read-only, as init_from,
  # the evaluations and the report do: nothing to act on.
  return "read_only=True" in message or "read only" in message


def console_line(line: str) -> str | None:
  """What the console shows of a stage's output line (the log keeps all):
  warnings and errors; per logged step the loss; evaluations without their
  per-layer values. None: log only (config dump, info chatter)."""
  match = _ABSL_LINE.match(line.rstrip("\n"))
  if not match:
    return None
  level, message = match.groups()
  if level != "I":
    return None if _read_only_note(message) else f"{level} {message}"
  step = _STEP_LINE.match(message)
  if not step:
    return None
  values = dict(item.split("=", 1) for item in step.group(2).split(" ")
                if "=" in item)
  if "train/loss" in values:
    keep = ("train/loss", "perf/steps_per_s")
  else:
    keep = tuple(k for k in values if not _PER_LAYER.search(k))
  return f"step {step.group(1)}: " + " ".join(
      f"{k}={values[k]}" for k in keep if k in values)


def run_stage_subprocess(stage: stages_lib.Stage, variant: str, workdir: str,
                         overrides: Sequence[str], log_path: str) -> int:
  """`python -m echo_jax.main` for the stage: its output to the log, and in
  short (`console_line`, prefixed with the stage) to the console; SIGTERM is
  forwarded to it."""
  command = [sys.executable, "-m", "echo_jax.main",
             f"--config={stage.config_path}:{variant}",
             f"--workdir={os.path.abspath(workdir)}", *overrides]
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    previous = signal.signal(
        signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    try:
      for line in process.stdout:
        log.write(line)
        log.flush()
        short = console_line(line)
        if short is not None:
          print(f"[{stage.name}] {short}", flush=True)
      return process.wait()
    finally:
      signal.signal(signal.SIGTERM, previous)


def run_stage_in_process(stage: stages_lib.Stage, variant: str, workdir: str,
                         overrides: Sequence[str], log_path: str, *,
                         mesh: jax.sharding.Mesh | None = None) -> int:
  """`trainer.train` in this process (tests: no second JAX start-up), with
  the exit statuses of `echo_jax.main`; the log gets this stage's records.
  `mesh`: the trainer's (None: from the config)."""
  handler = logging.FileHandler(log_path)
  handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
  logging.getLogger().addHandler(handler)
  try:
    trainer.train(stages_lib.load_config(stage, variant, overrides), workdir,
                  mesh=mesh)
  except trainer.Preempted as e:
    logging.warning("%s", e)
    return trainer.EXIT_PREEMPTED
  except (trainer.NonFiniteLossError, checkpointing.CheckpointSaveError) as e:
    logging.error("%s", e)
    return 1
  except Exception:  # noqa: BLE001 - a crash, as a subprocess would report.
    logging.exception("%s crashed.", stage.name)
    return 1
  finally:
    logging.getLogger().removeHandler(handler)
    handler.close()
  return 0


def _tail(path: str, lines: int = 15) -> str:
  with open(path, errors="replace") as f:
    return "".join(collections.deque(f, maxlen=lines))


def train_stages(variant: str, runs: str, selected: Sequence[stages_lib.Stage],
                 overrides: Sequence[str], runner: Runner,
                 timings: dict[str, float]) -> int:
  """Runs the selected stages in order; returns 0 or the failed status."""
  os.makedirs(os.path.join(runs, "logs"), exist_ok=True)
  for stage in selected:
    mine = stages_lib.stage_overrides(stage, variant, overrides)
    config = stages_lib.load_config(stage, variant, mine)
    workdir = stage.workdir(runs)
    step = stages_lib.latest_step(workdir)
    if stages_lib.is_finished(workdir, config):
      _log.info("%s: finished (step %d of %d) in %s; skipped.", stage.name,
                step, config.total_steps, workdir)
      continue
    log_path = os.path.join(runs, "logs", f"{stage.name}.log")
    _log.info("%s: %s, %d steps, in %s (log: %s).", stage.name,
              f"resuming at step {step}" if step else "training",
              config.total_steps, workdir, log_path)
    tick = time.time()
    status = runner(stage, variant, workdir, mine, log_path)
    timings[stage.name] = time.time() - tick
    if status == trainer.EXIT_PREEMPTED:
      _log.warning("%s was preempted after saving its checkpoint; rerun the "
                   "same command to resume. Log: %s", stage.name, log_path)
      return status
    if status != 0:
      _log.error("%s failed (exit status %d); the stack stopped there. Its "
                 "log: %s\n--- last lines ---\n%s", stage.name, status,
                 log_path, _tail(log_path))
      return status
    _log.info("%s: done in %.1f min.", stage.name, timings[stage.name] / 60)
  return 0


def summary_lines(runs: Sequence[stages_lib.StageRun], records: dict,
                  timings: dict[str, float]) -> list[str]:
  """The console summary: held-out speaker numbers per stage, DER, times."""
  lines = []
  for run in runs:
    lines += console_report.summarize(run.workdir)
  diarization = records.get("diarization")
  if diarization:
    r = diarization["results"]
    blind = {c: r["blind"][f"collar_{c:.2f}"]["der"] for c in (0.0, 0.25)}
    lines.append(
        f"{diarization['stage']}: blind DER {100 * blind[0.25]:.1f}% at "
        f"collar 0.25 s ({100 * blind[0.0]:.1f}% at 0), speaker count "
        f"accuracy {100 * r['blind']['count']['accuracy']:.0f}% on "
        f"{r['num_mixtures']} held-out mixtures")
    if "overlap_aware" in r:
      overlap = {c: r["overlap_aware"][f"collar_{c:.2f}"]["der"]
                 for c in (0.0, 0.25)}
      lines.append(
          f"{diarization['stage']}: overlap-aware DER {100 * overlap[0.0]:.1f}%"
          f" at collar 0 ({100 * overlap[0.25]:.1f}% at 0.25 s), speaker count"
          f" accuracy {100 * r['overlap_aware']['count']['accuracy']:.0f}%")
  for record in records.values():  # Evaluations that bring their own lines.
    lines += record.get("summary", [])
  if timings:
    lines.append("Time this run: " + ", ".join(
        f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items()))
  return lines


def run_stack(variant: str, runs: str, *,
              stage_numbers: Sequence[int] | None = None,
              overrides: Sequence[str] = (),
              experiments_dir: str = EXPERIMENTS,
              runner: Runner = run_stage_subprocess) -> int:
  """Trains, evaluates and reports; returns the exit status."""
  discovered = stages_lib.discover(experiments_dir)
  if stage_numbers is not None:
    unknown = sorted(set(stage_numbers) - {s.number for s in discovered})
    if unknown:
      raise ValueError(f"--stages {unknown}: no such stage; found "
                       f"{[s.name for s in discovered]}.")
  selected = [s for s in discovered
              if stage_numbers is None or s.number in stage_numbers]
  applied = {o for s in selected
             for o in stages_lib.stage_overrides(s, variant, overrides)}
  unused = [o for o in overrides if o not in applied]
  if unused:
    raise ValueError(f"{unused}: no selected stage's config has these "
                     f"fields (stages {[s.name for s in selected]}).")
  timings: dict[str, float] = {}
  status = train_stages(variant, runs, selected, overrides, runner, timings)
  if status:
    return status

  # The report covers every stage that has a run, selected or not.
  trained = [stages_lib.StageRun.read(
      s, runs, stages_lib.load_config(
          s, variant, stages_lib.stage_overrides(s, variant, overrides)))
             for s in discovered
             if os.path.exists(os.path.join(s.workdir(runs), "metrics.jsonl"))]
  tick = time.time()
  records = evaluations.run_all(trained, runs, variant)
  timings["evaluations"] = time.time() - tick
  tick = time.time()
  context = page.Context(runs=runs, out_dir=os.path.join(runs, "report"),
                         variant=variant, stages=tuple(trained),
                         evaluations=records)
  summary = summary_lines(trained, records, {})
  path, failed = page.write(context, sections.SECTIONS, summary)
  timings["report"] = time.time() - tick
  print("\n".join(summary_lines(trained, records, timings)))
  print(f"Report: {os.path.abspath(path)}")
  if failed:
    _log.error("Report sections %s failed (tracebacks above and on the page)."
               , failed)
    return 1
  return 0


def _stage_numbers(text: str) -> list[int]:
  try:
    return [int(n) for n in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected stage numbers like 1,2; found {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace,
                                                   list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="cpu",
                      help="smoke, cpu or canonical (experiments/common.py)")
  parser.add_argument("--runs", default=None,
                      help="where the stage workdirs go (default runs/VARIANT)")
  parser.add_argument("--stages", default=None, type=_stage_numbers,
                      help="comma-separated stage numbers to train (default "
                      "all); the report covers every stage with a run")
  parser.add_argument("--in_process", action="store_true",
                      help="train in this process instead of a subprocess "
                      "per stage (saves a JAX start-up; for tests)")
  args, overrides = parser.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad}; stage settings go as "
                 "--config.<field>=<value>.")
  return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
  cli.setup_logging(__name__, "echo_jax")
  logging.getLogger("absl").addFilter(
      lambda record: not _read_only_note(record.getMessage()))
  args, overrides = parse_args(argv)
  return run_stack(
      args.variant, args.runs or os.path.join("runs", args.variant),
      stage_numbers=args.stages, overrides=overrides,
      runner=run_stage_in_process if args.in_process else run_stage_subprocess)


if __name__ == "__main__":
  sys.exit(main())
