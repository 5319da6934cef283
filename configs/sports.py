r"""MMSSL on Amazon-Sports with the authors' Sports settings (docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/sports.py --workdir=runs/sports

MMSSL needs at least one <modality>_feat.npy (image and text in the paper).

The dataset folder: --config.data.dir, else $MMSSL_DATA/sports, else
data/sports; variants, ablations and modalities as config arguments
(`sports.py:variant=paper,ablation=wo_cl`): `mmssl_jax/config_lib.py`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("sports")
  c.optim.lr = 0.0005
  c.loss.real_data_tau = 0.002
  c.graph_update.T = 2
  c.graph_update.m_topk_rate = 0.02
  return config_lib.apply_arg(c, arg)
