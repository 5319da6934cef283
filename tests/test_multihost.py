"""Multi-process training through `python -m mmssl_jax.main`.

Two processes x 2 CPU devices, started by launch/local_multiprocess.sh and
joined by jax.distributed on 127.0.0.1 (gloo collectives), train
configs/test.py for 2 epochs with
`train.data_parallel=0` (a 'data' mesh over the 4 devices of both
processes). The reference is one process with 4 simulated devices, same
config and seed, run at the same time as the first 2-process launch.

To keep the file near a minute on 2 cores (each launch compiles the step:
see below), the 2-process run is also the preemption test: process 1 alone
gets SIGTERM after the 25th step (epoch 1, batch 4 of 21). Checked:

* both processes agree to stop at that step boundary, save one checkpoint
  collectively and exit 143 with the same one-line message;
* the same command then resumes (both processes restore the sharded state)
  and its metrics.jsonl (every epoch's loss terms and validation/test
  metrics, and the final record) equals the single-process run's to rtol
  1e-5: the same SPMD program on the same 4-device mesh, but the
  cross-process all-reduces go through gloo, whose summation order may
  differ from the in-process one by float rounding (1e-5 is the tolerance of
  tests/test_parallel.py for one step; observed: 100 of the 110 numbers
  equal, the others within 1.3e-7);
* only process 0 writes: the workdir holds one config.json and one
  metrics.jsonl with exactly one record per epoch plus the final one (two
  writers would duplicate them), and process 1 logs no epoch lines;
* the same 2-process command on the finished workdir trains nothing and
  exits 0 on both processes, leaving metrics.jsonl unchanged;
* errors reach every process: a config differing from the workdir's run
  (found by process 0) and a mesh that leaves out process 1's devices make
  both processes print the same one-line error and exit 1;
* the launcher exits with its processes' non-zero status (143, 1) and 0
  when both succeed.

Every process has a timeout, so a deadlock fails the test instead of
hanging it. No persistent compilation cache
(`helpers.without_compilation_cache`), so every launch compiles.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import helpers
from mmssl_jax import workdir as workdir_lib

REPO = helpers.REPO_ROOT
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
STEPS_PER_EPOCH = 21  # configs/test.py (2 epochs): 669 // 32 + 1
STOP_AFTER = 25  # steps; process 1 alone gets SIGTERM (epoch 1, batch 4)
RTOL = 1e-5
TIMEOUT_S = 240
FLAGS = ["--config=configs/test.py", "--config.train.data_parallel=0"]

# Runs main with process 1 sending itself SIGTERM after STOP_AFTER steps
# (the step is wrapped; nothing else changes).
PREEMPT_ONE = f"""
import os, signal
import jax
from absl import app
from mmssl_jax import main, steps
real_make_step = steps.make_step
def make_step(cfg, **shardings):
  step, calls = real_make_step(cfg, **shardings), [0]
  def hooked(*args):
    out = step(*args)
    calls[0] += 1
    if calls[0] == {STOP_AFTER} and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  return hooked
steps.make_step = make_step
app.run(main.main)
"""


# Runs main with process 1 sending itself SIGTERM while it loads the data
# (before any collective): start-up is covered by the run's signal handling.
PREEMPT_AT_STARTUP = """
import os, signal
import jax
from absl import app
from mmssl_jax import main, run
real_load = run.load
def load(config):
  if jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  return real_load(config)
run.load = load
app.run(main.main)
"""

# Runs main with each process reading its own copy of the data: process i
# reads the folder named by the MMSSL_TEST_DATA_<i> variable.
OWN_DATA = """
import os, sys
from absl import app
from mmssl_jax import main
i = [a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1]
sys.argv.append("--config.data.dir=" + os.environ["MMSSL_TEST_DATA_" + i])
app.run(main.main)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_STARTED = []  # every process started, stopped at the end of the module


def _start(command, env, log_path):
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
  proc.log_path = log_path
  _STARTED.append(proc)
  return proc


def _stop(proc):
  """TERM first: the launcher passes it on to its processes."""
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _stop_leftovers():
  yield
  for proc in _STARTED:
    _stop(proc)


def _wait(proc) -> tuple[int, str]:
  """(exit status, log); stops the process on a timeout."""
  try:
    proc.wait(timeout=TIMEOUT_S + 60)  # the launcher's own limit comes first
  except subprocess.TimeoutExpired:
    _stop(proc)
    raise
  with open(proc.log_path, encoding="utf-8") as f:
    return proc.returncode, f.read()


