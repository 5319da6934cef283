r"""Plots the loss terms and validation metrics of one or more training runs.

  python -m mmssl_jax.plot --workdir=/tmp/mmssl,/tmp/mmssl_wo_cl \
      --output=/tmp/figures --labels=MMSSL,w/o-CL

Reads each workdir's `metrics.jsonl` (one record per epoch, then a final
`{"final": true, "best_epoch": ...}` record; see `mmssl_jax.train`) and writes
  losses.png:      one panel per loss term present (train/bpr, train/cl,
                   train/critic, train/gen, train/loss, train/emb_l2,
                   train/feat_l2), loss per epoch;
  validation.png:  val/recall@20, val/ndcg@20, val/ndcg_mmssl@20 per epoch
                   (panels for the metrics present; not written when no run
                   has validation metrics).
Runs are overlaid in one colour each; labels default to the workdir names. The
best validation epoch of each run (the final record's `best_epoch`; for a run
still in progress, the last epoch that evaluated the test split, which
`train` does exactly when validation improves) is a dotted vertical line.

Needs matplotlib (`pip install "mmssl_jax[plot]"`); it is imported only when
plotting, and only its Agg canvas is used, so no display and no global
pyplot state are touched.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from absl import app
from absl import flags

from mmssl_jax.data import print_error

METRICS_FILE = "metrics.jsonl"
LOSS_KEYS = ("train/loss", "train/bpr", "train/cl", "train/critic", "train/gen",
             "train/emb_l2", "train/feat_l2")
VAL_KEYS = ("val/recall@20", "val/ndcg@20", "val/ndcg_mmssl@20")
PANEL_INCHES = (5.0, 3.5)  # one panel; figures are a grid of at most 3 across
MAX_COLUMNS = 3
DPI = 100
MISSING_MATPLOTLIB = 'plotting needs matplotlib: pip install "mmssl_jax[plot]"'


class Run(NamedTuple):
  """The parsed metrics.jsonl of one workdir."""
  label: str
  epochs: list[dict[str, Any]]  # per-epoch records, in file order
  best_epoch: int | None


def read_metrics(workdir: str | os.PathLike, label: str | None = None) -> Run:
  """Parses `<workdir>/metrics.jsonl`.

  A last line without its newline (a run writing it right now) is ignored.

  Raises:
    FileNotFoundError: no metrics.jsonl in `workdir`.
    ValueError: a malformed line, or no epoch records.
  """
  path = Path(workdir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f"{path}: not found (expected the {METRICS_FILE} that training writes "
        "into its --workdir)")
  # Drops what follows the last newline: '' for a complete file, or the line
  # a running job is writing right now.
  lines = path.read_text(encoding="utf-8").split("\n")[:-1]
  epochs, final = [], None
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}: line {n}: expected a JSON object")
    if record.get("final"):
      final = record
    elif "epoch" in record:
      epochs.append(record)
  if not epochs:
    raise ValueError(f"{path}: no epoch records yet")
  if final is not None and final.get("best_epoch", -1) >= 0:
    best = int(final["best_epoch"])
  else:
    tested = [r["epoch"] for r in epochs
              if any(k.startswith("test/") for k in r)]
    best = int(tested[-1]) if tested else None
  name = label if label is not None else Path(os.path.abspath(workdir)).name
  return Run(name, epochs, best)


def _series(run: Run, key: str) -> tuple[list[float], list[float]]:
  pairs = [(r["epoch"], r[key]) for r in run.epochs
           if isinstance(r.get(key), (int, float))]
  return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def figure_pixels(n_panels: int) -> tuple[int, int]:
  """(width, height) in pixels of a figure with `n_panels` panels."""
  cols = min(MAX_COLUMNS, n_panels)
  rows = math.ceil(n_panels / cols)
  return (round(PANEL_INCHES[0] * cols * DPI),
          round(PANEL_INCHES[1] * rows * DPI))


def _plot_panels(runs: Sequence[Run], keys: Sequence[str], path: Path,
                 title: str, mark_points: bool) -> None:
  """One panel per key, every run overlaid, best epochs marked; saves a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  width, height = figure_pixels(len(keys))
  cols = min(MAX_COLUMNS, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI,
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  colors = [f"C{k % 10}" for k in range(len(runs))]
  for ax, key in zip(axes, keys):
    for run, color in zip(runs, colors):
      x, y = _series(run, key)
      if not x:
        continue
      label = run.label + (f" (best epoch {run.best_epoch})"
                           if run.best_epoch is not None else "")
      ax.plot(x, y, color=color, label=label,
              marker="o" if mark_points else None, markersize=3)
      if run.best_epoch is not None:
        ax.axvline(run.best_epoch, color=color, linestyle=":", linewidth=1)
        if run.best_epoch in x:
          ax.plot([run.best_epoch], [y[x.index(run.best_epoch)]], color=color,
                  marker="*", markersize=10, linestyle="none")
    ax.set_title(key)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  # One legend with every run, even those missing from the first panel.
  handles = {}
  for ax in axes[:len(keys)]:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  axes[0].legend(handles.values(), handles.keys(), fontsize="small")
  fig.suptitle(title)
  fig.savefig(path, dpi=DPI, format="png")


def plot_runs(workdirs: Sequence[str | os.PathLike],
              output_dir: str | os.PathLike,
              labels: Sequence[str] | None = None) -> list[Path]:
  """Writes losses.png (and validation.png) for the runs in `workdirs`.

  Args:
    workdirs: training workdirs, each holding a metrics.jsonl.
    output_dir: where to write the PNGs (created if needed; existing PNGs of
      the same names are replaced).
    labels: legend labels, one per workdir; default: the workdir names.

  Returns:
    The paths written.

  Raises:
    ImportError: matplotlib is not installed.
    FileNotFoundError, ValueError: a missing or malformed metrics.jsonl, or
      `labels` of the wrong length.
  """
  if isinstance(workdirs, (str, os.PathLike)):
    workdirs = [workdirs]
  if not workdirs:
    raise ValueError("no workdirs given")
  if labels is not None and len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  runs = [read_metrics(w, labels[k] if labels is not None else None)
          for k, w in enumerate(workdirs)]
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ImportError(MISSING_MATPLOTLIB) from None
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  present = lambda keys: [k for k in keys  # pylint: disable=g-long-lambda
                          if any(_series(r, k)[0] for r in runs)]
  written = []
  loss_keys = present(LOSS_KEYS)
  if not loss_keys:
    raise ValueError(f"no loss terms ({', '.join(LOSS_KEYS)}) in "
                     f"{', '.join(str(Path(w) / METRICS_FILE) for w in workdirs)}")
  _plot_panels(runs, loss_keys, out / "losses.png", "training losses",
               mark_points=False)
  written.append(out / "losses.png")
  val_keys = present(VAL_KEYS)
  if val_keys:
    _plot_panels(runs, val_keys, out / "validation.png", "validation",
                 mark_points=True)
    written.append(out / "validation.png")
  return written


def define_flags() -> dict[str, flags.FlagHolder]:
  """Defines the flags (only when run as a program: no clash with --workdir
  of `mmssl_jax.main` when both modules are imported)."""
  return {
      "workdir": flags.DEFINE_list(
          "workdir", None, "Training workdir(s), comma-separated.",
          required=True),
      "output": flags.DEFINE_string("output", None,
                                    "Folder for the PNG figures.",
                                    required=True),
      "labels": flags.DEFINE_list(
          "labels", None, "Legend labels, one per workdir (default: the "
          "workdir names)."),
  }


def main(argv: Sequence[str], f: dict[str, flags.FlagHolder]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    paths = plot_runs(f["workdir"].value, f["output"].value, f["labels"].value)
  except (ImportError, OSError, ValueError) as e:
    return print_error(e)
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
