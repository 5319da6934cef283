"""Faults around checkpoints (docs/checkpoints.md), through the CLI.

A damaged newest checkpoint, none readable, SIGKILL during a save (reproduced
on disk, and real kills of a process saving in a loop), a save that cannot
be written, and the best checkpoint lost. Every resumable case must end with
the metrics.jsonl records of one uninterrupted run (module fixture), bit for
bit except `workdir.TIMING_FIELDS`; nothing is ever deleted, only moved
aside. Workdirs are copies of the reference run's, damaged by hand.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
from mmssl_jax import checkpointing
from mmssl_jax import restore
from mmssl_jax import workdir as workdir_lib

CLI_TIMEOUT_S = 300
ARGS = ("--config=configs/test.py", "--config.train.epochs=3",
        "--config.eval.patience=100")
SPE = 21  # steps per epoch of configs/test.py: checkpoints 21, 42, 63


def _cli(workdir, *extra, module="mmssl_jax.main"):
  return [sys.executable, "-m", module, *extra, f"--workdir={workdir}"]


def _run(cmd) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=helpers.REPO_ROOT, capture_output=True,
                        text=True, env=dict(os.environ), timeout=CLI_TIMEOUT_S)


def _records(workdir):
  """metrics.jsonl without the wall-time fields."""
  return [{k: v for k, v in r.items() if k not in workdir_lib.TIMING_FIELDS}
          for r in workdir_lib.read_records(
              str(Path(workdir) / workdir_lib.METRICS_FILE))]


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _line(stderr: str, *fragments) -> str:
  """The one stderr line holding every fragment."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if all(f in l for f in fragments)]
  assert len(lines) == 1, (fragments, stderr[-3000:])
  return lines[0]


def _largest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip(folder: Path) -> None:
  """Inverts the middle half of the largest file: a bad sector."""
  path = _largest_file(folder)
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 4, 3 * len(data) // 4):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
  """Cuts the largest file in half: an interrupted copy."""
  path = _largest_file(folder)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _assert_moved(before: dict, after: dict, moves: dict[str, str]) -> None:
  """Every file of `before` is in `after`, byte for byte, under its folder's
  new name (`moves`: first path component -> new name)."""
  for rel, data in before.items():
    head, _, rest = rel.partition(os.sep)
    new = os.path.join(moves.get(head, head), rest)
    assert after.get(new) == data, f"{rel} -> {new} lost or changed"


@pytest.fixture(scope="module", name="reference")
def reference_fixture(tmp_path_factory):
  """(workdir, records) of an uninterrupted 3-epoch run of configs/test.py."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = _run(_cli(workdir, *ARGS))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert workdir_lib.checkpoint_steps(str(workdir)) == [SPE, 2 * SPE, 3 * SPE]
  return workdir, _records(workdir)


def _killed_copy(reference, tmp_path, epochs_logged: int) -> Path:
  """The reference workdir as a SIGKILL would have left it with
  `epochs_logged` epoch records and no final record."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  metrics = str(workdir / workdir_lib.METRICS_FILE)
  workdir_lib.write_records(
      metrics, workdir_lib.read_records(metrics)[:epochs_logged])
  return workdir


def test_damaged_newest_checkpoints_fall_back_exactly(reference, tmp_path):
  # Killed after epoch 2's checkpoint and record; then bytes of the newest
  # checkpoint flipped and a file of the one before cut short. An earlier
  # incident already left a 63.unreadable.
  workdir = _killed_copy(reference, tmp_path, epochs_logged=3)
  ckpt = workdir / workdir_lib.CHECKPOINT_DIR
  _flip(ckpt / "63")
  _truncate(ckpt / "42")
  (ckpt / "63.unreadable").mkdir()
  before = _files(ckpt)
  proc = _run(_cli(workdir, *ARGS))
  assert proc.returncode == 0, proc.stderr[-3000:]
  _line(proc.stderr, f"checkpoint {ckpt / '63'} is unreadable (",
        "moved it aside to 63.unreadable.1; trying step 42")
  _line(proc.stderr, f"checkpoint {ckpt / '42'} is unreadable (",
        "moved it aside to 42.unreadable; trying step 21")
  _line(proc.stderr, "resuming from step 21 (epoch 1, batch 0)")
  assert _records(workdir) == reference[1]
  assert workdir_lib.checkpoint_steps(str(workdir)) == [21, 42, 63]
  _assert_moved(before, _files(ckpt), {"63": "63.unreadable.1",
                                       "42": "42.unreadable"})


