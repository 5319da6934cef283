"""benchmarks/gpu_suite.sh and the train_speed.py paths it uses, on a CPU.

* `synthetic_features.py` (in this process): the feature spec parser, and
  the seeded N(0, 1) float32 features added to an interactions-only dataset
  (shapes, dtype, determinism, order, a real modality replaced).
* `train_speed.py --synthetic_features --full_epoch --progress` on a tiny
  folder dataset with no features: the JSON names the synthetic features,
  their shapes, a complete epoch, the device fields, and "partial" lines
  come before the final one.
* `gpu_suite.sh --dry-run` on tiny tiktok/ and amazon_sports/ folders,
  with the TikTok folder missing its files so that run fails: its error is
  a JSON line, the Sports run (synthetic 4096/1024 features, low-rank
  critic, fused generator) still completes, the summary is printed and
  written to gpu_suite.json (machine, jax version, date, one entry per run
  with its status), and the script exits 1 because a run failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

import helpers

REPO = helpers.REPO_ROOT
sys.path.insert(0, str(REPO / "benchmarks"))
import synthetic_features  # pylint: disable=g-import-not-at-top,wrong-import-position

from mmssl_jax.data import formats  # pylint: disable=g-import-not-at-top,wrong-import-position

N_USERS, N_ITEMS = 60, 90


def _write_folder(path: Path, seed: int = 0) -> Path:
  """train/val/test.json (4/1/1 distinct items per user), no features."""
  rng = np.random.default_rng(seed)
  splits = {"train": {}, "val": {}, "test": {}}
  for u in range(N_USERS):
    items = rng.choice(N_ITEMS, 6, replace=False).tolist()
    splits["train"][str(u)] = items[:4]
    splits["val"][str(u)] = items[4:5]
    splits["test"][str(u)] = items[5:]
  splits["train"]["0"] = list(range(N_ITEMS - 4, N_ITEMS))  # n_items = 90
  path.mkdir(parents=True, exist_ok=True)
  for name, lists in splits.items():
    (path / f"{name}.json").write_text(json.dumps(lists))
  return path


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("OUT", None)
  return env


def test_parse_feature_spec():
  parse = synthetic_features.parse_feature_spec
  assert parse("image:4096,text:1024") == {"image": 4096, "text": 1024}
  assert parse(["image:4096", "text:1024"]) == {"image": 4096, "text": 1024}
  assert not parse("") and not parse([])
  for bad in ("image", "image:", ":8", "image:0", "image:x", "a:2,a:3"):
    with pytest.raises(ValueError):
      parse(bad)


def test_add_synthetic_features(tmp_path):
  ds = formats.load_folder(_write_folder(tmp_path / "sports"))
  assert not ds.modalities and ds.n_items == N_ITEMS
  dims = {"text": 16, "image": 40}
  out, replaced = synthetic_features.add_synthetic_features(ds, dims, seed=3)
  assert replaced == []
  assert list(out.modalities) == ["image", "text"]  # sorted, as load_folder
  assert out.modality_dims == {"image": 40, "text": 16}
  for m, d in dims.items():
    f = out.modalities[m]
    assert f.shape == (N_ITEMS, d) and f.dtype == np.float32
    assert abs(float(f.mean())) < 0.1 and abs(float(f.std()) - 1) < 0.1
  assert out.train is ds.train and out.n_users == ds.n_users
  again, _ = synthetic_features.add_synthetic_features(ds, dims, seed=3)
  for m in dims:
    np.testing.assert_array_equal(again.modalities[m], out.modalities[m])
  other, _ = synthetic_features.add_synthetic_features(ds, dims, seed=4)
  assert not np.allclose(other.modalities["image"], out.modalities["image"])
  # A real modality of the same name is replaced; others are kept.
  real = {"image": np.ones((N_ITEMS, 5), np.float32),
          "audio": np.zeros((N_ITEMS, 3), np.float32)}
  mixed, replaced = synthetic_features.add_synthetic_features(
      dataclasses.replace(ds, modalities=real), {"image": 7})
  assert replaced == ["image"]
  assert mixed.modality_dims == {"audio": 3, "image": 7}
  np.testing.assert_array_equal(mixed.modalities["audio"], real["audio"])


def test_train_speed_synthetic_full_epoch(tmp_path):
  data = _write_folder(tmp_path / "sports")
  proc = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "train_speed.py"),
       "--config=configs/test.py", "--config.data.source=folder",
       f"--config.data.dir={data}", "--config.train.batch_size=64",
       "--synthetic_features=image:24,text:8", "--synthetic_seed=1",
       "--iters=1", "--full_epoch", "--nosplit", "--progress",
       "--label=tiny"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines()
           if l.startswith("{")]
  assert [bool(r.get("partial")) for r in lines] == [True, True, False]
  rec = lines[-1]
  assert rec["benchmark"] == "train_speed" and rec["label"] == "tiny"
  assert rec["dataset"] == "sports"
  assert rec["synthetic_features"] == {"image": 24, "text": 8}
  assert "not real item features" in rec["synthetic_features_note"]
  assert rec["modalities"] == ["image", "text"]
  assert rec["modality_dims"] == {"image": 24, "text": 8}
  assert rec["n_items"] == N_ITEMS and rec["n_users"] == N_USERS
  assert rec["steps_per_epoch"] == 4 * N_USERS // 64 + 1
  assert rec["epoch_complete"] is True
  assert rec["epoch_steps_done"] == rec["steps_per_epoch"]
  assert rec["epoch_losses_finite"] is True
  assert rec["epoch_s"] == rec["epoch_wall_s"] > 0
  assert rec["device_kind"] == "cpu" and rec["device_platform"] == "cpu"
  assert rec["device_count"] >= 1 and "device_peak_gib_main" in rec
  assert rec["critic_kind"] == "dense" and rec["fused_generator"] is False
  assert "epoch_s" not in lines[0] and lines[1]["epoch_complete"] is True


def test_gpu_suite_dry_run(tmp_path):
  data = tmp_path / "data"
  _write_folder(data / "amazon_sports")
  (data / "tiktok").mkdir()  # no files: that run must fail alone
  results = tmp_path / "results"
  env = _env()
  env.pop("GPU_SUITE_DRY", None)  # --dry-run alone makes it a dry run
  env.update(GPU_SUITE_DATA=str(data),
             GPU_SUITE_ONLY="tiktok_dense,sports_lowrank_fused",
             PYTHON=sys.executable)
  proc = subprocess.run(
      ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run",
       str(results)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  # The TikTok run failed: exit status 1, after the summary.
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert sorted(p.name for p in results.iterdir()) == [
      "env.txt", "gpu_suite.json", "gpu_suite.jsonl", "gpu_suite.log"]
  rows = [json.loads(l) for l in
          (results / "gpu_suite.jsonl").read_text().splitlines()]
  assert [r.get("label", r["benchmark"]) for r in rows] == [
      "env", "tiktok_dense", "sports_lowrank_fused"]
  env_row, tiktok, sports = rows
  assert env_row["dry_run"] is True and env_row["backend"] == "cpu"
  assert env_row["imports_ok"] is True
  assert tiktok["rc"] == 1 and "tiktok" in tiktok["error"]
  assert "error" not in sports, sports
  assert sports["synthetic_features"] == {"image": 4096, "text": 1024}
  assert sports["modality_dims"] == {"image": 4096, "text": 1024}
  assert sports["critic_kind"] == "lowrank" and sports["fused_generator"]
  assert sports["generator_block"] == 4096 and sports["iters"] == 2
  assert sports["epoch_steps_done"] >= 1 and sports["device_kind"] == "cpu"
  # The summary table comes last.
  tail = proc.stdout.splitlines()
  assert any(l.startswith("sports_lowrank_fused") and "187" in l for l in tail)
  assert any(l.startswith("tiktok_dense") and "failed" in l for l in tail)
  assert tail[-1] == "FAILED: tiktok_dense"
  # One JSON object: the machine, jax version, date, one entry per run.
  summary = json.loads((results / "gpu_suite.json").read_text())
  assert summary["status"] == "failed"
  assert summary["failed_runs"] == ["tiktok_dense"]
  assert summary["dry_run"] is True and summary["jax"] == env_row["jax"]
  assert summary["date"][:4].isdigit() and "T" in summary["date"]
  assert summary["machine"]["backend"] == "cpu"
  assert summary["machine"]["jax_platforms"] == "cpu"
  assert summary["budget_s"] == 300 and summary["wall_s"] >= 0
  assert [(r["label"], r["status"]) for r in summary["runs"]] == [
      ("tiktok_dense", "failed"), ("sports_lowrank_fused", "ok")]
  assert summary["runs"][0]["rc"] == 1
  assert summary["runs"][1]["epoch_steps_done"] >= 1
