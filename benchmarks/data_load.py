"""Times loading and validating a dataset folder (`formats.load_folder`).

  python benchmarks/data_load.py --data=PATH/tiktok \
      --output=benchmarks/results/data_load_tiktok.json

Loads the folder `--repeats` times in this process (each load reads and
validates every file again) and prints one JSON line: the median and
minimum seconds, the dataset's sizes, the machine, and the command.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mmssl_jax.data import formats  # pylint: disable=wrong-import-position
import results_io  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, required=True)
  parser.add_argument("--format", default="auto", choices=formats.FORMATS)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    ds = formats.load_folder(args.data, format=args.format)
    times.append(time.perf_counter() - t0)
  results_io.emit({
      "benchmark": "data_load", "dataset": ds.name, "format": args.format,
      "n_users": ds.n_users, "n_items": ds.n_items,
      "n_train": len(ds.train), "n_val": len(ds.val), "n_test": len(ds.test),
      "modality_dims": ds.modality_dims,
      "load_s_median": round(statistics.median(times), 3),
      "load_s_min": round(min(times), 3), "repeats": args.repeats,
      "machine": results_io.machine(), "date": datetime.date.today().isoformat(),
      "command": "python benchmarks/data_load.py --data=PATH/"
                 f"{args.data.name} --format={args.format}",
  }, args.output)


if __name__ == "__main__":
  main()
