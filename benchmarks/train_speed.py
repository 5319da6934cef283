r"""Seconds per training iteration (after compilation), per epoch, peak RSS.

  python benchmarks/train_speed.py --config=configs/tiktok.py \
      --config.data.dir=PATH/tiktok --iters=10

Prints one JSON line. The step is one fused jitted function; to split it, the
same step is also timed with `loss.adversarial='none'` (no critic update, no
generator loss): `critic_and_generator_s` is the difference.

A dataset folder without item features (such as Amazon-Sports) can
be timed with seeded N(0, 1) float32 features of given dimensions; the JSON
then names them under `synthetic_features` (they are not real features, so
only the timings mean anything):

  python benchmarks/train_speed.py --config=configs/sports.py \
      --config.data.dir=PATH/amazon_sports \
      --synthetic_features=image:4096,text:1024 --full_epoch --nosplit

`--full_epoch` also runs one whole epoch (steps_per_epoch steps, as
`run_lib.Run.train_epoch` does) and reports its wall time as `epoch_s`;
`--max_epoch_s` (or `--deadline_s`, counted from the script's start) stops
it early (`epoch_complete: false`, `epoch_s` then extrapolated from the
steps done). `device_peak_gib` is the device
allocator's peak (`jax.Device.memory_stats`; absent on CPU).
"""

import json
import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mmssl_jax import run as run_lib

import results_io  # benchmarks/results_io.py (run as a script)
from synthetic_features import add_synthetic_features
from synthetic_features import parse_feature_spec

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Also write the JSON to this file.")
config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_integer("iters", 10, "Timed iterations.")
flags.DEFINE_bool("split", True, "Also time the step without the critic.")
flags.DEFINE_list("synthetic_features", [],
                  "name:dim,... seeded N(0,1) float32 item features added to "
                  "the loaded dataset (replacing a real modality of that name).")
flags.DEFINE_integer("synthetic_seed", 0, "Seed of --synthetic_features.")
flags.DEFINE_bool("full_epoch", False,
                  "Also time one full epoch (steps_per_epoch steps).")
flags.DEFINE_float("max_epoch_s", 0.0,
                   "With --full_epoch: stop the epoch after this many seconds "
                   "(0: no limit) and extrapolate.")
flags.DEFINE_float("deadline_s", 0.0,
                   "With --full_epoch: also stop the epoch once this many "
                   "seconds have passed since the script started (0: none); "
                   "for callers that kill it at a fixed time.")
flags.DEFINE_string("label", "", "A name for this run, copied into the JSON.")
flags.DEFINE_bool("progress", False,
                  "Also print the numbers so far as JSON lines with "
                  '"partial": true (after the timed iterations and the epoch), '
                  "for callers that may kill the script.")

_START = time.perf_counter()


def device_info() -> dict:
  """Kind, platform, count and allocator peak of the first local device."""
  dev = jax.devices()[0]
  out = {"device_kind": str(dev.device_kind), "device_platform": dev.platform,
         "device_count": jax.device_count()}
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
  if "bytes_limit" in stats:
    out["device_limit_gib"] = round(stats["bytes_limit"] / 2**30, 3)
  return out


def time_epoch(run, state, max_s: float = 0.0, stop_at: float = 0.0):
  """Wall time of one epoch of steps, dispatched as `Run.train_epoch` does.

  With a limit (`max_s` seconds of epoch, or `stop_at` on the
  `time.perf_counter` clock; 0: none) the loop waits for the device after
  steps 1, 2, 4, 8, 16 and then every 16 steps, only to check it; without
  one it never waits. The loss terms are fetched at the end, as
  train_epoch does.
  """
  history = []
  t0 = time.perf_counter()
  limit = min(t0 + max_s if max_s else float("inf"),
              stop_at if stop_at else float("inf"))
  done = 0
  for idx in range(run.steps_per_epoch):
    state, terms = run.step(state, jnp.int32(idx), run.inputs)
    history.append(terms)
    done = idx + 1
    if (limit < float("inf") and done < run.steps_per_epoch
        and (done % 16 == 0 or done in (1, 2, 4, 8))):
      jax.block_until_ready(terms)
      if time.perf_counter() > limit:
        break
  history = jax.device_get(history)
  elapsed = time.perf_counter() - t0
  finite = all(bool(np.all(np.isfinite(v))) for h in history
               for v in h.values())
  complete = done == run.steps_per_epoch
  return state, dict(
      epoch_steps_done=done, epoch_complete=complete,
      epoch_s=elapsed if complete else elapsed * run.steps_per_epoch / done,
      epoch_wall_s=elapsed, epoch_losses_finite=finite)


def time_step(config, ds, iters, full_epoch=False, max_epoch_s=0.0,
              epoch_stop_at=0.0, progress=None):
  """Compile, per-iteration, optional full-epoch and eval times of a Run.

  `progress(partial_dict)`, if given, is called with the numbers so far
  after the timed iterations and after the epoch.
  """
  t0 = time.perf_counter()
  run = run_lib.Run(config, ds)
  state = run.init_state()
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t0
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
  out = dict(fused_generator=run.step_config.fused,
             setup_s=setup_s, compile_s=compile_s,
             iter_s_median=times[len(times) // 2], iter_s_min=times[0],
             iters=iters, steps_per_epoch=run.steps_per_epoch)
  if progress:
    progress(out)
  if full_epoch:
    state, epoch = time_epoch(run, state, max_epoch_s, epoch_stop_at)
    out.update(epoch)
    if progress:
      progress(out)
  run.evaluate(state, "val")  # compiles
  t0 = time.perf_counter()
  run.evaluate(state, "val")  # returns host floats: includes the sync
  out["eval_val_s"] = time.perf_counter() - t0
  return out


def main(argv):
  del argv
  config = FLAGS.config
  ds = run_lib.load_dataset(config.data)
  out = {"benchmark": "train_speed"}
  if FLAGS.label:
    out["label"] = FLAGS.label
  synthetic = parse_feature_spec(FLAGS.synthetic_features)
  if synthetic:
    ds, replaced = add_synthetic_features(ds, synthetic, FLAGS.synthetic_seed)
    out["synthetic_features"] = synthetic
    out["synthetic_features_note"] = (
        f"seeded N(0,1) float32 features (seed {FLAGS.synthetic_seed}), not "
        "real item features: timings only")
    if replaced:
      out["replaced_real_features"] = replaced
  out.update({"dataset": ds.name,
              "model": config.model.name, "variant": config.variant,
              "critic_kind": config.critic.kind,
              "generator_block": config.train.generator_block,
              "n_users": ds.n_users, "n_items": ds.n_items,
              "n_train": len(ds.train),
              "modalities": list(ds.modalities),
              "modality_dims": ds.modality_dims,
              "batch_size": config.train.batch_size,
              "device": str(jax.devices()[0].device_kind),
              "jax": jax.__version__})
  def progress(partial):
    print(json.dumps({**out, **partial, **device_info(), "partial": True}),
          flush=True)

  full = time_step(config, ds, FLAGS.iters, FLAGS.full_epoch,
                   FLAGS.max_epoch_s,
                   _START + FLAGS.deadline_s if FLAGS.deadline_s else 0.0,
                   progress if FLAGS.progress else None)
  out.update(full)
  out["epoch_s_estimate"] = full["iter_s_median"] * full["steps_per_epoch"]
  out["device_peak_gib_main"] = device_info().get("device_peak_gib")
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
  out.update(device_info())
  results_io.emit(out, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