def _launch_two(workdir, tmp, name, program=("-m", "mmssl_jax.main"),
                flags=FLAGS, extra_env=None):
  """`launch/local_multiprocess.sh PROGRAM FLAGS --workdir=WORKDIR`."""
  log_dir = tmp / f"{name}_logs"
  env = helpers.without_compilation_cache(dict(os.environ, **(extra_env or {})))
  env.update(PYTHON=sys.executable, NUM_PROCESSES="2", DEVICES_PER_PROCESS="2",
             PORT=str(_free_port()), XLA_FLAGS_EXTRA=env.pop("XLA_FLAGS", ""),
             LOG_DIR=str(log_dir), TIMEOUT=str(TIMEOUT_S),
             PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
  proc = _start(["bash", str(LAUNCHER), *program, *flags,
                 f"--workdir={workdir}"], env, tmp / f"{name}.log")
  proc.log_dir = log_dir
  return proc


def _wait_two(launch) -> list[tuple[int, str]]:
  """(exit status, log) of each process of a launch; the launcher exits with
  a non-zero status of its processes (the first), or 0."""
  status, out = _wait(launch)
  failed = {int(i): int(rc) for i, rc in re.findall(
      r"^process (\d+) exited with status (\d+);", out, re.M)}
  results = [(failed.get(i, 0),
              (launch.log_dir / f"process_{i}.log").read_text("utf-8"))
             for i in range(2)]
  assert status in (set(failed.values()) or {0}), out[-3000:]
  return results


def _records(workdir):
  return workdir_lib.read_records(os.path.join(workdir,
                                                 workdir_lib.METRICS_FILE))


def _strip_timing(records):
  return [{k: v for k, v in r.items() if k not in workdir_lib.TIMING_FIELDS}
          for r in records]


@pytest.fixture(scope="module", name="runs")
def runs_fixture(tmp_path_factory):
  """The 1-process run; the preempted, resumed and re-run 2-process runs."""
  tmp = tmp_path_factory.mktemp("multihost")
  workdir = tmp / "two"
  single = _start([sys.executable, "-m", "mmssl_jax.main", *FLAGS,
                   f"--workdir={tmp / 'single'}"],
                  helpers.without_compilation_cache(helpers.device_env(4)),
                  tmp / "single.log")
  preempted = _wait_two(_launch_two(workdir, tmp, "preempted",
                                    program=("-c", PREEMPT_ONE)))
  status, log = _wait(single)
  assert status == 0, log[-3000:]
  records_after_preemption = _records(workdir)
  steps_after_preemption = workdir_lib.checkpoint_steps(workdir)
  resumed = _wait_two(_launch_two(workdir, tmp, "resumed"))
  for i, (status, log) in enumerate(resumed):
    assert status == 0, f"process {i}:\n{log[-3000:]}"
  return dict(tmp=tmp, single=tmp / "single", two=workdir,
              preempted=preempted, resumed=resumed,
              records_after_preemption=records_after_preemption,
              steps_after_preemption=steps_after_preemption)


def test_sigterm_on_one_process_stops_both_at_the_same_step(runs):
  errors = []
  for i, (status, log) in enumerate(runs["preempted"]):
    assert status == 128 + signal.SIGTERM, f"process {i}:\n{log[-3000:]}"
    errors.append([l for l in log.splitlines() if l.startswith("error: ")])
  expected = (f"error: stopped by SIGTERM at step {STOP_AFTER} (epoch 1, "
              f"batch {STOP_AFTER - STEPS_PER_EPOCH} of {STEPS_PER_EPOCH})")
  assert errors[0] == errors[1] and errors[0][0].startswith(expected), errors
  assert runs["steps_after_preemption"] == [STEPS_PER_EPOCH, STOP_AFTER]
  assert [r["epoch"] for r in runs["records_after_preemption"]] == [0]
  assert f"resuming from step {STOP_AFTER}" in runs["resumed"][0][1]


def test_two_processes_equal_one_process_of_as_many_devices(runs):
  one, two = _records(runs["single"]), _records(runs["two"])
  assert [r.get("epoch") for r in two] == [0, 1, None] and two[-1]["final"]
  assert len(one) == len(two)
  for a, b in zip(_strip_timing(one), _strip_timing(two)):
    flat_a = workdir_lib._flatten(a)  # pylint: disable=protected-access
    flat_b = workdir_lib._flatten(b)  # pylint: disable=protected-access
    assert flat_a.keys() == flat_b.keys()
    assert "train/gen" in flat_a or a.get("final")
    for k, v in flat_a.items():
      if isinstance(v, float):
        np.testing.assert_allclose(flat_b[k], v, rtol=RTOL, err_msg=k)
      else:
        assert flat_b[k] == v, k


def test_only_process_0_writes(runs):
  workdir = runs["two"]
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json",
                                         "metrics.jsonl"]
  assert [r.get("epoch") for r in _records(workdir)] == [0, 1, None]
  assert workdir_lib.checkpoint_steps(workdir)[-1] == 2 * STEPS_PER_EPOCH
  (_, log0), (_, log1) = runs["resumed"]
  assert "epoch   1 |" in log0 and "best validation epoch" in log0
  assert "epoch " not in log1 and "best validation" not in log1, log1[-2000:]


