"""Every input-data problem is a one-line DataError naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path
import pickle
from typing import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from mmssl_jax.data import formats
from mmssl_jax.data.dataset import DataError, Dataset, Split
from mmssl_jax.data.validate import validate_dataset

GOOD_TRAIN = {"0": [1, 2], "1": [0], "2": [4, 0]}
GOOD_VAL = {"0": [3], "1": [2]}
GOOD_TEST = {"1": [3], "2": [1]}
INTER_HEADER = "userID\titemID\tx_label"
GOOD_INTER = ["0\t1\t0", "0\t2\t0", "1\t0\t0", "0\t3\t1", "1\t1\t2"]


def write_folder(folder: Path, train=None, val=None, test=None,
                 feats: dict[str, np.ndarray] | None = None) -> Path:
  """A valid 3-user, 5-item mmssl folder, with the given parts replaced."""
  folder.mkdir(parents=True, exist_ok=True)
  for name, obj, default in (("train", train, GOOD_TRAIN),
                             ("val", val, GOOD_VAL), ("test", test, GOOD_TEST)):
    text = obj if isinstance(obj, str) else json.dumps(
        default if obj is None else obj)
    (folder / f"{name}.json").write_text(text)
  if feats is None:
    feats = {"image": np.ones((5, 4), np.float32)}
  for m, arr in feats.items():
    np.save(folder / f"{m}_feat.npy", arr, allow_pickle=True)
  return folder


def write_inter(folder: Path, header: str = INTER_HEADER,
                rows: list[str] | None = None, name: str = "d.inter") -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  lines = [header] + (GOOD_INTER if rows is None else rows)
  (folder / name).write_text("\n".join(lines) + "\n")
  return folder


def write_pickles(folder: Path, shape=(3, 5), mats=None) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  default = [sp.coo_matrix(([1.0], ([u], [i])), shape=shape)
             for u, i in ((0, 1), (1, 2), (2, 3))]
  for name, mat in zip(formats.PICKLE_FILES, mats or default):
    with open(folder / name, "wb") as f:
      pickle.dump(mat, f)
  return folder


def expect_error(fn: Callable[[], object], file: str, *phrases: str) -> str:
  """Asserts fn raises a one-line DataError naming `file` and each phrase."""
  with pytest.raises(DataError) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg and "\r" not in msg, msg
  assert file in msg, msg
  for phrase in phrases:
    assert phrase in msg, msg
  return msg


def test_good_folders_load(tmp_path: Path):
  assert len(formats.load_folder(write_folder(tmp_path / "a")).train) == 5
  assert len(formats.load_folder(write_inter(tmp_path / "b")).train) == 3
  assert len(formats.load_folder(write_pickles(tmp_path / "c")).test) == 1


# ---------------------------------------------------------------------------
# Missing or misplaced files


def test_missing_folder(tmp_path: Path):
  expect_error(lambda: formats.load_folder(tmp_path / "nope"), "nope",
               "not found", "train.json", "trnMat.pkl", ".inter")


def test_folder_is_a_file(tmp_path: Path):
  (tmp_path / "f").write_text("")
  expect_error(lambda: formats.load_folder(tmp_path / "f"), "f", "is a file")


def test_undetectable_folder_lists_expected_files(tmp_path: Path):
  (tmp_path / "empty").mkdir()
  expect_error(lambda: formats.load_folder(tmp_path / "empty"), "empty",
               "cannot detect", "train.json", "valMat.pkl", "x_label")


def test_missing_split_file(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  (folder / "val.json").unlink()
  expect_error(lambda: formats.load_folder(folder), "val.json", "not found",
               "train.json, val.json, test.json")


def test_missing_pickle_file(tmp_path: Path):
  folder = write_pickles(tmp_path / "d")
  (folder / "tstMat.pkl").unlink()
  expect_error(lambda: formats.load_folder(folder), "tstMat.pkl", "not found",
               "trnMat.pkl, valMat.pkl, tstMat.pkl")


def test_missing_feature_file(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  expect_error(lambda: formats.load_folder(folder, modalities=["image", "text"]),
               "text_feat.npy", "not found", "image_feat.npy")


def test_split_is_a_directory(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  (folder / "test.json").unlink()
  (folder / "test.json").mkdir()
  expect_error(lambda: formats.load_folder(folder), "test.json",
               "is a directory")


def test_feature_is_a_directory(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  (folder / "audio_feat.npy").mkdir()
  expect_error(lambda: formats.load_folder(folder), "audio_feat.npy",
               "is a directory")


def test_bad_arguments(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  expect_error(lambda: formats.load_folder(folder, format="csv"), "d",
               "unknown format 'csv'")
  expect_error(lambda: formats.load_folder(folder, modalities="image"), "d",
               "list of names")
  expect_error(lambda: formats.load_folder(folder, modalities=["../x"]), "d",
               "bad modality name")
  expect_error(lambda: formats.load_folder(folder, modalities=["a", "a"]), "d",
               "duplicate modality")


# ---------------------------------------------------------------------------
# JSON content


@pytest.mark.parametrize("split,text,phrase", [
    ("train", '{"0": [1, 2', "malformed JSON at line 1 column 12"),
    ("val", '{"0": [3]\n "1": [2]}', "malformed JSON at line 2 column 2"),
    ("test", b"\xff\xfe{}", "not UTF-8"),
    ("train", "[[1, 2], [0]]", "expected a JSON object"),
    ("val", '{"0": 3}', "user 0: expected a list of item ids, got a JSON number"),
    ("test", '{"0": {"1": 2}}', "got a JSON object"),
    ("train", '{"0": [1, "abc"]}', 'user 0: item id "abc" is not an integer'),
    ("train", '{"0": [1, "2"]}', 'item id "2" is not an integer'),
    ("val", '{"0": [1.5]}', "item id 1.5 is not an integer"),
    ("val", '{"0": [2.0]}', "item id 2.0 is not an integer"),
    ("test", '{"1": [true]}', "item id true is not an integer"),
    ("test", '{"1": [null]}', "item id null is not an integer"),
    ("train", '{"abc": [1]}', "user key 'abc' is not an integer"),
    ("train", '{"1.5": [1]}', "user key '1.5' is not an integer"),
    ("train", '{"+1": [1]}', "user key '+1' is not an integer"),
    ("val", '{"-1": [1]}', "negative user id -1"),
    ("test", '{"2": [1, -4]}', "user 2: negative item id -4"),
    ("test", '{"99999999999": [1]}', "user id 99999999999 too large"),
    ("test", '{"2": [99999999999]}', "item id 99999999999 too large"),
    ("test", '{"2": [99999999999999999999999]}', "item id too large"),
])
def test_bad_json(tmp_path: Path, split: str, text: str | bytes, phrase: str):
  folder = write_folder(tmp_path / "d")
  path = folder / f"{split}.json"
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text)
  expect_error(lambda: formats.load_folder(folder), f"{split}.json", phrase)


def test_item_out_of_range_of_features(tmp_path: Path):
  folder = write_folder(tmp_path / "d", test={"1": [3], "2": [5]})
  expect_error(lambda: formats.load_folder(folder), "test.json",
               "user 2: item id 5 out of range (n_items 5 from image_feat.npy)")


def test_user_out_of_range_of_train_mat(tmp_path: Path):
  folder = write_folder(tmp_path / "d", test={"3": [1]})
  mat = sp.csr_matrix(([1.0] * 5, ([0, 0, 1, 2, 2], [1, 2, 0, 4, 0])),
                      shape=(3, 5))
  with open(folder / "train_mat", "wb") as f:
    pickle.dump(mat, f)
  expect_error(lambda: formats.load_folder(folder), "test.json",
               "user 3: user id 3 out of range (n_users 3 from train_mat)")


def test_train_mat_must_match_train_json(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  mat = sp.csr_matrix(([1.0] * 4, ([0, 0, 1, 2], [1, 2, 0, 4])), shape=(3, 5))
  with open(folder / "train_mat", "wb") as f:
    pickle.dump(mat, f)
  expect_error(lambda: formats.load_folder(folder), "train_mat",
               "nonzeros (4 pairs) differ", "5 distinct pairs of train.json")


# ---------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("arr,phrase", [
    (np.ones(5, np.float32), "2-D numeric array"),
    (np.ones((5, 2, 2), np.float32), "2-D numeric array"),
    (np.full((5, 2), "a"), "2-D numeric array"),
    (np.ones((5, 2), bool), "2-D numeric array"),
    (np.ones((5, 0), np.float32), "2-D numeric array"),
    (np.array([[1, "x"]] * 5, dtype=object), "object array"),
])
def test_features_not_numeric_matrix(tmp_path: Path, arr: np.ndarray,
                                     phrase: str):
  folder = write_folder(tmp_path / "d", feats={"image": arr})
  expect_error(lambda: formats.load_folder(folder), "image_feat.npy", phrase)


def test_features_nan_and_inf(tmp_path: Path):
  arr = np.ones((5, 3), np.float64)
  arr[1, 0], arr[3, 2], arr[4, 1] = np.nan, np.inf, 1e300  # 1e300 overflows
  folder = write_folder(tmp_path / "d", feats={"image": arr})
  expect_error(lambda: formats.load_folder(folder), "image_feat.npy",
               "3 feature rows contain NaN or inf", "first: row 1")


def test_feature_rows_differ_between_modalities(tmp_path: Path):
  folder = write_folder(tmp_path / "d", feats={
      "audio": np.ones((6, 2), np.float32), "image": np.ones((5, 2), np.float32)})
  expect_error(lambda: formats.load_folder(folder), "image_feat.npy",
               "feature rows 5 != n_items 6 (from audio_feat.npy)")


def test_feature_rows_differ_from_pickle_shape(tmp_path: Path):
  folder = write_pickles(tmp_path / "d")
  np.save(folder / "image_feat.npy", np.ones((4, 2), np.float32))
  expect_error(lambda: formats.load_folder(folder), "image_feat.npy",
               "feature rows 4 != n_items 5 (from trnMat.pkl)")


def test_corrupt_npy(tmp_path: Path):
  folder = write_folder(tmp_path / "d")
  (folder / "text_feat.npy").write_text("hello")
  expect_error(lambda: formats.load_folder(folder), "text_feat.npy",
               "unreadable .npy file (not in .npy format)")
  raw = (folder / "image_feat.npy").read_bytes()
  (folder / "text_feat.npy").write_bytes(raw[:-8])  # truncated data
  expect_error(lambda: formats.load_folder(folder), "text_feat.npy",
               "unreadable .npy file")


# ---------------------------------------------------------------------------
# Pickles


def test_corrupt_pickle(tmp_path: Path):
  folder = write_pickles(tmp_path / "d")
  (folder / "valMat.pkl").write_bytes(b"\x80\x04garbage")
  expect_error(lambda: formats.load_folder(folder), "valMat.pkl",
               "unreadable pickle")
  (folder / "valMat.pkl").write_bytes(b"")
  expect_error(lambda: formats.load_folder(folder), "valMat.pkl",
               "unreadable pickle")


def test_pickle_of_wrong_type_or_shape(tmp_path: Path):
  folder = write_pickles(tmp_path / "d", mats=[
      {"not": "a matrix"}, sp.csr_matrix((3, 5)), sp.csr_matrix((3, 5))])
  expect_error(lambda: formats.load_folder(folder), "trnMat.pkl",
               "expected a pickled 2-D scipy sparse matrix, got dict")
  one = sp.csr_matrix(([1.0], ([0], [1])), shape=(3, 5))
  folder = write_pickles(tmp_path / "e", mats=[one, one, sp.csr_matrix((3, 6))])
  expect_error(lambda: formats.load_folder(folder), "tstMat.pkl",
               "matrix shape (3, 6) != trnMat.pkl shape (3, 5)")


# ---------------------------------------------------------------------------
# MMRec .inter


@pytest.mark.parametrize("header,rows,phrase", [
    ("userID\titemID", None, "line 1: missing column(s) x_label"),
    ("user_id:token\titem_id:token\trating:float", ["1\t2\t3"],
     "missing column(s) userID, itemID, x_label"),
    (INTER_HEADER, ["0\t1\t0", "0\t2\t3"], "line 3: x_label '3' is not 0, 1 or 2"),
    (INTER_HEADER, ["0\t1\t0", "0\t2\ttrain"], "line 3: x_label 'train'"),
    (INTER_HEADER, ["0\t1\t0", "u1\t2\t1"], "line 3: userID 'u1' is not an integer"),
    (INTER_HEADER, ["0\t1\t0", "0\t2.5\t1"], "line 3: itemID '2.5' is not an integer"),
    (INTER_HEADER, ["0\t1\t0", "", "0\t2"], "line 4: expected 3 tab-separated fields, got 2"),
    (INTER_HEADER, ["0\t1\t0", "0 2 1"], "line 3: expected 3 tab-separated fields, got 1"),
    (INTER_HEADER, ["0\t1\t0", "0\t-2\t1"], "line 3: negative item id -2"),
])
def test_bad_inter(tmp_path: Path, header: str, rows, phrase: str):
  folder = write_inter(tmp_path / "d", header, rows)
  expect_error(lambda: formats.load_folder(folder, format="mmrec"), "d.inter",
               phrase)


def test_recbole_inter_is_named_as_such(tmp_path: Path):
  folder = write_inter(tmp_path / "d", "user_id:token\titem_id:token", ["1\t2"])
  expect_error(lambda: formats.load_folder(folder, format="mmrec"), "d.inter",
               "RecBole atomic file")


def test_inter_file_count(tmp_path: Path):
  folder = write_inter(tmp_path / "d")
  write_inter(folder, name="e.inter")
  expect_error(lambda: formats.load_folder(folder), str(folder),
               "exactly one <name>.inter", "d.inter, e.inter")
  (tmp_path / "none").mkdir()
  expect_error(lambda: formats.load_folder(tmp_path / "none", format="mmrec"),
               "none", "found: none")


# ---------------------------------------------------------------------------
# Split-level rules


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_empty_split(tmp_path: Path, split: str):
  folder = write_folder(tmp_path / "d", **{split: {"0": [], "1": []}})
  expect_error(lambda: formats.load_folder(folder), f"{split}.json",
               f"empty {split} split")


def test_empty_split_in_inter_and_pickle(tmp_path: Path):
  folder = write_inter(tmp_path / "r", rows=["0\t1\t0", "0\t2\t2"])
  expect_error(lambda: formats.load_folder(folder), "d.inter (x_label 1, val)",
               "empty val split")
  one = sp.csr_matrix(([1.0], ([0], [1])), shape=(3, 5))
  folder = write_pickles(tmp_path / "p", mats=[sp.csr_matrix((3, 5)), one, one])
  expect_error(lambda: formats.load_folder(folder), "trnMat.pkl",
               "empty train split")


def test_users_without_val_or_test_items_are_fine(tmp_path: Path):
  folder = write_folder(tmp_path / "d", val={"0": [3], "1": [], "2": []})
  assert len(formats.load_folder(folder).val) == 1


@pytest.mark.parametrize("split", ["val", "test"])
def test_all_items_already_in_train(tmp_path: Path, split: str):
  folder = write_folder(tmp_path / "d", **{split: {"0": [3], "2": [4, 0]}})
  expect_error(lambda: formats.load_folder(folder), f"{split}.json",
               f"user 2: all 2 {split} items are also in that user's train items")


def test_partial_train_overlap_is_dropped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture):
  folder = write_folder(tmp_path / "d", test={"1": [3, 0], "2": [1, 4]})
  ds = formats.load_folder(folder)
  assert sorted(zip(ds.test.users.tolist(), ds.test.items.tolist())) == [
      (1, 3), (2, 1)]
  assert "test.json: dropped 2 test interactions whose item is also in" in (
      caplog.text)


def test_duplicates_are_removed_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture):
  folder = write_folder(tmp_path / "d", train={"0": [1, 2, 1, 1], "00": [2],
                                               "1": [0], "2": [4, 0]})
  ds = formats.load_folder(folder)
  assert len(ds.train) == 5
  assert "train.json: dropped 3 duplicate interactions in the train split" in (
      caplog.text)


# ---------------------------------------------------------------------------
# validate_dataset on in-memory data


def make_dataset(**overrides) -> Dataset:
  fields = dict(name="mem", n_users=3, n_items=4,
                train=Split([0, 1], [1, 2]), val=Split([0], [3]),
                test=Split([2], [0]),
                modalities={"image": np.ones((4, 2), np.float32)})
  fields.update(overrides)
  return Dataset(**fields)


def test_validate_dataset_accepts_good_data():
  validate_dataset(make_dataset(), "synthetic")


@pytest.mark.parametrize("overrides,phrase", [
    (dict(n_users=0), "must be positive"),
    (dict(test=Split([3], [0])), "(test): user id 3 out of range (n_users 3)"),
    (dict(val=Split([0], [-1])), "(val): negative item id -1"),
    (dict(train=Split([], [])), "empty train split"),
    (dict(modalities={"image": np.ones((5, 2), np.float32)}),
     "(modality image): feature rows 5 != n_items 4"),
    (dict(modalities={"image": np.full((4, 2), np.nan, np.float32)}),
     "4 feature rows contain NaN"),
    (dict(modalities={"image": np.ones((4, 2))}), "must be a float32"),
    (dict(modalities={"image": np.ones(4, np.float32)}), "2-D numeric array"),
])
def test_validate_dataset_errors(overrides: dict, phrase: str):
  expect_error(lambda: validate_dataset(make_dataset(**overrides), "synthetic"),
               "synthetic", phrase)


def test_user_with_every_item_in_train_is_rejected(tmp_path):
  """BPR could not sample a negative for such a user (the released sampler
  would loop forever)."""
  import json  # pylint: disable=g-import-not-at-top
  from mmssl_jax.data import formats  # pylint: disable=g-import-not-at-top
  from mmssl_jax.data.dataset import DataError  # pylint: disable=g-import-not-at-top
  (tmp_path / "train.json").write_text(json.dumps({"0": [0, 1, 2], "1": [0]}))
  (tmp_path / "val.json").write_text(json.dumps({"1": [1]}))
  (tmp_path / "test.json").write_text(json.dumps({"1": [2]}))
  with pytest.raises(DataError, match="user 0 has all 3 items in train"):
    formats.load_folder(tmp_path)
