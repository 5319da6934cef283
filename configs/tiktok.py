r"""MMSSL on TikTok with the authors' TikTok settings (§6.2).

  python -m mmssl_jax.main --config=configs/tiktok.py \
      --config.data.dir=PATH/TO/tiktok --workdir=/tmp/mmssl_tiktok

The shared TikTok folder has image and audio features (text is missing);
both are used (every *_feat.npy, sorted: audio, image).

Expected files in --config.data.dir: train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy.
Ablations: `configs/tiktok.py:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`configs/tiktok.py:variant=paper`;
LightGCN baseline: `configs/tiktok.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.expected_files = "train.json, val.json, test.json (or trnMat.pkl/valMat.pkl/tstMat.pkl, or <name>.inter) and <modality>_feat.npy"
  c.optim.lr = 0.00054
  c.loss.g_rate = 0.0018
  c.loss.real_data_tau = 0.002
  c.graph_update.T = 1
  c.graph_update.m_topk_rate = 0.01
  return config_lib.apply_arg(c, arg)
