"""plot: metrics.jsonl parsing, PNG figures from the API and the CLI, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
import struct
import subprocess
import sys

import pytest

from mmssl_jax import plot

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(workdir: Path, epochs: int, *, critic: bool, best: int | None,
              final: bool = True, partial_line: bool = False) -> Path:
  """A metrics.jsonl like train.py's: val every 2nd epoch, test on improvement."""
  workdir.mkdir(parents=True)
  lines = []
  for e in range(epochs):
    record = {"epoch": e, "train_seconds": 0.5, "train/loss": 1.0 / (e + 1),
              "train/bpr": 0.6 / (e + 1), "train/cl": 0.2}
    if critic:
      record.update({"train/critic": 0.3, "train/gen": -0.1})
    if e % 2 == 1:
      record.update({"val/recall@20": 0.01 * e, "val/ndcg@20": 0.005 * e})
      if best is not None and e <= best:
        record["test/recall@20"] = 0.02 * e
    lines.append(json.dumps(record))
  if final:
    lines.append(json.dumps({"final": True, "best_epoch": best,
                             "epochs": epochs, "test": {}, "val": {}}))
  text = "\n".join(lines) + "\n"
  if partial_line:
    text += '{"epoch": 99, "train/lo'  # being written right now
  (workdir / plot.METRICS_FILE).write_text(text)
  return workdir


def png_size(path: Path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE, path
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


@pytest.fixture(name="runs")
def runs_fixture(tmp_path: Path) -> list[Path]:
  return [write_run(tmp_path / "mmssl", 10, critic=True, best=7),
          write_run(tmp_path / "lightgcn", 6, critic=False, best=3, final=False,
                    partial_line=True)]


def test_read_metrics(runs: list[Path]):
  a = plot.read_metrics(runs[0])
  assert a.label == "mmssl" and len(a.epochs) == 10 and a.best_epoch == 7
  # No final record yet: the best epoch is the last one that ran the test set;
  # the half-written last line is ignored.
  b = plot.read_metrics(runs[1], label="LightGCN")
  assert b.label == "LightGCN" and len(b.epochs) == 6 and b.best_epoch == 3


def test_plot_runs(tmp_path: Path, runs: list[Path]):
  pytest.importorskip("matplotlib")
  out = tmp_path / "figs"
  paths = plot.plot_runs(runs, out, labels=["MMSSL", "LightGCN"])
  assert paths == [out / "losses.png", out / "validation.png"]
  # 5 loss panels (loss, bpr, cl, critic, gen) -> 3 x 2 grid; 2 val panels.
  assert plot.figure_pixels(5) == (1500, 700)
  assert png_size(out / "losses.png") == plot.figure_pixels(5)
  assert png_size(out / "validation.png") == plot.figure_pixels(2) == (1000, 350)
  for p in paths:
    assert p.stat().st_size > 10_000  # real drawings, not blank canvases


def test_plot_without_validation(tmp_path: Path):
  pytest.importorskip("matplotlib")
  run = tmp_path / "run"
  run.mkdir()
  (run / plot.METRICS_FILE).write_text(
      json.dumps({"epoch": 0, "train/loss": 1.0}) + "\n")
  assert plot.plot_runs([run], tmp_path / "out") == [
      tmp_path / "out" / "losses.png"]
  assert png_size(tmp_path / "out" / "losses.png") == plot.figure_pixels(1)


def test_errors(tmp_path: Path, runs: list[Path], monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"nowhere/metrics\.jsonl: not "
                     "found"):
    plot.plot_runs([runs[0], tmp_path / "nowhere"], tmp_path / "out")
  with pytest.raises(ValueError, match="1 labels for 2 workdirs"):
    plot.plot_runs(runs, tmp_path / "out", labels=["a"])
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / plot.METRICS_FILE).write_text('{"epoch": 0}\nnot json\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2: malformed"):
    plot.read_metrics(bad)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
  with pytest.raises(ImportError, match=r'pip install "mmssl_jax\[plot\]"'):
    plot.plot_runs(runs, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
  return subprocess.run([sys.executable, "-m", "mmssl_jax.plot", *args],
                        capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=60, check=False)


def test_cli(tmp_path: Path, runs: list[Path]):
  pytest.importorskip("matplotlib")
  out = tmp_path / "cli"
  res = run_cli(f"--workdir={runs[0]},{runs[1]}", f"--output={out}")
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == [str(out / "losses.png"),
                                str(out / "validation.png")]
  assert png_size(out / "losses.png") == plot.figure_pixels(5)

  res = run_cli(f"--workdir={tmp_path / 'missing'}", f"--output={out}")
  assert res.returncode == 1
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
  assert "missing/metrics.jsonl: not found" in lines[0]