def test_no_readable_checkpoint_is_one_line_and_deletes_nothing(
    reference, tmp_path):
  workdir = _killed_copy(reference, tmp_path, epochs_logged=3)
  ckpt = workdir / workdir_lib.CHECKPOINT_DIR
  _flip(ckpt / "63")
  (ckpt / "42" / "meta" / "metadata").write_text("{not json")
  os.remove(ckpt / "21" / "state" / "_METADATA")
  before, metrics = _files(ckpt), _files(workdir)["metrics.jsonl"]
  proc = _run(_cli(workdir, *ARGS))
  assert proc.returncode == 1, proc.stderr[-3000:]
  helpers.last_error_line(proc.stderr, f"{workdir}: no readable checkpoint",
              "tried step(s) 63 (moved aside to", "63.unreadable), 42 (",
              "42.unreadable), 21 (", "21.unreadable)", "nothing was deleted")
  _line(proc.stderr, "21 is unreadable (", "no other checkpoint to try")
  _assert_moved(before, _files(ckpt), {s: f"{s}.unreadable"
                                       for s in ("21", "42", "63")})
  assert _files(workdir)["metrics.jsonl"] == metrics


def test_sigkill_during_a_save_resumes_from_the_last_complete_one(
    reference, tmp_path):
  # Killed while orbax wrote epoch 2's checkpoint: its folder still has the
  # temporary name (and a temporary `state`, half written); no record yet.
  workdir = _killed_copy(reference, tmp_path, epochs_logged=2)
  ckpt = workdir / workdir_lib.CHECKPOINT_DIR
  partial = ckpt / "63.orbax-checkpoint-tmp"
  (ckpt / "63").rename(partial)
  (partial / "state").rename(partial / "state.orbax-checkpoint-tmp")
  _truncate(partial)
  before = _files(ckpt)
  proc = _run(_cli(workdir, *ARGS))
  assert proc.returncode == 0, proc.stderr[-3000:]
  _line(proc.stderr, f"{partial}: an unfinished save",
        "moved it aside to 63.partial")
  _line(proc.stderr, "resuming from step 42 (epoch 2, batch 0)")
  assert _records(workdir) == reference[1]
  _assert_moved(before, _files(ckpt), {partial.name: "63.partial"})


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from mmssl_jax import checkpointing
    from test_faults import saved_state, saved_meta
    with checkpointing.CheckpointStore(sys.argv[1], keep=2) as store:
      step = (store.latest_step() or 0) + 1
      while True:
        print(f"saving {step}", flush=True)
        store.save(saved_state(step), saved_meta(step),
                   best_score=-abs(step - 4.0))
        step += 1
""")


def saved_state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"a": rng.normal(size=(256, 64)).astype(np.float32),
          "b": rng.integers(0, 1000, size=(4096,), dtype=np.int32)}


def saved_meta(step: int) -> checkpointing.CheckpointMeta:
  return checkpointing.CheckpointMeta(
      step=step, epoch=step, batch=0, epoch_terms={}, train_seconds=0.0,
      bad_evals=0, best={}, last_record=None)


def test_sigkill_at_random_points_of_saves_keeps_the_newest_complete(
    tmp_path):
  """A process saving in a loop, killed (SIGKILL) at random moments of its
  saves: a fresh store always restores the newest complete step exactly
  and sets the unfinished one aside."""
  directory, rng, partials = tmp_path / "ck", random.Random(0), 0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
  for _ in range(5):
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)],
                            cwd=helpers.REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
      for _ in range(rng.randrange(2, 5)):  # a few saves, then the kill
        assert proc.stdout.readline().startswith("saving"), "saver died"
      time.sleep(rng.uniform(0.0, 0.05))
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
    partials += any(n.endswith(".orbax-checkpoint-tmp")
                    for n in os.listdir(directory))
    warnings = []
    with checkpointing.CheckpointStore(str(directory), keep=2,
                                       warn=warnings.append) as store:
      newest = checkpointing._step_folders(str(directory))[-1]  # pylint: disable=protected-access
      step, state, _ = store.restore_latest(saved_state(0))
    assert step == newest and not store.unreadable, warnings
    for name, value in saved_state(step).items():
      np.testing.assert_array_equal(state[name], value)
    assert all(n.isdigit() or ".partial" in n for n in os.listdir(directory))
  assert partials >= 1  # at least one kill hit a save in progress


def test_set_aside_folders_escape_retention_and_best(tmp_path):
  """Folders moved aside are not steps: retention never deletes them, the
  best-step lookup and checkpoint_steps never return them."""
  directory = tmp_path / "checkpoints"
  with checkpointing.CheckpointStore(str(directory), keep=2) as store:
    for step in (1, 2, 3):
      store.save(saved_state(step), saved_meta(step), best_score=step)
  (directory / "3").rename(directory / "3.unreadable")
  (directory / "2").rename(directory / "2.partial")
  with checkpointing.CheckpointStore(str(directory), keep=1) as store:
    assert store.all_steps() == [] and store.best_step() is None
    for step, score in ((4, 1.0), (5, 0.5), (6, 0.5)):
      store.save(saved_state(step), saved_meta(step), best_score=score)
    assert store.all_steps() == [4, 6] and store.best_step() == 4
  assert sorted(os.listdir(directory)) == ["2.partial", "3.unreadable", "4",
                                           "6"]
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [4, 6]


def test_unparsable_orbax_json_is_set_aside_when_the_store_opens(
    reference, tmp_path):
  """Orbax reads every checkpoint's metrics when it opens the folder (and
  fails on bad JSON): such a checkpoint is skipped by a read-only store
  and moved aside by a writable one, with a warning each."""
  ckpt = tmp_path / "checkpoints"
  shutil.copytree(reference[0] / workdir_lib.CHECKPOINT_DIR, ckpt)
  (ckpt / "63" / "metrics" / "metrics").write_text('{"val_score": 0.')
  for read_only in (True, False):
    warnings = []
    with checkpointing.CheckpointStore(str(ckpt), read_only=read_only,
                                       warn=warnings.append) as store:
      assert store.all_steps() == [21, 42] and store.best_step() == 42
    assert len(warnings) == 1 and warnings[0].startswith(
        f"checkpoint {ckpt / '63'} is unreadable (metrics/metrics: "
        "JSONDecodeError: "), warnings
    assert warnings[0].endswith("; skipping it" if read_only else
                                "; moved it aside to 63.unreadable")
  assert sorted(os.listdir(ckpt)) == ["21", "42", "63.unreadable"]


_FULL_DISK = textwrap.dedent("""
    import resource, runpy, signal, sys
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save
    def failing_save(self, step, *args, **kwargs):
      if step >= 42:  # from epoch 1's checkpoint on, no file over 1 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (1024, resource.RLIM_INFINITY))
      return save(self, step, *args, **kwargs)
    ocp.CheckpointManager.save = failing_save
    sys.argv[0] = "mmssl_jax.main"
    runpy.run_module("mmssl_jax.main", run_name="__main__", alter_sys=True)
