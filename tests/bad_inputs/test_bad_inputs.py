"""Every malformed dataset of the corpus is rejected with one clear line.

In process: `train.train_and_evaluate` raises a one-line DataError (or
ConfigError) naming the file and the problem, before creating the workdir.
Through the CLI: `main` with `--config=configs/tiktok.py
--config.data.dir=<bad> --workdir=<tmp>` exits 1, its stderr's last line
starts with `error:` and names the file and the problem, there is no
traceback, and the workdir is not created. Every case runs `main` in its own
process forked after the imports (`fork_main.py`, ~0.1 s a case instead of
~1.5 s of imports); a sample also runs as `python -m mmssl_jax.main`.
"""

from concurrent import futures
import json
from pathlib import Path
import subprocess
import sys

import pytest

import helpers
from bad_inputs import corpus
from mmssl_jax import train
from mmssl_jax.data import DataError
from mmssl_jax import run as run_lib

MIN_CASES = 20
FORK_MAIN = Path(__file__).with_name("fork_main.py")


@pytest.fixture(scope="module", name="cases")
def cases_fixture(tmp_path_factory):
  return corpus.build_corpus(tmp_path_factory.mktemp("bad_inputs"))


def _config(case):
  config = helpers.load_config("tiktok")
  config.data.dir = case.data_dir
  for arg in case.args:
    key, value = arg.removeprefix("--config.").split("=", 1)
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_corpus_is_large_and_distinct(cases):
  assert len(cases) >= MIN_CASES
  assert len({c.name for c in cases}) == len(cases)


def test_every_case_raises_one_line_naming_file_and_problem(cases, tmp_path):
  failures = []
  for case in cases:
    workdir = tmp_path / case.name
    try:
      train.train_and_evaluate(_config(case), str(workdir))
      failures.append(f"{case.name}: no error")
      continue
    except (DataError, run_lib.ConfigError) as e:
      message = str(e)
    if "\n" in message or case.file not in message or (
        case.problem not in message):
      failures.append(f"{case.name}: {message!r} should name {case.file!r} "
                      f"and say {case.problem!r}")
    if workdir.exists():
      failures.append(f"{case.name}: created the workdir")
  assert not failures, "\n".join(failures)


def _check_cli_result(case, status, stdout, stderr, workdir):
  problems = []
  if status != 1:
    problems.append(f"exit {status}")
  if "Traceback" in stderr + stdout:
    problems.append("traceback")
  lines = stderr.strip().splitlines()
  last = lines[-1] if lines else ""
  if not last.startswith("error: "):
    problems.append("last stderr line is not 'error: ...'")
  if case.file not in last or case.problem not in last:
    problems.append(f"should name {case.file!r} and say {case.problem!r}")
  if workdir.exists():
    problems.append("created the workdir")
  return f"{case.name}: {', '.join(problems)}: {last!r}" if problems else None


def _argv(case, workdir):
  return ["--config=configs/tiktok.py", f"--config.data.dir={case.data_dir}",
          *case.args, f"--workdir={workdir}"]


def test_main_rejects_every_case_with_exit_1_and_one_error_line(cases,
                                                                tmp_path):
  """`main` in a forked process per case (`fork_main.py`): the imports are
  paid once instead of once per case."""
  jobs = [{"argv": _argv(c, tmp_path / c.name),
           "stdout": str(tmp_path / f"{c.name}.out"),
           "stderr": str(tmp_path / f"{c.name}.err")} for c in cases]
  (tmp_path / "jobs.json").write_text(json.dumps(jobs))
  subprocess.run([sys.executable, str(FORK_MAIN), str(tmp_path / "jobs.json"),
                  str(tmp_path / "statuses.json")], cwd=helpers.REPO_ROOT,
                 check=True, timeout=300)
  statuses = json.loads((tmp_path / "statuses.json").read_text())
  failures = []
  for case, job, status in zip(cases, jobs, statuses):
    failures.append(_check_cli_result(
        case, status, open(job["stdout"]).read(), open(job["stderr"]).read(),
        tmp_path / case.name))
  failures = [f for f in failures if f is not None]
  assert not failures, "\n".join(failures)


# One case per file kind through the real entry point as well.
CLI_SAMPLE = ("truncated_json", "features_with_nan", "mmrec_bad_label",
              "pickle_unreadable", "split_is_a_directory")


def test_python_m_main_rejects_a_sample_with_exit_1_and_one_error_line(
    cases, tmp_path):
  def run(case):
    workdir = tmp_path / case.name
    proc = subprocess.run(
        [sys.executable, "-m", "mmssl_jax.main", *_argv(case, workdir)],
        cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=120)
    return _check_cli_result(case, proc.returncode, proc.stdout, proc.stderr,
                             workdir)

  sample = [c for c in cases if c.name in CLI_SAMPLE]
  assert len(sample) == len(CLI_SAMPLE)
  with futures.ThreadPoolExecutor(max_workers=2) as pool:
    failures = [f for f in pool.map(run, sample) if f is not None]
  assert not failures, "\n".join(failures)


def test_cold_start_user_is_not_an_error(tmp_path):
  folder = corpus.cold_start_folder(tmp_path)
  config = helpers.load_config("tiktok")
  config.data.dir = str(folder)
  config.train.batch_size = 32  # several batches per epoch
  ds = run_lib.load_dataset(config.data)
  run_lib.check_config(config, ds)
  cold = corpus.N_USERS
  assert cold in ds.test.users and cold not in ds.train.users
