"""benchmarks/ablation.py end to end on configs/test.py (1 epoch per run).

A tiny grid (reference x {full, wo_cl, wo_gt}, one seed, plus LightGCN)
with the wo_gt workdir blocked by a file, so that run fails: the study must
record the error and go on. Re-running the same command must not train
again (metrics.jsonl untouched, same metrics), `--only` must select runs,
and `--markdown
--from_json` must print a row per group.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import helpers

REPO = helpers.REPO_ROOT
SCRIPT = REPO / "benchmarks" / "ablation.py"
RUNS = ("reference_full_seed2022", "reference_wo_cl_seed2022",
        "lightgcn_full_seed2022")
BLOCKED = "reference_wo_gt_seed2022"
METRICS = ("recall@20", "precision@20", "ndcg@20", "ndcg_mmssl@20")


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(*args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _metrics_files(dataset_dir: Path) -> dict[str, tuple[int, bytes]]:
  out = {}
  for name in RUNS:
    path = dataset_dir / name / "metrics.jsonl"
    out[name] = (path.stat().st_mtime_ns, path.read_bytes())
  return out


def test_grid_plan_and_overrides():
  code = textwrap.dedent("""
      import json, sys
      sys.path.insert(0, "benchmarks")
      import ablation
      import results_io
      from mmssl_jax import config_lib
      plan = ablation.plan_runs(config_lib.VARIANTS, config_lib.ABLATIONS,
                                [2022, 1, 7], 1, True)
      c = results_io.load_config("configs/test.py",
                                 "variant=paper,ablation=wo_cl")
      results_io.apply_overrides(c, ["critic.kind=lowrank", "train.epochs=3",
                                     "optim.lr=1e-3", "eval.ks=5,20",
                                     "loss.gumbel_transform=false"])
      errors = []
      for bad in ("train.epochs=1.5", "no.such=1", "train.nope=1", "noeq"):
        try:
          results_io.apply_overrides(c, [bad])
        except ValueError as e:
          errors.append(str(e))
      print(json.dumps({
          "names": [r["name"] for r in plan],
          "args": {r["name"]: r["arg"] for r in plan},
          "config": [c.variant, c.ablation, c.loss.contrastive,
                     c.critic.kind, c.train.epochs, c.optim.lr,
                     list(c.eval.ks), c.loss.gumbel_transform],
          "errors": errors}))
      """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  names = out["names"]
  ablations = ("full", "wo_asl", "wo_cl", "wo_gt", "rp_gae")
  first = [f"{v}_{a}_seed2022" for v in ("reference", "paper")
           for a in ablations] + ["lightgcn_full_seed2022"]
  later = [f"{v}_full_seed{s}" for s in (1, 7) for v in ("reference", "paper")]
  assert names == first + later  # every group's first seed comes first
  assert out["args"]["paper_wo_gt_seed2022"] == "variant=paper,ablation=wo_gt"
  assert out["args"]["lightgcn_full_seed2022"] == "model=lightgcn"
  assert out["config"] == ["paper", "wo_cl", False, "lowrank", 3, 1e-3,
                           [5, 20], False]
  assert len(out["errors"]) == 4, out["errors"]
  assert "no field" in out["errors"][1] and "no field" in out["errors"][2]


def test_ablation_study_resumes_and_summarises(tmp_path):
  root, output = tmp_path / "root", tmp_path / "ablation.json"
  dataset_dir = root / "test"
  dataset_dir.mkdir(parents=True)
  (dataset_dir / BLOCKED).write_text("a file where the workdir should be\n")
  args = ("--config=configs/test.py", "--set=train.epochs=1",
          "--variants=reference", "--ablations=full,wo_cl,wo_gt",
          "--seeds=2022", f"--root={root}", f"--output={output}")

  proc = _run(*args)
  study = json.loads(output.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == study
  by_name = {r["name"]: r for r in study["runs"]}
  assert sorted(by_name) == sorted(RUNS + (BLOCKED,))
  assert study["pending"] == []
  assert study["overrides"] == ["train.epochs=1"]
  assert "not a folder" in by_name[BLOCKED]["error"]
  for name in RUNS:
    r = by_name[name]
    assert "error" not in r, r["error"]
    assert r["status"] == "trained"
    assert r["workdir"] == str(dataset_dir / name)
    for split in ("test", "best_val"):
      for k in METRICS:
        v = r[split][k]
        assert math.isfinite(v) and 0.0 <= v <= 1.0, (name, split, k, v)
    assert r["test"]["recall@20"] > 0.0
    assert (r["epochs"], r["best_epoch"], r["epochs_to_best"]) == (1, 0, 1)
    assert r["hit_epoch_cap"] and not r["stopped_early"]
    assert r["seconds_per_epoch"] > 0.0
  assert by_name["lightgcn_full_seed2022"]["model"] == "lightgcn"
  assert by_name["reference_wo_cl_seed2022"]["ablation"] == "wo_cl"
  groups = study["groups"]
  assert groups["reference_wo_gt"]["n"] == 0
  assert groups["reference_wo_gt"]["n_failed"] == 1
  full = groups["reference_full"]
  assert full["n"] == 1 and full["metrics"]["test/recall@20"]["std"] is None
  assert (full["metrics"]["test/recall@20"]["mean"]
          == by_name["reference_full_seed2022"]["test"]["recall@20"])
  assert "reference_full_seed2022: trained" in proc.stderr
  assert f"{BLOCKED}: FAILED" in proc.stderr

  # The same command again: nothing is trained, the results are the same.
  before = _metrics_files(dataset_dir)
  _run(*args)
  assert _metrics_files(dataset_dir) == before
  again = {r["name"]: r for r in json.loads(output.read_text())["runs"]}
  for name in RUNS:
    assert again[name]["status"] == "stored"
    assert again[name]["test"] == by_name[name]["test"]
    assert again[name]["seconds_per_epoch"] == by_name[name][
        "seconds_per_epoch"]
  assert "not a folder" in again[BLOCKED]["error"]

  # --only and --no_lightgcn: one process's share of the study.
  part = tmp_path / "part.json"
  _run(*args[:-1], f"--output={part}", "--only=wo_cl", "--no_lightgcn")
  share = json.loads(part.read_text())["runs"]
  assert [(r["name"], r["status"]) for r in share] == [
      ("reference_wo_cl_seed2022", "stored")]
  assert _metrics_files(dataset_dir) == before

  table = _run("--markdown", f"--from_json={output}").stdout
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert rows[0].startswith("| model | n | R@20 | P@20 | N@20 |")
  labels = [row.split("|")[1].strip() for row in rows[1:]]
  assert labels == ["reference, full", "reference, w/o CL",
                    "reference, w/o GT", "LightGCN"]
  assert rows[3].split("|")[2].strip() == "0 (1 failed)"
  r20 = by_name["reference_full_seed2022"]["test"]["recall@20"]
  assert f"{r20:.4f}" in rows[1]
