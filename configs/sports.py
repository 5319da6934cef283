r"""MMSSL on Amazon-Sports with the authors' Sports settings (docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/sports.py --workdir=runs/sports

MMSSL needs at least one <modality>_feat.npy (image and text in the paper).

Data: the folder `--config.data.dir`, by default `$MMSSL_DATA/sports` when
MMSSL_DATA is set, else `data/sports` under the working directory; it holds
train.json, val.json, test.json (or <name>.inter, or trnMat.pkl, valMat.pkl,
tstMat.pkl) and <modality>_feat.npy files (README, "Data").
Variants: `configs/sports.py:variant=paper`, `:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`:model=lightgcn`, `:modalities=image+text` (combine with commas).
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("sports")
  c.optim.lr = 0.0005
  c.loss.real_data_tau = 0.002
  c.graph_update.T = 2
  c.graph_update.m_topk_rate = 0.02
  return config_lib.apply_arg(c, arg)
