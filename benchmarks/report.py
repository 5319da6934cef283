r"""Writes docs/results.md and its figures from the result JSON files.

  python benchmarks/report.py   # docs/results.md, docs/figures/*.png, README's summary
  python benchmarks/report.py --output_dir=/tmp/report --readme=

Reads every `*.json` and `*.jsonl` in `benchmarks/results/` and
`experiments/results/` (a file name must be unique across the two) and
writes `results.md` plus `figures/*.png` under `--output_dir`. Every number
in results.md is formatted from a JSON value, every table row names the
command that wrote its JSON (or, for published figures, their source, from
`benchmarks/results/published.json`), and every section states the machine,
jax version and dates recorded in the JSONs it uses. The output is
deterministic: running it twice gives the same results.md byte for byte
(`tests/test_report.py` checks the committed one against a fresh run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_DIRS = ("benchmarks/results", "experiments/results")
FIGURES = ("val_recall_tiktok.png", "val_recall_ml100k.png",
           "epoch_seconds.png", "scale.png")
DASH = "—"
ABLATION_NAMES = {"full": "full", "wo_asl": "w/o ASL", "wo_cl": "w/o CL",
                  "wo_gt": "w/o GT", "rp_gae": "r/p GAE"}
ABLATIONS = tuple(ABLATION_NAMES)
DATASETS = {"tiktok": "TikTok", "ml100k": "ML-100K"}


# ------------------------------------------------------------------ loading
class Results:
  """The JSON (and JSON lines) files of the result folders, by file name."""

  def __init__(self, root: Path = REPO, dirs=RESULT_DIRS):
    self.data, self.paths = {}, {}
    for folder in dirs:
      for path in sorted((root / folder).glob("*.json*")):
        if path.suffix not in (".json", ".jsonl"):
          continue
        if path.name in self.data:
          raise ValueError(f"{path.name} is in {self.paths[path.name]} and "
                           f"{folder}: file names must be unique")
        text = path.read_text(encoding="utf-8")
        self.data[path.name] = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl" else json.loads(text))
        self.paths[path.name] = f"{folder}/{path.name}"

  def __getitem__(self, name: str):
    if name not in self.data:
      raise KeyError(f"{name}: not in {', '.join(RESULT_DIRS)}")
    return self.data[name]

  def glob(self, pattern: str) -> list[str]:
    rx = re.compile("^" + re.escape(pattern).replace(r"\*", ".*") + "$")
    return sorted(n for n in self.data if rx.match(n))


def paper_defaults() -> dict:
  """The paper variant's current settings (configs/tiktok.py:variant=paper)."""
  sys.path.insert(0, str(REPO))
  spec = importlib.util.spec_from_file_location("tiktok_config",
                                                REPO / "configs" / "tiktok.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("variant=paper")
  return {"loss.real_data_tau": c.loss.real_data_tau,
          "loss.ui_pre_scale": c.loss.ui_pre_scale,
          "loss.cl_rate": c.loss.cl_rate,
          "loss.contrastive": c.loss.contrastive,
          "graph_update.m_topk_rate": c.graph_update.m_topk_rate,
          "graph_update.topk_score": c.graph_update.topk_score,
          "loss.cold_bpr": c.loss.cold_bpr,
          "loss.cold_align": c.loss.cold_align}


# --------------------------------------------------------------- formatting
def f4(x) -> str:
  return DASH if x is None else f"{x:.4f}"


def num(x) -> str:
  """A measured quantity with about three significant digits."""
  if x is None:
    return DASH
  a = abs(x)
  if a >= 100:
    return f"{x:.0f}"
  if a >= 10:
    return f"{x:.1f}"
  if a >= 1:
    return f"{x:.2f}"
  return f"{x:.3g}"


def pub(x) -> str:
  """A published figure, as published."""
  return DASH if x is None else f"{x:g}"


def signed(x) -> str:
  return f"{x:+.4f}"


def mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return DASH
  if len(values) == 1:
    return f4(values[0])
  return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def pct(x) -> str:
  return f"{100 * x:.0f}%"


def data_path(text: str) -> str:
  """The dataset argument of a command as data/<name>."""
  return re.sub(r"(\.\./)+shared/data/", "data/", text)


def format_machine(m) -> str:
  if isinstance(m, str):
    return m
  parts = []
  cores = m.get("cpu_count")
  model = m.get("cpu_model")
  if cores is not None:
    parts.append(" ".join(str(p) for p in (cores, model, "cores") if p))
    if m.get("processor"):
      parts[-1] += f" ({m['processor']})"
  if m.get("memory_gib") is not None:
    parts.append(f"{m['memory_gib']} GiB")
  if str(m.get("device", "")).startswith("cpu"):
    parts.append("no GPU")
  return ", ".join(parts)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out + [""]


def cmd_ablation(d: dict, path: str) -> str:
  """The benchmarks/ablation.py command of a study, from its own fields."""
  parts = ["python benchmarks/ablation.py", f"--config={d['config']}",
           f"--variants={','.join(d['variants'])}",
           f"--ablations={','.join(d['ablations'])}",
           f"--seeds={','.join(str(s) for s in d['seeds'])}"]
  if d.get("ablation_seeds", 1) != 1:
    parts.append(f"--ablation_seeds={d['ablation_seeds']}")
  if not d.get("lightgcn", True):
    parts.append("--no_lightgcn")
  if d.get("only"):
    parts.append(f"--only={','.join(d['only'])}")
  parts += [f"--set={o}" for o in d.get("overrides", [])]
  parts += [f"--root={d['root']}", f"--output={path}"]
  return " ".join(parts)


# ------------------------------------------------------------------ sections
class Section:
  """Lines of one section, its commands and the machines/dates it used."""

  def __init__(self, res: Results, prefix: str):
    self.res, self.prefix = res, prefix
    self.lines: list[str] = []
    self.labels: dict[tuple[str, str], tuple[str, str, str]] = {}
    self.pending: list[tuple[str, str]] = []  # (command, path) to list next
    self.machines, self.jax, self.torch, self.dates = set(), set(), set(), set()
    self.sources: set[str] = set()

  def use(self, d: dict) -> None:
    if d.get("machine") is not None:
      self.machines.add(format_machine(d["machine"]))
    if d.get("jax"):
      self.jax.add(d["jax"])
    if d.get("torch"):
      self.torch.add(d["torch"])
    if d.get("date"):
      self.dates.add(d["date"][:10])

  def command(self, cmd: str, name: str, d: dict | None = None) -> str:
    """The label of `cmd`, which wrote file `name` (`d`: its record there)."""
    top = self.res[name]
    rec = top if d is None else d
    self.use(rec)
    if isinstance(top, dict):
      self.use(top)
    get = lambda key: rec.get(key) or (top.get(key) if isinstance(top, dict)
                                       else None)
    key = (data_path(cmd), self.res.paths[name])
    if key not in self.labels:
      self.labels[key] = (f"{self.prefix}{len(self.labels) + 1}",
                          (get("date") or "")[:10], get("config_note") or "")
    if key not in self.pending:
      self.pending.append(key)
    return self.labels[key][0]

  def published(self, entry: str) -> dict:
    e = self.res["published.json"]["entries"][entry]
    self.sources.add(e["source"])
    return e

  def add(self, *lines: str) -> None:
    self.lines.extend(lines)

  def conditions(self) -> list[str]:
    out = []
    if self.machines:
      machine = "; ".join(sorted(self.machines))
      versions = [f"jax {v}" for v in sorted(self.jax)]
      versions += [f"torch {v}" for v in sorted(self.torch)]
      dates = sorted(self.dates)
      when = (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
              ) if dates else "undated"
      out.append(f"*Measured on {machine}; {', '.join(versions)}; {when}.*")
    if self.sources:
      out.append(f"*Published figures: {'; '.join(sorted(self.sources))} "
                 "(`benchmarks/results/published.json`).*")
    return out + [""] if out else []

  def command_list(self) -> list[str]:
    if not self.pending:
      return []
    out = ["Commands, with the result file that holds their figures and its "
           "date:", ""]
    notes: dict[str, list[str]] = {}
    for cmd, path in self.pending:
      label, date, note = self.labels[(cmd, path)]
      out.append(f"- {label}: `{cmd}` → `{path}`, {date}")
      if note:
        notes.setdefault(note, []).append(label)
    out.append("")
    for note, labels in notes.items():
      out += [f"Note on {', '.join(labels)}: {note}.", ""]
    self.pending = []
    return out

  def flush(self) -> None:
    """Appends the pending command list (after a table and its text)."""
    self.lines += self.command_list()


class Run:
  """One trained run, from an ablation.py study or a reproduce.py summary."""

  def __init__(self, seed, val, test, to_best, epochs, label, cap=False):
    self.seed, self.val, self.test = seed, val, test
    self.to_best, self.epochs, self.label, self.cap = to_best, epochs, label, cap


def study_runs(sec: Section, name: str, variant=None, ablation=None,
               model="mmssl") -> list[Run]:
  d = sec.res[name]
  out = []
  for r in d["runs"]:
    if r.get("model") != model or "test" not in r:
      continue
    if model == "mmssl" and (r["variant"] != variant
                             or r["ablation"] != ablation):
      continue
    out.append(Run(r["seed"], r["best_val"], r["test"], r["epochs_to_best"],
                   r["epochs"], None, bool(r.get("hit_epoch_cap"))))
  if out:
    label = sec.command(cmd_ablation(d, sec.res.paths[name]), name)
    for r in out:
      r.label = label
  return out


def reproduce_run(sec: Section, name: str) -> Run:
  d = sec.res[name]
  label = sec.command(d["command"], name)
  return Run(d["seed"], d["best_val"], d["test_at_best_val"],
             d["best_epoch"] + 1, d["epochs"], label)


def run_cells(runs: list[Run], val=True, mmssl_ndcg=True) -> list[str]:
  runs = sorted(runs, key=lambda r: r.seed)
  get = lambda key: [r.test.get(key) for r in runs]
  cells = [", ".join(str(r.seed) for r in runs)]
  if val:
    cells.append(mean_std([r.val["recall@20"] for r in runs]))
  cells += [mean_std(get("recall@20")), mean_std(get("precision@20")),
            mean_std(get("ndcg@20"))]
  if mmssl_ndcg:
    cells.append(mean_std(get("ndcg_mmssl@20")))
  cells.append(", ".join(f"{r.to_best} / {r.epochs}" for r in runs))
  labels = []
  for r in runs:
    if r.label not in labels:
      labels.append(r.label)
  cells.append(", ".join(labels))
  return cells


# ------------------------------------------------------------------ accuracy
def accuracy(res: Results, out_dir: Path) -> list[str]:
  sec = Section(res, "A")
  sec.add("## Accuracy at the best validation epoch", "")
  header = ["data", "model", "seeds", "val R@20", "test R@20", "P@20",
            "NDCG@20", "NDCG@20 (MMSSL)", "epochs to best / run",
            "command or source"]
  rows = []
  curves = {}
  # TikTok
  ref = study_runs(sec, "tiktok_reference_lowrank_3seeds_full.json",
                   "reference", "full")
  rows.append(["TikTok", "MMSSL reference, low-rank critic", *run_cells(ref)])
  pap = study_runs(sec, "tiktok_paper_cl0.001_3seeds_full.json", "paper",
                   "full")
  rows.append(["TikTok", "MMSSL paper variant, low-rank critic",
               *run_cells(pap)])
  lgn = reproduce_run(sec, "tiktok_lightgcn.json")
  rows.append(["TikTok", "LightGCN", *run_cells([lgn])])
  pop = res["popularity_bias_tiktok_reference.json"]
  first = pop["runs"][sorted(pop["runs"])[0]]
  pop_label = sec.command(popularity_command(pop, sorted(pop["runs"])[0]),
                          "popularity_bias_tiktok_reference.json")
  rows.append(["TikTok", "item popularity (training degree)", DASH,
               f4(first["val"]["popularity_recall@20"]),
               f4(first["test"]["popularity_recall@20"]), DASH, DASH, DASH,
               DASH, pop_label])
  paper = sec.published("paper_accuracy_tiktok")
  for key, name in (("mmssl", "MMSSL"), ("lightgcn", "LightGCN")):
    m = paper[key]
    rows.append(["TikTok", f"{name}, published ({' + '.join(paper['modalities'])})",
                 DASH, DASH, pub(m["recall@20"]), pub(m["precision@20"]), DASH,
                 pub(m["ndcg@20"]), DASH, paper["source"]])
  curves["tiktok"] = [
      ("MMSSL reference, dense critic", "tiktok_reference_dense_3epochs.json"),
      ("LightGCN", "tiktok_lightgcn.json")]
  # ML-100K
  files = res.glob("ml100k_uncapped_seed*.json")
  ref = [r for f in files for r in study_runs(sec, f, "reference", "full")]
  rows.append(["ML-100K", "MMSSL reference, low-rank critic",
               *run_cells(ref)])
  dense = reproduce_run(sec, "ml100k_reference_dense.json")
  rows.append(["ML-100K", "MMSSL reference, dense critic",
               *run_cells([dense])])
  pap = [r for f in files for r in study_runs(sec, f, "paper", "full")]
  rows.append(["ML-100K", "MMSSL paper variant, low-rank critic",
               *run_cells(pap)])
  lgn = [r for f in res.glob("ml100k_uncapped_lightgcn_seed*.json")
         for r in study_runs(sec, f, model="lightgcn")]
  rows.append(["ML-100K", "LightGCN", *run_cells(lgn)])
  curves["ml100k"] = [
      ("MMSSL reference, dense critic", "ml100k_reference_dense.json")]
  sec.add(*table(header, rows))
  sec.add(
      "Test figures are read at the epoch of best validation Recall@20; "
      "several seeds give mean ± sample standard deviation. Epochs are "
      "counted from 1. Every MMSSL run here trains until early stopping on "
      "validation Recall@20.",
      "",
      f"On TikTok each validation and test user has one held-out item, so "
      f"both NDCG definitions coincide. The published figures use "
      f"{', '.join(paper['modalities'])}; this TikTok split has "
      f"{' and '.join(res['train_speed_tiktok_dense.json']['modalities'])} "
      f"only. The paper selects its figures by "
      f"{paper['selection']}; every figure of ours is selected on the "
      "validation split.",
      "",
      "No JSON holds item popularity on ML-100K, and the MMSSL paper reports "
      "no ML-100K figures, so those rows are absent.",
      "")
  sec.flush()
  # Curves
  sec.add("### Validation Recall@20 per epoch", "")
  released = {"tiktok": sec.published("released_cpu_tiktok"),
              "ml100k": sec.published("released_cpu_ml100k")}
  for ds in ("tiktok", "ml100k"):
    drawn = draw_val_curves(res, ds, curves[ds], released[ds],
                            out_dir / "figures" / f"val_recall_{ds}.png")
    for label, name in curves[ds]:
      sec.command(res[name]["command"], name)
    sec.add(f"![validation Recall@20 per epoch, {DATASETS[ds]}]"
            f"(figures/val_recall_{ds}.png)", "",
            f"{DATASETS[ds]}: curves of {', '.join(drawn)}; the released "
            f"code's validation figures ({released[ds]['source']}) as "
            "points.", "")
  sec.add("Only `benchmarks/reproduce.py` records per-epoch figures in its "
          "JSON; `benchmarks/ablation.py` records the best epoch only. So "
          "the paper variant (both datasets), the low-rank reference runs "
          "and LightGCN on ML-100K have no curve.", "")
  sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


def draw_val_curves(res, ds, curves, released, path: Path) -> list[str]:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  drawn = []
  for label, name in curves:
    traj = res[name].get("trajectory") or []
    pts = [(r["epoch"], r["val_recall@20"]) for r in traj
           if r.get("val_recall@20") is not None]
    if not pts:
      continue
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
            label=f"{label} (seed {res[name]['seed']})")
    drawn.append(f"{label} (seed {res[name]['seed']})")
  pts = [(r["epoch"], r["val_recall@20"]) for r in released["trajectory"]]
  ax.plot([p[0] for p in pts], [p[1] for p in pts], "ks",
          label=f"released code, {released['machine']['cpu_count']}-core CPU")
  ax.set_xlabel("epoch (from 0)")
  ax.set_ylabel("validation Recall@20")
  ax.set_title(f"{DATASETS[ds]}: validation Recall@20 per epoch")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, path)
  return drawn


