r"""MMSSL on Amazon-Sports with the authors' Sports settings (§6.2).

  python -m mmssl_jax.main --config=configs/sports.py \
      --config.data.dir=PATH/TO/amazon_sports --workdir=/tmp/mmssl_sports

The shared folder has no features; supply image_feat.npy/text_feat.npy.

Expected files in --config.data.dir: train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy.
Ablations: `configs/sports.py:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`configs/sports.py:variant=paper`;
LightGCN baseline: `configs/sports.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.expected_files = "train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy"
  c.optim.lr = 0.0005
  c.loss.real_data_tau = 0.002
  c.graph_update.T = 2
  c.graph_update.m_topk_rate = 0.02
  return config_lib.apply_arg(c, arg)
