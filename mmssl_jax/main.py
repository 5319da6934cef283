r"""Train and evaluate MMSSL (or the LightGCN baseline) from a config file.

  python -m mmssl_jax.main --config=configs/default.py --workdir=/tmp/mmssl
  python -m mmssl_jax.main --config=configs/tiktok.py:variant=wo_cl \
      --config.data.dir=../shared/data/tiktok --workdir=/tmp/tiktok_wo_cl

Kept short on purpose: the logic lives in `mmssl_jax.train` and
`mmssl_jax.checkpointing`.

Re-running the same command with the same --workdir resumes from the latest
checkpoint (bit-identical on CPU); a workdir holding a complete run prints
its stored result and exits 0 without training again.

Exit status and messages (one line `error: ...` on stderr, no traceback):
  0    trained to the end (or the workdir already held the complete run).
  1    bad input data (DataError, naming the file), a config that cannot run,
       a workdir holding a different run (the differing config fields are
       listed), a non-finite loss (NaN guard: the term and the step), or an
       OS error such as an unwritable workdir.
  143  stopped by SIGTERM (130: SIGINT) after saving a checkpoint at the next
       step boundary; run the same command again to resume.

Multi-process (multi-host) runs: every process runs the same command with
`--config.train.data_parallel=0` (a 'data' mesh over every device of every
process) and either `--distributed` (jax.distributed auto-detects TPU pods
and SLURM) or `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`; `launch/` has the launchers. The result equals a
single-process run on as many devices; process 0 writes the workdir's files
and log, checkpoints are written collectively, so --workdir must be on a file
system every process sees (`mmssl_jax.multihost`, tests/test_multihost.py).
Every process exits with the same status.

`--config.train.deterministic=True` adds `--xla_gpu_deterministic_ops=true`
to XLA_FLAGS before JAX initialises its backend, which makes GPU scatter-adds
(and so whole runs) reproducible at some speed cost; CPU runs are
deterministic without it (see `mmssl_jax.checkpointing`).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmssl_jax import checkpointing
from mmssl_jax import train
from mmssl_jax.data import DataError, print_error

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl "
                    "and checkpoints.")
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument "
    "(configs/tiktok.py:variant=wo_cl).", lock_config=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "(auto-detects TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for "
                    "jax.distributed (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's id.")
flags.mark_flags_as_required(["config", "workdir"])

DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"
# One-line `error: ...` and exit status 1 for these (never a traceback).
USER_ERRORS = (DataError, train.ConfigError, checkpointing.ConfigMismatchError,
               FloatingPointError, OSError)


def set_deterministic_xla_flags(environ=os.environ) -> bool:
  """Adds DETERMINISTIC_XLA_FLAG to XLA_FLAGS; True if the flag can work.

  XLA reads XLA_FLAGS once, when JAX initialises its backend (the first
  computation), so this must run before any JAX computation.
  """
  current = environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" not in current:
    environ["XLA_FLAGS"] = f"{current} {DETERMINISTIC_XLA_FLAG}".strip()
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return not xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return True


def _fail(message: str, status: int) -> None:
  print_error(message)
  sys.exit(status)


def _check_multiprocess_mesh(config) -> None:
  """Every process must own devices of the mesh (else it has no part in the
  sharded step): the mesh must span all devices of the job."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
  try:
    size = parallel.make_mesh(config).size
  except ValueError as e:
    _fail(str(e), 1)
  if size != jax.device_count():
    _fail(f"{jax.process_count()} processes need a mesh over all "
          f"{jax.device_count()} devices, this config's has {size}: pass "
          "--config.train.data_parallel=0 (all devices)", 1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  config = FLAGS.config
  if config.train.get("deterministic", False):
    if not set_deterministic_xla_flags():
      logging.warning("JAX was initialised before XLA_FLAGS was set: "
                      "train.deterministic has no effect")
  if FLAGS.distributed or FLAGS.coordinator_address:
    from mmssl_jax import multihost  # pylint: disable=g-import-not-at-top
    from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed(FLAGS.coordinator_address,
                                    FLAGS.num_processes, FLAGS.process_id)
    if multihost.process_count() > 1:
      _check_multiprocess_mesh(config)
      if not multihost.is_primary():
        # Process 0 writes the log; the others print warnings and errors.
        logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except checkpointing.Preempted as e:
    _fail(str(e), e.exit_code)
  except USER_ERRORS as e:
    _fail(str(e), 1)
  except KeyboardInterrupt:
    # SIGINT before the training loop, or a second one during a save.
    _fail("interrupted (SIGINT) away from a step boundary: nothing new was "
          "saved; run the same command again to resume from the last "
          "checkpoint, if any", 130)


def parse_flags(argv):
  """absl's parser, with a bad `--config.<field>=` override (misspelled
  field, wrong type) reported as one `error:` line, exit status 2 (usage)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections wraps its KeyError message in quotes with escapes.
    detail = str(e).replace("\\n", ". ").replace("\\'", "").strip("'\"")
    _fail(f"bad --config override: {' '.join(detail.split())}", 2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
