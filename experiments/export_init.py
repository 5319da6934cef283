r"""Writes a run's initial recommender parameters as an npz for `torch_port.py --init_from`.

  python experiments/export_init.py --config=configs/tiktok.py \
      --config.data.dir=PATH/tiktok --out=/tmp/jax_init_2022.npz

Keys: user_id, item_id (U, d) / (I, d); w_self_attention_cat (H*d, d); and
per modality name, trans_<name>_kernel (d_m, d) and trans_<name>_bias (d,).
The port matches projections by name, so it keeps the released modality
order (image, audio) and its dropout draws. `torch_port.py --save_init`
writes the same keys; `train_from_init.py` trains our step from such a file.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from mmssl_jax import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=False)
_OUT = flags.DEFINE_string("out", None, "npz to write", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  ds = run_lib.load_dataset(config.data)
  state = run_lib.Run(config, ds).init_state()
  p = state.params
  out = {"user_id": np.asarray(p["user_id_embedding"]),
         "item_id": np.asarray(p["item_id_embedding"]),
         "w_self_attention_cat": np.asarray(p["w_self_attention_cat"])}
  for m in ds.modalities:
    out[f"trans_{m}_kernel"] = np.asarray(p["modality_proj"][m]["kernel"])
    out[f"trans_{m}_bias"] = np.asarray(p["modality_proj"][m]["bias"])
  np.savez(_OUT.value, **out)
  print(json.dumps({"out": _OUT.value, "modalities": list(ds.modalities),
                    "seed": config.seed}))


if __name__ == "__main__":
  sys.exit(app.run(main))
