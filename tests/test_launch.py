"""The multi-host launchers (launch/), without a cluster.

* `bash -n` on every launch script (and benchmarks/gpu_suite.sh).
* launch/slurm.sbatch `DRY_RUN=1`: the srun line (explicit task counts, no
  per-task GPU binding) and one environment per task; under each printed
  environment JAX's own Slurm detection
  (`jax._src.clusters.ClusterEnv.auto_detect_unset_distributed_params`, as
  `jax.distributed.initialize()` calls it) must give the coordinator,
  process id, process count and local device ids the script claims, and the
  local device must be one of the GPUs the task sees.
* launch/tpu_pod.sh `DRY_RUN=1`: prints the gcloud commands (and never
  calls gcloud); extra arguments with spaces, quotes and `$` reach the
  worker's command intact.
* launch/tpu_pod.sh for real against a stand-in `gcloud` that runs the
  remote commands on this machine (a fake worker home): two SYNC=1 runs
  leave one clean copy of the repository (no nesting, deleted files gone),
  the worker process is started detached with JAX_PLATFORMS=tpu and the
  exact arguments, keeps running after the launcher returns, and STOP=1
  stops it with SIGTERM; the dry run printed the same gcloud commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shlex
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "launch" / "slurm.sbatch"
TPU = REPO / "launch" / "tpu_pod.sh"

EXTRA_ARGS = ["--config.train.note=it's a \"quoted\" value",
              "two words", "$HOME/x;echo hi", "back\\slash"]


def _clean_env(**extra: str) -> dict[str, str]:
  """os.environ without SLURM_*/JAX_* variables, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "SRUN_", "JAX_"))}
  for k in ("DRY_RUN", "SYNC", "STOP", "CONFIG", "WORKDIR", "DATA_DIR",
            "PROJECT", "REMOTE_DIR", "LOG_DIR", "PYTHON", "REPO"):
    env.pop(k, None)
  env.update(extra)
  return env


@pytest.mark.parametrize("script", [
    "launch/slurm.sbatch", "launch/tpu_pod.sh", "launch/local_multiprocess.sh",
    "benchmarks/gpu_suite.sh"])
