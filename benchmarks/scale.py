r"""Seconds per training iteration and peak memory on big synthetic catalogues.

  python benchmarks/scale.py                       # I = 1e4 and 1e5
  python benchmarks/scale.py --million             # also I = 1e6
  python benchmarks/scale.py --items=20000 --iters=3 --no_dense

Synthetic catalogues with users = items and 20 interactions per user
(uniform items; 18 train, 1 validation, 1 test), two random feature
modalities (64 and 32 dims), the released hyper-parameters otherwise
(B = 1024, d = 64, reference variant, k = floor(1e-4 I)). Each
configuration runs in its own subprocess, so `peak_rss_gib` is that
configuration's own peak (host memory; on an accelerator see
`device_peak_gib`). Prints one JSON line per configuration:

  python benchmarks/scale.py --items=1000000 --no_dense --compile_only

compiles the step only (the state as shapes, nothing allocated for it) and
prints XLA's buffer sizes: `xla_argument_gib` (state + inputs), `xla_temp_gib`
(the step's scratch, allocated whole for each call), `xla_output_gib`
(aliased to the donated state) and, on CPU, `xla_temp_gib_default_scheduler`
(the scratch under XLA:CPU's default scheduler, which the step replaces by
the memory-optimised one: `steps.step_compiler_options`). These tell the
step's own memory from the data's, in minutes where a timed run at I = 1e6
takes a quarter of an hour.

* `lowrank_fused`: critic.kind='lowrank' (rank 64, hidden 256/128) with the
  blockwise fused generator (train.generator_block items per block): no
  B x I array anywhere in the step.
* `dense`: the released I -> I/4 -> I/8 -> 1 critic with whole rows, only
  where it fits (I <= --dense_max_items, default 1e4).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("items", ["10000", "100000"], "Catalogue sizes I.")
flags.DEFINE_bool("million", False, "Also run I = 1e6 (lowrank only).")
flags.DEFINE_integer("iters", 5, "Timed iterations (after compilation).")
flags.DEFINE_integer("block", 4096, "train.generator_block of the fused step.")
flags.DEFINE_integer("batch_size", 1024, "Batch users B.")
flags.DEFINE_integer("rank", 64, "critic.rank r.")
flags.DEFINE_integer("dense_max_items", 10000,
                     "Largest I for the dense (released) critic.")
flags.DEFINE_bool("no_dense", False, "Skip the dense critic.")
flags.DEFINE_bool("compile_only", False,
                  "Compile the step (abstract state, nothing trained) and "
                  "print XLA's memory analysis instead of timing it.")
flags.DEFINE_string("one", "", "Internal: run one 'kind,I' configuration.")

INTERACTIONS = 20


def synthetic_catalogue(n_items: int, seed: int = 0):
  """users = items, INTERACTIONS distinct uniform items per user (O(U))."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mmssl_jax.data.dataset import Dataset, Split
  rng = np.random.default_rng(seed)
  n_users = n_items
  draws = np.sort(rng.integers(0, n_items, (n_users, INTERACTIONS + 8)), 1)
  fresh = np.ones(draws.shape, bool)
  fresh[:, 1:] = draws[:, 1:] != draws[:, :-1]
  # Keep the first INTERACTIONS distinct items of each row, shuffled.
  rank = np.cumsum(fresh, axis=1)
  keep = fresh & (rank <= INTERACTIONS)
  users = np.repeat(np.arange(n_users), keep.sum(1))
  items = draws[keep]
  order = np.lexsort((rng.random(items.shape), users))
  users, items = users[order], items[order]
  first = np.r_[True, users[1:] != users[:-1]]
  second = np.r_[False, first[:-1]]
  test, val = first, second
  train = ~(test | val)
  split = lambda m: Split(users[m].astype(np.int32), items[m].astype(np.int32))
  modalities = {"image": rng.normal(size=(n_items, 64)).astype(np.float32),
                "text": rng.normal(size=(n_items, 32)).astype(np.float32)}
  return Dataset(name=f"synthetic_{n_items}", n_users=n_users,
                 n_items=n_items, train=split(train), val=split(val),
                 test=split(test), modalities=modalities)


def config_for(kind: str):
  from mmssl_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.data.source = "synthetic"
  c.train.batch_size = FLAGS.batch_size
  if kind == "lowrank_fused":
    c.critic.kind = "lowrank"
    c.critic.rank = FLAGS.rank
    c.train.generator_block = FLAGS.block
  return c


