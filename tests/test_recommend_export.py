"""mmssl_jax.recommend, mmssl_jax.export and the training loop's progress output.

One tiny run of configs/test.py (1 epoch) is trained through the CLI with
piped stdout/stderr (so the progress bar must stay off) and shared by the
recommend/export tests; the bar and TensorBoard wiring are checked on an
in-process run whose stderr pretends to be a terminal.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
from mmssl_jax import export
from mmssl_jax import model as model_lib
from mmssl_jax import recommend
from mmssl_jax import train
from mmssl_jax import workdir as workdir_lib
from mmssl_jax import run as run_lib
from mmssl_jax import restore
from test_progress import FakeTTY, read_scalars

CLI_TIMEOUT_S = 300


@pytest.fixture(scope="module", name="trained")
def trained_fixture(tmp_path_factory):
  """configs/test.py trained for 1 epoch by the CLI, output piped:
  (workdir, completed process)."""
  workdir = tmp_path_factory.mktemp("recommend") / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "mmssl_jax.main", "--config=configs/test.py",
       "--config.train.epochs=1", f"--workdir={workdir}"],
      cwd=helpers.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr.decode()[-3000:]
  return workdir, proc


@pytest.fixture(scope="module", name="restored")
def restored_fixture(trained):
  return restore.restore_best(str(trained[0]))


def _direct_scores(restored):
  """float64 dot-product scores of the final embeddings, train items -inf."""
  user, item = jax.device_get(restored.run.final_embeddings(restored.state))
  scores = np.asarray(user, np.float64) @ np.asarray(item, np.float64).T
  ds = restored.dataset
  scores[ds.train.users, ds.train.items] = -np.inf
  return scores


# ----------------------------------------------------------------------------
# Progress output


def test_progress_bar_is_off_when_output_is_piped(trained):
  _, proc = trained
  out, err = proc.stdout.decode(), proc.stderr.decode()
  assert "\r" not in out and "\r" not in err
  assert "[####" not in err
  # The one-line-per-epoch log is still there.
  assert "epoch   0 | loss" in err


@pytest.fixture(scope="module", name="lightgcn_run")
def lightgcn_run_fixture(tmp_path_factory):
  """configs/test.py:model=lightgcn trained in-process for 1 epoch with
  train.tensorboard=True and a stderr that is a terminal:
  (workdir, what was written to stderr, steps per epoch)."""
  config = helpers.load_config("test", "model=lightgcn")
  config.train.epochs = 1
  config.train.tensorboard = True
  workdir = tmp_path_factory.mktemp("lightgcn") / "run"
  tty = FakeTTY()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "stderr", tty)
    train.train_and_evaluate(config, str(workdir))
  spe = run_lib.Run(config, run_lib.load_dataset(config.data)).steps_per_epoch
  return workdir, tty.getvalue(), spe


def test_progress_bar_on_a_terminal_and_tensorboard_scalars(lightgcn_run):
  tmp_path, text, spe = lightgcn_run
  assert "\repoch   0 [" in text
  last = text.split("\r")[-1]
  assert last.startswith(f"epoch   0 [{'#' * 20}] {spe}/{spe} ")
  assert " loss " in last and "\n" in last
  events = list(tmp_path.glob("events.out.tfevents.*"))
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:  # MetricWriter is a no-op without it
    assert not events
    return
  assert len(events) == 1
  scalars = {tag: (step, value) for step, tag, value
             in read_scalars(events[0])}
  record = workdir_lib.read_records(
      str(tmp_path / workdir_lib.METRICS_FILE))[0]
  assert scalars["train/loss"] == (spe, pytest.approx(record["train/loss"]))
  assert scalars["val/recall_20"] == (spe,
                                      pytest.approx(record["val/recall@20"]))
  assert "epoch" in scalars and "train_seconds" in scalars


# ----------------------------------------------------------------------------
# recommend


def test_recommend_excludes_train_and_matches_direct_scores(restored):
  ds = restored.dataset
  k = 10
  users = np.arange(ds.n_users)
  ids, scores = recommend.recommend(restored, users, k, block_users=50)
  assert ids.shape == scores.shape == (ds.n_users, k)
  assert ids.dtype == np.int32 and scores.dtype == np.float32
  direct = _direct_scores(restored)
  train_lists = ds.train.user_lists(ds.n_users)
  exact_rows = 0
  for u in users:
    assert not set(ids[u]) & set(train_lists[u].tolist())
    assert np.all(ids[u] >= 0) and len(set(ids[u])) == k
    np.testing.assert_allclose(scores[u], direct[u, ids[u]], rtol=1e-5,
                               atol=1e-6)
    assert np.all(np.diff(scores[u]) <= 0)
    rest = np.delete(direct[u], ids[u])
    assert scores[u][-1] >= rest.max() - 1e-5  # nothing better left out
    order = np.argsort(-direct[u], kind="stable")[:k]
    gaps = -np.diff(np.sort(direct[u])[::-1][:k + 1])
    if gaps.min() > 1e-4:  # no near-tie: the ranking is exactly numpy's
      np.testing.assert_array_equal(ids[u], order)
      exact_rows += 1
  assert exact_rows > ds.n_users // 2
  # The same user gets the same scores whatever block it is scored in.
  ids1, scores1 = recommend.recommend(restored, [17], k)
  ids3, scores3 = recommend.recommend(restored, [5, 17, 42], k)
  np.testing.assert_array_equal(ids1[0], ids3[1])
  np.testing.assert_array_equal(scores1[0], scores3[1])


def test_recommend_errors(restored):
  with pytest.raises(recommend.UserError, match="unknown user id 120"):
    recommend.recommend(restored, [3, 120], 5)
  with pytest.raises(recommend.UserError, match="K must lie in"):
    recommend.recommend(restored, [3], restored.dataset.n_items + 1)
  assert recommend.parse_user_ids(" 3, 17\n42 ") == [3, 17, 42]
  for bad in ("3,x", "1.5", "-2"):
    with pytest.raises(recommend.UserError):
      recommend.parse_user_ids(bad)


def test_cli_unknown_user_exits_1_with_one_error_line(trained, tmp_path):
  workdir, _ = trained
  proc = subprocess.run(
      [sys.executable, "-m", "mmssl_jax.recommend", f"--workdir={workdir}",
       "--users=3,17,120", "--k=5"],
      cwd=helpers.REPO_ROOT, capture_output=True, text=True,
      timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 1
  assert "unknown user id 120" in helpers.one_error_line(proc.stderr)
  assert proc.stdout == ""
  # In-process: negative and non-integer ids, no checkpoint, bad k.
  empty = tmp_path / "empty"
  empty.mkdir()
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  (no_ckpt / "config.json").write_text(
      (workdir / "config.json").read_text())
  cases = [
      (["--users=-1"], "negative"),
      (["--users=3,abc"], "'abc' is not an integer"),
      (["--users=2.5"], "not an integer"),
      (["--users=3", "--k=0"], "K must be >= 1"),
      (["--users=3", "--k=1000"], "K must lie in [1, 90]"),
      (["--all-users"], "--all-users writes csv or json"),
  ]
  for args, fragment in cases:
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(sys, "stderr", err)
      status = recommend.run_cli([f"--workdir={workdir}", *args],
                                 stdout=io.StringIO())
    assert status == 1, args
    line = helpers.one_error_line(err.getvalue())
    assert fragment in line, (args, err.getvalue())
  for folder, fragment in ((empty, "config.json: not found"),
                           (no_ckpt, "no checkpoint")):
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(sys, "stderr", err)
      assert recommend.run_cli([f"--workdir={folder}", "--users=3"]) == 1
    assert fragment in helpers.one_error_line(err.getvalue())


def _cli_stdout(workdir, *args) -> str:
  out = io.StringIO()
  status = recommend.run_cli([f"--workdir={workdir}", *args], stdout=out)
  assert status == 0
  return out.getvalue()


def test_cli_table_json_csv_parse_back_to_the_same_items(trained, restored):
  workdir, _ = trained
  users, k = [3, 17, 42], 7
  ids, scores = recommend.recommend(restored, users, k)
  table = _cli_stdout(workdir, "--users=3,17,42", f"--k={k}").splitlines()
  assert table[0].split() == ["user", "rank", "item", "score"]
  assert len({len(line) for line in table}) == 1  # aligned columns
  rows = [line.split() for line in table[1:]]
  assert [int(r[0]) for r in rows] == [u for u in users for _ in range(k)]
  assert [int(r[1]) for r in rows] == list(range(1, k + 1)) * len(users)
  assert [int(r[2]) for r in rows] == ids.reshape(-1).tolist()
  np.testing.assert_allclose([float(r[3]) for r in rows], scores.reshape(-1),
                             atol=1e-6)

  lines = _cli_stdout(workdir, "--users=3,17,42", f"--k={k}",
                      "--format=json").splitlines()
  objs = [json.loads(line) for line in lines]
  assert [o["user"] for o in objs] == users
  assert [o["items"] for o in objs] == ids.tolist()
  # 9 significant digits give back the float32 scores exactly.
  np.testing.assert_array_equal(
      np.asarray([o["scores"] for o in objs], np.float32), scores)

  text = _cli_stdout(workdir, "--users=3,17,42", f"--k={k}", "--format=csv")
  parsed = list(csv.DictReader(io.StringIO(text)))
  assert [int(r["user"]) for r in parsed] == [u for u in users
                                              for _ in range(k)]
  assert [int(r["item"]) for r in parsed] == ids.reshape(-1).tolist()
  np.testing.assert_array_equal(
      np.asarray([float(r["score"]) for r in parsed], np.float32),
      scores.reshape(-1))

  users_file = workdir.parent / "users.txt"
  users_file.write_text("3\n17, 42\n")
  assert _cli_stdout(workdir, f"--users-file={users_file}", f"--k={k}",
                     "--format=json").splitlines() == lines


def test_cli_all_users_writes_every_user(trained, restored, tmp_path):
  workdir, _ = trained
  ds = restored.dataset
  ids, scores = recommend.recommend(restored, np.arange(ds.n_users), 5)
  path = tmp_path / "all.csv"
  assert recommend.run_cli([f"--workdir={workdir}", "--all-users", "--k=5",
                            f"--output={path}", "--block_users=50"]) == 0
  rows = list(csv.DictReader(path.open()))
  assert len(rows) == ds.n_users * 5
  got = np.asarray([int(r["item"]) for r in rows]).reshape(ds.n_users, 5)
  assert [int(r["user"]) for r in rows[::5]] == list(range(ds.n_users))
  np.testing.assert_array_equal(got, ids)
  jpath = tmp_path / "all.jsonl"
  assert recommend.run_cli([f"--workdir={workdir}", "--all-users", "--k=5",
                            f"--output={jpath}"]) == 0
  objs = [json.loads(l) for l in jpath.read_text().splitlines()]
  assert [o["user"] for o in objs] == list(range(ds.n_users))
  assert [o["items"] for o in objs] == ids.tolist()
  # An existing output is never overwritten; no temporary files are left.
  before = path.read_bytes()
  err = io.StringIO()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "stderr", err)
    assert recommend.run_cli([f"--workdir={workdir}", "--all-users",
                              f"--output={path}"]) == 1
  assert "refusing to overwrite" in helpers.one_error_line(err.getvalue())
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["all.csv",
                                                        "all.jsonl"]


# ----------------------------------------------------------------------------
# export


def test_export_round_trip(trained, restored, tmp_path):
  workdir, _ = trained
  out = tmp_path / "export"
  assert export.run_cli([f"--workdir={workdir}", f"--output={out}"]) == 0
  manifest = json.loads((out / export.MANIFEST).read_text())
  ds = restored.dataset
  assert manifest["score"] == "dot"
  assert (manifest["n_users"], manifest["n_items"], manifest["dim"]) == (
      ds.n_users, ds.n_items, 16)
  assert manifest["modalities"] == ["image", "text"]
  assert manifest["model"] == {
      "name": "mmssl", "variant": "reference", "ablation": "full",
      "model_cat_rate": pytest.approx(restored.config.model.model_cat_rate)}
  assert manifest["checkpoint"]["step"] == restored.step
  assert manifest["source_workdir"] == os.path.abspath(workdir)
  expected = {"user_embeddings.npy", "item_embeddings.npy"} | {
      f"{p}_{m}.npy" for p in ("feat_user", "feat_item", "modality_user",
                               "modality_item") for m in ("image", "text")}
  assert set(manifest["files"]) == expected
  assert set(os.listdir(out)) == expected | {export.MANIFEST}
  arrays = {}
  for name, info in manifest["files"].items():
    a = np.load(out / name)
    assert list(a.shape) == info["shape"] and str(a.dtype) == info["dtype"]
    arrays[name[:-4]] = a
  # Scores from the exported arrays are the model's scores.
  user, item = jax.device_get(restored.run.final_embeddings(restored.state))
  np.testing.assert_array_equal(arrays["user_embeddings"], user)
  np.testing.assert_array_equal(arrays["item_embeddings"], item)
  exported = arrays["user_embeddings"] @ arrays["item_embeddings"].T
  np.testing.assert_allclose(exported, np.asarray(user) @ np.asarray(item).T,
                             rtol=1e-6)
  ids, scores = recommend.recommend(restored, [3, 17], 5)
  for row, u in enumerate((3, 17)):
    s = exported[u].astype(np.float64)
    s[ds.train.user_lists(ds.n_users)[u]] = -np.inf
    np.testing.assert_allclose(s[ids[row]], scores[row], rtol=1e-5)
  # Per-modality views are model.forward's (eval mode).
  state, run = restored.state, restored.run
  fwd = model_lib.forward(
      state.params, run.inputs.graph, run.inputs.features,
      state.modality_graphs, key=state.rng, train=False,
      hp=model_lib.ModelHParams.from_config(restored.config.model),
      modality_is_base=run.modality_is_base(state))
  for m in ("image", "text"):
    for name, view in (("feat_user", fwd.feat_user), ("feat_item",
                                                      fwd.feat_item),
                       ("modality_user", fwd.modality_user),
                       ("modality_item", fwd.modality_item)):
      np.testing.assert_allclose(arrays[f"{name}_{m}"], view[m], rtol=1e-5,
                                 atol=1e-6)
  # A non-empty output folder is refused and left untouched.
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  err = io.StringIO()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "stderr", err)
    assert export.run_cli([f"--workdir={workdir}", f"--output={out}"]) == 1
  assert "not an empty folder" in helpers.one_error_line(err.getvalue())
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  # An empty folder is fine; nothing temporary is left next to it.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert export.run_cli([f"--workdir={workdir}", f"--output={empty}"]) == 0
  assert set(os.listdir(empty)) == expected | {export.MANIFEST}
  assert sorted(os.listdir(tmp_path)) == ["empty", "export"]


def test_export_lightgcn_has_only_the_final_vectors(lightgcn_run, tmp_path):
  workdir = lightgcn_run[0]
  restored = restore.restore_best(str(workdir))
  manifest = export.export(restored, str(tmp_path / "out"),
                           workdir=str(workdir))
  assert set(manifest["files"]) == {"user_embeddings.npy",
                                    "item_embeddings.npy"}
  assert manifest["modalities"] == []
  assert manifest["model"]["name"] == "lightgcn"
  user, item = jax.device_get(restored.run.final_embeddings(restored.state))
  np.testing.assert_array_equal(
      np.load(tmp_path / "out" / "user_embeddings.npy"), user)
  np.testing.assert_array_equal(
      np.load(tmp_path / "out" / "item_embeddings.npy"), item)
  ids, _ = recommend.recommend(restored, [0, 1], 3)
  assert ids.shape == (2, 3)
