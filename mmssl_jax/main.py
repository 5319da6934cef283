r"""Train and evaluate MMSSL (or the LightGCN baseline) from a config file.

  python -m mmssl_jax.main --config=configs/default.py --workdir=/tmp/mmssl
  python -m mmssl_jax.main --config=configs/tiktok.py:ablation=wo_cl \
      --config.data.dir=PATH/tiktok --workdir=/tmp/tiktok_wo_cl

Re-running the same command with the same --workdir resumes from the latest
checkpoint; a workdir holding a complete run prints its stored result and
exits 0. Exit status: 0 done; 1 bad data, config or workdir, a non-finite
loss, or an OS error (one line `error: ...`, no traceback); 143 (130)
stopped by SIGTERM (SIGINT) after saving a checkpoint; 2 a bad flag.
Multi-process runs: every process runs the same command with
`--config.train.data_parallel=0` and `--distributed` or the coordinator
flags (`launch/`, `mmssl_jax.multihost`).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmssl_jax import multihost
from mmssl_jax import preemption
from mmssl_jax import run as run_lib
from mmssl_jax import train
from mmssl_jax import workdir as workdir_lib
from mmssl_jax.data import DataError, print_error

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl "
                    "and checkpoints.")
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument "
    "(configs/tiktok.py:ablation=wo_cl).", lock_config=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "(auto-detects TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for "
                    "jax.distributed (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's id.")
flags.mark_flags_as_required(["config", "workdir"])

DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"
# One-line `error: ...` and exit status 1 for these (never a traceback).
USER_ERRORS = (DataError, run_lib.ConfigError,
               workdir_lib.ConfigMismatchError, FloatingPointError, OSError)


def set_deterministic_xla_flags(environ=os.environ) -> None:
  """Adds DETERMINISTIC_XLA_FLAG to XLA_FLAGS, which XLA reads when JAX
  starts its backend: `main` calls it before any JAX computation."""
  current = environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" not in current:
    environ["XLA_FLAGS"] = f"{current} {DETERMINISTIC_XLA_FLAG}".strip()


def _fail(message: str, status: int) -> None:
  print_error(message)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  config = FLAGS.config
  if config.train.deterministic:
    set_deterministic_xla_flags()
  if FLAGS.distributed or FLAGS.coordinator_address:
    try:
      multihost.initialize(config, FLAGS.coordinator_address,
                           FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
      _fail(str(e), 1)
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except preemption.Preempted as e:
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
