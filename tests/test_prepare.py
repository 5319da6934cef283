"""prepare: reading, dedup, iterative k-core, remapping, LATTICE split, features, CLI."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from mmssl_jax.data import formats
from mmssl_jax.data import prepare as prep
from mmssl_jax.data.dataset import DataError

REPO = Path(__file__).resolve().parent.parent

# user -> [(item, timestamp)]. With --kcore=3 the filter needs four rounds:
#   1. users u05 (2 items), u07 (1), u12 (2) and item Q (u06, u07) go;
#   2. then item P (only u03 left) and user u06 (A, B left) go;
#   3. then user u03 (M, N left) and items A, B (u01, u02 left) go;
#   4. stable.
# Survivors: users u01 u02 u04 u10 u11 u9 x08 (string order: 'u10' < 'u9'),
# items C..O, R, S.
LOG = {
    "u01": [(c, 100 + k) for k, c in enumerate("ABCDEFGHIJKLMNORS")],  # S latest
    "u02": [(c, 50 + k) for k, c in enumerate("ABCDEFGHIJKLRS")],
    "u03": [("M", 1), ("N", 2), ("P", 3)],
    "u04": [("M", 5), ("N", 7), ("O", 7)],  # N, O tie: O (larger id) is later
    "u05": [("O", 1), ("P", 2)],
    "u06": [("A", 1), ("B", 2), ("Q", 3)],
    "u07": [("Q", 1)],
    "x08": [("C", 3), ("D", 1), ("E", 2), ("S", 4)],
    "u9": [("F", 10), ("G", 20), ("H", 30), ("F", 40)],  # duplicate F, later
    "u10": [("I", 1), ("J", 2), ("K", 3)],
    "u11": [("L", 1), ("M", 2), ("N", 3), ("O", 4), ("R", 5)],
    "u12": [("A", 1), ("P", 2)],
}
DUPLICATES = [("u02", "A", 999), ("u9", "F", 41)]
USERS = ["u01", "u02", "u04", "u10", "u11", "u9", "x08"]
ITEMS = list("CDEFGHIJKLMNORS")
SURVIVING = {
    "u01": set("CDEFGHIJKLMNORS"), "u02": set("CDEFGHIJKLRS"),
    "u04": set("MNO"), "x08": set("CDES"), "u9": set("FGH"), "u10": set("IJK"),
    "u11": set("LMNOR"),
}
N_INTERACTIONS = 45  # 15 + 12 + 3 + 4 + 3 + 3 + 5
# LATTICE: n < 10 -> 1 test + 1 val; n >= 10 -> h = int(0.2 n), h//2 test.
EXPECTED_HOLDOUT = {"u01": (1, 2), "u02": (1, 1), "u04": (1, 1), "x08": (1, 1),
                    "u9": (1, 1), "u10": (1, 1), "u11": (1, 1)}


def write_log(path: Path, sep: str = ",", header=("user", "item", "timestamp"),
              log=None) -> Path:
  rows = [sep.join(header)]
  for user, pairs in (log or LOG).items():
    rows += [sep.join([user, item, str(t)]) for item, t in pairs]
  if log is None:
    rows += [sep.join([u, i, str(t)]) for u, i, t in DUPLICATES]
  path.write_text("\n".join(rows) + "\n")
  return path


@pytest.fixture(name="log_csv")
def log_csv_fixture(tmp_path: Path) -> Path:
  return write_log(tmp_path / "log.csv")


def items_by_user(prepared: prep.Prepared, split: str) -> dict[str, set[str]]:
  ds = prepared.dataset
  lists = getattr(ds, split).user_lists(ds.n_users)
  return {str(prepared.user_ids[u]): {str(prepared.item_ids[i]) for i in items}
          for u, items in enumerate(lists)}


def test_kcore_mapping_and_split_sizes(log_csv: Path):
  p = prep.prepare(log_csv, kcore=3, seed=123)
  ds = p.dataset
  assert p.user_ids.tolist() == USERS
  assert p.item_ids.tolist() == ITEMS
  assert (ds.n_users, ds.n_items) == (7, 15)
  assert len(ds.train) + len(ds.val) + len(ds.test) == N_INTERACTIONS
  # 61 rows in LOG + 2 more; (u9, F) thrice and (u02, A) twice.
  assert p.counts == {"rows": 63, "users": 12, "items": 19, "distinct": 60,
                      "kept": N_INTERACTIONS}
  train, val, test = (items_by_user(p, s) for s in ("train", "val", "test"))
  for user, items in SURVIVING.items():
    n_test, n_val = EXPECTED_HOLDOUT[user]
    assert (len(test[user]), len(val[user])) == (n_test, n_val), user
    assert train[user] | val[user] | test[user] == items
    assert len(train[user]) == len(items) - n_test - n_val
  assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 8, 7)


def test_holdout_sizes_follow_lattice():
  n = np.array([0, 1, 2, 3, 9, 10, 14, 15, 19, 20, 25, 34, 35, 100])
  n_test, n_val = prep.holdout_sizes(n)
  assert n_test.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 10]
  assert n_val.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 10]
  # LATTICE build_data.py: 2 if n < 10 else int(n * 0.2), first half test.
  lattice = [0 if k < 3 else 2 if k < 10 else int(k * 0.2) for k in n]
  assert (n_test + n_val).tolist() == lattice
  assert n_test.tolist() == [h // 2 for h in lattice]


def test_small_users_stay_in_train(log_csv: Path):
  p = prep.prepare(log_csv, kcore=0)
  train, val, test = (items_by_user(p, s) for s in ("train", "val", "test"))
  assert p.dataset.n_users == 12 and p.dataset.n_items == 19
  for user in ("u05", "u07", "u12"):  # 2, 1 and 2 interactions
    assert train[user] == {i for i, _ in LOG[user]}
    assert not val[user] and not test[user]
  assert len(test["u03"]) == len(val["u03"]) == 1


def test_chronological_split_holds_out_the_latest(log_csv: Path):
  p = prep.prepare(log_csv, kcore=3, split="chronological")
  train, val, test = (items_by_user(p, s) for s in ("train", "val", "test"))
  assert test["u01"] == {"S"} and val["u01"] == {"O", "R"}
  assert test["u02"] == {"S"} and val["u02"] == {"R"}
  assert test["x08"] == {"S"} and val["x08"] == {"C"}
  assert test["u04"] == {"O"} and val["u04"] == {"N"}  # tie at t=7: O later
  # The duplicate (u9, F) keeps its earliest time, 10, so F stays in train.
  assert test["u9"] == {"H"} and val["u9"] == {"G"} and train["u9"] == {"F"}
  assert p.counts["distinct"] == 60


def test_random_split_is_seeded(log_csv: Path):
  def held_out(seed):
    p = prep.prepare(log_csv, kcore=3, seed=seed)
    return items_by_user(p, "val"), items_by_user(p, "test")

  assert held_out(123) == held_out(123)
  assert held_out(123) != held_out(7)


def test_features_reordered_by_item_ids(tmp_path: Path, log_csv: Path):
  # Rows in a scrambled order, with items the k-core removes (A, B, P, Q)
  # and one nobody interacted with (Z). Row value = code of the id's letter.
  row_ids = list("ZQSRBAPONMLKJIHGFEDC")
  (tmp_path / "ids.txt").write_text("\n".join(row_ids) + "\n\n")
  image = np.array([[ord(s), 1.0] for s in row_ids])
  text = np.array([[ord(s), ord(s) + 0.5, 0.0] for s in row_ids], np.float32)
  np.save(tmp_path / "image.npy", image)
  np.save(tmp_path / "text.npy", text)
  p = prep.prepare(log_csv, kcore=3,
                   features={"image": tmp_path / "image.npy",
                             "text": tmp_path / "text.npy"},
                   item_ids=tmp_path / "ids.txt")
  feats = p.dataset.modalities
  assert feats["image"].dtype == np.float32 and feats["image"].shape == (15, 2)
  assert feats["image"][:, 0].tolist() == [ord(c) for c in ITEMS]
  np.testing.assert_array_equal(feats["text"][:, 1],
                                [ord(c) + 0.5 for c in ITEMS])
  assert p.dataset.modality_dims == {"image": 2, "text": 3}


def test_features_without_item_ids_use_row_index(tmp_path: Path):
  # Ids '10' < '3' < '7' as strings; rows 0..11 hold their own index.
  log = {"a": [("3", 1), ("10", 2), ("7", 3)], "b": [("7", 1), ("3", 2),
                                                    ("10", 3)]}
  csv_path = write_log(tmp_path / "log.tsv", sep="\t", log=log)
  np.save(tmp_path / "f.npy", np.arange(12.0)[:, None] * [1.0, -1.0])
  p = prep.prepare(csv_path, kcore=0, features={"v": tmp_path / "f.npy"})
  assert p.item_ids.tolist() == ["10", "3", "7"]
  assert p.dataset.modalities["v"].tolist() == [[10, -10], [3, -3], [7, -7]]

  np.save(tmp_path / "short.npy", np.ones((8, 2)))  # no row for item '10'
  with pytest.raises(DataError, match=r"short\.npy: no feature row for item "
                     r"'10' \(1 of 3 items"):
    prep.prepare(csv_path, kcore=0, features={"v": tmp_path / "short.npy"})


def test_written_folder_loads(tmp_path: Path, log_csv: Path):
  np.save(tmp_path / "img.npy", np.arange(20.0)[:, None] * np.ones((1, 4)))
  # Letter ids need --item_ids; write one listing the letters A..T.
  (tmp_path / "ids.txt").write_text("\n".join("ABCDEFGHIJKLMNOPQRST"))
  p = prep.prepare(log_csv, kcore=3, features={"image": tmp_path / "img.npy"},
                   item_ids=tmp_path / "ids.txt", name="toy")
  for fmt in ("mmssl", "mmrec"):
    out = prep.write_prepared(p, tmp_path / fmt, format=fmt)
    loaded = formats.load_folder(out, name="toy")
    assert formats.detect_format(out) == fmt
    assert (loaded.n_users, loaded.n_items) == (7, 15)
    for split in ("train", "val", "test"):
      a, b = getattr(loaded, split), getattr(p.dataset, split)
      np.testing.assert_array_equal(a.users, b.users)
      np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(loaded.modalities["image"][:, 0],
                                  [ord(c) - ord("A") for c in ITEMS])
    mapping = (out / "item_mapping.tsv").read_text().splitlines()
    assert mapping[0] == "original_id\tnew_id"
    assert mapping[1:] == [f"{c}\t{k}" for k, c in enumerate(ITEMS)]
    users = (out / "user_mapping.tsv").read_text().splitlines()[1:]
    assert users == [f"{u}\t{k}" for k, u in enumerate(USERS)]
  with pytest.raises(DataError, match="refusing to overwrite"):
    prep.write_prepared(p, tmp_path / "mmssl")


def test_statistics_row(log_csv: Path):
  p = prep.prepare(log_csv, kcore=3, name="toy")
  # 45 / (7 * 15) -> sparsity 1 - 0.428571 = 57.143%
  assert prep.statistics_row(p.dataset) == (
      "| toy | 7 | 15 | 45 | 57.143% | none |")


def test_read_errors(tmp_path: Path):
  bad = tmp_path / "bad.csv"
  bad.write_text("user,item\nu1,i1\nu2\n")
  with pytest.raises(DataError, match=r"bad\.csv: line 3: expected 2 fields"):
    prep.read_interactions(bad)
  bad.write_text("user,item,timestamp\nu1,i1,5\nu1,i2,soon\n")
  with pytest.raises(DataError, match=r"line 3: timestamp 'soon' is neither"):
    prep.read_interactions(bad, time_col="timestamp")
  bad.write_text("user,item,timestamp\nu1,i1,2014-01-02\nu1,i2,2013-12-31\n")
  times = prep.read_interactions(bad, time_col="timestamp").times
  assert times[0] > times[1]
  with pytest.raises(DataError, match="no interactions survive the 5-core"):
    prep.prepare(bad)


# ---------------------------------------------------------------------------
# command line


def run_prepare(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "mmssl_jax.data.prepare", *args],
                        capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=60, check=False)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str):
  assert res.returncode == 1, res.stdout + res.stderr
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr
  assert lines[0].startswith("error: ")
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_cli(tmp_path: Path, log_csv: Path):
  out = tmp_path / "toy"
  res = run_prepare(f"--interactions={log_csv}", f"--output={out}", "--kcore=3",
                    "--split=chronological")
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert lines[0] == prep.TABLE_HEADER.splitlines()[0]
  assert lines[2] == "| toy | 7 | 15 | 45 | 57.143% | none |"
  assert lines[3] == ("63 rows, 3 duplicates dropped; 3-core kept 45 of 60 "
                      "interactions, users 12 -> 7, items 19 -> 15; "
                      "train/val/test 30/8/7")
  assert res.stderr == ""
  loaded = formats.load_folder(out)
  assert (loaded.n_users, loaded.n_items, len(loaded.test)) == (7, 15, 7)

  # A non-empty output folder is never touched.
  res = run_prepare(f"--interactions={log_csv}", f"--output={out}", "--kcore=3")
  assert_one_line_error(res, str(out), "refusing to overwrite")
  assert sorted(p.name for p in out.iterdir()) == [
      "item_mapping.tsv", "test.json", "train.json", "user_mapping.tsv",
      "val.json"]


def test_cli_errors(tmp_path: Path, log_csv: Path):
  res = run_prepare(f"--interactions={log_csv}", f"--output={tmp_path / 'a'}",
                    "--user_col=reviewer")
  assert_one_line_error(res, "log.csv", "missing column(s) reviewer",
                        "header is user | item | timestamp")
  assert not (tmp_path / "a").exists()

  ids = tmp_path / "ids.txt"
  ids.write_text("\n".join("ABCDEFGHIJKLMNOPQR"))  # no S
  np.save(tmp_path / "f.npy", np.ones((18, 2)))
  res = run_prepare(f"--interactions={log_csv}", f"--output={tmp_path / 'b'}",
                    "--kcore=3", f"--features=image:{tmp_path / 'f.npy'}",
                    f"--item_ids={ids}")
  assert_one_line_error(res, "f.npy", "no feature row for item 'S'",
                        "not listed in", "ids.txt")
  assert not (tmp_path / "b").exists()
