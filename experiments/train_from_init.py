r"""Trains our JAX step from an exported initial parameter file: the reverse init swap.

  python experiments/train_from_init.py --config=configs/tiktok.py \
      --config.data.dir=PATH/tiktok \
      --init_from=/tmp/torch_init_2022.npz --epochs=1

`--init_from` takes the keys `export_init.py` writes and `torch_port.py
--save_init` writes (user_id, item_id, w_self_attention_cat,
trans_<modality>_kernel and trans_<modality>_bias); it replaces those
recommender parameters of the seed's state and keeps everything else of it
(critic init, optimiser state, dropout and sampler keys). With the port's own
init this says whether our step, given the torch draw, reaches what the port
reaches from it. Prints one JSON line per epoch: validation and test Recall@20
and NDCG@20 (both definitions), mean loss terms and seconds.
"""

import json
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mmssl_jax import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=False)
_INIT_FROM = flags.DEFINE_string("init_from", None, "npz of initial parameters", required=True)
_EPOCHS = flags.DEFINE_integer("epochs", 1, "epochs to train")


def load_params(params, path: str, modalities):
  """Returns `params` with the exported groups replaced; checks every shape."""
  z = np.load(path)
  out = dict(params, user_id_embedding=z["user_id"], item_id_embedding=z["item_id"],
             w_self_attention_cat=z["w_self_attention_cat"])
  out["modality_proj"] = {m: dict(params["modality_proj"][m], kernel=z[f"trans_{m}_kernel"],
                                  bias=z[f"trans_{m}_bias"]) for m in modalities}

  def cast(keypath, like, got):
    if np.shape(like) != np.shape(got):
      raise ValueError(f"{path}: {jax.tree_util.keystr(keypath)} has shape "
                       f"{np.shape(got)}, the model wants {np.shape(like)}")
    return jnp.asarray(got, dtype=like.dtype)

  return jax.tree_util.tree_map_with_path(cast, params, out)


def main(argv):
  del argv
  config = _CONFIG.value
  ds = run_lib.load_dataset(config.data)
  run_lib.check_config(config, ds)
  modalities = list(ds.modalities)
  run = run_lib.Run(config, ds)
  del ds
  state = run.init_state()
  state = state._replace(params=load_params(state.params, _INIT_FROM.value, modalities))
  run.compile_step(state)
  for epoch in range(_EPOCHS.value):
    t0 = time.perf_counter()
    state, terms = run.train_epoch(state)
    train_s = time.perf_counter() - t0
    val, test = run.evaluate(state, "val"), run.evaluate(state, "test")
    print(json.dumps({"epoch": epoch, "seed": config.seed, "init_from": _INIT_FROM.value,
                      "val_recall@20": round(val["recall@20"], 5),
                      "val_ndcg_mmssl@20": round(val["ndcg_mmssl@20"], 5),
                      "test_recall@20": round(test["recall@20"], 5),
                      "test_ndcg_mmssl@20": round(test["ndcg_mmssl@20"], 5),
                      "test_ndcg@20": round(test["ndcg@20"], 5),
                      "train_s": round(train_s, 1),
                      **{f"mean_{k}": round(float(v), 6) for k, v in terms.items()}}),
          flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