def save(fig, path: Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, metadata={"Software": None})
  plt.close(fig)


# ------------------------------------------------------------------ ablation
def ablation(res: Results) -> list[str]:
  sec = Section(res, "B")
  sec.add("## Ablation study", "")
  sec.add("Both variants, each ablation switch (`ablation=wo_asl`, `wo_cl`, "
          "`wo_gt`, `rp_gae`) and LightGCN. Full models run with several "
          "seeds (mean ± sample standard deviation), each ablation with one "
          "seed; the last column but one gives each ablation's difference to "
          "the full model's run with the same seed. Test figures at the best "
          "validation epoch, epochs counted from 1. Every MMSSL run uses the "
          "low-rank critic (`critic.kind=lowrank`).", "")
  sec.add("### Trained to early stopping", "")
  header = ["model", "seeds", "val R@20", "test R@20", "P@20", "NDCG@20",
            "NDCG@20 (MMSSL)", "epochs to best / run", "Δ test R@20 vs full, same seed",
            "command"]
  sources = {
      "tiktok": {
          ("reference", "full"): ["tiktok_reference_lowrank_3seeds_full.json"],
          ("reference", "*"): ["tiktok_reference_ablation_full.json"],
          ("paper", "full"): ["tiktok_paper_ablation_full.json"],
          ("paper", "*"): ["tiktok_paper_ablation_full.json"],
          "lightgcn": "tiktok_lightgcn.json"},
      "ml100k": {
          ("reference", "full"): res.glob("ml100k_uncapped_seed*.json"),
          ("reference", "*"): res.glob("ml100k_uncapped_reference_*.json"),
          ("paper", "full"): res.glob("ml100k_uncapped_seed*.json"),
          ("paper", "*"): res.glob("ml100k_uncapped_paper_*.json"),
          "lightgcn": res.glob("ml100k_uncapped_lightgcn_seed*.json")}}
  for ds, src in sources.items():
    rows = []
    for variant in ("reference", "paper"):
      full = [r for f in src[(variant, "full")]
              for r in study_runs(sec, f, variant, "full")]
      same_seed = {r.seed: r.test["recall@20"] for r in full}
      rows.append([f"{variant}, full", *diff_cells(run_cells(full), [])])
      for abl in ABLATIONS[1:]:
        runs = [r for f in src[(variant, "*")]
                for r in study_runs(sec, f, variant, abl)]
        if not runs:
          continue
        diffs = [r.test["recall@20"] - same_seed[r.seed] for r in runs
                 if r.seed in same_seed]
        rows.append([f"{variant}, {ABLATION_NAMES[abl]}",
                     *diff_cells(run_cells(runs), diffs)])
    lg = src["lightgcn"]
    if isinstance(lg, str):
      runs = [reproduce_run(sec, lg)]
    else:
      runs = [r for f in lg for r in study_runs(sec, f, model="lightgcn")]
    rows.append(["LightGCN", *diff_cells(run_cells(runs), [])])
    sec.add(f"**{DATASETS[ds]}**", "", *table(header, rows))
  paper = sec.published("paper_ablation_tiktok")
  sec.add(f"The MMSSL paper's TikTok ablation ({paper['source']}; "
          f"{' + '.join(paper['modalities'])}):", "")
  sec.add(*table(["model", "R@20", "NDCG@20", "source"],
                 [[ABLATION_NAMES[a], pub(paper["recall@20"][a]),
                   pub(paper["ndcg@20"][a]), paper["source"]]
                  for a in ABLATIONS]))
  sec.flush()
  # Capped studies
  sec.add("### At a fixed epoch budget", "",
          "The same grid with an epoch cap, so these tables compare fixed "
          "training budgets, not converged models; the column \"at cap\" "
          "counts the runs that the cap, not early stopping, ended.", "")
  capped = (
      ("ML-100K", ["ablation_ml100k.json",
                   "ablation_ml100k_paper_wo_gt_rp_gae.json"]),
      ("ML-100K, paper variant", ["ablation_ml100k_paper_cl0.001.json"]),
      ("TikTok", ["ablation_tiktok.json"]))
  header = ["model", "seeds", "test R@20", "P@20", "NDCG@20",
            "NDCG@20 (MMSSL)", "epochs to best / run", "at cap", "command"]
  for title, files in capped:
    rows = []
    for variant in ("reference", "paper"):
      for abl in ABLATIONS:
        runs = [r for f in files for r in study_runs(sec, f, variant, abl)]
        if runs:
          cells = run_cells(runs, val=False)
          rows.append([f"{variant}, {ABLATION_NAMES[abl]}", *cells[:-1],
                       f"{sum(r.cap for r in runs)} / {len(runs)}", cells[-1]])
    runs = [r for f in files for r in study_runs(sec, f, model="lightgcn")]
    if runs:
      cells = run_cells(runs, val=False)
      rows.append(["LightGCN", *cells[:-1],
                   f"{sum(r.cap for r in runs)} / {len(runs)}", cells[-1]])
    sets = sorted({o for f in files for o in res[f]["overrides"]
                   if not o.startswith(("data.dir=", "critic.kind="))})
    sec.add(f"**{title}** ({', '.join(f'`{o}`' for o in sets)})", "",
            *table(header, rows))
  sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


