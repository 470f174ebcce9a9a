"""SIGTERM handling: the local flag, and two JAX processes on loopback that
stop and save at the same step when only one of them gets SIGTERM.

The multi-process tests start real `jax.distributed` processes (4 fake CPU
devices each, gloo collectives) as subprocesses; every wait has a deadline and
the children are killed in `finally`, so a hang fails instead of blocking.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from echo_jax import preemption, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(**extra) -> dict:
  env = dict(os.environ)
  # Replaces (not extends) conftest's 8 devices. The two CPU flags only make
  # XLA compile faster; the processes compile at the same time on few cores.
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=4 "
             "--xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true", **extra)
  return env


def start(args, log_path, env):
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def read(path) -> str:
  with open(path) as f:
    return f.read()


def wait_until(condition, procs, logs, timeout, what):
  deadline = time.time() + timeout
  while not condition():
    for p, log in zip(procs, logs):
      if p.poll() is not None:
        pytest.fail(f"process exited ({p.returncode}) before {what}:\n"
                    + read(log)[-3000:])
    if time.time() > deadline:
      pytest.fail(f"timed out after {timeout}s waiting for {what}:\n"
                  + "\n".join(read(log)[-2000:] for log in logs))
    time.sleep(0.2)


def wait_all(procs, logs, timeout):
  deadline = time.time() + timeout
  for p, log in zip(procs, logs):
    try:
      p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      pytest.fail(f"a process did not exit within {timeout}s of SIGTERM:\n"
                  + "\n".join(read(log)[-2000:] for log in logs))


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


# --- One process: the flag. ---------------------------------------------------


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption() as p:
    assert not p.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # Handled before the next bytecode.
    assert p.requested
    assert p.should_stop(2) and p.should_stop(3)
  assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigterm_kills_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from echo_jax import preemption
      with preemption.Preemption() as p:
        os.kill(os.getpid(), signal.SIGTERM)
        print("flagged", p.should_stop(1), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
      print("survived", flush=True)
  """)
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        env=child_env(), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
  assert "flagged True" in done.stdout and "survived" not in done.stdout


# --- Two processes: the same stop step. --------------------------------------

# A training-like loop: one cross-process computation per step.
LOOP = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    port, process_id = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id)
    from echo_jax import preemption
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    x = jax.device_put(jnp.zeros(jax.device_count()),
                       NamedSharding(mesh, P("d")))
    step_fn = jax.jit(lambda x: x + jnp.sum(x))
    step = 0
    with preemption.Preemption(sync_every=5) as p:
      while step < 3000:
        x = step_fn(x)
        step += 1
        print("step", step, flush=True)
        if p.should_stop(step):
          print("stopped at", step, flush=True)
          break
        time.sleep(0.01)
""")


@pytest.mark.parametrize("sync_manager", [True, False],
                         ids=["sync_manager", "allgather"])
def test_two_processes_stop_at_the_same_step(tmp_path, sync_manager):
  # Without JAX's preemption service the flags are all-gathered every 5 steps.
  env = child_env(JAX_ENABLE_PREEMPTION_SERVICE=str(sync_manager).lower())
  port = free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      procs.append(start(["-c", LOOP, str(port), str(i)], logs[i], env))
    wait_until(lambda: all("step 20\n" in read(log) for log in logs),
               procs, logs, 120, "20 steps in both processes")
    signalled_at = max(int(n) for log in logs
                       for n in re.findall(r"^step (\d+)$", read(log), re.M))
    procs[1].send_signal(signal.SIGTERM)
    wait_all(procs, logs, 60)
    assert [p.returncode for p in procs] == [0, 0]
    stops = [re.findall(r"^stopped at (\d+)$", read(log), re.M)
             for log in logs]
    assert stops[0] and stops[0] == stops[1], stops
    stop = int(stops[0][0])
    assert signalled_at <= stop < 3000
    assert "SIGTERM: saving" in read(logs[1])
    assert "SIGTERM: saving" not in read(logs[0])
    if not sync_manager:
      assert stop % 5 == 0
  finally:
    kill_all(procs)


# Stage 1 smoke without evaluators (they would only add start-up time).
CONFIG = textwrap.dedent("""
    from experiments import stage1_jepa

    def get_config(arg=None):
      config = stage1_jepa.get_config("smoke")
      with config.unlocked():
        config.evals = {}
        config.progress = False
      return config
""")


def metric_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.endswith("\n")]
  return [r["step"] for r in rows if "train/loss" in r]


def launch_and_preempt(tmp_path, name, config_path, workdir, manifest,
                       signalled: int) -> tuple[int, list[str]]:
  """Trains on two processes until SIGTERM to process `signalled` stops them.

  Returns the step both stopped at and the two logs.
  """
  port = free_port()
  logs = [tmp_path / f"{name}_process_{i}.log" for i in range(2)]
  steps_before = len(metric_steps(workdir))
  procs = []
  try:
    for i in range(2):
      procs.append(start(
          ["-m", "echo_jax.main", f"--config={config_path}",
           f"--workdir={workdir}", "--config.total_steps=200",
           # Metrics every step (written by process 0) show the progress.
           "--config.log_every=1", "--config.checkpoint.every=100000",
           f"--config.data.manifest={manifest}", "--distributed",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"], logs[i], child_env()))
    # Process 0 writes metrics.jsonl; a step is a collective, so the other
    # process is training too. Compiling takes most of the time.
    wait_until(lambda: len(metric_steps(workdir)) >= steps_before + 2, procs,
               logs, 300, "two training steps")
    procs[signalled].send_signal(signal.SIGTERM)
    wait_all(procs, logs, 120)
    texts = [read(log) for log in logs]
    # A preempted run exits with its own code on every host, not 0.
    assert [p.returncode for p in procs] == [trainer.EXIT_PREEMPTED] * 2, [
        t[-3000:] for t in texts]
  finally:
    kill_all(procs)
  stops = [re.findall(r"Stopped at step (\d+) after SIGTERM", t)
           for t in texts]
  assert stops[0] and stops[0] == stops[1], stops
  assert "SIGTERM: saving" in texts[signalled]
  assert "SIGTERM: saving" not in texts[1 - signalled]
  stop = int(stops[0][0])
  assert metric_steps(workdir)[-1] == stop
  # Both hosts saved the stop step, each its own data iterator.
  assert sorted(os.listdir(workdir / "checkpoints" / str(stop) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  return stop, texts


@pytest.mark.slow
def test_trainer_stops_every_host_at_the_same_step_and_resumes(tmp_path):
  """Stage-1 smoke on two processes: SIGTERM to process 1 only; then a second
  launch resumes from that step and SIGTERM to process 0 only."""
  from data_pipelines import default_corpus
  # Built (or found in the cache) once here, not raced by the children.
  manifest = default_corpus.ensure_default_corpus(size="tiny")
  config_path = tmp_path / "config.py"
  config_path.write_text(CONFIG)
  workdir = tmp_path / "run"

  first, _ = launch_and_preempt(tmp_path, "first", config_path, workdir,
                                manifest, signalled=1)
  assert 2 <= first < 200
  second, texts = launch_and_preempt(tmp_path, "second", config_path, workdir,
                                     manifest, signalled=0)
  assert all(f"at step {first}." in t for t in texts)  # "Resumed ... at step"
  assert first < second < 200
  steps = metric_steps(workdir)
  assert steps == list(range(1, second + 1))  # Continued from `first`.
