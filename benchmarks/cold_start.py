r"""New items: MMSSL's inductive item path against the baselines, by seed.

  python benchmarks/cold_start.py --config=configs/tiktok.py \
      --set=data.dir=PATH/tiktok --set=critic.kind=lowrank \
      --cold_items=0.2 --seeds=2022,1,7 --root=runs/cold_start \
      --output=benchmarks/results/cold_start_tiktok.json

For each seed s, the dataset's items are split with `data.cold_items` and
`data.cold_seed = s` (`mmssl_jax/data/cold_start.py`: 20% of the items held
out of training, half of them validation items, half test items), and on
that split:

* `mmssl_inductive`: MMSSL with `model.cold_start=True` (seed s), trained to
  early stopping on validation Recall@20 over all items;
* `mmssl`: the same checkpoint with the inductive path switched off (new
  items keep the vectors the model gives them without it). The encoder's
  loss reaches no other parameter, so this is MMSSL trained without it;
* `lightgcn`: LightGCN (seed s); new items keep their initial vectors;
* `content_knn` and `popularity` (`mmssl_jax/baselines.py`).

Every model is scored on the test split at its best validation epoch,
overall and by item group: `cold/` (new test items ranked among the new
items), `cold_all/` (among all items) and `warm/`. The JSON holds every run
and mean, std over the seeds. Re-running resumes finished runs from their
workdirs (`--root`).
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io  # pylint: disable=g-import-not-at-top,wrong-import-position

from mmssl_jax import baselines  # pylint: disable=g-import-not-at-top,wrong-import-position
from mmssl_jax import restore  # pylint: disable=g-import-not-at-top,wrong-import-position
from mmssl_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file (configs/tiktok.py).")
flags.DEFINE_float("cold_items", 0.2, "Fraction of the items held out.")
flags.DEFINE_list("seeds", ["2022", "1", "7"], "Seeds (split and models).")
flags.DEFINE_multi_string("set", [], "key=value config override of every "
                          "run, e.g. data.dir=PATH or critic.kind=lowrank.")
flags.DEFINE_list("models", ["mmssl", "lightgcn", "content_knn",
                             "popularity"], "What to run.")
flags.DEFINE_string("root", "runs/cold_start", "Workdirs: <root>/<name>.")
flags.DEFINE_string("output", None, "JSON file, rewritten after every run.")

SUMMARY_KEYS = ("cold/recall@20", "cold/ndcg@20", "cold_all/recall@20",
                "cold_all/ndcg@20", "warm/recall@20", "warm/ndcg@20",
                "recall@20", "ndcg@20")


def _config(seed: int, model: str):
  config = results_io.load_config(FLAGS.config,
                                "model=lightgcn" if model == "lightgcn" else "")
  results_io.apply_overrides(config, FLAGS.set)
  config.seed = seed
  config.data.cold_items = FLAGS.cold_items
  config.data.cold_seed = seed
  config.model.cold_start = model == "mmssl"
  return config


def _row(name: str, seed: int, test: dict, val: dict | None, **extra) -> dict:
  return {"model": name, "seed": seed, **extra,
          "val": {k: v for k, v in (val or {}).items()},
          "test": {k: v for k, v in test.items()}}


def run_mmssl(seed: int, model: str) -> list[dict]:
  """The trained model (and, for MMSSL, the same checkpoint without the
  inductive path)."""
  config = _config(seed, model)
  workdir = os.path.join(FLAGS.root, f"{model}_seed{seed}")
  final = train.train_and_evaluate(config, workdir)
  extra = dict(best_epoch=final["best_epoch"], epochs=final["epochs"],
               workdir=workdir)
  if model != "mmssl":
    return [_row(model, seed, final["test"], final["val"], **extra)]
  restored = restore.restore_best(workdir)
  plain = {split: restored.run.evaluate(restored.state, split,
                                        inductive=False)
           for split in ("val", "test")}
  return [_row("mmssl_inductive", seed, final["test"], final["val"], **extra),
          _row("mmssl", seed, plain["test"], plain["val"], **extra)]


def run_baseline(seed: int, name: str) -> list[dict]:
  from mmssl_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  config, ds, _ = run_lib.load(_config(seed, "lightgcn"))
  built = run_lib.Run(config, ds)
  user, item = (baselines.popularity(ds, seed) if name == "popularity"
                else getattr(baselines, name)(ds))
  user, item = jnp.asarray(user), jnp.asarray(item)
  return [_row(name, seed, built.evaluate_embeddings(user, item, "test"),
               built.evaluate_embeddings(user, item, "val"))]


def summarise(rows: list[dict]) -> dict:
  out = {}
  for name in sorted({r["model"] for r in rows}):
    runs = [r for r in rows if r["model"] == name]
    out[name] = {}
    for key in SUMMARY_KEYS:
      values = [r["test"][key] for r in runs if key in r["test"]]
      if values:
        out[name][key] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}
  return out


def main(argv):
  del argv
  rows = []
  for seed in [int(s) for s in FLAGS.seeds]:
    for model in FLAGS.models:
      rows += (run_mmssl(seed, model) if model in ("mmssl", "lightgcn")
               else run_baseline(seed, model))
      results_io.emit({
          "benchmark": "cold_start", "config": FLAGS.config,
          "cold_items": FLAGS.cold_items, "seeds": FLAGS.seeds,
          "overrides": FLAGS.set, "date": datetime.date.today().isoformat(),
          "machine": results_io.machine(),
          "jax": jax.__version__,
          "command": " ".join(["python benchmarks/cold_start.py",
                               *sys.argv[1:]]),
          "summary": summarise(rows), "runs": rows}, FLAGS.output)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
