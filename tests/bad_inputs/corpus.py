r"""Builds a corpus of malformed dataset folders, one problem each.

  python tests/bad_inputs/corpus.py OUT_DIR   # writes the folders, lists them

Every case starts from the same small valid dataset (MMSSL JSON splits plus
`audio_feat.npy` and `image_feat.npy`, or its MMRec / pickle conversion) and
breaks one thing. `Case.file` is the path (or dataset name) the one-line
error must name and `Case.problem` a phrase it must contain.

On "a user in test but not in train": that is NOT an error. Cold-start users
(val/test items but no train items) are legitimate and load; the loader only
rejects a user whose val (or test) items are ALL in that user's train items,
since the user would be left without targets. The corpus therefore has
`val_items_all_in_train` (an error) and `VALID_COLD_START` checks that the
cold-start case loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import pickle
import shutil
import sys

import numpy as np
import scipy.sparse as sp

from mmssl_jax.data import formats
from mmssl_jax.data import synthetic
from mmssl_jax.data.dataset import Dataset, Split

N_USERS, N_ITEMS = 24, 60  # >= 50 items: configs/tiktok.py ranks the top 50


@dataclasses.dataclass(frozen=True)
class Case:
  """One malformed dataset.

  name: the folder name under the corpus root.
  data_dir: the value for --config.data.dir.
  file: what the error must name (a path, or the dataset's name).
  problem: a phrase the error must contain.
  args: extra command-line flags (e.g. a forced format).
  """

  name: str
  data_dir: str
  file: str
  problem: str
  args: tuple[str, ...] = ()


def valid_dataset() -> Dataset:
  """A small valid dataset with audio and image features."""
  from mmssl_jax import config_lib  # pylint: disable=g-import-not-at-top
  s = config_lib.synthetic_config()
  s.n_users, s.n_items, s.n_factors, s.mean_interactions = (N_USERS, N_ITEMS,
                                                            4, 8)
  s.modality_dims = {"audio": 4, "image": 6}
  s.modality_noise = {"audio": 0.5, "image": 0.5}
  return synthetic.make_synthetic(s)


def _read(path: Path) -> dict:
  return json.loads(path.read_text())


def _write(path: Path, obj) -> None:
  path.write_text(json.dumps(obj))


def _first_user(split: dict) -> str:
  return next(u for u, items in split.items() if items)


def build_corpus(root: str | Path) -> list[Case]:
  """Writes every case under `root` (which must not exist or be empty)."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  ds = valid_dataset()
  base = formats.write_mmssl(ds, root / "_valid_mmssl")
  mmrec = formats.write_mmrec(ds, root / "_valid_mmrec")
  inter_name = next(mmrec.glob("*.inter")).name
  cases: list[Case] = []

  def new(name, template=base):
    folder = root / name
    shutil.copytree(template, folder)
    return folder

  def add(name, folder, file, problem, *args):
    cases.append(Case(name, str(folder), str(file), problem, tuple(args)))

  # --- MMSSL JSON splits
  d = new("truncated_json")
  text = (d / "train.json").read_text()
  (d / "train.json").write_text(text[:len(text) // 2])
  add("truncated_json", d, d / "train.json", "malformed JSON at line 1")

  d = new("json_not_an_object")
  _write(d / "val.json", [[0, 1], [1, 2]])
  add("json_not_an_object", d, d / "val.json",
      "expected a JSON object", )

  d = new("item_id_is_a_string")
  obj = _read(d / "test.json")
  obj[_first_user(obj)] = ["3"]
  _write(d / "test.json", obj)
  add("item_id_is_a_string", d, d / "test.json", 'item id "3" is not an '
      "integer")

  d = new("item_id_is_a_float")
  obj = _read(d / "train.json")
  obj[_first_user(obj)].append(2.5)
  _write(d / "train.json", obj)
  add("item_id_is_a_float", d, d / "train.json", "item id 2.5 is not an "
      "integer")

  d = new("user_key_not_an_integer")
  obj = _read(d / "train.json")
  obj["alice"] = [1]
  _write(d / "train.json", obj)
  add("user_key_not_an_integer", d, d / "train.json",
      "user key 'alice' is not an integer")

  d = new("negative_user_id")
  obj = _read(d / "val.json")
  obj["-3"] = [1]
  _write(d / "val.json", obj)
  add("negative_user_id", d, d / "val.json", "negative user id -3")

  d = new("negative_item_id")
  obj = _read(d / "train.json")
  obj[_first_user(obj)].append(-1)
  _write(d / "train.json", obj)
  add("negative_item_id", d, d / "train.json", "negative item id -1")

  d = new("item_id_out_of_range")
  obj = _read(d / "test.json")
  obj[_first_user(obj)] = [N_ITEMS]
  _write(d / "test.json", obj)
  add("item_id_out_of_range", d, d / "test.json",
      f"item id {N_ITEMS} out of range (n_items {N_ITEMS} from audio_feat.npy)")

  d = new("items_not_a_list")
  obj = _read(d / "train.json")
  obj[_first_user(obj)] = 5
  _write(d / "train.json", obj)
  add("items_not_a_list", d, d / "train.json",
      "expected a list of item ids, got a JSON number")

  d = new("json_not_utf8")
  (d / "val.json").write_bytes(b'{"0": [1]}\xff\xfe')
  add("json_not_utf8", d, d / "val.json", "not UTF-8")

  d = new("empty_val_split")
  _write(d / "val.json", {u: [] for u in _read(d / "val.json")})
  add("empty_val_split", d, d / "val.json", "empty val split")

  # The error that replaces "a user in test but not in train" (allowed).
  d = new("val_items_all_in_train")
  train, val = _read(d / "train.json"), _read(d / "val.json")
  user = _first_user(val)
  val[user] = [train[user][0]]
  _write(d / "val.json", val)
  add("val_items_all_in_train", d, d / "val.json",
      f"user {user}: all 1 val items are also in that user's train items")

  d = new("split_is_a_directory")
  (d / "train.json").unlink()
  (d / "train.json").mkdir()
  add("split_is_a_directory", d, d / "train.json",
      "is a directory, expected a file")

  d = new("missing_test_json")
  (d / "test.json").unlink()
  add("missing_test_json", d, d / "test.json", "file not found")

  d = root / "data_dir_is_a_file"
  d.write_text("not a folder\n")
  add("data_dir_is_a_file", d, d, "is a file, expected a dataset folder")

  d = new("empty_folder")
  for p in d.iterdir():
    p.unlink()
  add("empty_folder", d, d, "cannot detect the dataset format")

  d = new("train_mat_disagrees")
  mat = sp.coo_matrix(([1.0], ([0], [0])), shape=(N_USERS, N_ITEMS))
  with open(d / "train_mat", "wb") as f:
    pickle.dump(mat, f)
  add("train_mat_disagrees", d, d / "train_mat", "differ from the")

  # --- Features
  d = new("features_with_nan")
  feat = np.load(d / "image_feat.npy")
  feat[7, 2] = np.nan
  np.save(d / "image_feat.npy", feat)
  add("features_with_nan", d, d / "image_feat.npy",
      "1 feature rows contain NaN or inf (first: row 7)")

  d = new("features_wrong_row_count")
  np.save(d / "image_feat.npy", np.load(d / "image_feat.npy")[:-1])
  add("features_wrong_row_count", d, d / "image_feat.npy",
      f"feature rows {N_ITEMS - 1} != n_items {N_ITEMS} (from audio_feat.npy)")

  d = new("features_string_dtype")
  np.save(d / "audio_feat.npy", np.full((N_ITEMS, 4), "x"))
  add("features_string_dtype", d, d / "audio_feat.npy", "dtype <U1")

  d = new("features_object_dtype")
  np.save(d / "audio_feat.npy", np.array([{"a": 1}] * N_ITEMS, dtype=object),
          allow_pickle=True)
  add("features_object_dtype", d, d / "audio_feat.npy", "object array")

  d = new("features_one_dimensional")
  np.save(d / "image_feat.npy", np.ones(N_ITEMS, np.float32))
  add("features_one_dimensional", d, d / "image_feat.npy",
      f"2-D numeric array (items x dims), got shape ({N_ITEMS},)")

  d = new("features_not_npy")
  (d / "image_feat.npy").write_bytes(b"PK\x03\x04 this is a zip, not .npy")
  add("features_not_npy", d, d / "image_feat.npy", "not in .npy format")

  d = new("features_truncated_npy")
  data = (d / "audio_feat.npy").read_bytes()
  (d / "audio_feat.npy").write_bytes(data[:len(data) // 2])
  add("features_truncated_npy", d, d / "audio_feat.npy", "unreadable .npy")

  d = new("features_is_a_directory")
  (d / "image_feat.npy").unlink()
  (d / "image_feat.npy").mkdir()
  add("features_is_a_directory", d, d / "image_feat.npy", "is a directory")

  d = new("no_features_for_mmssl")
  for p in d.glob("*_feat.npy"):
    p.unlink()
  add("no_features_for_mmssl", d, d.name,
      "MMSSL needs at least one modality")

  d = new("unknown_format")
  add("unknown_format", d, d, "unknown format 'csv'",
      "--config.data.format=csv")

  # --- MMRec .inter
  def inter_case(name, edit, file_problem, *args):
    d = new(name, mmrec)
    path = d / inter_name
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    add(name, d, path, file_problem, *args)

  inter_case("mmrec_bad_label",
             lambda ls: ls[:3] + [ls[3].rsplit("\t", 1)[0] + "\t3"] + ls[4:],
             "line 4: x_label '3' is not 0, 1 or 2 (train/val/test)")
  inter_case("mmrec_user_not_an_integer",
             lambda ls: ls[:2] + ["u7\t1\t0"] + ls[2:],
             "line 3: userID 'u7' is not an integer")
  inter_case("mmrec_short_line",
             lambda ls: ls[:5] + ["3\t1"] + ls[5:],
             "line 6: expected 3 tab-separated fields, got 2")
  inter_case("mmrec_missing_column",
             lambda ls: ["userID\titem\tx_label"] + ls[1:],
             "missing column(s) itemID", "--config.data.format=mmrec")
  inter_case("mmrec_item_out_of_range",
             lambda ls: ls + [f"0\t{N_ITEMS + 5}\t2"],
             f"item id {N_ITEMS + 5} out of range")

  d = new("mmrec_two_inter_files", mmrec)
  shutil.copy(d / inter_name, d / "other.inter")
  add("mmrec_two_inter_files", d, d, "expects exactly one <name>.inter",
      "--config.data.format=mmrec")

  # --- Pickled matrices
  def pickle_folder(name):
    d = root / name
    d.mkdir()
    for split, file in zip((ds.train, ds.val, ds.test), formats.PICKLE_FILES):
      mat = sp.coo_matrix((np.ones(len(split)), (split.users, split.items)),
                          shape=(N_USERS, N_ITEMS))
      with open(d / file, "wb") as f:
        pickle.dump(mat, f)
    for m, feat in ds.modalities.items():
      np.save(d / f"{m}_feat.npy", feat)
    return d

  d = pickle_folder("pickle_unreadable")
  (d / "valMat.pkl").write_bytes(b"\x80\x04\x95garbage, not a pickle")
  add("pickle_unreadable", d, d / "valMat.pkl", "unreadable pickle")

  d = pickle_folder("pickle_wrong_type")
  with open(d / "tstMat.pkl", "wb") as f:
    pickle.dump([[0, 1], [1, 0]], f)
  add("pickle_wrong_type", d, d / "tstMat.pkl",
      "expected a pickled 2-D scipy sparse matrix, got list")

  d = pickle_folder("pickle_shape_mismatch")
  with open(d / "valMat.pkl", "wb") as f:
    pickle.dump(sp.coo_matrix((N_USERS + 1, N_ITEMS)), f)
  add("pickle_shape_mismatch", d, d / "valMat.pkl",
      f"matrix shape ({N_USERS + 1}, {N_ITEMS}) != trnMat.pkl shape")

  d = pickle_folder("pickle_missing_file")
  (d / "tstMat.pkl").unlink()
  add("pickle_missing_file", d, d / "tstMat.pkl", "file not found",
      "--config.data.format=pickle")

  return cases


def cold_start_folder(root: str | Path) -> Path:
  """A VALID folder where a test user has no train items (cold start)."""
  ds = valid_dataset()
  user = N_USERS  # a new user, only in test
  test = Split(np.append(ds.test.users, user), np.append(ds.test.items, 0))
  ds = Dataset(ds.name, N_USERS + 1, ds.n_items, ds.train, ds.val, test,
               ds.modalities)
  return formats.write_mmssl(ds, Path(root) / "cold_start_user")


if __name__ == "__main__":
  for case in build_corpus(sys.argv[1]):
    print(f"{case.name}\t{case.data_dir}\t{case.problem}")