def test_rerun_of_a_finished_workdir_returns_the_stored_result(runs):
  workdir, tmp = runs["two"], runs["tmp"]
  before = _records(workdir)
  results = _wait_two(_launch_two(workdir, tmp, "rerun"))
  for i, (status, log) in enumerate(results):
    assert status == 0, f"process {i}:\n{log[-3000:]}"
  assert "holds a complete run" in results[0][1]
  assert _records(workdir) == before


def test_errors_stop_every_process_with_the_same_line(runs):
  """A config that differs from the workdir's run (found by process 0 alone,
  raised on both), and a mesh that leaves process 1 without devices."""
  workdir, tmp = runs["two"], runs["tmp"]
  before = _records(workdir)
  mismatch = _launch_two(workdir, tmp, "mismatch",
                         flags=[*FLAGS, "--config.seed=1"])
  no_mesh = _launch_two(tmp / "no_mesh", tmp, "no_mesh",
                        flags=["--config=configs/test.py"])
  for launch, expected in ((mismatch, "the config differs from the run in "
                           "this workdir in 1 field(s): seed 2022 -> 1"),
                          (no_mesh, "2 processes need a mesh over all 4 "
                           "devices")):
    errors = []
    for i, (status, log) in enumerate(_wait_two(launch)):
      assert status == 1, f"process {i}:\n{log[-3000:]}"
      errors.append([l for l in log.splitlines() if l.startswith("error: ")])
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert expected in errors[0][0], errors
  assert _records(workdir) == before
  assert not (tmp / "no_mesh").exists()


def test_sigterm_during_start_up_stops_both_and_a_rerun_is_exact(runs):
  """SIGTERM to process 1 while it loads the data: both processes stop at
  the first safe point with exit status 143 and the same line, nothing is
  trained; re-running the command trains the run that equals the
  preempted-and-resumed one bit for bit."""
  tmp = runs["tmp"]
  workdir = tmp / "startup"
  stopped = _wait_two(_launch_two(workdir, tmp, "startup",
                                  program=("-c", PREEMPT_AT_STARTUP)))
  errors = []
  for i, (status, log) in enumerate(stopped):
    assert status == 128 + signal.SIGTERM, f"process {i}:\n{log[-3000:]}"
    errors.append([l for l in log.splitlines() if l.startswith("error: ")])
  assert errors[0] == errors[1] == [
      "error: stopped by SIGTERM during start-up (loading the data); nothing "
      "was trained since the last checkpoint; run the same command again to "
      "resume"], errors
  assert not workdir_lib.checkpoint_steps(workdir)
  for i, (status, log) in enumerate(_wait_two(
      _launch_two(workdir, tmp, "startup_rerun"))):
    assert status == 0, f"process {i}:\n{log[-3000:]}"
  assert (_strip_timing(_records(workdir))
          == _strip_timing(_records(runs["two"])))


def test_processes_with_different_data_stop_with_one_line(tmp_path):
  """Two processes given different dataset folders: both stop before
  training with one line naming each process, its host and fingerprint."""
  from mmssl_jax.data import formats  # pylint: disable=g-import-not-at-top
  from mmssl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = helpers.load_config("test")
  env = {}
  for i, seed in enumerate((0, 1)):
    config.data.synthetic.seed = seed
    formats.write_mmssl(synthetic.make_synthetic(config.data.synthetic),
                        tmp_path / f"data_{i}")
    env[f"MMSSL_TEST_DATA_{i}"] = str(tmp_path / f"data_{i}")
  launch = _launch_two(tmp_path / "run", tmp_path, "own_data",
                       program=("-c", OWN_DATA),
                       flags=[*FLAGS, "--config.data.source=folder"],
                       extra_env=env)
  errors = []
  for i, (status, log) in enumerate(_wait_two(launch)):
    assert status == 1, f"process {i}:\n{log[-3000:]}"
    errors.append([l for l in log.splitlines() if l.startswith("error: ")])
  assert errors[0] == errors[1] and len(errors[0]) == 1, errors
  line, host = errors[0][0], socket.gethostname()
  assert line.startswith("error: the processes loaded different data: "
                         f"process 0 ({host}): data_0, fingerprint "), line
  assert f"; process 1 ({host}): data_1, fingerprint " in line, line
  assert not (tmp_path / "run").exists()

