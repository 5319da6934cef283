"""Loaders, writers and the converter CLI on tiny folders and on the real data."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import helpers
from mmssl_jax.data import formats
from mmssl_jax.data import synthetic
from mmssl_jax.data.dataset import DataError, Dataset, Split

REPO = Path(__file__).resolve().parent.parent


def write_json_splits(folder: Path, train: dict, val: dict, test: dict) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  for name, obj in (("train", train), ("val", val), ("test", test)):
    (folder / f"{name}.json").write_text(json.dumps(obj))
  return folder


def write_inter(path: Path, header: str, rows: list[str]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join([header] + rows) + "\n")
  return path


def dump_pickle(path: Path, obj: object) -> None:
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def pairs(split: Split) -> list[tuple[int, int]]:
  return sorted(zip(split.users.tolist(), split.items.tolist()))


def assert_same_data(a: Dataset, b: Dataset) -> None:
  assert (a.n_users, a.n_items) == (b.n_users, b.n_items)
  for name in ("train", "val", "test"):
    assert pairs(getattr(a, name)) == pairs(getattr(b, name)), name
  assert list(a.modalities) == list(b.modalities)
  for m in a.modalities:
    np.testing.assert_array_equal(a.modalities[m], b.modalities[m])


@pytest.fixture(name="mmssl_dir")
def mmssl_dir_fixture(tmp_path: Path) -> Path:
  """4 users (user 3 has no train items), 5 items (from the features)."""
  folder = write_json_splits(
      tmp_path / "toy",
      train={"0": [1, 2], "1": [0], "2": [4, 0], "3": []},
      val={"0": [3], "1": [2]},
      test={"1": [3], "2": [1], "3": [0]})
  np.save(folder / "image_feat.npy", np.arange(20, dtype=np.float16).reshape(5, 4))
  np.save(folder / "audio_feat.npy", np.ones((5, 2), np.float64))
  return folder


# ---------------------------------------------------------------------------
# mmssl


def test_load_mmssl(mmssl_dir: Path):
  ds = formats.load_folder(mmssl_dir)
  assert ds.name == "toy"
  assert (ds.n_users, ds.n_items) == (4, 5)
  np.testing.assert_array_equal(ds.train.users, [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(ds.train.items, [1, 2, 0, 0, 4])
  np.testing.assert_array_equal(ds.val.users, [0, 1])
  np.testing.assert_array_equal(ds.val.items, [3, 2])
  np.testing.assert_array_equal(ds.test.users, [1, 2, 3])
  np.testing.assert_array_equal(ds.test.items, [3, 1, 0])
  assert ds.train.users.dtype == np.int32
  assert type(ds.modalities) is dict  # pylint: disable=unidiomatic-typecheck
  assert list(ds.modalities) == ["audio", "image"]
  for feat in ds.modalities.values():
    assert feat.dtype == np.float32
  np.testing.assert_array_equal(ds.modalities["image"],
                                np.arange(20, dtype=np.float32).reshape(5, 4))
  assert ds.modality_dims == {"audio": 2, "image": 4}


def test_modalities_argument_sets_order_and_subset(mmssl_dir: Path):
  ds = formats.load_folder(mmssl_dir, modalities=["image", "audio"])
  assert list(ds.modalities) == ["image", "audio"]
  ds = formats.load_folder(mmssl_dir, modalities=["image"], name="custom")
  assert list(ds.modalities) == ["image"]
  assert ds.name == "custom"


def test_mmssl_without_features_uses_max_item_id(tmp_path: Path):
  folder = write_json_splits(tmp_path / "d", train={"0": [1], "1": [6]},
                             val={"0": [2]}, test={"1": [0], "2": [3]})
  ds = formats.load_folder(folder)
  assert (ds.n_users, ds.n_items) == (3, 7)
  assert ds.modalities == {}


def test_mmssl_every_key_counts_as_a_user(tmp_path: Path):
  folder = write_json_splits(tmp_path / "d", train={"0": [1]},
                             val={"0": [2]}, test={"0": [0], "4": []})
  assert formats.load_folder(folder).n_users == 5


def test_mmssl_leading_zero_keys(tmp_path: Path):
  folder = write_json_splits(tmp_path / "d", train={"00": [1], "001": [0]},
                             val={"0": [2]}, test={"1": [2]})
  ds = formats.load_folder(folder)
  assert pairs(ds.train) == [(0, 1), (1, 0)]


def test_mmssl_train_mat_sets_shape(mmssl_dir: Path):
  train = formats.load_folder(mmssl_dir).train
  mat = sp.csr_matrix((np.ones(len(train)), (train.users, train.items)),
                      shape=(6, 5))
  dump_pickle(mmssl_dir / "train_mat", mat)
  ds = formats.load_folder(mmssl_dir)
  assert (ds.n_users, ds.n_items) == (6, 5)


# ---------------------------------------------------------------------------
# mmrec


def test_load_mmrec_columns_by_header_name(tmp_path: Path):
  # Column order differs from the usual and an extra column is ignored.
  write_inter(tmp_path / "d" / "toy.inter", "itemID\tx_label\trating\tuserID",
              ["1\t0\t5\t0", "2\t0\t3\t0", "0\t0\t1\t2", "3\t1\t2\t0",
               "4\t2\t4\t2", "0\t1\t4\t1", "2\t0\t4\t1", "1\t2\t1\t1"])
  ds = formats.load_folder(tmp_path / "d")
  assert (ds.n_users, ds.n_items) == (3, 5)
  assert pairs(ds.train) == [(0, 1), (0, 2), (1, 2), (2, 0)]
  assert pairs(ds.val) == [(0, 3), (1, 0)]
  assert pairs(ds.test) == [(1, 1), (2, 4)]


def test_load_mmrec_typed_header_with_x_label(tmp_path: Path):
  write_inter(tmp_path / "d" / "toy.inter",
              "userID:token\titemID:token\tx_label:token",
              ["0\t0\t0", "0\t1\t1", "0\t2\t2"])
  np.save(tmp_path / "d" / "text_feat.npy", np.zeros((4, 3), np.float32))
  ds = formats.load_folder(tmp_path / "d", format="mmrec")
  assert (ds.n_users, ds.n_items) == (1, 4)
  assert list(ds.modalities) == ["text"]


# ---------------------------------------------------------------------------
# pickle


def test_load_pickle_any_sparse_type(tmp_path: Path):
  folder = tmp_path / "p"
  folder.mkdir()
  shape = (4, 6)
  trn = sp.coo_matrix(([1.0, 1.0, 1.0], ([0, 1, 2], [5, 0, 1])), shape=shape)
  val = sp.csr_matrix(([1.0, 1.0], ([0, 2], [1, 3])), shape=shape)
  tst = sp.dok_matrix(shape)
  tst[1, 2] = 1.0
  for name, mat in zip(formats.PICKLE_FILES, (trn, val, tst)):
    dump_pickle(folder / name, mat)
  ds = formats.load_folder(folder)
  assert (ds.n_users, ds.n_items) == (4, 6)
  assert pairs(ds.train) == [(0, 5), (1, 0), (2, 1)]
  assert pairs(ds.val) == [(0, 1), (2, 3)]
  assert pairs(ds.test) == [(1, 2)]


# ---------------------------------------------------------------------------
# auto-detection


def test_auto_prefers_json_and_never_opens_pickles(mmssl_dir: Path):
  for name in formats.PICKLE_FILES:
    (mmssl_dir / name).write_bytes(b"not a pickle")
  assert formats.detect_format(mmssl_dir) == "mmssl"
  assert len(formats.load_folder(mmssl_dir).train) == 5


def test_auto_detects_mmrec_and_pickle(tmp_path: Path):
  write_inter(tmp_path / "r" / "x.inter", "userID\titemID\tx_label",
              ["0\t0\t0", "0\t1\t1", "0\t2\t2"])
  assert formats.detect_format(tmp_path / "r") == "mmrec"
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "trnMat.pkl").write_bytes(b"")
  assert formats.detect_format(tmp_path / "p") == "pickle"


def test_auto_ignores_recbole_inter_without_x_label(tmp_path: Path):
  write_inter(tmp_path / "r" / "ml.inter", "user_id:token\titem_id:token",
              ["1\t2"])
  with pytest.raises(DataError, match="cannot detect.*train.json"):
    formats.load_folder(tmp_path / "r")


# ---------------------------------------------------------------------------
# writers and round trips


def test_write_mmssl_lists_every_user(tmp_path: Path):
  ds = Dataset("w", n_users=4, n_items=3, train=Split([0, 2], [1, 0]),
               val=Split([0], [2]), test=Split([2], [2]),
               modalities={"image": np.eye(3, dtype=np.float32)})
  out = formats.write_mmssl(ds, tmp_path / "a" / "b")
  train = json.loads((out / "train.json").read_text())
  assert train == {"0": [1], "1": [], "2": [0], "3": []}
  assert json.loads((out / "test.json").read_text())["2"] == [2]
  feat = np.load(out / "image_feat.npy")
  assert feat.dtype == np.float32 and feat.shape == (3, 3)
  assert formats.load_folder(out, name="w").n_users == 4


def test_write_mmrec_file(tmp_path: Path):
  ds = Dataset("toy", n_users=2, n_items=3, train=Split([1, 0], [2, 1]),
               val=Split([0], [0]), test=Split([1], [0]))
  formats.write_mmrec(ds, tmp_path / "o")
  text = (tmp_path / "o" / "toy.inter").read_text()
  assert text == ("userID\titemID\tx_label\n0\t1\t0\n1\t2\t0\n0\t0\t1\n"
                  "1\t0\t2\n")


@pytest.mark.parametrize("writer", [formats.write_mmssl, formats.write_mmrec])
def test_writers_refuse_non_empty_output(mmssl_dir: Path, tmp_path: Path,
                                         writer):
  ds = formats.load_folder(mmssl_dir)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(DataError, match="out: output path exists"):
    writer(ds, tmp_path / "out")
  with pytest.raises(DataError, match="keep.txt: output path exists"):
    writer(ds, tmp_path / "out" / "keep.txt")
  writer(ds, tmp_path / "empty_is_fine")


def test_round_trip_mmssl_mmrec_mmssl(mmssl_dir: Path, tmp_path: Path):
  original = formats.load_folder(mmssl_dir)
  formats.write_mmrec(original, tmp_path / "rec")
  via_rec = formats.load_folder(tmp_path / "rec", name="toy")
  assert formats.detect_format(tmp_path / "rec") == "mmrec"
  formats.write_mmssl(via_rec, tmp_path / "back")
  back = formats.load_folder(tmp_path / "back")
  assert_same_data(original, via_rec)
  assert_same_data(original, back)


def run_convert(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "mmssl_jax.data.convert", *args],
                        capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=60, check=False)


def test_convert_cli(mmssl_dir: Path, tmp_path: Path):
  res = run_convert(f"--input={mmssl_dir}", f"--output={tmp_path / 'rec'}",
                    "--to=mmrec")
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == formats.load_folder(mmssl_dir).summary()
  assert_same_data(formats.load_folder(mmssl_dir),
                   formats.load_folder(tmp_path / "rec", name="toy"))

  (mmssl_dir / "val.json").write_text('{"0": [1.5]}')
  res = run_convert(f"--input={mmssl_dir}", f"--output={tmp_path / 'bad'}",
                    "--to=mmssl")
  assert res.returncode == 1
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr
  assert lines[0].startswith("error: ") and "val.json" in lines[0]
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------
# real data (../shared/data)


@pytest.mark.requires_shared_data
def test_real_tiktok(shared_data: Path):
  ds = formats.load_folder(shared_data / "tiktok")
  assert ds.name == "tiktok"
  assert (ds.n_users, ds.n_items) == (9308, 6710)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (59541, 3051, 6130)
  assert list(ds.modalities) == ["audio", "image"]
  for feat in ds.modalities.values():
    assert feat.shape == (6710, 128) and feat.dtype == np.float32
  assert_same_data(ds, formats.load_folder(shared_data / "tiktok",
                                           format="pickle"))


@pytest.mark.requires_shared_data
def test_real_ml100k(shared_data: Path):
  ds = formats.load_folder(shared_data / "ml100k")
  assert (ds.n_users, ds.n_items) == (943, 1682)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (80024, 9988, 9988)
  assert ds.modality_dims == {"genre": 19, "text": 384}
  with pytest.raises(DataError, match="RecBole"):  # ml-100k.inter is raw
    formats.load_folder(shared_data / "ml100k", format="mmrec")


@pytest.mark.requires_shared_data
def test_real_amazon_baby_json_and_mmrec(shared_data: Path):
  ds = formats.load_folder(shared_data / "amazon_baby")
  assert (ds.n_users, ds.n_items) == (19445, 7050)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (118551, 21682, 20559)
  assert ds.modalities == {}
  assert_same_data(ds, formats.load_folder(shared_data / "amazon_baby",
                                           format="mmrec"))


def test_fingerprint_follows_the_interactions_and_shapes(tmp_path: Path):
  """Equal data in two layouts: equal fingerprints; one interaction or a
  feature width changed: another fingerprint."""
  config = helpers.load_config("test")
  ds = synthetic.make_synthetic(config.data.synthetic)
  formats.write_mmssl(ds, tmp_path / "a")
  formats.write_mmrec(ds, tmp_path / "b")
  a = formats.load_folder(tmp_path / "a")
  b = formats.load_folder(tmp_path / "b")
  assert a.fingerprint() == b.fingerprint() == ds.fingerprint()
  assert len(ds.fingerprint()) == 16
  items = ds.train.items.copy()
  items[0] = (items[0] + 1) % ds.n_items
  moved = dataclasses.replace(ds, train=dataclasses.replace(ds.train,
                                                            items=items))
  assert moved.fingerprint() != ds.fingerprint()
  wider = dataclasses.replace(ds, modalities={
      m: np.concatenate([f, f[:, :1]], axis=1)
      for m, f in ds.modalities.items()})
  assert wider.fingerprint() != ds.fingerprint()
