"""benchmarks/sweep_table.py: settings read from each run's config.json, the
best chosen by validation only (never by test), rows and choice in JSON."""

import json
import subprocess
import sys

import helpers


def _study(tmp_path, name, tau, val, test):
  workdir = tmp_path / name / "run"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(
      {"loss": {"real_data_tau": tau, "ui_pre_scale": 1.0}}))
  metrics = lambda r: {"recall@20": r, "ndcg@20": r / 2}
  path = tmp_path / f"{name}.json"
  path.write_text(json.dumps({"runs": [{
      "name": "paper_full_seed2022", "workdir": str(workdir),
      "best_val": metrics(val), "test": metrics(test), "epochs": 5,
      "epochs_to_best": 3}]}))
  return path


def test_best_by_validation_not_test(tmp_path):
  _study(tmp_path, "a", 0.1, val=0.06, test=0.09)  # best test, worse val
  _study(tmp_path, "b", 2.0, val=0.07, test=0.05)
  out = tmp_path / "sweep.json"
  proc = subprocess.run(
      [sys.executable, str(helpers.REPO_ROOT / "benchmarks/sweep_table.py"),
       f"--inputs={tmp_path}/*.json", "--keys=loss.real_data_tau",
       f"--output={out}"], capture_output=True, text=True, check=True,
      timeout=120)
  result = json.loads(out.read_text())
  assert result["best"] == {"loss.real_data_tau": 2.0}
  assert [r["setting"]["loss.real_data_tau"] for r in result["rows"]] == [
      0.1, 2.0]
  assert "| 2.0 | 0.0700 (best) | 0.0500 |" in proc.stdout
