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
starts its backend: the same HLO, about 3x less CPU compile time (see
helpers.py). Results differ from XLA's default options by float rounding only;
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


# The files that take a minute or more on 2 cores, longest first
# (`--durations=0`). They are handed to the xdist workers
# before all others, so that no worker is left alone with a long file at the
# end: xdist's default (--dist loadfile) hands out the files with the most
# tests first, which put the three multi-device files, 4-6 tests each, last.
_LONGEST_FIRST = ("test_multihost.py", "test_readme.py", "test_faults.py",
                  "test_train.py", "test_parallel.py", "test_reliability.py",
                  "test_steps.py", "test_scale.py", "test_paper_variant.py",
                  "test_step_pieces.py", "test_training_quality.py",
                  "test_item_sharding.py")


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      "markers", "requires_shared_data: skip unless ../shared/data exists")
  _share_compilation_cache()
  _fast_backend_compilation()
  if hasattr(config.option, "loadscopereorder"):  # xdist: keep our order
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: n for n, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


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
