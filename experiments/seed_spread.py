r"""Spread of early-epoch metrics over seeds (is a gap seed noise?).

  python experiments/seed_spread.py --config=configs/tiktok.py \
      --config.data.dir=PATH/tiktok --seeds=2022,1,7 --epochs=1

Trains the config for `--epochs` epochs once per seed (temporary workdirs)
and prints one JSON line with validation and test Recall@20 / NDCG@20 per
epoch and seed, and their mean and range.
"""

import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from mmssl_jax import train
from mmssl_jax import workdir as workdir_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "benchmarks"))
import results_io  # noqa: E402  benchmarks/results_io.py

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_list("seeds", ["2022", "1", "7"], "Seeds.")
flags.DEFINE_integer("epochs", 1, "Epochs per seed.")
flags.DEFINE_string("output", None, "Also write the JSON to this file.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  runs = {}
  for seed in FLAGS.seeds:
    config = FLAGS.config.copy_and_resolve_references()
    with config.unlocked():
      config.seed = int(seed)
      config.train.epochs = FLAGS.epochs
      config.eval.patience = FLAGS.epochs  # never stop early here
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(config, workdir)
      records = workdir_lib.read_records(f"{workdir}/metrics.jsonl")
    runs[seed] = [{k: r[k] for k in ("epoch", "val/recall@20", "val/ndcg@20",
                                      "test/recall@20", "test/ndcg@20")
                   if k in r} for r in records if not r.get("final")]
  summary = {}
  for key in ("val/recall@20", "test/recall@20"):
    last = [r[-1][key] for r in runs.values() if key in r[-1]]
    if last:
      summary[key] = {"mean": float(np.mean(last)), "min": float(min(last)),
                      "max": float(max(last))}
  out = {"benchmark": "seed_spread", "data": FLAGS.config.data.dir,
         "variant": FLAGS.config.variant, "epochs": FLAGS.epochs,
         "runs": runs, "last_epoch": summary}
  results_io.emit(out, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