""")


def test_unwritable_checkpoint_stops_with_one_line_and_rerun_resumes(
    reference, tmp_path):
  """A write that fails for real (EFBIG: the file-size limit, which also
  stops root) while orbax writes epoch 1's checkpoint."""
  workdir = tmp_path / "run"
  ckpt = workdir / workdir_lib.CHECKPOINT_DIR
  proc = _run([sys.executable, "-c", _FULL_DISK, *ARGS,
               f"--workdir={workdir}"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  helpers.last_error_line(
      proc.stderr, f"could not write checkpoint {ckpt / '42'}: ",
      "File too large", f"the last complete checkpoint, {ckpt / '21'}"
      ", is untouched", "run the same command again to resume")
  assert workdir_lib.checkpoint_steps(str(workdir)) == [21]
  assert _records(workdir) == reference[1][:1]  # no record of epoch 1
  proc = _run(_cli(workdir, *ARGS))
  assert proc.returncode == 0, proc.stderr[-3000:]
  _line(proc.stderr, "42.orbax-checkpoint-tmp: an unfinished save",
        "moved it aside to 42.partial")
  _line(proc.stderr, "resuming from step 21 (epoch 1, batch 0)")
  assert _records(workdir) == reference[1]


def test_lost_best_checkpoint_falls_back_with_a_warning(reference, tmp_path,
                                                        capsys):
  """restore_run (recommend, export) with the best checkpoint damaged: the
  best-scoring readable one, a warning naming it, nothing moved."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  ckpt = workdir / workdir_lib.CHECKPOINT_DIR
  _flip(ckpt / "63")
  before = _files(ckpt)
  with checkpointing.CheckpointStore(str(ckpt), read_only=True) as store:
    assert store.best_step() == 63 and store.ranked_steps() == [63, 42, 21]
  restored = restore.restore_run(str(workdir), which="best")
  assert restored.step == 42 and restored.meta.best["epoch"] == 1
  assert restored.run.evaluate(restored.state, "val") == restored.meta.best[
      "val"]
  stderr = capsys.readouterr().err
  _line(stderr, f"warning: checkpoint {ckpt / '63'} is unreadable (",
        "skipping it; trying step 42")
  _line(stderr, f"warning: using checkpoint {ckpt / '42'} (step 42, the "
        "best-scoring readable one; unreadable: step(s) 63)")
  with pytest.raises(checkpointing.CheckpointReadError, match="63 is unread"):
    restore.restore_run(str(workdir), which=63)
  assert _files(ckpt) == before  # read-only: nothing moved

  # The recommend CLI: the same two warnings, then its output, exit 0.
  proc = _run(_cli(workdir, "--users=0", "--k=3",
                   module="mmssl_jax.recommend"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  _line(proc.stderr, "warning: using checkpoint", "(step 42, the best-scoring")
  assert proc.stdout.strip()
