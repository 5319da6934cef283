r"""Ablation study: variants x ablations x seeds, resumable.

  python benchmarks/ablation.py --config=configs/tiktok.py \
      --set=data.dir=PATH/tiktok --set=critic.kind=lowrank \
      --set=train.epochs=200 --root=runs/ablation \
      --output=benchmarks/results/ablation_tiktok.json

  python benchmarks/ablation.py --markdown \
      --from_json=benchmarks/results/ablation_tiktok.json

Grid: for each variant in `--variants` and each ablation in `--ablations`
(`config_lib.VARIANTS`, `config_lib.ABLATIONS`), the config file is loaded
as `<config>:variant=<v>,ablation=<a>`; `full` runs with every seed of
`--seeds`, the other ablations with the first `--ablation_seeds` seeds. Plus
LightGCN (`<config>:model=lightgcn`) with the first seed, unless
`--no_lightgcn`. The runs go seed by seed (every group's first seed before
any second seed), so a partial study has a row for every group early.
`--set=key=value` overrides (repeatable; the value is parsed with the type of
the existing field, e.g. `eval.ks=10,20`) are applied to every run after the
variant and ablation switches.

Every run trains in its own persistent workdir
`<root>/<dataset>/<variant or lightgcn>_<ablation>_seed<seed>` with
`train.train_and_evaluate`, so re-running the same command resumes an
interrupted study: unfinished runs resume from their checkpoint, finished
ones are only summarised from their metrics.jsonl (a finished run is not
extended by a larger `train.epochs`). A workdir trained with other
overrides is refused (`ConfigMismatchError`, recorded as the run's error):
use another `--root` for another setting. A run that raises is recorded
with its error and the study goes on; SIGTERM/SIGINT stop the study after
the running run saved its checkpoint (exit 143/130; run again to resume).
`--only=SUBSTRING[,SUBSTRING]` keeps the runs whose name contains one of
them, to split a study over processes (one `--output` each; `--from_json`
merges several files). Several processes on one GPU need
XLA_PYTHON_CLIENT_PREALLOCATE=false.

The JSON (written to `--output` after every run, printed as one line at the
end) holds per run: test metrics at the best validation epoch, the best
validation metrics, epochs run, `best_epoch` (0-based) and
`epochs_to_best` = best_epoch + 1, mean training seconds per epoch (the
per-epoch `train_seconds` records: training only, evaluation excluded; the
first epoch includes compilation, `seconds_per_epoch_after_first` leaves it
out), and whether early stopping ended the run or the epoch cap did; per
group (variant, ablation) the mean, std (ddof=1; null when n=1), min and max
over seeds. `--markdown` prints a table of the groups (from `--from_json`
without training, or after the study).
"""

import contextlib
import datetime
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from mmssl_jax import config_lib
from mmssl_jax import workdir as workdir_lib
from mmssl_jax import preemption

import results_io  # benchmarks/results_io.py (run as a script)

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file path (configs/tiktok.py); "
                    "`:variant=..,ablation=..` is appended per run.")
flags.DEFINE_list("variants", list(config_lib.VARIANTS), "Variants.")
flags.DEFINE_list("ablations", list(config_lib.ABLATIONS), "Ablations.")
flags.DEFINE_list("seeds", ["2022", "1", "7"], "Seeds of the full models.")
flags.DEFINE_integer("ablation_seeds", 1, "The ablations (not `full`) run "
                     "with the first this many seeds.")
flags.DEFINE_bool("no_lightgcn", False, "Leave out the LightGCN run (first "
                  "seed).")
flags.DEFINE_multi_string("set", [], "key=value config override for every "
                          "run (repeatable), e.g. critic.kind=lowrank.")
flags.DEFINE_string("root", "runs/ablation", "Workdirs go to "
                    "<root>/<dataset>/<run name>.")
flags.DEFINE_string("dataset", None, "Folder name under --root (default: "
                    "the config file's name, e.g. tiktok).")
flags.DEFINE_string("output", None, "JSON file, rewritten after every run.")
flags.DEFINE_list("only", [], "Run only the runs whose name contains one of "
                  "these substrings.")
flags.DEFINE_bool("markdown", False, "Print a markdown table of the groups.")
flags.DEFINE_list("from_json", [], "With --markdown: read these JSON files "
                  "(merged by run name) instead of training.")

