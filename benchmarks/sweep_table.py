r"""Collects a hyper-parameter sweep run as one `ablation.py` study per setting.

  for tau in 0.1 0.5 2.0; do for k in 0.3 1.0 3.0; do
    python benchmarks/ablation.py --config=configs/tiktok.py --variants=paper \
        --ablations=full --seeds=2022 --no_lightgcn \
        --set=data.dir=PATH/tiktok --set=critic.kind=lowrank \
        --set=train.epochs=5 --set=loss.real_data_tau=$tau \
        --set=loss.ui_pre_scale=$k --root=runs/sweep/tau${tau}_k${k} \
        --output=runs/sweep/tau${tau}_k${k}.json
  done; done
  python benchmarks/sweep_table.py --inputs='runs/sweep/*.json' \
      --keys=loss.real_data_tau,loss.ui_pre_scale \
      --output=benchmarks/results/paper_gumbel_sweep_tiktok.json

Each input is the JSON of one study (one run: its first). The setting of a
run is read from its own config.json (`--keys`), not from file names. The
best setting is the one with the highest best-validation `--metric`; test
metrics are reported next to it but never used to choose. Prints a markdown
table and writes the rows, the best setting and the selection rule as JSON.
"""

import glob
import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("inputs", None, "Glob of ablation.py JSON files.")
flags.DEFINE_list("keys", [], "Dotted config fields that vary.")
flags.DEFINE_string("metric", "recall@20", "Validation metric to select by.")
flags.DEFINE_string("output", None, "JSON file to write.")
flags.mark_flag_as_required("inputs")


def _field(config: dict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def main(argv):
  del argv
  rows = []
  for path in sorted(glob.glob(FLAGS.inputs)):
    with open(path, encoding="utf-8") as f:
      study = json.load(f)
    run = study["runs"][0]
    if "best_val" not in run:
      raise app.UsageError(f"{path}: run {run.get('name')} has no result "
                           f"({run.get('error', 'unfinished')})")
    with open(os.path.join(run["workdir"], "config.json"),
              encoding="utf-8") as f:
      config = json.load(f)
    rows.append({"source": path,
                 "setting": {k: _field(config, k) for k in FLAGS.keys},
                 "best_val": run["best_val"], "test": run["test"],
                 "epochs": run["epochs"],
                 "epochs_to_best": run["epochs_to_best"]})
  if not rows:
    raise app.UsageError(f"--inputs={FLAGS.inputs} matches no file")
  best = max(rows, key=lambda r: r["best_val"][FLAGS.metric])
  header = [*FLAGS.keys, f"val {FLAGS.metric}", f"test {FLAGS.metric}",
            "test ndcg@20", "epochs to best / run"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    mark = " (best)" if r is best else ""
    print("| " + " | ".join(
        [*(str(v) for v in r["setting"].values()),
         f"{r['best_val'][FLAGS.metric]:.4f}{mark}",
         f"{r['test'][FLAGS.metric]:.4f}", f"{r['test']['ndcg@20']:.4f}",
         f"{r['epochs_to_best']} / {r['epochs']}"]) + " |")
  out = {"benchmark": "sweep", "select_by": f"best validation {FLAGS.metric}",
         "best": best["setting"], "rows": rows}
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  print(json.dumps({"best": best["setting"]}))


if __name__ == "__main__":
  app.run(main)
