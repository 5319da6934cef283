"""Loading a trained run from its workdir: config, dataset, checkpoint.

`restore_best(workdir)` rebuilds the run of a workdir (config.json, the
dataset, `run.Run`) and loads its best-validation checkpoint; `recommend`,
`export` and users' own code start from it. A run trained on a device mesh
(any number of devices and processes) is rebuilt on a one-device mesh of
this process, so its checkpoints load anywhere.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NamedTuple

import ml_collections

from mmssl_jax import checkpointing
from mmssl_jax import parallel
from mmssl_jax import run as run_lib
from mmssl_jax import workdir as workdir_lib


class RestoredRun(NamedTuple):
  """A run rebuilt from its workdir.

  config: the run's config (from config.json).
  dataset: its dataset, loaded and validated again.
  run: a `run.Run` (final_embeddings, evaluate, ...).
  state: the train state of the checkpoint.
  step: the checkpoint's global step.
  meta: its `checkpointing.CheckpointMeta` (epoch, best metrics, ...).
  """

  config: ml_collections.ConfigDict
  dataset: Any
  run: run_lib.Run
  state: Any
  step: int
  meta: checkpointing.CheckpointMeta


def _candidates(store: checkpointing.CheckpointStore,
                which: str | int) -> list[int]:
  """The steps to try for `which`, in order (an explicit step: only it)."""
  if which == "best":
    if store.best_step() is None:
      raise FileNotFoundError(
          f"{store.directory}: no checkpoint of an evaluated epoch")
    return store.ranked_steps()
  if which == "latest":
    return sorted(store.all_steps(), reverse=True)
  step = int(which)
  if step not in store.all_steps():
    raise FileNotFoundError(f"{store.directory}: no checkpoint at step "
                            f"{step} (have {store.all_steps()})")
  return [step]


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _restore(store: checkpointing.CheckpointStore, which: str | int,
             target) -> tuple[int, Any, checkpointing.CheckpointMeta]:
  """Restores `which`; a damaged 'best' or 'latest' falls back (read-only:
  nothing is moved) to the best-scoring readable checkpoint, else the
  latest readable one, with a warning naming the step used."""
  steps = _candidates(store, which)
  if which not in ("best", "latest"):
    return (steps[0], *store.restore(steps[0], target))
  step, state, meta = store.restore_first(steps, target)
  if store.unreadable:
    lost = ", ".join(str(s) for s, _ in store.unreadable)
    kind = ("the best-scoring readable one" if which == "best"
            else "the latest readable one")
    _warn(f"using checkpoint {os.path.join(store.directory, str(step))} "
          f"(step {step}, {kind}; unreadable: step(s) {lost})")
  return step, state, meta


def restore_run(workdir: str, *, which: str | int = "best",
                data_dir: str | None = None) -> RestoredRun:
  """Loads a workdir's config, dataset and a checkpoint's train state.

  Args:
    workdir: a training workdir (config.json + checkpoints/).
    which: 'best' (best validation epoch), 'latest', or a step number.
    data_dir: overrides config.data.dir (a moved dataset folder).

  Raises:
    FileNotFoundError: no config.json or no (such) checkpoint.
    checkpointing.CheckpointReadError: the checkpoint (an explicit step), or
      every one tried ('best', 'latest'), is unreadable. For 'best' and
      'latest' an unreadable checkpoint is skipped (not moved) with a
      one-line warning on stderr, and a last line names the step used.
    DataError: the dataset no longer loads.
    ConfigMismatchError: the dataset's shapes do not match the checkpoint.
  """
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: not found; {workdir} is not a "
                            "training workdir")
  config = workdir_lib.load_config_json(config_path)
  if data_dir is not None:
    config.data.dir = str(data_dir)
  if not workdir_lib.checkpoint_steps(workdir):
    raise FileNotFoundError(
        f"{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}: no checkpoint")
  with checkpointing.quiet_orbax(logging.ERROR):
    store = checkpointing.CheckpointStore(
        os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), read_only=True,
        warn=_warn)
    with store:
      _candidates(store, which)  # a missing step fails before the data loads
      config, ds, _ = run_lib.load(config)
      # A run trained on a mesh saved a state without CSR fields: rebuild
      # it as such, on a one-device mesh of this process.
      mesh = (parallel.make_mesh(n_devices=1, item_devices=1)
              if parallel.is_sharded(config) else None)
      run = run_lib.Run(config, ds, mesh)
      step, state, meta = _restore(store, which, run.init_state())
  return RestoredRun(config, ds, run, state, step, meta)


def restore_best(workdir: str, *, data_dir: str | None = None) -> RestoredRun:
  """`restore_run(workdir, which='best')`: the best-validation checkpoint."""
  return restore_run(workdir, which="best", data_dir=data_dir)