def popularity_command(d: dict, key: str) -> str:
  """The export and audit commands of one run of a popularity_bias JSON."""
  export = d["runs"][key]["export"]
  steps = [c for c in d["commands"] if c.endswith(f"--output={export}")]
  workdirs = [w for c in steps for w in re.findall(r"--workdir=(\S+)", c)]
  steps = [c for c in d["commands"] if "mmssl_jax.main" in c and any(
      c.endswith(f"--workdir={w}") for w in workdirs)] + steps
  audit = [c.replace("=EXPORT", f"={export}") for c in d["commands"]
           if "popularity_bias.py" in c]
  return " && ".join(steps + audit)


def diff_cells(cells: list[str], diffs: list[float]) -> list[str]:
  return [*cells[:-1], ", ".join(signed(d) for d in diffs) or DASH, cells[-1]]


# ------------------------------------------------------------------ sweeps
def sweep_rows(sec: Section, name: str, keys, default: dict, extra=None):
  d = sec.res[name]
  sec.use(d)
  best = max(r["best_val"]["recall@20"] for r in d["rows"])
  rows = []
  for r in sorted(d["rows"], key=lambda r: [str(r["setting"][k]) if
                                           isinstance(r["setting"][k], str)
                                           else r["setting"][k] for k in keys]):
    setting = [str(r["setting"][k]) for k in keys]
    if all(r["setting"][k] == default.get(k, r["setting"][k]) for k in keys):
      setting[-1] += " (default)"
    val = f4(r["best_val"]["recall@20"])
    if r["best_val"]["recall@20"] == best:
      val = f"**{val}**"
    cells = [*setting, *(extra(r) if extra else []), val,
             f4(r["test"]["recall@20"]), f4(r["test"]["ndcg@20"]),
             f"{r['epochs_to_best']} / {r['epochs']}",
             sec.command(r["command"], name, dict(r, date=d["date"]))]
    rows.append(cells)
  return rows, d


