"""New items without retraining: `recommend --new_items` and `export --new_items`.

One run of configs/test.py with a cold-item split and the inductive item
encoder (data.cold_items=0.2, model.cold_start=True, 2 epochs) is trained
in-process and shared. Its own held-out (cold) items, written out as a
new-items folder, are the reference: they have no training interactions, so
the run already scores them as catalogue items with the encoder's vectors,
and ranking them as new items must give the same scores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys

import jax
import numpy as np
import pytest

import helpers
from mmssl_jax import export
from mmssl_jax import model as model_lib
from mmssl_jax import new_items
from mmssl_jax import recommend
from mmssl_jax import restore
from mmssl_jax import train
from mmssl_jax.data import DataError


def _train(tmp_path_factory, name: str, **overrides):
  config = helpers.load_config("test")
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  workdir = tmp_path_factory.mktemp(name) / "run"
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module", name="workdir")
def workdir_fixture(tmp_path_factory):
  return _train(tmp_path_factory, "new_items", data__cold_items=0.2,
                model__cold_start=True, train__epochs=2)


@pytest.fixture(scope="module", name="restored")
def restored_fixture(workdir):
  return restore.restore_best(str(workdir))


def _write_folder(folder, features) -> str:
  folder.mkdir(parents=True, exist_ok=True)
  for m, x in features.items():
    np.save(folder / f"{m}_feat.npy", x)
  return str(folder)


def _cold_features(restored) -> dict[str, np.ndarray]:
  ds = restored.dataset
  return {m: np.asarray(x)[ds.cold_items] for m, x in ds.modalities.items()}


@pytest.fixture(scope="module", name="folder")
def folder_fixture(restored, tmp_path_factory):
  """The run's cold items as a new-items folder (plus a file to ignore)."""
  folder = tmp_path_factory.mktemp("new") / "new"
  _write_folder(folder, _cold_features(restored))
  (folder / "README.txt").write_text("not a feature file\n")
  return str(folder)


def _encoded(restored) -> np.ndarray:
  return np.asarray(model_lib.encode_items(
      restored.state.params["cold_encoder"], _cold_features(restored)))


def _run(cli, args) -> tuple[int, str, str]:
  """(status, stdout, stderr) of an in-process CLI run."""
  out, err = io.StringIO(), io.StringIO()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "stderr", err)
    mp.setattr(sys, "stdout", out)
    if cli is recommend:
      status = recommend.run_cli(args, stdout=out)
    else:
      status = export.run_cli(args)
  return status, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------
# The API


