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


def _checkpoint_step(store: checkpointing.CheckpointStore,
                     which: str | int) -> int:
  if which == "best":
    step = store.best_step()
    if step is None:
      raise FileNotFoundError(
          f"{store.directory}: no checkpoint of an evaluated epoch")
    return step
  if which == "latest":
    return store.latest_step()
  step = int(which)
  if step not in store.all_steps():
    raise FileNotFoundError(f"{store.directory}: no checkpoint at step "
                            f"{step} (have {store.all_steps()})")
  return step


def restore_run(workdir: str, *, which: str | int = "best",
                data_dir: str | None = None) -> RestoredRun:
  """Loads a workdir's config, dataset and a checkpoint's train state.

  Args:
    workdir: a training workdir (config.json + checkpoints/).
    which: 'best' (best validation epoch), 'latest', or a step number.
    data_dir: overrides config.data.dir (a moved dataset folder).

  Raises:
    FileNotFoundError: no config.json or no (such) checkpoint.
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
        os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), read_only=True)
    with store:
      step = _checkpoint_step(store, which)
      config, ds, _ = run_lib.load(config)
      # A run trained on a mesh saved a state without CSR fields: rebuild
      # it as such, on a one-device mesh of this process.
      mesh = (parallel.make_mesh(n_devices=1, item_devices=1)
              if parallel.is_sharded(config) else None)
      run = run_lib.Run(config, ds, mesh)
      state, meta = store.restore(step, run.init_state())
  return RestoredRun(config, ds, run, state, step, meta)


def restore_best(workdir: str, *, data_dir: str | None = None) -> RestoredRun:
  """`restore_run(workdir, which='best')`: the best-validation checkpoint."""
  return restore_run(workdir, which="best", data_dir=data_dir)
