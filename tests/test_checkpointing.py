"""Checkpoints and exact resume (`mmssl_jax.checkpointing`, `train`).

An uninterrupted 3-epoch run of configs/test.py is the reference; runs
stopped by a signal at an epoch boundary, mid-epoch and twice, then resumed,
must end with bit-identical train states (every leaf) and metrics.jsonl
records (minus timing fields). Same-seed runs are bit-identical and a
different seed gives a different run.

All runs share one compiled step (the step is a pure function of its
`steps.StepConfig`; `steps.make_step` is memoised here).
"""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import checkpointing
from mmssl_jax import state as state_lib
from mmssl_jax import steps
from mmssl_jax import train
from mmssl_jax.checkpointing import CheckpointMeta
from mmssl_jax import workdir as workdir_lib
from mmssl_jax import run as run_lib
from mmssl_jax import restore
from mmssl_jax import preemption

EPOCHS = 3


class StepHooks:
  """Shared, memoised steps that can signal the process after given steps."""

  def __init__(self):
    self.signal_after = {}  # global step index -> signal number
    self.nan_at = None  # (global step index, names of the terms to spoil)
    self._cache = {}
    self._real = steps.make_step

  def make(self, cfg, **shardings):
    assert not shardings  # one-device runs only
    if cfg not in self._cache:
      self._cache[cfg] = self._real(cfg)
    compiled = self._cache[cfg]

    def step(state, batch_idx, inputs):
      index = int(state.step)
      state, terms = compiled(state, batch_idx, inputs)
      if self.nan_at is not None and self.nan_at[0] == index:
        terms = dict(terms, **{k: jnp.float32(np.nan)
                               for k in self.nan_at[1]})
      if index in self.signal_after:
        os.kill(os.getpid(), self.signal_after[index])
      return state, terms

    return step


@pytest.fixture(scope="module", name="hooks")
def hooks_fixture():
  hooks = StepHooks()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, "make_step", hooks.make)
    yield hooks


def _config(**overrides):
  config = helpers.load_config("test")
  config.train.epochs = EPOCHS
  config.eval.patience = 100
  for key, value in overrides.items():
    section, name = key.split(".") if "." in key else (None, key)
    (config[section] if section else config)[name] = value
  return config


def records(workdir):
  """metrics.jsonl records without the wall-time fields."""
  out = []
  for r in workdir_lib.read_records(os.path.join(workdir,
                                                   workdir_lib.METRICS_FILE)):
    out.append({k: v for k, v in r.items()
                if k not in workdir_lib.TIMING_FIELDS})
  return out


def final_state(workdir):
  return restore.restore_run(str(workdir), which="latest").state


def assert_states_equal(a, b):
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    if state_lib.is_prng_key(x):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def run_until_stopped(hooks, config, workdir, signal_after):
  """train_and_evaluate with signals after the given global step indices;
  returns the Preempted raised."""
  hooks.signal_after = dict(signal_after)
  try:
    with pytest.raises(preemption.Preempted) as info:
      train.train_and_evaluate(config, str(workdir))
  finally:
    hooks.signal_after = {}
  return info.value


@pytest.fixture(scope="module", name="reference")
def reference_fixture(hooks, tmp_path_factory):
  """The uninterrupted run: (workdir, records, final state, steps/epoch)."""
  workdir = tmp_path_factory.mktemp("reference")
  result = train.train_and_evaluate(_config(), str(workdir))
  assert result["epochs"] == EPOCHS
  spe = run_lib.Run(_config(), run_lib.load_dataset(_config().data)
                  ).steps_per_epoch
  return workdir, records(workdir), final_state(workdir), spe


# ----------------------------------------------------------------------------
# Store and state round trip (no training)


