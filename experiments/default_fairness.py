r"""Is the embedded synthetic dataset a fair test? Popularity vs LightGCN vs MMSSL.

  python experiments/default_fairness.py --config=configs/default.py

Trains LightGCN (`model=lightgcn`) and MMSSL on the same generated data and
ranks by item popularity; prints one JSON line with test metrics at best
validation and wall-clock seconds of each.
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mmssl_jax import config_lib
from mmssl_jax import evaluation
from mmssl_jax import train
from mmssl_jax import run as run_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "benchmarks"))
import results_io  # noqa: E402  benchmarks/results_io.py

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Also write the JSON to this file.")
config_flags.DEFINE_config_file("config", "configs/default.py", "Config.")
KEYS = ("recall@20", "ndcg@20", "precision@20")


def popularity(ds, config):
  counts = np.bincount(ds.train.items, minlength=ds.n_items).astype(np.float32)
  test_set = evaluation.build_eval_set(
      target=ds.test, exclude=[ds.train], n_users=ds.n_users,
      n_items=ds.n_items, block_users=config.eval.block_users)
  return evaluation.evaluate(jnp.ones((ds.n_users, 1)),
                             jnp.asarray(counts)[:, None], test_set,
                             ks=config.eval.ks)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  ds = run_lib.load_dataset(config.data)
  out = {"benchmark": "default_fairness", "dataset": ds.summary()}
  pop = popularity(ds, config)
  out["popularity"] = {k: pop[k] for k in KEYS}
  lgn = config_lib.apply_arg(config.copy_and_resolve_references(),
                             "model=lightgcn")
  for name, cfg in (("lightgcn", lgn), ("mmssl", config)):
    t0 = time.time()
    with tempfile.TemporaryDirectory() as workdir:
      result = train.train_and_evaluate(cfg, workdir)
    out[name] = {**{k: result["test"][k] for k in KEYS},
                 "best_epoch": result["best_epoch"],
                 "epochs": result["epochs"], "seconds": time.time() - t0}
  results_io.emit(out, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