TEST_KEYS = ("recall@20", "precision@20", "ndcg@20", "ndcg_mmssl@20",
             "recall@10", "ndcg@10", "recall@50", "ndcg@50")
# Aggregated per group: (run field, metric key or None).
AGGREGATED = (("test", "recall@20"), ("test", "precision@20"),
              ("test", "ndcg@20"), ("test", "ndcg_mmssl@20"),
              ("best_val", "recall@20"), ("epochs", None),
              ("best_epoch", None), ("epochs_to_best", None),
              ("seconds_per_epoch", None))
ABLATION_LABELS = {"full": "full", "wo_asl": "w/o ASL", "wo_cl": "w/o CL",
                   "wo_gt": "w/o GT", "rp_gae": "r/p GAE"}
DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"  # as in main.py


# ----------------------------------------------------------------------------
# Configs


def plan_runs(variants, ablations, seeds, ablation_seeds: int,
              lightgcn: bool) -> list[dict]:
  """The grid, seed by seed: [{name, group, variant, ablation, model, seed,
  arg}] with `arg` the config-file argument of the run."""
  for v in variants:
    if v not in config_lib.VARIANTS:
      raise app.UsageError(f"--variants: {v!r} is not one of "
                           f"{config_lib.VARIANTS}")
  for a in ablations:
    if a not in config_lib.ABLATIONS:
      raise app.UsageError(f"--ablations: {a!r} is not one of "
                           f"{config_lib.ABLATIONS}")
  if not seeds:
    raise app.UsageError("--seeds is empty")
  runs = []

  def add(group, variant, ablation, model, seed, arg):
    runs.append({"name": f"{group}_seed{seed}", "group": group,
                 "variant": variant, "ablation": ablation, "model": model,
                 "seed": seed, "arg": arg})

  for i, seed in enumerate(seeds):
    for v in variants:
      for a in ablations:
        if i < (len(seeds) if a == "full" else ablation_seeds):
          add(f"{v}_{a}", v, a, "mmssl", seed, f"variant={v},ablation={a}")
    if i == 0 and lightgcn:
      add("lightgcn_full", "reference", "full", "lightgcn", seed,
          "model=lightgcn")
  return runs


def combine_args(base: str, arg: str) -> str:
  return ",".join(a for a in (base, arg) if a)


# ----------------------------------------------------------------------------
# One run's record


def summarise(workdir: str, final: dict, config) -> dict:
  """Metrics of a finished run from its final result and metrics.jsonl."""
  records = workdir_lib.read_records(
      os.path.join(workdir, workdir_lib.METRICS_FILE))
  epochs = [r for r in records if "epoch" in r and not r.get("final")]
  if final.get("test") is None:
    raise RuntimeError(f"{workdir}: no evaluation ran ({len(epochs)} epochs)")
  best_epoch = int(final["best_epoch"])
  secs = [float(r["train_seconds"]) for r in epochs if "train_seconds" in r]
  metric = f"val/{config.eval.metric}"
  evals_after_best = sum(1 for r in epochs
                         if r["epoch"] > best_epoch and metric in r)
  stopped_early = evals_after_best > int(config.eval.patience)
  out = {
      "epochs": int(final["epochs"]),
      "best_epoch": best_epoch,
      "epochs_to_best": best_epoch + 1,
      "test": {k: float(final["test"][k]) for k in TEST_KEYS
               if k in final["test"]},
      "best_val": {k: float(final["val"][k]) for k in TEST_KEYS
                   if k in final["val"]},
      "seconds_per_epoch": float(np.mean(secs)) if secs else None,
      "seconds_per_epoch_after_first": (float(np.mean(secs[1:]))
                                        if len(secs) > 1 else None),
      "stopped_early": stopped_early,
      "hit_epoch_cap": not stopped_early,
      "epoch_cap": int(config.train.epochs),
  }
  if not stopped_early and out["epochs"] < out["epoch_cap"]:
    out["note"] = (f"finished at {out['epochs']} epochs under a smaller "
                   "train.epochs (finished runs are not extended)")
  return out


def set_deterministic_xla_flags() -> None:
  """As `mmssl_jax.main`: must run before JAX's first computation."""
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" not in current:
    os.environ["XLA_FLAGS"] = f"{current} {DETERMINISTIC_XLA_FLAG}".strip()


# ----------------------------------------------------------------------------
# Aggregation and markdown


