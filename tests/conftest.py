"""Shared pytest helpers: where the real datasets live and how to skip without them.

Real-data tests are marked `@pytest.mark.requires_shared_data` (or decorated
with `conftest.requires_shared_data`); they skip when `<repo>/../shared/data`
is absent, so the suite still passes on a bare checkout.

The whole session shares one persistent JAX compilation cache (a temporary
folder, removed at the end): many tests, in both xdist workers and in the
CLI subprocesses they start, compile the same programs (the step of
configs/test.py above all). The cache changes no result: an executable is
reused only for the same program, compiler options and XLA flags. Tests that
count compilations count `/jax/core/compile/backend_compile_duration`, which
JAX records for cache hits too. Processes joined by jax.distributed must not
use it (`helpers.without_compilation_cache`).

Every program of the session (in the workers and in the processes they
start) is compiled with helpers.FAST_COMPILE_OPTIONS (XLA backend
optimisation level 0, no fusion emitters), added to XLA_FLAGS before JAX
starts its backend: the same HLO at a quarter of the CPU compile time; on
2 cores the suite went from 12:34 to 9:24 (user time 21:40 -> 16:15).
Results differ from XLA's default options by float rounding only;
tests/test_steps.py compares three steps of configs/test.py compiled both
ways.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent

SHARED_DATA_MISSING = "../shared/data not found (real-data tests need it)"


def shared_data_dir() -> Path:
  """The real-data folder, `<repo root>/../shared/data` (may not exist)."""
  return _REPO_ROOT.parent / "shared" / "data"


requires_shared_data = pytest.mark.requires_shared_data


_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_CREATED_CACHE = []  # the folder this process made (the xdist controller's)
_CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                   "jax_persistent_cache_min_entry_size_bytes": 0}


def _share_compilation_cache() -> None:
  """Points JAX (here and in every child process) at the session's cache.

  The xdist controller makes the folder before it starts the workers, which
  inherit the environment; a folder the user set is used as it is."""
  if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mmssl_jax_test_cache_")
    _CREATED_CACHE.append(os.environ[_CACHE_ENV])
  # Every program, however small: a process's eager start-up (parameter
  # initialisation) compiles ~60 one-op programs of about 0.1 s each: for
  # configs/test.py on 2 cores, building the Run and its state took 10 s
  # with a cold cache and 2 s with a warm one.
  for name, value in _CACHE_SETTINGS.items():
    os.environ.setdefault(name.upper(), str(value))
  if "jax" in sys.modules:  # imported before this hook read the environment
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    for name, value in _CACHE_SETTINGS.items():
      jax.config.update(name, type(value)(os.environ[name.upper()]))


def _fast_backend_compilation() -> None:
  """XLA_FLAGS (here and in every child process) with helpers.FAST_XLA_FLAGS.

  Read when JAX starts its backend, after this hook (no test has run yet)."""
  import helpers  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "")
  if helpers.FAST_XLA_FLAGS not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {helpers.FAST_XLA_FLAGS}".strip()


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      "markers", "requires_shared_data: skip unless ../shared/data exists")
  _share_compilation_cache()
  _fast_backend_compilation()


def pytest_unconfigure(config: pytest.Config) -> None:  # pylint: disable=unused-argument
  for folder in _CREATED_CACHE:
    shutil.rmtree(folder, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
  if (item.get_closest_marker("requires_shared_data")
      and not shared_data_dir().is_dir()):
    pytest.skip(SHARED_DATA_MISSING)


@pytest.fixture(name="shared_data")
def shared_data_fixture() -> Path:
  """The real-data folder; skips the test when it is absent."""
  if not shared_data_dir().is_dir():
    pytest.skip(SHARED_DATA_MISSING)
  return shared_data_dir()
