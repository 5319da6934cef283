r"""Train and evaluate MMSSL (or the LightGCN baseline) from a config file.

  python -m mmssl_jax.main --config=configs/default.py --workdir=/tmp/mmssl
  python -m mmssl_jax.main --config=configs/tiktok.py:variant=wo_cl \
      --config.data.dir=../shared/data/tiktok --workdir=/tmp/tiktok_wo_cl

Kept short on purpose: the logic lives in `mmssl_jax.train`. Problems with the
input data or the workdir are printed as one line (`error: ...`) and the
process exits with status 1 without a traceback.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmssl_jax import train
from mmssl_jax.data import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl "
                    "and checkpoints.")
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument "
    "(configs/tiktok.py:variant=wo_cl).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (DataError, FileExistsError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
