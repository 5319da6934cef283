r"""MMSSL on TikTok with the authors' TikTok settings (docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/tiktok.py --workdir=runs/tiktok

TikTok as MMSSL distributes it has image (visual), audio (acoustic) and text
features; every *_feat.npy in the folder is used unless `modalities=` names some.

The dataset folder: --config.data.dir, else $MMSSL_DATA/tiktok, else
data/tiktok; variants, ablations and modalities as config arguments
(`tiktok.py:variant=paper,ablation=wo_cl`): `mmssl_jax/config_lib.py`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("tiktok")
  c.optim.lr = 0.00054
  c.loss.g_rate = 0.0018
  c.loss.real_data_tau = 0.002
  c.graph_update.T = 1
  c.graph_update.m_topk_rate = 0.01
  return config_lib.apply_arg(c, arg)
