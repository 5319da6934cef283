r"""Train (or summarise) one run and write its result as JSON.

  python benchmarks/reproduce.py --config=configs/tiktok.py:model=lightgcn \
      --config.data.dir=PATH/tiktok --workdir=runs/tiktok_lightgcn \
      --output=benchmarks/results/tiktok_lightgcn.json

Trains with `train_and_evaluate` unless the workdir already holds a finished
run, then reads `metrics.jsonl` and writes (and prints) one JSON object: test
metrics at the best validation epoch, epochs run, best epoch, mean seconds
per training epoch, the validation/test trajectory, machine and date.
"""

import datetime
import os
import platform

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mmssl_jax import train
from mmssl_jax import workdir as workdir_lib

import results_io  # benchmarks/results_io.py (run as a script)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_string("workdir", None, "Run directory (resumed or summarised).")
flags.DEFINE_string("output", None, "JSON file to write (optional).")
flags.mark_flags_as_required(["config", "workdir"])

KEYS = ("recall@20", "precision@20", "ndcg@20", "ndcg_mmssl@20", "recall@10",
        "ndcg@10", "recall@50", "ndcg@50")


def summarise(workdir: str) -> dict:
  records = workdir_lib.read_records(
      os.path.join(workdir, workdir_lib.METRICS_FILE))
  epochs = [r for r in records if "epoch" in r and not r.get("final")]
  final = next((r for r in records if r.get("final")), None)
  best = max((r for r in epochs if "val/recall@20" in r),
             key=lambda r: r["val/recall@20"])
  best_test = final["test"] if final else {
      k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("test/")}
  secs = [r["train_seconds"] for r in epochs if "train_seconds" in r]
  return {
      "finished": final is not None,
      "epochs": len(epochs),
      "best_epoch": best["epoch"],
      "test_at_best_val": {k: best_test[k] for k in KEYS if k in best_test},
      "best_val": {k: best[f"val/{k}"] for k in KEYS if f"val/{k}" in best},
      "train_seconds_per_epoch_median": sorted(secs)[len(secs) // 2],
      "trajectory": [
          {"epoch": r["epoch"], "val_recall@20": r.get("val/recall@20"),
           "val_ndcg_mmssl@20": r.get("val/ndcg_mmssl@20"),
           "test_recall@20": r.get("test/recall@20"),
           "test_ndcg@20": r.get("test/ndcg@20")} for r in epochs],
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  workdir = FLAGS.workdir
  # A finished workdir is only summarised (even if written by an older
  # version whose config.json lacks newer fields).
  records = workdir_lib.read_records(
      os.path.join(workdir, workdir_lib.METRICS_FILE))
  if not any(r.get("final") for r in records):
    train.train_and_evaluate(FLAGS.config, workdir)
  out = {"benchmark": "reproduce", "workdir": workdir,
         "model": FLAGS.config.model.name,
         "variant": FLAGS.config.variant,
         "ablation": FLAGS.config.get("ablation", "full"),
         "data": FLAGS.config.data.dir or FLAGS.config.data.source,
         "seed": FLAGS.config.seed,
         "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                    f"{jax.devices()[0].device_kind}",
         "jax": jax.__version__,
         "date": datetime.date.today().isoformat(),
         **summarise(workdir)}
  results_io.emit(out, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
