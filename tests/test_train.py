"""End-to-end tests of mmssl_jax.train, the CLI and every config in configs/."""

import gc
import json
import math
import os
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import train
from mmssl_jax.data import DataError
from mmssl_jax.data import formats
from mmssl_jax.data import synthetic
from mmssl_jax import workdir as workdir_lib
from mmssl_jax import run as run_lib

CLI_TIMEOUT_S = 400


def _cli(*args, workdir):
  return [sys.executable, "-m", "mmssl_jax.main", *args, f"--workdir={workdir}"]


def _files(path):
  """{relative path: (bytes, mtime_ns)} of the files under path."""
  return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(path.rglob("*")) if p.is_file()}


def _finite_numbers(obj):
  """All numbers in a JSON value are finite."""
  if isinstance(obj, dict):
    return all(_finite_numbers(v) for v in obj.values())
  if isinstance(obj, list):
    return all(_finite_numbers(v) for v in obj)
  if isinstance(obj, (int, float)) and not isinstance(obj, bool):
    return math.isfinite(obj)
  return True


def _check_run_files(workdir, epochs_cap):
  lines = (workdir / workdir_lib.METRICS_FILE).read_text().splitlines()
  records = [json.loads(line) for line in lines]
  final = records[-1]
  epochs = records[:-1]
  assert final["final"] is True
  assert final["epochs"] == len(epochs) <= epochs_cap
  assert [r["epoch"] for r in epochs] == list(range(len(epochs)))
  assert 0 <= final["best_epoch"] < len(epochs)
  for key in ("recall@20", "ndcg@20", "precision@20"):
    assert key in final["test"] and key in final["val"]
    assert 0.0 <= final["test"][key] <= 1.0
  best = epochs[final["best_epoch"]]
  for k, v in final["test"].items():
    assert best[f"test/{k}"] == pytest.approx(v)
  for r in epochs:
    assert {"train/loss", "train/bpr", "val/recall@20"} <= set(r)
  assert _finite_numbers(records)
  config = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  assert config["train"]["batch_size"] == 32
  assert config["data"]["synthetic"]["n_items"] == 90
  assert config["variant"] == helpers.load_config("test").variant
  return records


# ----------------------------------------------------------------------------
# train_and_evaluate


def test_train_and_evaluate_writes_metrics_and_never_overwrites(tmp_path):
  config = helpers.load_config("test")
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(config, str(workdir))
  records = _check_run_files(workdir, config.train.epochs)
  assert result["best_epoch"] == records[-1]["best_epoch"]
  assert result["epochs"] == config.train.epochs  # 2 epochs, patience 7
  assert result["test"]["recall@20"] == pytest.approx(
      records[-1]["test"]["recall@20"])
  assert {workdir_lib.METRICS_FILE, workdir_lib.CONFIG_FILE} <= {
      p.name for p in workdir.iterdir()}

  # Running again into the same workdir never modifies it: either it refuses
  # (FileExistsError) or, with checkpoint/resume support, a complete run is
  # not trained again and its stored result is returned.
  before = _files(workdir)
  try:
    again = train.train_and_evaluate(helpers.load_config("test"),
                                     str(workdir))
  except FileExistsError as e:
    assert workdir_lib.METRICS_FILE in str(e)
  else:
    assert again["best_epoch"] == result["best_epoch"]
    assert again["test"] == pytest.approx(result["test"])
  assert _files(workdir) == before


