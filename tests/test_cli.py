"""The command line where a new user meets it: `python -m mmssl_jax.main`.

* Modalities are chosen with `--config.data.modalities=image,text`, a tuple
  literal or `configs/<dataset>.py:modalities=image+audio`.
* A dataset config finds its folder in `$MMSSL_DATA/<name>` or
  `data/<name>` under the working directory; without one, a single error
  line names every folder it looked in and the files it expects.
* A 40-item, 8-user dataset trains under a dataset config (TikTok's
  settings: K up to 50, T = 1 on an epoch of one batch, k = 0.4 items for
  the paper variant): one warning for each setting adapted, and config.json
  holds the adapted values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

import helpers

TIMEOUT_S = 300
N_USERS, N_ITEMS = 8, 40


def _tiny_dataset(folder: Path) -> Path:
  """8 users x 40 items, 6 train / 1 val / 1 test items each, 2 modalities."""
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True)
  splits = {"train": {}, "val": {}, "test": {}}
  for u in range(N_USERS):
    items = rng.choice(N_ITEMS, 8, replace=False).tolist()
    splits["train"][str(u)] = items[:6]
    splits["val"][str(u)] = [items[6]]
    splits["test"][str(u)] = [items[7]]
  for name, split in splits.items():
    (folder / f"{name}.json").write_text(json.dumps(split))
  np.save(folder / "image_feat.npy", rng.normal(size=(N_ITEMS, 6)).astype(
      np.float32))
  np.save(folder / "audio_feat.npy", rng.normal(size=(N_ITEMS, 5)).astype(
      np.float32))
  return folder


def _main(cwd: Path, *args: str, env: dict[str, str] | None = None):
  command = [sys.executable, "-m", "mmssl_jax.main", *args]
  environ = {k: v for k, v in os.environ.items() if k != "MMSSL_DATA"}
  environ.update(env or {})
  environ["PYTHONPATH"] = str(helpers.REPO_ROOT)
  return subprocess.run(command, cwd=cwd, env=environ, capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)


def _config_json(workdir: Path) -> dict:
  return json.loads((workdir / "config.json").read_text())


def _warnings(stderr: str) -> list[str]:
  return [line.split("adapted to the dataset: ", 1)[1]
          for line in stderr.splitlines() if "adapted to the dataset: " in line]


@pytest.fixture(scope="module", name="cwd")
def cwd_fixture(tmp_path_factory) -> Path:
  """A working directory holding data/tiktok (the tiny dataset)."""
  cwd = tmp_path_factory.mktemp("cli")
  _tiny_dataset(cwd / "data" / "tiktok")
  return cwd


def test_default_folder_modalities_and_small_catalogue(cwd):
  """configs/tiktok.py with no --config.data.dir reads data/tiktok, the
  modalities named on the command line, and adapts K and T with one
  warning each."""
  config = helpers.REPO_ROOT / "configs" / "tiktok.py"
  proc = _main(cwd, f"--config={config}", "--config.data.modalities=image",
               "--config.train.epochs=1", "--workdir=run")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = _config_json(cwd / "run")
  assert saved["data"]["dir"] == str(cwd / "data" / "tiktok")
  assert saved["data"]["modalities"] == ["image"]
  assert "modalities: image 6" in proc.stderr
  assert saved["eval"]["ks"] == [10, 20, 40]
  assert _warnings(proc.stderr) == [
      "eval.ks (10, 20, 50) -> (10, 20, 40): dataset tiktok has 40 items",
      "graph_update.T=1: an epoch of dataset tiktok is one batch, so the "
      "modality graphs are never regenerated (as in the released code)"]
  records = [json.loads(l) for l in
             (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["final"] and "recall@40" in records[-1]["test"]


def test_paper_variant_and_modality_argument_under_mmssl_data(cwd, tmp_path):
  """`configs/tiktok.py:variant=paper,modalities=audio+image` with the data
  in $MMSSL_DATA/tiktok: k = floor(40 * 0.01) = 0 is raised to 1."""
  config = helpers.REPO_ROOT / "configs" / "tiktok.py"
  proc = _main(tmp_path, f"--config={config}:variant=paper,modalities=audio+image",
               "--config.train.epochs=1", "--workdir=run",
               env={"MMSSL_DATA": str(cwd / "data")})
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = _config_json(tmp_path / "run")
  assert saved["data"]["modalities"] == ["audio", "image"]
  assert saved["graph_update"]["m_topk_rate"] == pytest.approx(1 / 40)
  assert _warnings(proc.stderr) == [
      "eval.ks (10, 20, 50) -> (10, 20, 40): dataset tiktok has 40 items",
      "graph_update.m_topk_rate 0.01 -> 1/40: the persistent graphs need "
      "k >= 1 item of the 40 of dataset tiktok"]
  # Re-running the same command finds the run complete (the adapted config
  # equals config.json): it trains nothing and exits 0.
  again = _main(tmp_path, f"--config={config}:variant=paper,modalities=audio+image",
                "--config.train.epochs=1", "--workdir=run",
                env={"MMSSL_DATA": str(cwd / "data")})
  assert again.returncode == 0, again.stderr[-3000:]
  assert "holds a complete run" in again.stderr


def test_tuple_literal_modalities_and_missing_folder(tmp_path):
  """The README's `--config.data.modalities='["image","text"]'` parses;
  a dataset config with no folder stops with one line naming both folders
  it looked in and the files a dataset folder holds; nothing is written."""
  config = helpers.REPO_ROOT / "configs" / "sports.py"
  proc = _main(tmp_path, f"--config={config}",
               '--config.data.modalities=["image","text"]', "--workdir=run",
               env={"MMSSL_DATA": str(tmp_path / "datasets")})
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for part in (str(tmp_path / "datasets" / "sports"), "data/sports",
               "--config.data.dir", "train.json", "_feat.npy"):
    assert part in lines[0]
  assert not (tmp_path / "run").exists()
