r"""MMSSL on Allrecipes with the authors' Allrecipes settings (§6.2).

  python -m mmssl_jax.main --config=configs/allrecipes.py \
      --config.data.dir=PATH/TO/allrecipes --workdir=/tmp/mmssl_allrecipes

Allrecipes is not in ../shared/data (the authors removed it from their drive).

Expected files in --config.data.dir: train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy.
Ablations: `configs/allrecipes.py:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`configs/allrecipes.py:variant=paper`;
LightGCN baseline: `configs/allrecipes.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.expected_files = "train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy"
  c.optim.lr = 0.00056
  c.critic.lr = 0.00025
  c.loss.g_rate = 0.0003
  c.loss.real_data_tau = 0.02
  c.graph_update.T = 2
  c.graph_update.m_topk_rate = 0.02
  c.loss.tau = 0.3
  c.model.id_cat_rate = 0.34
  return config_lib.apply_arg(c, arg)