def sweeps(res: Results) -> list[str]:
  sec = Section(res, "C")
  default = paper_defaults()
  sec.add("## Sweeps that set the paper variant's defaults", "")
  sec.add("Each sweep trains `variant=paper` on TikTok with one seed and the "
          "low-rank critic (see the commands), and selects by best validation Recall@20 (bold: "
          "the highest); test figures are shown but never used to choose. "
          "\"(default)\" marks the paper variant's current setting "
          "(`configs/tiktok.py:variant=paper`). Epochs counted from 1.", "")
  tail = ["val R@20 (selects)", "test R@20", "test NDCG@20",
          "epochs to best / run", "command"]

  sec.add("### Gumbel temperature and score mixing", "")
  rows, d = sweep_rows(sec, "paper_gumbel_sweep_tiktok.json",
                       ["loss.real_data_tau", "loss.ui_pre_scale"], default)
  sec.add(*table(["`loss.real_data_tau`", "`loss.ui_pre_scale`", *tail], rows))
  sec.add(f"Aggregated by `{data_path(d['command'])}`.", "")
  sec.flush()

  sec.add("### Contrastive weight", "")
  rows, d = sweep_rows(sec, "paper_cl_rate_sweep_tiktok.json",
                       ["loss.contrastive", "loss.cl_rate"], default)
  for r in rows:
    if r[0] == "False":
      r[1] = "off (`ablation=wo_cl`)"
  sec.add(*table(["`loss.contrastive`", "`loss.cl_rate`", *tail], rows))
  sec.add(f"Aggregated by `{data_path(d['command'])}`.", "")
  sec.flush()

  sec.add("### Size k of the persistent top-k graphs", "")
  n_items = res["train_speed_tiktok_dense.json"]["n_items"]
  rows, d = sweep_rows(
      sec, "paper_topk_sweep_tiktok.json", ["graph_update.m_topk_rate"],
      default,
      extra=lambda r: [str(math.floor(n_items *
                                      r["setting"]["graph_update.m_topk_rate"]))])
  sec.add(*table(["`graph_update.m_topk_rate`", f"k = floor({n_items} × rate)",
                  *tail], rows))
  sec.add(f"Aggregated by `{data_path(d['command'])}`.", "")
  sec.flush()

  sec.add("### Which correction shapes the paper variant", "",
          "Each run reverts one correction of the paper variant to the "
          "released behaviour (overrides in the command); the last row is "
          "the reference variant with only the persistent graphs. The "
          "popularity columns come from `experiments/popularity_bias.py` on "
          "each run's best-validation export: the ratio of validation to test "
          "Recall@20, and the share of a user's test top 20 that is also in "
          "the popularity top 20.", "")
  pop_lines = res["paper_corrections_popularity_tiktok.jsonl"]
  pop = {os.path.basename(p["export"]): p for p in pop_lines}
  names = {"rate0.01": "paper, all corrections",
           "fusion_mean_wsum": "fusion reverted",
           "critic_reference": "critic reverted",
           "gumbel_reference": "Gumbel reverted",
           "schedule_reference": "persistent graphs reverted",
           "reference_persistent": "reference + persistent graphs only"}
  d = res["paper_corrections_tiktok.json"]
  sec.use(d)
  rows = []
  order = list(names)
  for r in sorted(d["rows"], key=lambda r: order.index(
      Path(r["source"]).stem) if Path(r["source"]).stem in order else 99):
    stem = Path(r["source"]).stem
    p = pop.get(f"sweep_k_{stem}") or pop.get(f"corrections_{stem}")
    label = sec.command(r["command"], "paper_corrections_tiktok.json",
                        dict(r, date=d["date"]))
    pop_label = sec.command(p["command"],
                            "paper_corrections_popularity_tiktok.jsonl", p)
    rows.append([names.get(stem, stem), f4(r["best_val"]["recall@20"]),
                 f4(r["test"]["recall@20"]), f4(r["test"]["ndcg@20"]),
                 f"{r['epochs_to_best']} / {r['epochs']}",
                 f"{p['val_over_test_recall@20']:.2f}",
                 pct(p["test"]["pop_overlap@20"]), f"{label}, {pop_label}"])
  first = pop_lines[0]
  rows.append(["item popularity", f4(first["val"]["popularity_recall@20"]),
               f4(first["test"]["popularity_recall@20"]), DASH, DASH,
               f"{first['val_over_test_popularity_recall@20']:.2f}",
               "(itself)",
               sec.command(first["command"],
                           "paper_corrections_popularity_tiktok.jsonl", first)])
  ref = res["popularity_bias_tiktok_reference.json"]
  for key in sorted(ref["runs"]):
    run = ref["runs"][key]
    if "lowrank" not in key:
      continue
    label = sec.command(popularity_command(ref, key),
                        "popularity_bias_tiktok_reference.json")
    seed = re.search(r"seed(\d+)", key).group(1)
    rows.append([f"reference, low-rank critic, best epoch (seed {seed})",
                 f4(run["val"]["recall@20"]), f4(run["test"]["recall@20"]),
                 DASH, f"{run['checkpoint']['best_epoch'] + 1} / {DASH}",
                 f"{run['val_over_test_recall@20']:.2f}",
                 pct(run["test"]["pop_overlap@20"]), label])
  sec.add(*table(["run", "val R@20 (selects)", "test R@20", "test NDCG@20",
                  "epochs to best / run", "val / test R@20",
                  "test top 20 shared with popularity", "commands"], rows))
  sec.add(f"Aggregated by `{data_path(d['command'])}`.", "")
  sec.flush()

  rows, n = [], []
  for score, name in (("cosine", "tiktok_paper_topk_cosine_3seeds.json"),
                      ("dot", "tiktok_paper_cl0.001_3seeds_full.json")):
    runs = study_runs(sec, name, "paper", "full")
    n.append(str(len(runs)))
    mark = " (default)" if score == default["graph_update.topk_score"] else ""
    for r in runs:
      rows.append([f"{score}{mark}", str(r.seed), f4(r.val["recall@20"]),
                   f4(r.test["recall@20"]), f4(r.test["ndcg@20"]),
                   f"{r.to_best} / {r.epochs}", r.label])
    rows.append([f"**{score}, mean ± std**", "",
                 mean_std([r.val["recall@20"] for r in runs]),
                 mean_std([r.test["recall@20"] for r in runs]),
                 mean_std([r.test["ndcg@20"] for r in runs]), "",
                 runs[0].label])
  sec.add("### Ranking the top-k refresh by cosine", "",
          "`graph_update.topk_score=cosine` ranks each batch user's top-k "
          "items by P_b·Q_i/|Q_i| instead of the released dot product; "
          + (f"{n[0]} seeds each" if len(set(n)) == 1 else
             f"{' and '.join(n)} seeds") + ", trained to early stopping.",
          "")
  sec.add(*table(["top-k score", "seed", "val R@20 (selects)", "test R@20",
                  "test NDCG@20", "epochs to best / run", "command"], rows))
  sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


