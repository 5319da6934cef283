r"""MMSSL on MovieLens-100K (text + genre) with the Baby settings.

  python -m mmssl_jax.main --config=configs/ml100k.py \
      --config.data.dir=PATH/TO/ml100k --workdir=/tmp/mmssl_ml100k

The released code was measured on this data with the Baby settings (anchors.md);
batch 1024 > 943 users, so batches are drawn with replacement (§4.2).

Expected files in --config.data.dir: train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy.
Ablations: `configs/ml100k.py:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`configs/ml100k.py:variant=paper`;
LightGCN baseline: `configs/ml100k.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.expected_files = "train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy"
  return config_lib.apply_arg(c, arg)
