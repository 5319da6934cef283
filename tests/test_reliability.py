"""NaN guard, workdir/config safety, preemption through the CLI, determinism flag.

In-process runs share one compiled step with tests/test_checkpointing.py
(`StepHooks`); the CLI tests run `python -m mmssl_jax.main` in subprocesses
that inherit the session's persistent compilation cache (conftest.py), so
the resumed process does not compile again.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from mmssl_jax import checkpointing
from mmssl_jax import config_lib
from mmssl_jax import main as main_lib
from mmssl_jax import train
from mmssl_jax import workdir as workdir_lib
from mmssl_jax import run as run_lib
from mmssl_jax import restore
from mmssl_jax import preemption
from test_checkpointing import hooks_fixture  # noqa: F401 (the `hooks` fixture)

CLI_TIMEOUT_S = 300


def _config(**train_fields):
  config = helpers.load_config("test")
  config.train.epochs = 3
  config.eval.patience = 100
  for k, v in train_fields.items():
    config.train[k] = v
  return config


def _files(path):
  """{relative path: (bytes, mtime_ns)} of every file under path."""
  return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", name="stopped_run")
def stopped_run_fixture(hooks, tmp_path_factory):
  """A workdir stopped by SIGTERM after epoch 0 (config.json, 1 record,
  one checkpoint); tests copy it before changing anything."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  config = _config()
  spe = run_lib.Run(config, run_lib.load_dataset(config.data)).steps_per_epoch
  hooks.signal_after = {spe - 1: signal.SIGTERM}
  try:
    with pytest.raises(preemption.Preempted):
      train.train_and_evaluate(config, str(workdir))
  finally:
    hooks.signal_after = {}
  return workdir, spe