# ------------------------------------------------------------ speed, scale
def speed(res: Results, out_dir: Path) -> list[str]:
  sec = Section(res, "D")
  sec.add("## Speed and memory", "")
  sec.add("Seconds per training iteration after compilation (median), the "
          "part of it spent on the critic (and, for mmssl_jax, the generator "
          "loss), and seconds per epoch (iterations × median for mmssl_jax). "
          "\"÷ released\" divides by the released code's seconds per "
          "iteration on the same kind of CPU machine.", "")
  header = ["data", "implementation", "s / iteration", "critic s / iteration",
            "iterations / epoch", "s / epoch", "÷ released", "peak RSS (GiB)",
            "command or source"]
  rows = []
  bars = {}
  for ds, entry, jsons in (
      ("tiktok", "released_cpu_tiktok",
       [("mmssl_jax, dense released critic", "train_speed_tiktok_dense.json", None),
        ("mmssl_jax, low-rank critic", "train_speed_tiktok_lowrank.json", None),
        ("mmssl_jax, dense released critic", "scale_rows_readout_2026-12-02.json", "dense"),
        ("mmssl_jax, low-rank critic", "scale_rows_readout_2026-12-02.json", "lowrank")]),
      ("ml100k", "released_cpu_ml100k",
       [("mmssl_jax, dense released critic", "train_speed_ml100k_dense.json", None)])):
    rel = sec.published(entry)
    sec.use(rel)
    rows.append([DATASETS[ds], f"released PyTorch code ({rel['date']})",
                 pub(rel["seconds_per_iteration"]),
                 pub(rel["critic_seconds_per_iteration"]),
                 pub(rel["iterations_per_epoch"]), pub(rel["seconds_per_epoch"]),
                 DASH, pub(rel["peak_rss_gib"]), rel["source"]])
    bars[ds] = [("released code, CPU", rel["seconds_per_epoch"])]
    if ds == "tiktok":
      gpu = sec.published("released_gpu_log_tiktok")
      rows.append([DATASETS[ds], f"released PyTorch code, {gpu['device']}",
                   DASH, DASH, DASH, pub(gpu["seconds_per_epoch"]), DASH, DASH,
                   gpu["source"]])
    for label, name, kind in jsons:
      d = res[name]
      if kind is None:
        r, when = d, d["date"]
      else:
        r = next(x for x in d["runs"] if x["benchmark"] == "train_speed"
                 and x["critic_kind"] == kind)
        when = d["date"]
      cmd = sec.command(r["command"], name, dict(r, date=when))
      rows.append([DATASETS[ds], f"{label} ({when})", num(r["iter_s_median"]),
                   num(r["critic_and_generator_s"]), str(r["steps_per_epoch"]),
                   num(r["epoch_s_estimate"]),
                   num(r["iter_s_median"] / rel["seconds_per_iteration"]),
                   num(r["peak_rss_gib"]), cmd])
      if kind is None:
        bars[ds].append((label.replace("mmssl_jax, ", "mmssl_jax "),
                         r["epoch_s_estimate"]))
    if ds == "tiktok":
      bars[ds].append(("released code, GPU log", gpu["seconds_per_epoch"]))
  sec.add(*table(header, rows))
  inst = res["scale_rows_readout_2026-12-02.json"]["machine"].get("instance_note")
  if inst:
    sec.add(f"The rows from `{res.paths['scale_rows_readout_2026-12-02.json']}` "
            f"ran on {inst}, so rows of different dates compare machines as "
            "well as code.", "")
  draw_epoch_seconds(bars, out_dir / "figures" / "epoch_seconds.png")
  sec.add("![seconds per epoch](figures/epoch_seconds.png)", "")
  sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


def draw_epoch_seconds(bars: dict, path: Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  items = [(f"{DATASETS[ds]}: {label}", v) for ds, group in bars.items()
           for label, v in group]
  fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(items) + 1.2), dpi=100)
  y = list(range(len(items)))[::-1]
  colors = ["0.45" if "released code, CPU" in k else
            "0.75" if "GPU" in k else
            "tab:blue" if "dense" in k else "tab:orange" for k, _ in items]
  ax.barh(y, [v - 1.0 for _, v in items], color=colors, left=1.0)
  ax.set_xscale("log")
  ax.set_yticks(y)
  ax.set_yticklabels([k for k, _ in items], fontsize=8)
  for yi, (_, v) in zip(y, items):
    ax.text(v * 1.05, yi, num(v), va="center", fontsize=8)
  ax.set_xlim(1.0, max(v for _, v in items) * 3)
  ax.set_xlabel("seconds per epoch (log scale)")
  ax.set_title("Training epoch: the released code and mmssl_jax")
  ax.grid(alpha=0.3, axis="x", which="both")
  save(fig, path)


def fit_exponent(xs, ys) -> float:
  lx = [math.log(x) for x in xs]
  ly = [math.log(y) for y in ys]
  mx, my = statistics.mean(lx), statistics.mean(ly)
  return (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
          / sum((a - mx) ** 2 for a in lx))