@pytest.mark.parametrize("arg", [None, "model=lightgcn", "variant=wo_asl"])
def test_state_round_trip_keeps_structure_values_and_key_type(tmp_path, arg):
  config = helpers.load_config("test", arg)
  run = run_lib.Run(config, run_lib.load_dataset(config.data))
  state = run.init_state()
  if arg == "model=lightgcn":
    assert state.critic_params is None and state.graph_buffer is None
  meta = CheckpointMeta(step=5, epoch=0, batch=5, epoch_terms={"loss": [0.5]},
                        train_seconds=1.0, bad_evals=0, best={},
                        last_record=None)
  with checkpointing.CheckpointStore(str(tmp_path / "ck")) as store:
    store.save(state, meta)
    config.seed = 99  # a different target: values must come from the file
    target = run_lib.Run(config, run_lib.load_dataset(config.data)).init_state()
    restored, restored_meta = store.restore(5, target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert restored.rng.dtype == state.rng.dtype  # a typed key again
  assert_states_equal(restored, state)
  assert restored_meta.epoch_terms == {"loss": [0.5]}
  assert restored_meta.batch == 5


def test_restore_into_another_structure_names_the_difference(tmp_path):
  config = helpers.load_config("test", "variant=wo_asl")
  state = run_lib.Run(config, run_lib.load_dataset(config.data)).init_state()
  meta = CheckpointMeta(step=1, epoch=0, batch=1, epoch_terms={},
                        train_seconds=0.0, bad_evals=0, best={},
                        last_record=None)
  with checkpointing.CheckpointStore(str(tmp_path / "ck")) as store:
    store.save(state, meta)
    config.model.embed_size = 32
    other = run_lib.Run(config, run_lib.load_dataset(config.data)).init_state()
    with pytest.raises(workdir_lib.ConfigMismatchError,
                       match="do not match.*embedding"):
      store.restore(1, other)


def test_store_keeps_last_n_plus_best_across_reopen(tmp_path):
  state = {"w": jnp.arange(3.0), "step": jnp.int32(0)}

  def meta(step):
    return CheckpointMeta(step=step, epoch=step, batch=0, epoch_terms={},
                          train_seconds=0.0, bad_evals=0, best={},
                          last_record=None)

  directory = str(tmp_path / "ck")
  with checkpointing.CheckpointStore(directory, keep=2) as store:
    for step, score in [(1, 0.1), (2, 0.5), (3, None), (4, 0.3)]:
      store.save(state, meta(step), best_score=score)
    assert store.all_steps() == [2, 3, 4]
    assert store.best_step() == 2
  with checkpointing.CheckpointStore(directory, keep=2) as store:
    store.save(state, meta(5))
    store.save(state, meta(6))
    assert store.all_steps() == [2, 5, 6]  # the best survives a reopen
    assert store.best_step() == 2
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == []  # not a workdir
  assert sorted(os.listdir(directory)) == ["2", "5", "6"]  # no temp folders


def test_save_refuses_a_state_with_nan(tmp_path):
  state = {"params": {"w": jnp.array([1.0, np.nan])}, "step": jnp.int32(3)}
  meta = CheckpointMeta(step=3, epoch=0, batch=3, epoch_terms={},
                        train_seconds=0.0, bad_evals=0, best={},
                        last_record=None)
  with checkpointing.CheckpointStore(str(tmp_path / "ck")) as store:
    with pytest.raises(FloatingPointError, match=r"\['params'\]\['w'\].*3"):
      store.save(state, meta)
    assert store.all_steps() == []


# ----------------------------------------------------------------------------
# Exact resume and determinism


def test_reference_run_writes_checkpoints_and_best(reference):
  workdir, recs, _, spe = reference
  assert [r["epoch"] for r in recs[:-1]] == list(range(EPOCHS))
  assert recs[-1]["final"] is True
  kept = workdir_lib.checkpoint_steps(str(workdir))
  assert kept[-1] == EPOCHS * spe
  best = restore.restore_best(str(workdir))
  assert best.step == (recs[-1]["best_epoch"] + 1) * spe
  assert best.meta.best["epoch"] == recs[-1]["best_epoch"]
  # The best checkpoint reproduces the reported validation metrics.
  val = best.run.evaluate(best.state, "val")
  assert val == recs[-1]["val"]


@pytest.mark.parametrize("case", ["after_epoch_0", "mid_epoch", "twice",
                                  "stale_records", "lost_record", "extended"])
def test_interrupted_and_resumed_run_is_bit_identical(hooks, reference,
                                                      tmp_path, case):
  ref_dir, ref_records, ref_state, spe = reference
  workdir = tmp_path / "run"
  config = _config()
  metrics_path = workdir / workdir_lib.METRICS_FILE
  if case in ("after_epoch_0", "stale_records", "lost_record"):
    # Signal during the last step of epoch 0: the epoch is finished,
    # evaluated and checkpointed, then the run stops.
    stop = run_until_stopped(hooks, config, workdir, {spe - 1: signal.SIGTERM})
    assert f"step {spe} (end of epoch 0)" in str(stop)
    assert workdir_lib.checkpoint_steps(str(workdir))[-1] == spe
    if case == "stale_records":
      # A crash after logging an epoch the checkpoint does not hold.
      with open(metrics_path, "a") as f:
        f.write(json.dumps({"epoch": 1, "train/loss": 1.0}) + "\n")
        f.write('{"epoch": 2, "trai')
    if case == "lost_record":
      # A crash between saving the checkpoint and logging its epoch.
      metrics_path.write_text("")
  elif case == "mid_epoch":
    stop = run_until_stopped(hooks, config, workdir,
                             {spe + 4: signal.SIGINT})
    assert stop.exit_code == 130 and "SIGINT" in str(stop)
    assert f"step {spe + 5} (epoch 1, batch 5 of {spe})" in str(stop)
    assert workdir_lib.checkpoint_steps(str(workdir))[-1] == spe + 5
  elif case == "extended":
    # A run complete at 1 epoch (final record), then given EPOCHS.
    short = train.train_and_evaluate(_config(**{"train.epochs": 1}),
                                     str(workdir))
    assert short["epochs"] == 1
    assert [r.get("final", False) for r in records(workdir)] == [False, True]
  else:  # twice: mid-epoch 0, then mid-epoch 2
    run_until_stopped(hooks, config, workdir, {2: signal.SIGTERM})
    assert workdir_lib.checkpoint_steps(str(workdir)) == [3]
    assert workdir_lib.read_records(str(metrics_path)) == []
    run_until_stopped(hooks, config, workdir, {2 * spe + 7: signal.SIGTERM})
    assert workdir_lib.checkpoint_steps(str(workdir))[-1] == 2 * spe + 8
  result = train.train_and_evaluate(config, str(workdir))
  assert records(workdir) == ref_records
  assert result == ref_records[-1]
  assert_states_equal(final_state(workdir), ref_state)
  ref_steps = workdir_lib.checkpoint_steps(str(ref_dir))
  assert workdir_lib.checkpoint_steps(str(workdir))[-1] == ref_steps[-1]
  assert (restore.restore_best(str(workdir)).step
          == restore.restore_best(str(ref_dir)).step)


def test_same_seed_is_bit_identical_and_another_seed_differs(
    hooks, reference, tmp_path):
  del hooks
  _, ref_records, ref_state, _ = reference
  train.train_and_evaluate(_config(), str(tmp_path / "same"))
  assert records(tmp_path / "same") == ref_records
  assert_states_equal(final_state(tmp_path / "same"), ref_state)
  train.train_and_evaluate(_config(seed=7), str(tmp_path / "other"))
  other = records(tmp_path / "other")
  assert other[0]["train/loss"] != ref_records[0]["train/loss"]
  assert other[-1]["val"] != ref_records[-1]["val"]
  other_state = final_state(tmp_path / "other")
  assert not np.array_equal(other_state.params["user_id_embedding"],
                            ref_state.params["user_id_embedding"])


def test_a_second_process_on_a_busy_workdir_stops_at_once(tmp_path):
  """While one process holds the workdir (here: this test, through the same
  lock train_and_evaluate takes), `main` on it exits 1 with one line naming
  the workdir and writes nothing; once released, the workdir is usable."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir_lib.WorkdirLock(str(workdir))
  lock.acquire()
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError):
      workdir_lib.WorkdirLock(str(workdir)).acquire()  # another open file
    proc = subprocess.run(
        [sys.executable, "-m", "mmssl_jax.main", "--config=configs/test.py",
         "--config.train.epochs=1", f"--workdir={workdir}"],
        cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=300)
  finally:
    lock.release()
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "another process is training" in last
  assert str(workdir) in last and "Traceback" not in proc.stderr
  assert list(workdir.iterdir()) == []
  again = workdir_lib.WorkdirLock(str(workdir))
  again.acquire()
  again.release()