def _copy(src, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(src, dst)
  return dst


# ----------------------------------------------------------------------------
# NaN guard


@pytest.mark.parametrize("every", [1, 4])
def test_nan_stops_with_term_and_step_and_keeps_last_good_checkpoint(
    hooks, stopped_run, tmp_path, every):
  src, spe = stopped_run
  workdir = _copy(src, tmp_path)
  bad_step = spe + 1  # epoch 1, batch 1
  hooks.nan_at = (bad_step, ("gen", "loss"))
  try:
    with pytest.raises(FloatingPointError) as info:
      train.train_and_evaluate(_config(nan_check_every_steps=every),
                               str(workdir))
  finally:
    hooks.nan_at = None
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(
      f"non-finite loss term gen = nan at step {bad_step} (epoch 1, batch 1)")
  assert "also non-finite: loss" in message
  assert f"last good checkpoint is step {spe}" in message
  # Nothing was saved or logged after the NaN; the checkpoint is finite.
  assert workdir_lib.checkpoint_steps(str(workdir)) == [spe]
  assert [r["epoch"] for r in workdir_lib.read_records(
      str(workdir / workdir_lib.METRICS_FILE))] == [0]
  restored = restore.restore_run(str(workdir), which="latest")
  assert checkpointing.first_nonfinite(restored.state) is None


def test_absurd_learning_rate_stops_on_the_first_nan(tmp_path):
  # LightGCN: a small step to compile. lr=1e30 overflows after one update.
  config = helpers.load_config("test", "model=lightgcn")
  config.optim.lr = 1e30
  with pytest.raises(FloatingPointError,
                     match=r"^non-finite loss term bpr = (nan|inf) at step 1 "
                     r"\(epoch 0, batch 1\).*no checkpoint was saved yet"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert workdir_lib.checkpoint_steps(str(tmp_path / "run")) == []


# ----------------------------------------------------------------------------
# Workdir and config safety


def test_resuming_with_other_shapes_lists_the_fields_and_writes_nothing(
    stopped_run, tmp_path):
  workdir = _copy(stopped_run[0], tmp_path)
  before = _files(workdir)
  config = _config()
  config.model.embed_size = 32
  config.data.synthetic.n_users = 100
  config.data.synthetic.modality_dims = {"image": 12, "text": 9}
  with pytest.raises(workdir_lib.ConfigMismatchError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert "\n" not in message and "config.json" in message
  assert "3 field(s)" in message
  for field in ("model.embed_size 16 -> 32", "data.synthetic.n_users 120 -> 100",
                "data.synthetic.modality_dims.text 8 -> 9"):
    assert field in message
  assert _files(workdir) == before


def test_records_without_checkpoints_are_refused(stopped_run, tmp_path):
  workdir = _copy(stopped_run[0], tmp_path)
  shutil.rmtree(workdir / workdir_lib.CHECKPOINT_DIR)
  before = _files(workdir)
  with pytest.raises(FileExistsError, match="cannot be resumed"):
    train.train_and_evaluate(_config(), str(workdir))
  (workdir / workdir_lib.CONFIG_FILE).unlink()
  with pytest.raises(FileExistsError, match="no config.json"):
    train.train_and_evaluate(_config(), str(workdir))
  del before[workdir_lib.CONFIG_FILE]
  assert _files(workdir) == before
  with pytest.raises(FileExistsError, match="not a folder"):
    train.train_and_evaluate(_config(), str(workdir / workdir_lib.METRICS_FILE))


def test_complete_run_is_returned_not_retrained(stopped_run, tmp_path):
  workdir = _copy(stopped_run[0], tmp_path)
  # Complete at the config's own budget of 1 epoch.
  final = {"final": True, "best_epoch": 0, "epochs": 1, "test": {"x": 1.0},
           "val": {"x": 2.0}}
  workdir_lib.append_record(str(workdir / workdir_lib.METRICS_FILE), final)
  before = _files(workdir)
  assert train.train_and_evaluate(_config(epochs=1), str(workdir)) == final
  assert _files(workdir) == before
  # Without a checkpoint a larger budget cannot continue it either.
  shutil.rmtree(workdir / workdir_lib.CHECKPOINT_DIR)
  status = workdir_lib.inspect_workdir(str(workdir), _config(epochs=5))
  assert status.kind == "complete" and status.final == final
  assert status.reason == "it has no checkpoint to continue from"


def _val_record(epoch):
  return {"epoch": epoch, "train/loss": 1.0, "val/recall@20": 0.1}


@pytest.mark.parametrize("epochs,patience,best_epoch,expected", [
    (5, 100, 0, True),   # more epochs, patience left: goes on
    (3, 100, 0, False),  # it ran its whole budget
    (2, 100, 0, False),  # a smaller budget never shortens a finished run
    (5, 2, 0, True),     # 2 evaluations since the best, patience 2 goes on
    (5, 1, 0, False),    # ... patience 1 had stopped it (2 > 1)
    (5, 1, 1, True),     # 1 evaluation since the best, patience 1 goes on
    (5, 0, 1, False),    # ... patience 0 had stopped it
])
def test_extends_run_follows_the_train_loops_stopping_rule(
    epochs, patience, best_epoch, expected):
  records = [_val_record(e) for e in range(3)]
  records.append({"final": True, "best_epoch": best_epoch, "epochs": 3})
  config = _config(epochs=epochs)
  config.eval.patience = patience
  assert workdir_lib.extends_run(records, config) is expected
  if not expected:
    reason = workdir_lib.why_complete(records, config)
    assert ("--config.eval.patience" in reason) is (
        3 - 1 - best_epoch > patience), reason


def test_config_differences_ignore_only_resumable_fields():
  old = workdir_lib.config_to_json(_config())
  new_config = _config()
  new_config.train.epochs = 99
  new_config.eval.patience = 1
  new_config.optim.lr = 1.0
  new = workdir_lib.config_to_json(new_config)
  assert workdir_lib.config_differences(old, new) == [
      ("optim.lr", old["optim"]["lr"], 1.0)]
  del new["train"]["batch_size"]
  assert ("train.batch_size", 32, None) in workdir_lib.config_differences(
      old, new)


def test_data_dir_spelt_another_way_is_the_same_folder(tmp_path, monkeypatch):
  (tmp_path / "data").mkdir()
  (tmp_path / "other").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "data")
  monkeypatch.chdir(tmp_path)
  saved = _config()
  saved.data.dir = "data"
  old = workdir_lib.config_to_json(saved)
  for same in (str(tmp_path / "data"), "./data/", str(tmp_path / "link")):
    new = _config()
    new.data.dir = same
    assert workdir_lib.config_differences(
        old, workdir_lib.config_to_json(new)) == [], same
  new.data.dir = "other"
  assert workdir_lib.config_differences(
      old, workdir_lib.config_to_json(new)) == [("data.dir", "data",
                                                   "other")]


def test_field_added_after_a_run_was_saved_is_unchanged_at_its_default():
  old = workdir_lib.config_to_json(_config())
  del old["train"]["item_parallel"]  # a workdir saved before the field existed
  new_config = _config()
  assert workdir_lib.config_differences(
      old, workdir_lib.config_to_json(new_config)) == []
  new_config.train.item_parallel = 2
  assert workdir_lib.config_differences(
      old, workdir_lib.config_to_json(new_config)) == [
          ("train.item_parallel", None, 2)]


def test_deterministic_flag_is_added_once():
  env = {"XLA_FLAGS": "--xla_foo=1"}
  main_lib.set_deterministic_xla_flags(env)
  main_lib.set_deterministic_xla_flags(env)
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_gpu_deterministic_ops=true"
  env = {}
  main_lib.set_deterministic_xla_flags(env)
  assert env["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=true"


# ----------------------------------------------------------------------------
# The CLI: preemption, resume, exit statuses


def _cli(*args, workdir):
  return [sys.executable, "-m", "mmssl_jax.main", *args, f"--workdir={workdir}"]


def _env():
  """The CLI's environment: the session's fast XLA flags and compilation
  cache (conftest.py) are inherited, so a rerun loads what the first run
  compiled."""
  return dict(os.environ)


def test_cli_sigterm_saves_and_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  env = _env()
  metrics = workdir / workdir_lib.METRICS_FILE
  args = ["--config=configs/test.py", "--config.eval.patience=1000"]
  with open(tmp_path / "stderr.txt", "w+") as err:
    proc = subprocess.Popen(_cli(*args, "--config.train.epochs=50",
                                 workdir=workdir),
                            cwd=helpers.REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=err, env=env)
    try:
      deadline = time.time() + CLI_TIMEOUT_S
      while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, "finished before the signal"
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      status = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
    err.seek(0)
    stderr = err.read()
  assert status == 128 + signal.SIGTERM == 143
  last = helpers.last_error_line(stderr, "stopped by SIGTERM at step",
                                "run the same command again to resume")
  step = int(re.search(r"at step (\d+)", last).group(1))
  assert step in workdir_lib.checkpoint_steps(str(workdir))
  done = len(workdir_lib.read_records(str(metrics)))
  assert done >= 1

  # The same command, asking for two more epochs (epochs may change on
  # resume) and with the deterministic-ops XLA flag (harmless on CPU).
  rerun_env, extra = dict(env), []
  if "deterministic" in config_lib.base_config().train:
    extra.append("--config.train.deterministic=True")
  else:  # until base_config() has the field: the flag itself
    rerun_env["XLA_FLAGS"] += " " + main_lib.DETERMINISTIC_XLA_FLAG
  proc = subprocess.run(
      _cli(*args, f"--config.train.epochs={done + 2}", *extra,
           workdir=workdir),
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, env=rerun_env,
      timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert f"resuming from step {step} " in proc.stderr
  records = workdir_lib.read_records(str(metrics))
  assert [r.get("epoch") for r in records[:-1]] == list(range(done + 2))
  assert records[-1]["final"] is True and records[-1]["epochs"] == done + 2
  assert json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())[
      "train"]["epochs"] == 50  # config.json is the run's original

  # Once complete, the same command prints the stored result and exits 0.
  proc = subprocess.run(
      _cli(*args, f"--config.train.epochs={done + 2}", workdir=workdir),
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, env=env,
      timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "holds a complete run" in proc.stderr
  assert "a larger --config.train.epochs continues it" in proc.stderr
  assert workdir_lib.read_records(str(metrics)) == records


def test_cli_config_mismatch_and_nan_exit_1_with_one_line(tmp_path):
  env = _env()
  workdir = tmp_path / "run"
  # LightGCN with an absurd learning rate: NaN after the first update.
  proc = subprocess.run(
      _cli("--config=configs/test.py:model=lightgcn", "--config.optim.lr=1e30",
           workdir=workdir),
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, env=env,
      timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 1, proc.stderr[-3000:]
  helpers.last_error_line(proc.stderr, "non-finite loss term", "at step 1")
  # The workdir now holds that run's config: another config is refused.
  before = _files(workdir)
  proc = subprocess.run(
      _cli("--config=configs/test.py:model=lightgcn",
           "--config.model.embed_size=8", workdir=workdir),
      cwd=helpers.REPO_ROOT, capture_output=True, text=True, env=env,
      timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 1, proc.stderr[-3000:]
  helpers.last_error_line(proc.stderr, "model.embed_size 16 -> 8",
                         "optim.lr 1e+30 -> 0.001", "config.json")
  assert _files(workdir) == before


def test_restore_best_gives_the_best_epoch_state(stopped_run, hooks):
  del hooks
  restored = restore.restore_best(str(stopped_run[0]))
  assert restored.step == stopped_run[1]
  assert restored.meta.best["epoch"] == 0
  user, item = restored.run.final_embeddings(restored.state)
  assert user.shape == (restored.dataset.n_users, 16)
  assert item.shape == (restored.dataset.n_items, 16)
  assert np.all(np.isfinite(jax.device_get(user)))
  assert restored.run.evaluate(restored.state, "val") == restored.meta.best[
      "val"]


def test_cli_misspelled_config_field_is_one_line_usage_error(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      _cli("--config=configs/test.py", "--config.train.epoch=3",
           workdir=workdir),
      cwd=helpers.REPO_ROOT, capture_output=True, text=True,
      env=_env(), timeout=CLI_TIMEOUT_S)
  assert proc.returncode == 2, proc.stderr[-3000:]
  helpers.last_error_line(proc.stderr, "bad --config override", "epoch",
                         'Did you mean "epochs"')
  assert not workdir.exists()