def test_bash_syntax(script):
  proc = subprocess.run(["bash", "-n", str(REPO / script)],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------
# SLURM


def _slurm_dry_run(*args: str, **env: str) -> list[str]:
  proc = subprocess.run(
      ["bash", str(SLURM), *args], cwd=REPO,
      env=_clean_env(DRY_RUN="1", **env), capture_output=True, text=True,
      timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def _parse_tasks(lines: list[str]) -> list[tuple[dict, dict]]:
  """(environment, claims) of each `task ...` line."""
  tasks = []
  for line in lines:
    if not line.startswith("task "):
      continue
    env_part, claims_part = line[len("task "):].split(" | ")
    env = dict(kv.split("=", 1) for kv in env_part.split())
    claims = dict(kv.split("=", 1) for kv in claims_part.split())
    tasks.append((env, claims))
  return tasks


def _jax_detects(task_env: dict[str, str]):
  """What jax.distributed.initialize() derives under this environment."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in task_env.items() if k != "node"}
  with mock.patch.dict(os.environ, env, clear=True):
    assert slurm_cluster.SlurmCluster.is_env_present()
    # The arguments jax.distributed.initialize() passes when called with
    # none (jax/_src/distributed.py), cluster detection left automatic.
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300)


def _check_tasks(tasks, nodes: int, per_node: int, gpus: int):
  assert len(tasks) == nodes * per_node
  seen = set()
  for env, claims in tasks:
    node, local = env["node"], int(env["SLURM_LOCALID"])
    seen.add((node, local))
    assert env["JAX_PLATFORMS"] == "cuda"
    assert env["SLURM_NTASKS"] == str(nodes * per_node)
    assert env["SLURM_STEP_NODELIST"] == env["SLURM_JOB_NODELIST"]
    # Every task sees all the GPUs of its node.
    visible = env["CUDA_VISIBLE_DEVICES"].split(",")
    assert visible == [str(g) for g in range(gpus)]
    coordinator, count, pid, local_ids = _jax_detects(env)
    assert coordinator == claims["coordinator"]
    assert coordinator.startswith("node001:")
    assert count == int(claims["num_processes"]) == nodes * per_node
    assert pid == int(claims["process_id"]) == int(env["SLURM_PROCID"])
    assert local_ids == [int(claims["local_device_ids"])] == [local]
    # jax.distributed sets jax_cuda_visible_devices to local_device_ids:
    # an index into the GPUs the process sees, which must exist.
    assert all(i < len(visible) for i in local_ids)
    assert claims["gpu"] == f"{node}:{visible[local_ids[0]]}"
  assert sorted(int(e["SLURM_PROCID"]) for e, _ in tasks) == list(
      range(nodes * per_node))
  assert seen == {(f"node{n:03d}", l) for n in range(1, nodes + 1)
                  for l in range(per_node)}


def test_slurm_dry_run_matches_jax_detection():
  lines = _slurm_dry_run(*EXTRA_ARGS, DATA_DIR="/data/my sports")
  srun = [l for l in lines if l.startswith("srun ")]
  assert len(srun) == 1
  argv = shlex.split(srun[0])
  assert argv[:7] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none",
                      "--nodes=2", "--ntasks=16", "--ntasks-per-node=8",
                      "python3"]
  assert not any(a.startswith("--gpus-per-task") for a in argv)
  assert argv[7:11] == ["-m", "mmssl_jax.main", "--distributed",
                        "--config=configs/tiktok.py"]
  assert "--config.train.data_parallel=0" in argv
  assert "--config.data.dir=/data/my sports" in argv
  assert argv[-len(EXTRA_ARGS):] == EXTRA_ARGS
  assert "# exported: JAX_PLATFORMS=cuda SRUN_CPUS_PER_TASK=8" in lines
  # The #SBATCH header: 2 nodes x 8 tasks, 8 GPUs per node.
  tasks = _parse_tasks(lines)
  _check_tasks(tasks, nodes=2, per_node=8, gpus=8)
  assert {e["SLURM_STEP_NODELIST"] for e, _ in tasks} == {"node[001-002]"}


def test_slurm_dry_run_env_overrides():
  lines = _slurm_dry_run(SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="4",
                         SLURM_GPUS_PER_NODE="a100:4", SLURM_JOB_ID="123457",
                         SLURM_CPUS_PER_TASK="3")
  tasks = _parse_tasks(lines)
  _check_tasks(tasks, nodes=1, per_node=4, gpus=4)
  assert tasks[0][0]["SLURM_STEP_NODELIST"] == "node001"
  assert tasks[0][1]["coordinator"] == f"node001:{123457 % 4096 + 61440}"
  assert "# exported: JAX_PLATFORMS=cuda SRUN_CPUS_PER_TASK=3" in lines


def test_slurm_refuses_bad_shapes_and_no_job():
  proc = subprocess.run(
      ["bash", str(SLURM)], cwd=REPO,
      env=_clean_env(DRY_RUN="1", SLURM_NTASKS_PER_NODE="4"),
      capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2
  assert "4 tasks per node but 8 GPUs per node" in proc.stderr
  proc = subprocess.run(
      ["bash", str(SLURM)], cwd=REPO, env=_clean_env(CONFIG="c", WORKDIR="w"),
      capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr


# ----------------------------------------------------------------------------
# TPU pod

FAKE_GCLOUD = r'''#!{python}
"""Stand-in gcloud: `compute tpus tpu-vm scp|ssh` on one local fake worker."""
import json, os, shutil, subprocess, sys
home = os.environ["FAKE_WORKER_HOME"]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
flags = [a for a in args[4:] if a.startswith("--")]
plain = [a for a in args[4:] if not a.startswith("--")]
assert "--worker=all" in flags, args
if args[3] == "scp":
  src, dest = plain
  shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
elif args[3] == "ssh":
  command = next(a for a in flags if a.startswith("--command="))
  env = dict(os.environ, HOME=home)
  sys.exit(subprocess.run(["bash", "-c", command[len("--command="):]],
                          cwd=home, env=env).returncode)
else:
  sys.exit(f"fake gcloud: unexpected {args}")
'''

FAKE_PYTHON = r'''#!{python}
"""Stand-in worker python: records its argv; `-m mmssl_jax.main` then waits
for SIGTERM (as a training run would) and exits 143."""
import json, os, signal, sys, time
if sys.argv[1:3] == ["-m", "pip"]:
  sys.exit(0)
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS")}),
      flush=True)
def stop(*_):
  print("stopped by SIGTERM", flush=True)
  sys.exit(143)
signal.signal(signal.SIGTERM, stop)
deadline = time.time() + float(os.environ.get("FAKE_RUN_S", "0"))
while time.time() < deadline:
  time.sleep(0.05)
'''


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text.replace("{python}", sys.executable))
  path.chmod(0o755)
  return path


def _git(repo: Path, *args: str):
  subprocess.run(["git", "-C", str(repo), *args], check=True,
                 capture_output=True)


def _tpu_env(tmp: Path, **extra: str) -> dict[str, str]:
  bin_dir = tmp / "bin"
  env = _clean_env(
      PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="my-pod",
      ZONE="us-west4-a", PROJECT="proj", CONFIG="configs/sports.py:variant=paper",
      WORKDIR="/mnt/my runs/sports", DATA_DIR="/mnt/data/sports",
      FAKE_WORKER_HOME=str(tmp / "worker"),
      FAKE_GCLOUD_LOG=str(tmp / "gcloud.jsonl"),
      PYTHON=str(tmp / "bin" / "fake_python"), START_CHECK_S="1")
  env.update(extra)
  return env


def _setup_tpu(tmp: Path) -> Path:
  (tmp / "bin").mkdir()
  (tmp / "worker").mkdir()
  _write_exe(tmp / "bin" / "gcloud", FAKE_GCLOUD)
  _write_exe(tmp / "bin" / "fake_python", FAKE_PYTHON)
  src = tmp / "src"
  (src / "pkg").mkdir(parents=True)
  (src / "a.txt").write_text("a")
  (src / "pkg" / "b.py").write_text("b = 1")
  (src / ".gitignore").write_text("ignored.bin\n")
  (src / "ignored.bin").write_text("x")
  _git(src, "init", "-q")
  _git(src, "add", ".")
  _git(src, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
       "-m", "init")
  return src


def _expected_main_argv():
  return ["-m", "mmssl_jax.main", "--distributed",
          "--config=configs/sports.py:variant=paper",
          "--workdir=/mnt/my runs/sports", "--config.train.data_parallel=0",
          "--config.data.dir=/mnt/data/sports", *EXTRA_ARGS]


def _gcloud_lines(stdout: str) -> list[list[str]]:
  return [shlex.split(l) for l in stdout.splitlines()
          if l.strip() and not l.startswith("#")]


def test_tpu_dry_run_prints_commands_with_arguments_intact(tmp_path):
  src = _setup_tpu(tmp_path)
  proc = subprocess.run(
      ["bash", str(TPU), *EXTRA_ARGS], cwd=tmp_path,
      env=_tpu_env(tmp_path, DRY_RUN="1", SYNC="1", PYTHON="python3",
                   REPO=str(src)),
      capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  assert not (tmp_path / "gcloud.jsonl").exists()  # gcloud never called
  cmds = _gcloud_lines(proc.stdout)
  assert [c[:5] for c in cmds] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  for c in cmds:
    assert "--worker=all" in c and "--zone=us-west4-a" in c
    assert "--project=proj" in c
  start = next(a for a in cmds[2] if a.startswith("--command="))
  words = shlex.split(start[len("--command="):])
  assert "JAX_PLATFORMS=tpu" in words and "setsid" in words
  first = words.index("-m")
  assert words[first - 1] == "python3"
  assert words[first:words.index("<")] == _expected_main_argv()
  sync = next(a for a in cmds[1] if a.startswith("--command="))
  assert "rm -rf \"$t\"; mv \"$t.sync\" \"$t\"" in sync
  assert "pip install -q -e '.[tpu]'" in sync


def test_tpu_sync_twice_start_and_stop(tmp_path):
  src = _setup_tpu(tmp_path)
  worker = tmp_path / "worker"
  log = worker / "mmssl_jax_logs" / f"{socket.gethostname()}.log"
  pid_file = log.with_suffix(".pid")

  def launch(**extra):
    return subprocess.run(
        ["bash", str(TPU), *EXTRA_ARGS], cwd=tmp_path,
        env=_tpu_env(tmp_path, REPO=str(src), **extra), capture_output=True,
        text=True, timeout=60, check=False)

  running = None  # the long-running stand-in worker, killed if left over
  try:
    # First sync and start; the worker exits at once (status 0).
    proc = launch(SYNC="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in worker.iterdir()) == [
        "mmssl_jax", "mmssl_jax_logs"]
    # Second sync after deleting and adding files: a clean copy, no nesting.
    (src / "a.txt").unlink()
    (src / "c.txt").write_text("c")  # untracked, not ignored: copied
    proc = launch(SYNC="1", FAKE_RUN_S="30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = worker / "mmssl_jax"
    files = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    assert files == [".gitignore", "c.txt", "pkg", "pkg/b.py"]
    assert sorted(p.name for p in worker.iterdir()) == [
        "mmssl_jax", "mmssl_jax_logs"]  # no .sync folder, no tarball left
    # The worker still runs after the launcher (its "ssh") returned.
    pid = running = int(pid_file.read_text())
    os.kill(pid, 0)
    records = [json.loads(l) for l in log.read_text().splitlines()
               if l.startswith("{")]
    assert len(records) == 2  # appended
    for rec in records:
      assert rec["argv"] == _expected_main_argv()
      assert rec["JAX_PLATFORMS"] == "tpu"
      assert Path(rec["cwd"]).resolve() == copy.resolve()
    # STOP=1: SIGTERM on every worker.
    proc = launch(STOP="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline = time.time() + 10
    while "stopped by SIGTERM" not in log.read_text():
      assert time.time() < deadline, log.read_text()
      time.sleep(0.1)
    # The dry run printed the same gcloud commands (the tarball's local
    # path aside).
    calls = [json.loads(l) for l in
             (tmp_path / "gcloud.jsonl").read_text().splitlines()]
    dry = subprocess.run(
        ["bash", str(TPU), *EXTRA_ARGS], cwd=tmp_path,
        env=_tpu_env(tmp_path, REPO=str(src), SYNC="1", DRY_RUN="1"),
        capture_output=True, text=True, timeout=60, check=False)
    printed = [c[1:] for c in _gcloud_lines(dry.stdout)]
    real = calls[3:6]  # the second launch: scp, sync, start
    assert printed[1:] == real[1:]
    assert printed[0][:-2] == real[0][:-2]
    assert printed[0][-1] == real[0][-1] == "my-pod:mmssl_jax.sync.tar.gz"
  finally:
    if running is not None:
      try:
        cmdline = Path(f"/proc/{running}/cmdline").read_bytes()
      except OSError:
        cmdline = b""
      if b"fake_python" in cmdline:
        os.kill(running, signal.SIGKILL)
