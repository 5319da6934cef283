r"""MMSSL on TikTok with the authors' TikTok settings (docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/tiktok.py --workdir=runs/tiktok

TikTok as MMSSL distributes it has image (visual), audio (acoustic) and text
features; every *_feat.npy in the folder is used unless `modalities=` names some.

Data: the folder `--config.data.dir`, by default `$MMSSL_DATA/tiktok` when
MMSSL_DATA is set, else `data/tiktok` under the working directory; it holds
train.json, val.json, test.json (or <name>.inter, or trnMat.pkl, valMat.pkl,
tstMat.pkl) and <modality>_feat.npy files (README, "Data").
Variants: `configs/tiktok.py:variant=paper`, `:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`:model=lightgcn`, `:modalities=image+audio` (combine with commas).
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
