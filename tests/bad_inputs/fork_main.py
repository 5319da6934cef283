r"""Runs `mmssl_jax.main` once per job, each in its own forked process.

  python tests/bad_inputs/fork_main.py JOBS.json RESULTS.json

JOBS.json is a list of {"argv": [...], "stderr": path, "stdout": path}. The
parent imports mmssl_jax.main once (about a second of imports, mostly JAX)
and forks a child per job; the child points file descriptors 1 and 2 at the
job's files and calls `absl.app.run(main)` with the job's argv, exactly what
`python -m mmssl_jax.main ARGV` does after its imports. No JAX computation
runs before the fork (importing JAX does not start its backend). RESULTS.json
receives the exit status of each job.
"""

import json
import os
import sys


def _child(job) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from mmssl_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  for fd, key in ((1, "stdout"), (2, "stderr")):
    out = os.open(job[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, fd)
    os.close(out)
  sys.argv = ["mmssl_jax.main", *job["argv"]]
  status = 0
  try:
    app.run(main_lib.main)
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None
                                                     else 1)
  except BaseException:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    status = 70
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def main() -> None:
  with open(sys.argv[1]) as f:
    jobs = json.load(f)
  from mmssl_jax import main as _  # pylint: disable=g-import-not-at-top,unused-import
  statuses = []
  for job in jobs:
    pid = os.fork()
    if pid == 0:
      _child(job)
    _, wait_status = os.waitpid(pid, 0)
    statuses.append(os.waitstatus_to_exitcode(wait_status))
  with open(sys.argv[2], "w") as f:
    json.dump(statuses, f)


if __name__ == "__main__":
  main()