def scale(res: Results, out_dir: Path) -> list[str]:
  sec = Section(res, "E")
  sec.add("## Scale", "")
  name = "scale_rows_readout_2026-12-02.json"
  d = res[name]
  sec.add("`benchmarks/scale.py`: synthetic catalogues with as many users as "
          "items, the low-rank critic fused blockwise with the generator, no "
          "other jobs running. The step's scratch is XLA's temporary buffer "
          "of the compiled train step (`--compile_only`), under the "
          "memory-optimised scheduler the step uses and under XLA's default "
          "one.", "")
  timed = sorted((r for r in d["runs"] if r["benchmark"] == "scale"),
                 key=lambda r: r["n_items"])
  memory = {r["n_items"]: r for r in d["runs"]
            if r["benchmark"] == "scale_memory"}
  rows = []
  for r in timed:
    m = memory.get(r["n_items"])
    rows.append([f"{r['n_items']:,}", "low-rank, fused",
                 f"{num(r['iter_s_median'])} ({num(r['iter_s_min'])})",
                 num(r["peak_rss_gib"]), num(r["peak_rss_after_setup_gib"]),
                 (f"{num(m['xla_temp_gib'])} ({num(m['xla_temp_gib_default_scheduler'])})"
                  if m else DASH),
                 ", ".join(sec.command(x["command"], name, dict(x, date=d["date"]))
                           for x in [r] + ([m] if m else []))])
  sched = "scale_memory_scheduler_2026-12-02.json"
  dense = [r for r in res[sched]["intermediate_with_the_dropout_key_trick"]
           if r.get("config") == "dense"]
  for r in dense:
    rows.append([f"{r['n_items']:,}", "dense released critic",
                 f"{num(r['iter_s_median'])} ({num(r['iter_s_min'])})",
                 num(r["peak_rss_gib"]), num(r["peak_rss_after_setup_gib"]),
                 DASH, sec.command(r["command"], sched,
                                   dict(r, date=res[sched]["date"]))])
  sec.add(*table(["items (= users)", "critic", "s / iteration, median (min)",
                  "peak RSS (GiB)", "after setup (GiB)",
                  "step scratch, GiB (default scheduler)", "command"], rows))
  xs = [r["n_items"] for r in timed]
  b_time = fit_exponent(xs, [r["iter_s_median"] for r in timed])
  b_rss = fit_exponent(xs, [r["peak_rss_gib"] for r in timed])
  pair = [math.log(timed[i + 1]["iter_s_median"] / timed[i]["iter_s_median"])
          / math.log(timed[i + 1]["n_items"] / timed[i]["n_items"])
          for i in range(len(timed) - 1)]
  sec.add(f"A least-squares fit of log time on log items over the "
          f"{len(timed)} low-rank sizes gives time ∝ I^{b_time:.2f} "
          f"(between neighbouring sizes: "
          f"{', '.join(f'{p:.2f}' for p in pair)}), and peak RSS ∝ "
          f"I^{b_rss:.2f}.", "")
  inst = d["machine"].get("instance_note")
  if inst:
    sec.add(f"The low-rank rows ran on {inst}.", "")
  draw_scale(timed, dense, b_time, b_rss, out_dir / "figures" / "scale.png")
  sec.add("![time and peak RSS against items](figures/scale.png)", "")
  sec.flush()

  sec.add("### Earlier measurements of the same step", "",
          "The same command on earlier code; each JSON's note or change field "
          "says what the code was.", "")
  rows = []
  hist = []
  for hname in ("scale_1e5_lowrank.json", "scale_1e6_lowrank.json"):
    hd = res[hname]
    hist.append((hd["date"], hname, hd, hd.get("code") or hd.get("note", "")))
  hd = res["scale_1e6_lowrank_2026-12-02.json"]
  for r in hd["runs"]:
    hist.append((hd["date"], "scale_1e6_lowrank_2026-12-02.json", r,
                 r.get("note", "")))
  hd = res[sched]
  for r in hd["runs"]:
    if r["benchmark"] == "scale":
      hist.append((hd["date"], sched, r, "memory-optimised scheduler"))
  for r in d["before_change_same_machine"]:
    hist.append((d["date"], name, r, "before the batch-row readout, same machine"))
  for date, hname, r, note in hist:
    cmd = sec.command(r["command"], hname, dict(r, date=date))
    rows.append([date, f"{r['n_items']:,}", num(r["iter_s_median"]),
                 num(r["peak_rss_gib"]), note, cmd])
  sec.add(*table(["date", "items", "s / iteration", "peak RSS (GiB)", "code",
                  "command"], rows))
  sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


