r"""Tiny end-to-end configuration for tests (seconds on a CPU).

  python -m mmssl_jax.main --config=configs/test.py --workdir=/tmp/mmssl_test
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.data.source = "synthetic"
  s = c.data.synthetic
  s.n_users, s.n_items, s.n_factors, s.mean_interactions = 120, 90, 4, 8
  s.modality_dims = {"image": 12, "text": 8}
  s.modality_noise = {"image": 0.5, "text": 1.0}
  c.model.embed_size = 16
  c.train.batch_size = 32
  c.train.epochs = 2
  c.graph_update.m_topk_rate = 0.05  # k = 4
  c.eval.ks = (5, 10, 20)
  c.eval.block_users = 32
  return config_lib.apply_arg(c, arg)
