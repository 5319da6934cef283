"""Times `mmssl_jax.evaluation.evaluate` on the TikTok validation users.

Reads train.json and val.json directly (user id string -> item list), draws
seeded random 64-d float32 embeddings, builds the evaluation set of the users
with a validation item (train items excluded, as in §5 of the reference
description), compiles once and times 5 evaluations.
Prints one JSON line.

  python benchmarks/eval_speed.py --data_dir=PATH/tiktok [--block_users N]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmssl_jax import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position
from mmssl_jax.data.dataset import Split  # pylint: disable=g-import-not-at-top,wrong-import-position

N_USERS, N_ITEMS, DIM = 9308, 6710, 64


def read_split(path: pathlib.Path) -> Split:
  """A {"user": [items]} JSON file as a Split."""
  with open(path) as f:
    lists = json.load(f)
  users = [int(u) for u, items in lists.items() for _ in items]
  items = [int(i) for its in lists.values() for i in its]
  return Split(np.array(users, np.int32), np.array(items, np.int32))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", type=pathlib.Path, required=True,
                      help="the TikTok dataset folder")
  parser.add_argument("--block_users", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  train = read_split(args.data_dir / "train.json")
  val = read_split(args.data_dir / "val.json")
  eval_set = evaluation.build_eval_set(
      target=val, exclude=[train], n_users=N_USERS, n_items=N_ITEMS,
      block_users=args.block_users)
  eval_set = jax.device_put(eval_set)
  rng = np.random.default_rng(0)
  user_emb = jnp.asarray(rng.normal(size=(N_USERS, DIM)), jnp.float32)
  item_emb = jnp.asarray(rng.normal(size=(N_ITEMS, DIM)), jnp.float32)

  start = time.perf_counter()
  evaluation.evaluate(user_emb, item_emb, eval_set)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    evaluation.evaluate(user_emb, item_emb, eval_set)  # returns host floats
    times.append(time.perf_counter() - start)

  print(json.dumps({
      "benchmark": "eval_speed",
      "dataset": args.data_dir.name,
      "n_eval_users": int(eval_set.n_users),
      "n_items": N_ITEMS,
      "compile_s": round(compile_s, 3),
      "eval_s_median": round(statistics.median(times), 4),
      "eval_s_min": round(min(times), 4),
      "block_users": int(eval_set.users.shape[1]),
      "jax_version": jax.__version__,
      "device": str(jax.devices()[0].device_kind),
  }))


if __name__ == "__main__":
  main()
