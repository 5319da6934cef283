r"""Seconds to save and restore a checkpoint of the full train state, and its size.

  python benchmarks/checkpoint_speed.py --config=configs/tiktok.py \
      --config.data.dir=PATH/tiktok

Builds the run's train state (MMSSL on TikTok: both parameter sets, both
optimiser states, critic statistics, modality graphs and buffers), then saves
it `--repeats` times through `checkpointing.CheckpointStore` exactly as the
training loop does (NaN check, host copy, orbax write to a temporary folder
and rename) and restores the latest one. `--steps` train steps run first
(0 by default: the state's shapes and dtypes, hence the cost, do not depend
on its values; a step compiles for minutes on a CPU). Prints one JSON line.
"""

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mmssl_jax import checkpointing
from mmssl_jax import train
from mmssl_jax import run as run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_integer("repeats", 5, "Saves (and restores) to time.")
flags.DEFINE_integer("steps", 0, "Train steps before saving.")
flags.DEFINE_string("dir", None, "Where to write (default: a temporary "
                    "folder, removed afterwards).")


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _meta(step: int) -> checkpointing.CheckpointMeta:
  return checkpointing.CheckpointMeta(
      step=step, epoch=step, batch=0, epoch_terms={}, train_seconds=0.0,
      bad_evals=0, best={"epoch": -1}, last_record=None)


def run_benchmark(config, directory: str, repeats: int, n_steps: int):
  ds = run_lib.load_dataset(config.data)
  run = run_lib.Run(config, ds)
  state = run.init_state()
  for i in range(n_steps):
    state, _ = run.step(state, jnp.int32(i), run.inputs)
  jax.block_until_ready(state)
  leaves = jax.tree.leaves(checkpointing.state_to_arrays(state))
  out = {"benchmark": "checkpoint_speed", "dataset": ds.name,
         "model": config.model.name, "variant": config.variant,
         "n_users": ds.n_users, "n_items": ds.n_items,
         "modalities": list(ds.modalities), "steps_before_save": n_steps,
         "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
         "arrays": len(leaves),
         "state_mbytes": sum(x.nbytes for x in leaves) / 2**20}
  checkpointing.check_finite(state, 0)  # compiles the check
  t0 = time.perf_counter()
  checkpointing.check_finite(state, 0)
  out["nan_check_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  checkpointing.state_to_arrays(state)
  out["host_copy_s"] = time.perf_counter() - t0
  saves, restores = [], []
  step = n_steps
  with checkpointing.CheckpointStore(directory, keep=2) as store:
    for _ in range(repeats):
      step += 1
      t0 = time.perf_counter()
      store.save(state, _meta(step))
      saves.append(time.perf_counter() - t0)
    out["size_on_disk_mbytes"] = _du(os.path.join(directory, str(step))) / 2**20
    target = run.init_state()
    for _ in range(repeats):
      t0 = time.perf_counter()
      restored, _ = store.restore(step, target)
      jax.block_until_ready(restored)
      restores.append(time.perf_counter() - t0)
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      leaves, jax.tree.leaves(checkpointing.state_to_arrays(restored))))
  out.update(save_s_median=statistics.median(saves), save_s_min=min(saves),
             restore_s_median=statistics.median(restores),
             restore_s_min=min(restores), restored_equal=same)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.dir:
    out = run_benchmark(FLAGS.config, FLAGS.dir, FLAGS.repeats, FLAGS.steps)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      out = run_benchmark(FLAGS.config, os.path.join(tmp, "checkpoints"),
                          FLAGS.repeats, FLAGS.steps)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