def test_rank_new_items_scores_the_encoder_and_match_the_catalogue(
    restored, folder):
  ds = restored.dataset
  cold, n_new = ds.cold_items, len(ds.cold_items)
  features = recommend.read_new_items(folder, restored)
  assert list(features) == list(ds.modalities)
  users = [0, 1, 5, 42]
  ids, scores = recommend.rank_new_items(restored, users, features, n_new)
  assert ids.shape == scores.shape == (len(users), n_new)
  assert ids.dtype == np.int32 and scores.dtype == np.float32
  user, _ = jax.device_get(restored.run.final_embeddings(restored.state))
  by_hand = np.asarray(user)[users] @ _encoded(restored).T  # (users, N)
  catalogue_ids, catalogue_scores = recommend.recommend(restored, users,
                                                        ds.n_items)
  for row in range(len(users)):
    assert sorted(ids[row]) == list(range(ds.n_items, ds.n_items + n_new))
    assert np.all(np.diff(scores[row]) <= 0)
    np.testing.assert_allclose(scores[row], by_hand[row, ids[row] - ds.n_items],
                               rtol=1e-5, atol=1e-5)
    # New item n_items + r is catalogue item cold[r], scored the same.
    catalogue = dict(zip(catalogue_ids[row].tolist(),
                         catalogue_scores[row].tolist()))
    np.testing.assert_allclose(
        scores[row], [catalogue[int(cold[i - ds.n_items])] for i in ids[row]],
        rtol=1e-5, atol=1e-5)
  # With the catalogue: both kinds of id, training items still excluded;
  # new item n_items + r scores as its twin cold[r].
  k = ds.n_items + n_new
  ids, scores = recommend.rank_new_items(restored, users, features, k,
                                         include_catalogue=True)
  assert ids.shape == (len(users), k)
  train_lists = ds.train.user_lists(ds.n_users)
  for row, u in enumerate(users):
    got = ids[row][ids[row] >= 0]
    assert np.any(got >= ds.n_items) and np.any(got < ds.n_items)
    assert not set(got.tolist()) & set(train_lists[u].tolist())
    assert set(range(ds.n_items, ds.n_items + n_new)) <= set(got.tolist())
    score = dict(zip(ids[row].tolist(), scores[row].tolist()))
    np.testing.assert_allclose([score[ds.n_items + r] for r in range(n_new)],
                               [score[int(c)] for c in cold], rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(recommend.UserError, match=r"\[1, %d\] \(the number of "
                     "new items\\)" % n_new):
    recommend.rank_new_items(restored, [0], features, n_new + 1)


# ----------------------------------------------------------------------------
# The command lines


def test_cli_recommend_new_items(workdir, restored, folder):
  ds = restored.dataset
  base = [f"--workdir={workdir}", "--users=1,2", "--k=3",
          f"--new_items={folder}", "--format=csv"]
  status, out, err = _run(recommend, base)
  assert status == 0, err
  rows = list(csv.DictReader(io.StringIO(out)))
  assert [int(r["user"]) for r in rows] == [1, 1, 1, 2, 2, 2]
  items = [int(r["item"]) for r in rows]
  assert all(i >= ds.n_items for i in items)
  ids, scores = recommend.rank_new_items(
      restored, [1, 2], recommend.read_new_items(folder, restored), 3)
  assert items == ids.reshape(-1).tolist()
  np.testing.assert_array_equal(
      np.asarray([float(r["score"]) for r in rows], np.float32),
      scores.reshape(-1))
  status, out, err = _run(recommend, [*base[:2], f"--k={ds.n_items}",
                                      *base[3:], "--new_items_only=false"])
  assert status == 0, err
  items = [int(r["item"]) for r in csv.DictReader(io.StringIO(out))]
  assert min(items) < ds.n_items <= max(items)
  # Without --new_items the output is the catalogue's, as before.
  status, out, _ = _run(recommend, [*base[:3], "--format=csv"])
  assert status == 0
  assert all(int(r["item"]) < ds.n_items
             for r in csv.DictReader(io.StringIO(out)))


def test_cli_export_new_items(workdir, restored, folder, tmp_path):
  out = tmp_path / "export"
  status, _, err = _run(export, [f"--workdir={workdir}", f"--output={out}",
                                 f"--new_items={folder}"])
  assert status == 0, err
  manifest = json.loads((out / export.MANIFEST).read_text())
  info = manifest["files"]["new_item_embeddings.npy"]
  n_new = len(restored.dataset.cold_items)
  assert info["shape"] == [n_new, 16] and info["dtype"] == "float32"
  assert "encode_items" in info["description"]
  assert manifest["new_items_folder"] == os.path.abspath(folder)
  assert manifest["n_new_items"] == n_new
  np.testing.assert_allclose(np.load(out / "new_item_embeddings.npy"),
                             _encoded(restored), rtol=1e-5, atol=1e-6)
  assert "new_item_embeddings.npy" in os.listdir(out)


# ----------------------------------------------------------------------------
# Bad input


def _bad_folders(restored, root):
  """(name, folder, message fragment) per kind of bad new-items folder."""
  good = _cold_features(restored)
  image, text = good["image"], good["text"]
  nan = image.copy()
  nan[2, 3] = np.nan
  cases = [("missing folder", str(root / "absent"),
            f"{root / 'absent'}: new-items folder not found")]
  def case(name, features, fragment, extra=None):
    folder = root / name.replace(" ", "_")
    _write_folder(folder, features)
    if extra:
      extra(folder)
    cases.append((name, str(folder), fragment.format(folder=folder)))
  case("missing modality", {"image": image},
       "{folder}/text_feat.npy: file not found")
  case("unknown modality", {**good, "audio": image},
       "{folder}/audio_feat.npy: not a modality of the run")
  case("wrong width", {"image": image[:, :5], "text": text},
       "{folder}/image_feat.npy: 5 columns, but the run's image features "
       "have 12")
  case("row counts differ", {"image": image, "text": text[:-1]},
       f"{{folder}}/text_feat.npy: {len(text) - 1} rows, but "
       f"{{folder}}/image_feat.npy has {len(image)}")
  case("not finite", {"image": nan, "text": text},
       "{folder}/image_feat.npy: row 2 is not finite")
  case("inf", {"image": image, "text": np.where(
      np.arange(len(text))[:, None] == 4, np.inf, text)},
       "{folder}/text_feat.npy: row 4 is not finite")
  case("empty file", {"image": image}, "{folder}/text_feat.npy: is empty",
       extra=lambda f: (f / "text_feat.npy").write_bytes(b""))
  case("no rows", {"image": image[:0], "text": text[:0]},
       "{folder}/image_feat.npy: is empty (0 rows")
  return cases


def test_bad_new_items_folders_exit_1_with_one_line(workdir, restored,
                                                    tmp_path):
  for name, folder, fragment in _bad_folders(restored, tmp_path / "bad"):
    with pytest.raises(DataError, match="^" + re.escape(fragment)):
      recommend.read_new_items(folder, restored)
    output = tmp_path / f"{name}.csv"
    status, out, err = _run(recommend, [
        f"--workdir={workdir}", "--users=1", "--k=2",
        f"--new_items={folder}", f"--output={output}"])
    assert status == 1, name
    line = helpers.one_error_line(err)
    assert line.startswith(f"error: {fragment}"), (name, err)
    assert not out and not output.exists(), name
  # export: the same checks, nothing written (one case each way).
  for name, folder, fragment in _bad_folders(restored, tmp_path / "bad2")[:3]:
    output = tmp_path / f"export_{name}"
    status, _, err = _run(export, [f"--workdir={workdir}",
                                   f"--output={output}",
                                   f"--new_items={folder}"])
    assert status == 1 and fragment in helpers.one_error_line(err), (name, err)
    assert not output.exists(), name
  leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
  assert not leftovers


def test_run_without_the_encoder_refuses_new_items(tmp_path_factory, folder,
                                                   tmp_path):
  plain = _train(tmp_path_factory, "plain", train__epochs=1)
  output = tmp_path / "out"
  for cli, args in ((recommend, ["--users=1", "--k=2"]),
                    (export, [f"--output={output}"])):
    status, _, err = _run(cli, [f"--workdir={plain}", *args,
                                f"--new_items={folder}"])
    assert status == 1
    assert helpers.one_error_line(err) == f"error: {new_items.NO_INDUCTIVE}"
    assert not output.exists()
  restored = restore.restore_best(str(plain))
  features = {m: np.asarray(x)[:3]
              for m, x in restored.dataset.modalities.items()}
  with pytest.raises(DataError, match="no inductive item path"):
    recommend.rank_new_items(restored, [1], features, 1)
