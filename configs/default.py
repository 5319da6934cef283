r"""MMSSL (reference variant) on the embedded synthetic multi-modal dataset.

  python -m mmssl_jax.main --config=configs/default.py --workdir=/tmp/mmssl_default

Needs no downloads: the data is generated in memory from a seed
(`mmssl_jax/data/synthetic.py`). Ablations: `configs/default.py:ablation=wo_cl`, the paper variant:
`configs/default.py:variant=paper`,
the LightGCN baseline: `configs/default.py:model=lightgcn`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.source = "synthetic"
  c.train.batch_size = 512
  c.train.epochs = 20
  c.optim.lr = 2e-3
  c.graph_update.m_topk_rate = 0.01  # k = 8 on 800 items
  c.loss.g_rate = 1e-3
  c.loss.real_data_tau = 0.002
  c.eval.patience = 5
  return config_lib.apply_arg(c, arg)
