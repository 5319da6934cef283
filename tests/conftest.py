"""Shared pytest helpers: where the real datasets live and how to skip without them.

Real-data tests are marked `@pytest.mark.requires_shared_data` (or decorated
with `conftest.requires_shared_data`); they skip when `<repo>/../shared/data`
is absent, so the suite still passes on a bare checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent

SHARED_DATA_MISSING = "../shared/data not found (real-data tests need it)"


def shared_data_dir() -> Path:
  """The real-data folder, `<repo root>/../shared/data` (may not exist)."""
  return _REPO_ROOT.parent / "shared" / "data"


requires_shared_data = pytest.mark.requires_shared_data


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      "markers", "requires_shared_data: skip unless ../shared/data exists")


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
