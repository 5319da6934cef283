r"""MMSSL on Amazon-Clothing with the HEAD defaults (no author settings exist).

  python -m mmssl_jax.main --config=configs/clothing.py \
      --config.data.dir=PATH/TO/clothing --workdir=/tmp/mmssl_clothing

Clothing is listed in the released parser help only; no settings were published.

Expected files in --config.data.dir: train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy.
Ablations: `configs/clothing.py:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`configs/clothing.py:variant=paper`;
LightGCN baseline: `configs/clothing.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.expected_files = "train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy"
  return config_lib.apply_arg(c, arg)