def test_workdir_with_foreign_metrics_raises_file_exists(tmp_path):
  """A workdir whose metrics.jsonl holds epochs of another run (and nothing
  to resume from) is refused before anything is written."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / workdir_lib.METRICS_FILE).write_text(
      json.dumps({"epoch": 0, "train/loss": 1.0}) + "\n")
  before = _files(workdir)
  with pytest.raises(FileExistsError, match="metrics.jsonl"):
    train.train_and_evaluate(helpers.load_config("test"), str(workdir))
  assert _files(workdir) == before


def test_folder_config_without_data_dir_raises_and_writes_nothing(
    tmp_path, monkeypatch):
  """No data/tiktok here and no MMSSL_DATA: one line naming the folder it
  looked in, the flag, the variable and the files a dataset folder holds."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("MMSSL_DATA", raising=False)
  config = helpers.load_config("tiktok")
  assert config.data.dir == ""
  workdir = tmp_path / "run"
  with pytest.raises(DataError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  for part in ("data/tiktok", "--config.data.dir", "MMSSL_DATA"):
    assert part in message
  for expected in ("train.json", "val.json", "test.json", "_feat.npy"):
    assert expected in message
  assert "\n" not in message
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# Every config in configs/ builds and runs one step


def _tiny(modality_dims, n_users=60, n_items=200, seed=0):
  s = helpers.load_config("test").data.synthetic
  s.n_users, s.n_items, s.seed = n_users, n_items, seed
  s.mean_interactions = 10
  s.modality_dims = dict(modality_dims)
  s.modality_noise = {m: 0.5 for m in modality_dims}
  return synthetic.make_synthetic(s)


@pytest.fixture(scope="module", name="folders")
def folders_fixture(tmp_path_factory):
  """Tiny dataset folders in the released layout (train/val/test.json +
  <modality>_feat.npy)."""
  root = tmp_path_factory.mktemp("data")
  return {
      "two": formats.write_mmssl(_tiny({"image": 12, "text": 8}),
                                 root / "two"),
      # The shared TikTok folder has audio and image features.
      "tiktok": formats.write_mmssl(_tiny({"image": 10, "audio": 6}),
                                    root / "tiktok"),
      # MovieLens-100K: text + genre.
      "ml100k": formats.write_mmssl(_tiny({"text": 9, "genre": 5}),
                                    root / "ml100k"),
  }


# config -> (folder, batch size, expected modalities)
SWEEP = {
    "baby": ("two", 32, ("image", "text")),
    "sports": ("two", 32, ("image", "text")),
    "allrecipes": ("two", 32, ("image", "text")),
    "clothing": ("two", 32, ("image", "text")),
    "tiktok": ("tiktok", 32, ("audio", "image")),
    # Batch larger than the 60 users: sampled with replacement, as ML-100K
    # with B = 1024 > 943 users (§4.2).
    "ml100k": ("ml100k", 64, ("genre", "text")),
    "default": (None, None, ("image", "noise", "text")),
}


def test_sweep_covers_every_config():
  # configs/test.py runs end to end above (train_and_evaluate and the CLI).
  missing = sorted(set(helpers.config_names()) - {*SWEEP, "test"})
  assert not missing, f"add {missing} to SWEEP in tests/test_train.py"


@pytest.mark.parametrize("name", sorted(SWEEP))
def test_config_builds_and_runs_one_step(name, folders):
  folder, batch_size, modalities = SWEEP[name]
  config = helpers.load_config(name)
  reference = helpers.load_config(name)
  if folder is not None:
    assert config.data.source == "folder"
    config.data.dir = str(folders[folder])
    config.train.batch_size = batch_size
  else:  # the synthetic default, smaller (same modalities, batch 256, k > 0)
    config.data.synthetic.n_users = 300
    config.data.synthetic.n_items = 240
  ds = run_lib.load_dataset(config.data)
  assert tuple(ds.modalities) == modalities
  run_lib.check_config(config, ds)
  run = run_lib.Run(config, ds)
  state = run.init_state()
  state, metrics = run.step(state, jnp.int32(0), run.inputs)
  metrics = jax.device_get(metrics)
  assert helpers.tree_all_finite(metrics), metrics
  assert helpers.tree_all_finite(state.params)
  assert helpers.tree_all_finite(state.critic_params)
  assert int(state.step) == 1
  # Everything but the data location and the batch size is the config's own.
  for section in ("model", "loss", "critic", "graph_update", "optim"):
    assert config[section].to_dict() == reference[section].to_dict()
  if name == "ml100k":
    assert batch_size > len(np.asarray(run.inputs.sampler.exist_users))


def test_run_holds_no_reference_to_the_host_dataset():
  """`Run` keeps device copies only, so the host dataset (0.6 GiB at
  I = 1e6) is freed once the caller drops it (`train_and_evaluate` does)."""
  config = helpers.load_config("test")
  ds = run_lib.load_dataset(config.data)
  alive = weakref.ref(ds)
  run = run_lib.Run(config, ds)
  assert run.modality_dims == ds.modality_dims
  del ds
  gc.collect()
  assert alive() is None


# ----------------------------------------------------------------------------
# The CLI


def test_cli_bad_data_dir_prints_one_error_line(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      _cli("--config=configs/tiktok.py",
           f"--config.data.dir={tmp_path / 'no_such_dataset'}",
           workdir=workdir),
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error:")
  assert "no_such_dataset" in lines[0]
  assert "Traceback" not in proc.stderr + proc.stdout
  assert not workdir.exists()


def test_cli_end_to_end_on_test_config(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(_cli("--config=configs/test.py", workdir=workdir),
                        cwd=helpers.REPO_ROOT, capture_output=True, text=True,
                        timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  _check_run_files(workdir, helpers.load_config("test").train.epochs)
  assert {workdir_lib.METRICS_FILE, workdir_lib.CONFIG_FILE} <= set(os.listdir(workdir))
