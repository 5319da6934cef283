r"""Scores saved final embeddings with `mmssl_jax.evaluation` (§5), e.g. the port's.

  /tmp/torchenv/bin/python experiments/torch_port.py --data=PATH/tiktok \
      --epochs=1 --save=/tmp/port_emb.npz
  python experiments/score_embeddings.py --config=configs/tiktok.py \
      --config.data.dir=PATH/tiktok --embeddings=/tmp/port_emb.npz

`--embeddings` holds `user` (U, d) and `item` (I, d). The validation and test
sets are built as a run of `--config` builds them (training items excluded;
validation items too when `eval.exclude_val_in_test`). Prints JSON with
Recall@20, NDCG@20 in both definitions, for both splits, to compare with the
port's own numpy evaluator.
"""

import json
import sys

from absl import app
from absl import flags
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mmssl_jax import evaluation
from mmssl_jax import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=False)
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "npz with user, item", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  ds = run_lib.load_dataset(config.data)
  z = np.load(_EMBEDDINGS.value)
  user, item = z["user"], z["item"]
  if user.shape[0] != ds.n_users or item.shape[0] != ds.n_items:
    raise ValueError(f"{_EMBEDDINGS.value}: {user.shape[0]} users x {item.shape[0]} items, "
                     f"the dataset has {ds.n_users} x {ds.n_items}")
  out = {"embeddings": _EMBEDDINGS.value}
  exclude = {"val": [ds.train],
             "test": [ds.train, ds.val] if config.eval.exclude_val_in_test else [ds.train]}
  for split, target in (("val", ds.val), ("test", ds.test)):
    eval_set = evaluation.build_eval_set(target=target, exclude=exclude[split],
                                         n_users=ds.n_users, n_items=ds.n_items,
                                         block_users=config.eval.block_users)
    metrics = evaluation.evaluate(jnp.asarray(user), jnp.asarray(item), eval_set, ks=(20,))
    out.update({f"{split}_{k}": round(float(v), 5) for k, v in metrics.items()})
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(app.run(main))
