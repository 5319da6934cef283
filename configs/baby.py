r"""MMSSL on Amazon-Baby with the authors' Baby settings (= HEAD defaults, §6.2).

  python -m mmssl_jax.main --config=configs/baby.py \
      --config.data.dir=PATH/TO/amazon_baby --workdir=/tmp/mmssl_baby

Baby's m_topk_rate 1e-4 gives k = 0: regenerated modality graphs are empty (§4.4).
The shared folder has no features; supply image_feat.npy/text_feat.npy.

Expected files in --config.data.dir: train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy.
Ablations: `configs/baby.py:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`configs/baby.py:variant=paper`;
LightGCN baseline: `configs/baby.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.expected_files = "train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy"
  return config_lib.apply_arg(c, arg)
