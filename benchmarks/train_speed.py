r"""Seconds per training iteration (after compilation), per epoch, peak RSS.

  python benchmarks/train_speed.py --config=configs/tiktok.py \
      --config.data.dir=../shared/data/tiktok --iters=10

Prints one JSON line. The step is one fused jitted function; to split it, the
same step is also timed with `loss.adversarial='none'` (no critic update, no
generator loss): `critic_and_generator_s` is the difference.
"""

import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from mmssl_jax import train

import results_io  # benchmarks/results_io.py (run as a script)

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Also write the JSON to this file.")
config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_integer("iters", 10, "Timed iterations.")
flags.DEFINE_bool("split", True, "Also time the step without the critic.")


def time_step(config, ds, iters):
  run = train.Run(config, ds)
  state = run.init_state()
  t0 = time.perf_counter()
  state, terms = run.step(state, jnp.int32(0), run.inputs)
  jax.block_until_ready(terms)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    state, terms = run.step(state, jnp.int32(i + 1), run.inputs)
    jax.block_until_ready(terms)
    times.append(time.perf_counter() - t0)
  times.sort()
  run.evaluate(state, "val")  # compiles
  t0 = time.perf_counter()
  run.evaluate(state, "val")  # returns host floats: includes the sync
  eval_s = time.perf_counter() - t0
  return dict(compile_s=compile_s, iter_s_median=times[len(times) // 2],
              iter_s_min=times[0], eval_val_s=eval_s,
              steps_per_epoch=run.steps_per_epoch)


def main(argv):
  del argv
  config = FLAGS.config
  ds = train.load_dataset(config.data)
  out = {"benchmark": "train_speed", "dataset": ds.name,
         "model": config.model.name, "variant": config.variant,
         "n_users": ds.n_users, "n_items": ds.n_items,
         "modalities": list(ds.modalities), "batch_size": config.train.batch_size,
         "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  full = time_step(config, ds, FLAGS.iters)
  out.update(full)
  out["epoch_s_estimate"] = full["iter_s_median"] * full["steps_per_epoch"]
  if FLAGS.split and config.model.name == "mmssl" and (
      config.loss.adversarial == "wgan"):
    no_critic = config.copy_and_resolve_references()
    with no_critic.unlocked():
      no_critic.loss.adversarial = "none"
    rec = time_step(no_critic, ds, FLAGS.iters)
    out["recommender_only_iter_s"] = rec["iter_s_median"]
    out["critic_and_generator_s"] = full["iter_s_median"] - rec["iter_s_median"]
  out["peak_rss_gib"] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 2**20
  results_io.emit(out, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