def _stats(values: list[float]) -> dict:
  n = len(values)
  return {"mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if n > 1 else None,
          "min": float(min(values)), "max": float(max(values)), "n": n}


def _group_order(run: dict) -> tuple:
  """Variants, then ablations in config_lib's order; LightGCN last."""
  def rank(value, order):
    return order.index(value) if value in order else len(order)
  return (run["model"] == "lightgcn", rank(run["variant"], config_lib.VARIANTS),
          rank(run["ablation"], config_lib.ABLATIONS))


def aggregate(runs: list[dict]) -> dict:
  """Per group: n, failures and stats of AGGREGATED over its seeds."""
  groups = {}
  for r in sorted(runs, key=_group_order):
    g = groups.setdefault(r["group"], {
        "variant": r["variant"], "ablation": r["ablation"],
        "model": r["model"], "n": 0, "n_failed": 0, "seeds": [],
        "n_epoch_cap": 0, "metrics": {}})
    if r.get("error"):
      g["n_failed"] += 1
      continue
    g["n"] += 1
    g["seeds"].append(r["seed"])
    g["n_epoch_cap"] += int(bool(r.get("hit_epoch_cap")))
  for name, g in groups.items():
    ok = [r for r in runs if r["group"] == name and not r.get("error")]
    for field, key in AGGREGATED:
      values = [r[field][key] if key else r[field] for r in ok]
      values = [v for v in values if v is not None]
      if values:
        g["metrics"][f"{field}/{key}" if key else field] = _stats(values)
  return groups


def _cell(stats: dict | None, digits: int) -> str:
  if not stats:
    return ""
  text = f"{stats['mean']:.{digits}f}"
  if stats["std"] is not None:
    text += f" ± {stats['std']:.{digits}f}"
  return text


def group_label(g: dict) -> str:
  if g["model"] == "lightgcn":
    return "LightGCN"
  return f"{g['variant']}, {ABLATION_LABELS.get(g['ablation'], g['ablation'])}"


def markdown(study: dict) -> str:
  """README table: one row per group, mean ± std over seeds (n given)."""
  groups = aggregate(study["runs"])
  lines = [
      "| model | n | R@20 | P@20 | N@20 | N@20 (MMSSL) | epochs to best "
      "| s/epoch |",
      "|---|---|---|---|---|---|---|---|"]
  caps = set()
  any_cap = any_failed = False
  for g in groups.values():
    m = g["metrics"]
    best = _cell(m.get("epochs_to_best"), 1)
    if g["n_epoch_cap"]:
      any_cap = True
      best += "*"
    n = str(g["n"])
    if g["n_failed"]:
      any_failed = True
      n += f" ({g['n_failed']} failed)"
    lines.append(
        f"| {group_label(g)} | {n} | {_cell(m.get('test/recall@20'), 4)} "
        f"| {_cell(m.get('test/precision@20'), 4)} "
        f"| {_cell(m.get('test/ndcg@20'), 4)} "
        f"| {_cell(m.get('test/ndcg_mmssl@20'), 4)} | {best} "
        f"| {_cell(m.get('seconds_per_epoch'), 1)} |")
  for r in study["runs"]:
    if r.get("hit_epoch_cap"):
      caps.add(r["epoch_cap"])
  notes = []
  if any_cap:
    notes.append("\\* some runs of the row stopped at the epoch cap "
                 f"({', '.join(str(c) for c in sorted(caps))} epochs), not "
                 "by early stopping.")
  if any_failed:
    notes.append("Failed runs are left out (their errors are in the JSON).")
  return "\n".join(lines + ([""] + notes if notes else []))


def read_studies(paths) -> dict:
  """The studies in `paths`, runs merged by name (later files win)."""
  study, runs, pending = None, {}, set()
  for path in paths:
    with open(path) as f:
      s = json.load(f)
    study = study or s
    runs.update((r["name"], r) for r in s["runs"])
    pending.update(s.get("pending", []))
  study = dict(study, runs=list(runs.values()),
               pending=sorted(pending - set(runs)), sources=list(paths))
  study["groups"] = aggregate(study["runs"])
  return study


# ----------------------------------------------------------------------------
# The study


def _write(study: dict, last: bool) -> None:
  """`--output` after every run; the one-line JSON on stdout at the end."""
  if last:
    results_io.emit(study, FLAGS.output)
  elif FLAGS.output:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
      results_io.emit(study, FLAGS.output)


