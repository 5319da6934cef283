r"""Runs sharded training steps of a config on all devices of all processes.

A small example of the multi-host path (`mmssl_jax.parallel`), and what
tests/test_parallel.py runs; full training runs go through `mmssl_jax.main`
with the same flags and `--config.train.data_parallel=0` (see
`launch/local_multiprocess.sh` and tests/test_multihost.py).

  # one process, 4 CPU devices
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python launch/distributed_step.py --config=configs/test.py --steps=1
  # two processes x 2 CPU devices on loopback
  launch/local_multiprocess.sh launch/distributed_step.py \
      --config=configs/test.py --steps=1 --out=/tmp/step.npz

Process 0 prints one JSON line (loss terms of the last step, validation
metrics with --eval) and, with --out, saves them and the final parameters
(flattened) as .npz.
"""

import argparse
import importlib.util
import json
import os
import sys


def _load_config(spec):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True,
                      help="configs/FILE.py[:arg], as for mmssl_jax.main")
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--out", default="", help=".npz of terms and params")
  parser.add_argument("--eval", action="store_true",
                      help="also evaluate the validation split (sharded)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override KEY=PYTHON_LITERAL, repeatable")
  parser.add_argument("--coordinator_address", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with auto-detection "
                      "(TPU pods, SLURM)")
  args = parser.parse_args()

  from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1 or args.distributed:
    parallel.initialize_distributed(
        args.coordinator_address or None,
        args.num_processes if args.coordinator_address else None,
        args.process_id if args.coordinator_address else None)
  import ast  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmssl_jax import train  # pylint: disable=g-import-not-at-top

  config = _load_config(args.config)
  for item in args.set:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = ast.literal_eval(value)
  ds = train.load_dataset(config.data)
  run = parallel.shard_run(train.Run(config, ds),
                           parallel.make_mesh(config, n_devices=0))
  state = run.init_state()
  for idx in range(args.steps):
    state, terms = run.step(state, jnp.int32(idx % run.steps_per_epoch),
                            run.inputs)
  terms = parallel.host_local(terms)
  val = run.evaluate(state, "val") if args.eval else {}
  if jax.process_index() == 0:
    print(json.dumps({"processes": jax.process_count(),
                      "devices": jax.device_count(),
                      **{k: float(v) for k, v in terms.items()},
                      **{f"val/{k}": v for k, v in val.items()}}))
    if args.out:
      flat = {}
      for part in ("params", "critic_params"):
        tree = parallel.host_local(getattr(state, part))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
          flat[part + jax.tree_util.keystr(path)] = np.asarray(leaf)
      flat.update({f"terms/{k}": np.asarray(v) for k, v in terms.items()})
      flat.update({f"val/{k}": np.asarray(v) for k, v in val.items()})
      np.savez(args.out, **flat)
  sys.stdout.flush()
  if jax.process_count() > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  main()
