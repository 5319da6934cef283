"""benchmarks/report.py: docs/results.md is what the result JSONs generate.

Runs the report into a temporary folder and compares its results.md with the
committed docs/results.md byte for byte, so no figure in the docs can drift
from its JSON (after changing a JSON, rerun `python benchmarks/report.py`
and commit docs/). Every figure must be a PNG that opens, of a sensible size.
"""

import subprocess
import sys

import matplotlib.image
import pytest

import helpers

REPORT = helpers.REPO_ROOT / "benchmarks" / "report.py"
DOCS = helpers.REPO_ROOT / "docs"
FIGURES = ("val_recall_tiktok.png", "val_recall_ml100k.png",
           "epoch_seconds.png", "scale.png")


@pytest.fixture(name="report", scope="module")
def report_fixture(tmp_path_factory):
  out = tmp_path_factory.mktemp("report")
  proc = subprocess.run([sys.executable, str(REPORT), f"--output_dir={out}",
                         "--readme="],
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr
  return out


def test_results_md_matches_the_jsons(report):
  fresh = (report / "results.md").read_bytes()
  committed = (DOCS / "results.md").read_bytes()
  assert fresh == committed, (
      "docs/results.md differs from what benchmarks/report.py generates from "
      "the result JSONs; run `python benchmarks/report.py` and commit docs/")


def test_report_is_deterministic(report, tmp_path):
  proc = subprocess.run([sys.executable, str(REPORT),
                         f"--output_dir={tmp_path}", "--readme="],
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr
  assert ((tmp_path / "results.md").read_bytes()
          == (report / "results.md").read_bytes())


@pytest.mark.parametrize("folder", ["fresh", "committed"])
@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_pngs_that_open(report, folder, name):
  path = (report if folder == "fresh" else DOCS) / "figures" / name
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  image = matplotlib.image.imread(path)
  height, width = image.shape[:2]
  assert 300 <= width <= 3000 and 200 <= height <= 3000, (path, image.shape)
  assert image.std() > 0.01, f"{path} is blank"


def test_results_md_links_every_figure():
  text = (DOCS / "results.md").read_text(encoding="utf-8")
  for name in FIGURES:
    assert f"(figures/{name})" in text, name


def test_readme_results_summary_matches_the_jsons():
  """README's results table is the block report.py writes from the JSONs."""
  sys.path.insert(0, str(REPORT.parent))
  import report  # pylint: disable=g-import-not-at-top
  text = (helpers.REPO_ROOT / "README.md").read_text(encoding="utf-8")
  block = "\n".join(report.readme_summary())
  assert block in text, (
      "README.md's results summary differs from what benchmarks/report.py "
      "writes; run `python benchmarks/report.py` and commit README.md")
