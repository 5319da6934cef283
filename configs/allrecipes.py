r"""MMSSL on Allrecipes with the authors' Allrecipes settings (docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/allrecipes.py --workdir=runs/allrecipes

The released code's authors no longer distribute this dataset.

The dataset folder: --config.data.dir, else $MMSSL_DATA/allrecipes, else
data/allrecipes; variants, ablations and modalities as config arguments
(`allrecipes.py:variant=paper,ablation=wo_cl`): `mmssl_jax/config_lib.py`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("allrecipes")
  c.optim.lr = 0.00056
  c.critic.lr = 0.00025
  c.loss.g_rate = 0.0003
  c.loss.real_data_tau = 0.02
  c.graph_update.T = 2
  c.graph_update.m_topk_rate = 0.02
  c.loss.tau = 0.3
  c.model.id_cat_rate = 0.34
  return config_lib.apply_arg(c, arg)