def _peak_rss_gib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def run_one(kind: str, n_items: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mmssl_jax import run as run_lib
  from mmssl_jax import state as state_lib

  t0 = time.perf_counter()
  ds = synthetic_catalogue(n_items)
  config = config_for(kind)
  run = run_lib.Run(config, ds)
  sizes = {"n_items": n_items, "n_users": ds.n_users,
           "n_train": len(ds.train)}
  # As `train.train_and_evaluate`: the host dataset is freed once `Run`
  # holds the device arrays, and the step is compiled before it first runs.
  del ds
  if FLAGS.compile_only:
    return _memory_analysis(kind, run, sizes, time.perf_counter() - t0)
  state = run.init_state()
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t0
  rss_setup = _peak_rss_gib()
  compile_s = run.compile_step(state)
  state, terms = run.step(state, jnp.int32(0), run.inputs)
  jax.block_until_ready(terms)
  rss_compile = _peak_rss_gib()
  times = []
  for i in range(FLAGS.iters):
    t0 = time.perf_counter()
    state, terms = run.step(state, jnp.int32(i + 1), run.inputs)
    jax.block_until_ready(terms)
    times.append(time.perf_counter() - t0)
  times.sort()
  terms = jax.device_get(terms)
  out = {
      "benchmark": "scale", "config": kind, **sizes,
      "batch_size": config.train.batch_size,
      "generator_block": config.train.generator_block,
      "fused": run.step_config.fused,
      "critic_params": state_lib.count_params(state.critic_params),
      "recommender_params": state_lib.count_params(state.params),
      "setup_s": round(setup_s, 2), "compile_s": round(compile_s, 2),
      "iter_s_median": round(times[len(times) // 2], 3),
      "iter_s_min": round(times[0], 3), "iters": FLAGS.iters,
      "finite": bool(all(map(lambda v: bool(jnp.isfinite(v)),
                             terms.values()))),
      # Peak RSS so far after data + state setup, after compiling and the
      # first step, and at the end: tells setup memory from step memory.
      "peak_rss_after_setup_gib": rss_setup,
      "peak_rss_after_first_step_gib": rss_compile,
      "peak_rss_gib": _peak_rss_gib(),
      "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
  }
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
  return out


def _memory_analysis(kind: str, run, sizes: dict, setup_s: float) -> dict:
  """XLA's buffer sizes of the compiled step (`--compile_only`)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mmssl_jax import steps
  t0 = time.perf_counter()
  state = jax.eval_shape(run.init_state)
  lowered = run.step.lower(state, jnp.int32(0), run.inputs)
  m = lowered.compile().memory_analysis()
  gib = lambda b: round(b / 2**30, 3)
  extra = {}
  if steps.step_compiler_options():
    # The same step under XLA's default (concurrency-optimised) scheduler,
    # which the step replaces (`steps.step_compiler_options`).
    default = lowered.compile(compiler_options={
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
    extra["xla_temp_gib_default_scheduler"] = gib(
        default.memory_analysis().temp_size_in_bytes)
  return {
      "benchmark": "scale_memory", "config": kind, **sizes,
      "setup_s": round(setup_s, 2),
      "compile_s": round(time.perf_counter() - t0, 2),
      "xla_argument_gib": gib(m.argument_size_in_bytes),
      "xla_output_gib": gib(m.output_size_in_bytes),
      "xla_alias_gib": gib(m.alias_size_in_bytes),
      "xla_temp_gib": gib(m.temp_size_in_bytes), **extra,
      "peak_rss_gib": _peak_rss_gib(),
      "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
  }


def main(argv):
  del argv
  if FLAGS.one:
    kind, n_items = FLAGS.one.split(",")
    print(json.dumps(run_one(kind, int(n_items))), flush=True)
    return
  sizes = [int(float(n)) for n in FLAGS.items]
  if FLAGS.million:
    sizes.append(1_000_000)
  jobs = []
  for n in sizes:
    if not FLAGS.no_dense and n <= FLAGS.dense_max_items:
      jobs.append(("dense", n))
    jobs.append(("lowrank_fused", n))
  passed = [a for a in sys.argv[1:] if a.split("=")[0].lstrip("-") in (
      "iters", "block", "batch_size", "rank", "compile_only",
      "nocompile_only")]
  for kind, n in jobs:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--one={kind},{n}",
         *passed], capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
      print(json.dumps({"benchmark": "scale", "config": kind, "n_items": n,
                        "error": proc.stderr.strip().splitlines()[-1:]}),
            flush=True)
    else:
      print(lines[-1], flush=True)


if __name__ == "__main__":
  app.run(main)