def draw_scale(timed, dense, b_time, b_rss, path: Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=100)
  xs = [r["n_items"] for r in timed]
  for ax, key, b, ylabel in ((axes[0], "iter_s_median", b_time,
                              "seconds per iteration"),
                             (axes[1], "peak_rss_gib", b_rss,
                              "peak RSS (GiB)")):
    ys = [r[key] for r in timed]
    ax.loglog(xs, ys, "o", color="tab:orange", label="low-rank critic")
    # The fitted line through the geometric means.
    gx = math.exp(statistics.mean(math.log(x) for x in xs))
    gy = math.exp(statistics.mean(math.log(y) for y in ys))
    line = [gy * (x / gx) ** b for x in xs]
    ax.loglog(xs, line, "--", color="tab:orange",
              label=f"fit ∝ I^{b:.2f}")
    if dense:
      ax.loglog([r["n_items"] for r in dense], [r[key] for r in dense], "s",
                color="tab:blue", label="dense released critic")
    ax.set_xlabel("items I (= users)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  save(fig, path)


# ------------------------------------------------------------------ fidelity
def fidelity(res: Results) -> list[str]:
  sec = Section(res, "F")
  sec.add("## Fidelity to the released code", "")
  # ML-100K trajectory
  rel = sec.published("released_cpu_ml100k")
  name = "ml100k_reference_dense.json"
  ours = res[name]
  label = sec.command(ours["command"], name)
  by_epoch = {r["epoch"]: r for r in ours["trajectory"]}
  sec.add("### ML-100K, reference variant, dense critic", "",
          f"Beside the released code's run on the same data and settings "
          f"({rel['source']}, {rel['settings']}). Epochs from 0; our run "
          "records test figures only at epochs where validation improved.",
          "")
  rows = []
  for r in rel["trajectory"]:
    o = by_epoch.get(r["epoch"], {})
    rows.append([str(r["epoch"]),
                 f"{pub(r['val_recall@20'])} / {pub(r['val_ndcg_mmssl@20'])}",
                 f"{f4(o.get('val_recall@20'))} / {f4(o.get('val_ndcg_mmssl@20'))}",
                 pub(r["test_recall@20"]), f4(o.get("test_recall@20")), label])
  sec.add(*table(["epoch", "released val R@20 / NDCG@20 (MMSSL)",
                  "ours val R@20 / NDCG@20 (MMSSL)", "released test R@20",
                  "ours test R@20", "command"], rows))
  best = rel["trajectory"][[r["epoch"] for r in rel["trajectory"]].index(
      rel["best_epoch"])]
  sec.add(f"The released run had its best validation at epoch "
          f"{rel['best_epoch']} (test R@20 {pub(best['test_recall@20'])}, "
          f"NDCG@20 (MMSSL) {pub(best['test_ndcg_mmssl@20'])}) and stopped "
          f"after epoch {rel['last_epoch']}; ours had its best at epoch "
          f"{ours['best_epoch']} (test R@20 "
          f"{f4(ours['test_at_best_val']['recall@20'])}, NDCG@20 (MMSSL) "
          f"{f4(ours['test_at_best_val']['ndcg_mmssl@20'])}) and stopped after "
          f"epoch {ours['epochs'] - 1}. Early stopping on a noisy validation "
          "curve decides where such runs end, and the two codes' random "
          "streams differ by construction.", "")
  sec.flush()
  # TikTok first epochs
  rel = sec.published("released_cpu_tiktok")
  name = "tiktok_reference_dense_3epochs.json"
  ours = res[name]
  label = sec.command(ours["command"], name)
  by_epoch = {r["epoch"]: r for r in ours["trajectory"]}
  sec.add("### TikTok, reference variant, dense critic, first epochs", "",
          f"Beside the released code's first epochs ({rel['source']}, "
          f"{rel['settings']}); on TikTok both NDCG definitions coincide.", "")
  rows = []
  for r in rel["trajectory"]:
    o = by_epoch.get(r["epoch"], {})
    rows.append([str(r["epoch"]),
                 f"{pub(r['val_recall@20'])} / {pub(r['val_ndcg@20'])}",
                 f"{f4(o.get('val_recall@20'))} / {f4(o.get('val_ndcg_mmssl@20'))}",
                 f"{pub(r['test_recall@20'])} / {pub(r['test_ndcg@20'])}",
                 f"{f4(o.get('test_recall@20'))} / {f4(o.get('test_ndcg@20'))}",
                 label])
  sec.add(*table(["epoch", "released val R@20 / NDCG@20",
                  "ours val R@20 / NDCG@20", "released test R@20 / NDCG@20",
                  "ours test R@20 / NDCG@20", "command"], rows))
  sec.flush()
  # TikTok epoch 0: the PyTorch port
  sec.add("### TikTok, the first epoch: the PyTorch port", "",
          "`experiments/torch_port.py` is an independent PyTorch port of the "
          "released training that makes every random draw in the released "
          "code's order. Run from torch's own initial draw, and from ours "
          "(`experiments/export_init.py`), it shows that the first-epoch "
          "figure follows the initial parameters. The mean feature-L2 term "
          "is the epoch's mean of that loss term.", "")
  rows = [["released code", f"torch, seed {rel['seed']}",
           pub(rel["trajectory"][0]["val_recall@20"]),
           pub(rel["trajectory"][0]["val_ndcg@20"]),
           pub(rel["trajectory"][0]["test_recall@20"]),
           pub(rel["trajectory"][0]["test_ndcg@20"]), DASH, DASH,
           rel["source"]]]
  for pname in res.glob("tiktok_torch_port_1epoch_*.json"):
    p = res[pname]
    init = (f"ours (`{Path(p['init_from']).name}`), seed {p['seed']}"
            if p.get("init_from") else f"torch, seed {p['seed']}")
    rows.append(["PyTorch port", init, f4(p["val_recall@20"]),
                 f4(p["val_ndcg@20"]), f4(p["test_recall@20"]),
                 f4(p["test_ndcg@20"]), f"{p['mean_feat']:.2f}",
                 num(p["train_s"]), sec.command(p["command"], pname)])
  sname = "tiktok_seed_spread_1epoch.json"
  s = res[sname]
  slabel = sec.command(s["command"], sname)
  for seed in sorted(s["runs"], key=int):
    r = s["runs"][seed][0]
    rows.append(["mmssl_jax, dense critic", f"jax, seed {seed}",
                 f4(r["val/recall@20"]), f4(r["val/ndcg@20"]),
                 f4(r["test/recall@20"]), f4(r["test/ndcg@20"]), DASH, DASH,
                 slabel])
  sec.add(*table(["run", "initial parameters", "val R@20", "val NDCG@20",
                  "test R@20", "test NDCG@20", "mean feature-L2 term",
                  "training s", "command or source"], rows))
  sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


# ------------------------------------------------------------------ main
# ------------------------------------------------------------------ new items
NEW_ITEM_MODELS = (
    ("mmssl_inductive", "MMSSL + inductive item path (`model.cold_start`)"),
    ("mmssl", "MMSSL, same runs without the inductive path"),
    ("content_knn", "content kNN (`baselines.content_knn`)"),
    ("lightgcn", "LightGCN (new items keep their initial vectors)"),
    ("popularity", "item popularity (random among ties)"))
NEW_ITEM_KEYS = ("cold/recall@20", "cold/ndcg@20", "cold_all/recall@20",
                 "cold_all/ndcg@20", "warm/recall@20", "recall@20")


def new_items_table(sec: Section, name: str) -> list[str]:
  """Rows of one cold_start_<dataset>.json: mean ± std over its seeds."""
  d = sec.res[name]
  label = sec.command(d["command"], name)
  rows = []
  for model, title in NEW_ITEM_MODELS:
    runs = [r for r in d["runs"] if r["model"] == model]
    if runs:
      epochs = ", ".join(f"{r['best_epoch'] + 1} / {r['epochs']}"
                         for r in runs if "epochs" in r) or DASH
      rows.append([title, ", ".join(str(r["seed"]) for r in runs)]
                  + [mean_std([r["test"].get(k) for r in runs])
                     for k in NEW_ITEM_KEYS] + [epochs, label])
  return table(["model", "seeds", "new R@20", "new NDCG@20",
                "new among all R@20", "new among all NDCG@20",
                "old R@20", "all R@20", "epochs to best / run", "command"],
               rows)


def _compare(summary: dict, a: str, b: str, key: str) -> str:
  """'a 0.1 ± 0.01 against b 0.2 ± 0.02: beyond/within seed noise'."""
  x, y = summary[a][key], summary[b][key]
  beyond = abs(x["mean"] - y["mean"]) > 2 * max(x["std"], y["std"])
  side = "higher" if x["mean"] > y["mean"] else "lower"
  return (f"{f4(x['mean'])} ± {f4(x['std'])} against {f4(y['mean'])} ± "
          f"{f4(y['std'])}, {side}, "
          f"{'beyond' if beyond else 'within'} seed noise")


def _new_items_verdict(ds: str, summary: dict) -> str:
  """One line per dataset: the inductive path against content kNN on the new
  items, and against the same runs without it on the old items."""
  ind, knn, plain = "mmssl_inductive", "content_knn", "mmssl"
  return (f"{ds}: new items among the new, Recall@20 "
          f"{_compare(summary, ind, knn, 'cold/recall@20')} (inductive path "
          f"against content kNN); among all items "
          f"{_compare(summary, ind, knn, 'cold_all/recall@20')}; old items, "
          f"{_compare(summary, ind, plain, 'warm/recall@20')} (with against "
          "without the inductive path).")


def new_items(res: Results) -> list[str]:
  sec = Section(res, "N")
  sec.add("## New items", "",
          "A seeded random 20% of the items is held out of training "
          "(`data.cold_items=0.2`, `data.cold_seed` = the seed): half of them "
          "are validation items, half test items, and every interaction with "
          "one is a target of its split (`mmssl_jax/data/cold_start.py`). "
          "Test figures at the best validation epoch (validation Recall@20 "
          "over all items), mean ± sample standard deviation over the seeds, "
          "each seed its own split and initialisation. *New*: the held-out "
          "test items ranked among the held-out items; *new among all*: "
          "among all items; *old*: the other items among themselves; *all*: "
          "every test target among all items. MMSSL runs use the low-rank "
          "critic; the runs without the inductive path are the same "
          "checkpoints scored with it switched off (its loss reaches no "
          "other parameter).", "")
  verdicts = []
  for ds, name in (("TikTok", "cold_start_tiktok.json"),
                   ("ML-100K", "cold_start_ml100k.json")):
    if name in res.data:
      sec.add(f"**{ds}**", "", *new_items_table(sec, name))
      verdicts.append(_new_items_verdict(ds, res[name]["summary"]))
  if verdicts:
    sec.add("Differences are called beyond seed noise when they exceed twice "
            "the larger of the two standard deviations.", "",
            *[f"- {v}" for v in verdicts], "")
  sec.flush()
  if "cold_start_tiktok_stop_on_new.json" in res.data:
    sec.add("### Early stopping on the new items", "",
            "TikTok again, with early stopping on the validation Recall@20 "
            "of the new items (`eval.metric=cold/recall@20`) instead of all "
            "items; the other settings and the seeds as above.", "",
            *new_items_table(sec, "cold_start_tiktok_stop_on_new.json"))
    sec.flush()
  probes = sorted(res.glob("cold_start_loss_ml100k_*.json"))
  if probes:
    rows, best = [], (-1.0, "")
    for name in probes:
      d = res[name]
      run = [r for r in d["runs"] if r["model"] == "mmssl_inductive"][0]
      weights = dict(o.split("=") for o in d["overrides"]
                     if o.startswith("loss.cold_"))
      best = max(best, (run["val"]["cold/recall@20"], weights))
      rows.append([weights.get("loss.cold_bpr", ""),
                   weights.get("loss.cold_align", ""),
                   f4(run["val"]["cold/recall@20"]),
                   f4(run["test"]["cold/recall@20"]),
                   f4(run["test"]["cold_all/recall@20"]),
                   f4(run["test"]["warm/recall@20"]),
                   sec.command(d["command"], name)])
    defaults = paper_defaults()
    chosen = ", ".join(f"`{k}={v}`" for k, v in sorted(best[1].items()))
    is_default = all(float(v) == defaults[k] for k, v in best[1].items())
    sec.add("### The inductive path's loss", "",
            f"On ML-100K (seed {run['seed']}), with the BPR and alignment "
            "terms of the encoder's loss each on or off; the best validation "
            f"Recall@20 of the new items is that of {chosen}"
            f"{', the defaults' if is_default else ''}.", "")
    sec.add(*table(["cold_bpr", "cold_align", "val new R@20", "new R@20",
                    "new among all R@20", "old R@20", "command"], rows))
    sec.flush()
  return sec.lines[:2] + sec.conditions() + sec.lines[2:]


README_BEGIN = ("<!-- results summary: written by benchmarks/report.py from "
                "benchmarks/results; do not edit -->")
README_END = "<!-- end of results summary -->"


def readme_summary(res: Results | None = None) -> list[str]:
  """README's results table: test Recall@20 / NDCG@20 at best validation."""
  res = res or Results()
  sec = Section(res, "R")
  ml_files = res.glob("ml100k_uncapped_seed*.json")
  cell = lambda runs, key: mean_std([r.test[key] for r in runs])
  rows = []
  models = (
      ("MMSSL, reference variant",
       study_runs(sec, "tiktok_reference_lowrank_3seeds_full.json",
                  "reference", "full"),
       [r for f in ml_files for r in study_runs(sec, f, "reference", "full")]),
      ("MMSSL, paper variant",
       study_runs(sec, "tiktok_paper_cl0.001_3seeds_full.json", "paper",
                  "full"),
       [r for f in ml_files for r in study_runs(sec, f, "paper", "full")]),
      ("LightGCN", [reproduce_run(sec, "tiktok_lightgcn.json")],
       [r for f in res.glob("ml100k_uncapped_lightgcn_seed*.json")
        for r in study_runs(sec, f, model="lightgcn")]))
  for name, tiktok, ml100k in models:
    rows.append([name, cell(tiktok, "recall@20"), cell(tiktok, "ndcg@20"),
                 cell(ml100k, "recall@20"), cell(ml100k, "ndcg@20")])
  pop = res["popularity_bias_tiktok_reference.json"]
  first = pop["runs"][sorted(pop["runs"])[0]]
  rows.append(["item popularity", f4(first["test"]["popularity_recall@20"]),
               DASH, DASH, DASH])
  paper = sec.published("paper_accuracy_tiktok")
  for key, name in (("mmssl", "MMSSL"), ("lightgcn", "LightGCN")):
    rows.append([f"{name}, published ({' + '.join(paper['modalities'])})",
                 pub(paper[key]["recall@20"]), pub(paper[key]["ndcg@20"]),
                 DASH, DASH])
  header = ["model", "TikTok R@20", "TikTok NDCG@20", "ML-100K R@20",
            "ML-100K NDCG@20"]
  return [README_BEGIN, *table(header, rows), *_new_items_sentence(res),
          README_END]


def _new_items_sentence(res: Results) -> list[str]:
  """README's line on new items: the inductive path against content kNN."""
  parts = []
  for ds, name in (("TikTok", "cold_start_tiktok.json"),
                   ("ML-100K", "cold_start_ml100k.json")):
    if name not in res.data:
      continue
    summary = res[name]["summary"]
    cell = lambda model: (f"{summary[model]['cold/recall@20']['mean']:.4f} ± "
                          f"{summary[model]['cold/recall@20']['std']:.4f}")
    parts.append(f"{ds} {cell('mmssl_inductive')} against "
                 f"{cell('content_knn')}")
  if not parts:
    return []
  return [f"New items (20% of the items held out, 3 seeds; "
          f"[docs/results.md](docs/results.md#new-items)): test Recall@20 "
          f"among the new items with the inductive path, against a "
          f"content-kNN baseline: {'; '.join(parts)}.", ""]


def update_readme(path: Path, res: Results | None = None) -> bool:
  """Rewrites README's results summary block; True if it changed."""
  text = path.read_text(encoding="utf-8")
  start, end = text.find(README_BEGIN), text.find(README_END)
  if start < 0 or end < start:
    raise ValueError(f"{path}: no results summary block ({README_BEGIN})")
  new = (text[:start] + "\n".join(readme_summary(res))
         + text[end + len(README_END):])
  if new != text:
    path.write_text(new, encoding="utf-8")
  return new != text


def render(out_dir: Path, res: Results | None = None) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  res = res or Results()
  parts = [accuracy(res, out_dir), ablation(res), sweeps(res),
           new_items(res), speed(res, out_dir), scale(res, out_dir),
           fidelity(res)]
  titles = [p[0][3:] for p in parts]
  head = ["# Results", "",
          "Generated by `python benchmarks/report.py` from the JSON files in "
          "`benchmarks/results/` and `experiments/results/`; do not edit it "
          "by hand (`tests/test_report.py` fails when it differs from a fresh "
          "run). Each table row names the command that wrote its JSON "
          "(listed under the table, with the JSON and its date) or, for "
          "published figures, their source. `data/<name>` in a command "
          "stands for the dataset folder. Runs are seeded, but code changed "
          "between runs (random streams among others), so a rerun reproduces "
          "a figure up to seed noise, not bit for bit.", "",
          *[f"- [{t}](#{re.sub(r'[^a-z0-9 -]', '', t.lower()).replace(' ', '-')})"
            for t in titles], ""]
  lines = head + [line for p in parts for line in p]
  while lines and lines[-1] == "":
    lines.pop()
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--output_dir", default=str(REPO / "docs"),
                 help="folder for results.md and figures/ (default: docs/)")
  p.add_argument("--readme", default=str(REPO / "README.md"),
                 help="README whose results summary block is rewritten "
                 "('' for none)")
  a = p.parse_args(argv)
  out_dir = Path(a.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  text = render(out_dir)
  (out_dir / "results.md").write_text(text, encoding="utf-8")
  if a.readme and update_readme(Path(a.readme)):
    print(f"updated the results summary in {a.readme}")
  print(f"wrote {out_dir / 'results.md'} and "
        f"{', '.join(str(out_dir / 'figures' / f) for f in FIGURES)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