def _progress(i: int, total: int, run: dict, message: str) -> None:
  print(f"[ablation {i}/{total}] {run['name']}: {message}", file=sys.stderr,
        flush=True)


def run_one(run: dict, config, workdir: str) -> dict:
  from mmssl_jax import train  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if any(r.get("final") for r in workdir_lib.read_records(metrics_path)):
    status = "stored"  # finished earlier: summarised, not trained
  elif workdir_lib.checkpoint_steps(workdir):
    status = "resumed"
  else:
    status = "trained"
  final = train.train_and_evaluate(config, workdir)
  return {"status": status,
          "wall_seconds": time.time() - t0,
          **summarise(workdir, final, config)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.from_json:
    study = read_studies(FLAGS.from_json)
    if FLAGS.markdown:
      print(markdown(study))
    else:
      print(json.dumps(study))
    return
  if not FLAGS.config:
    raise app.UsageError("--config (or --from_json with --markdown) is needed")
  logging.set_verbosity(logging.INFO)
  path, _, base_arg = FLAGS.config.partition(":")
  dataset = FLAGS.dataset or os.path.splitext(os.path.basename(path))[0]
  seeds = [int(s) for s in FLAGS.seeds]
  plan = plan_runs(FLAGS.variants, FLAGS.ablations, seeds,
                   FLAGS.ablation_seeds, not FLAGS.no_lightgcn)
  if FLAGS.only:
    plan = [r for r in plan if any(s in r["name"] for s in FLAGS.only)]
  # Every config is built (and every override checked) before any training.
  configs = {}
  for run in plan:
    arg = combine_args(base_arg, run.pop("arg"))
    config = results_io.load_config(path, arg)
    try:
      results_io.apply_overrides(config, FLAGS.set)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    with config.unlocked():
      config.seed = run["seed"]
    run["config_arg"] = arg
    configs[run["name"]] = config
  if any(c.train.get("deterministic", False) for c in configs.values()):
    set_deterministic_xla_flags()
  import jax  # pylint: disable=g-import-not-at-top
  first = next(iter(configs.values()), None)
  study = {
      "benchmark": "ablation", "dataset": dataset, "config": FLAGS.config,
      "data": (first.data.dir or first.data.source) if first else None,
      "overrides": list(FLAGS.set), "root": FLAGS.root,
      "variants": list(FLAGS.variants), "ablations": list(FLAGS.ablations),
      "seeds": seeds, "ablation_seeds": FLAGS.ablation_seeds,
      "lightgcn": not FLAGS.no_lightgcn, "only": list(FLAGS.only),
      "best_epoch_note": "best_epoch is 0-based; epochs_to_best = "
                         "best_epoch + 1",
      "jax": jax.__version__, "machine": results_io.machine(),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "runs": [], "pending": [r["name"] for r in plan], "groups": {}}
  if not plan:
    logging.warning("no run matches --only=%s", ",".join(FLAGS.only))
  for i, run in enumerate(plan, 1):
    workdir = os.path.join(FLAGS.root, dataset, run["name"])
    record = {**run, "workdir": workdir}
    _progress(i, len(plan), run, f"starting in {workdir}")
    try:
      record.update(run_one(run, configs[run["name"]], workdir))
    except preemption.Preempted as e:
      _progress(i, len(plan), run, f"stopped: {e}")
      _write(study, last=True)
      sys.exit(e.exit_code)
    except Exception as e:  # pylint: disable=broad-except
      record["error"] = f"{type(e).__name__}: {e}"
      _progress(i, len(plan), run, f"FAILED: {record['error']}")
    else:
      test = record["test"]
      _progress(i, len(plan), run, (
          f"{record['status']} in {record['wall_seconds']:.0f} s: test "
          f"R@20 {test['recall@20']:.4f} N@20 {test['ndcg@20']:.4f}, best "
          f"epoch {record['best_epoch']} of {record['epochs']} ("
          f"{'early stop' if record['stopped_early'] else 'epoch cap'}), "
          f"{record['seconds_per_epoch'] or math.nan:.1f} s/epoch"))
    study["runs"].append(record)
    study["pending"].remove(run["name"])
    study["groups"] = aggregate(study["runs"])
    _write(study, last=i == len(plan))
  if not plan:
    _write(study, last=True)
  if FLAGS.markdown:
    print(markdown(study))


if __name__ == "__main__":
  app.run(main)
