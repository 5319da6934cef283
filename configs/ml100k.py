r"""MMSSL on MovieLens-100K (text + genre features) with the Baby settings.

  python -m mmssl_jax.main --config=configs/ml100k.py --workdir=runs/ml100k

The released code was measured on this data with the Baby settings
(docs/fidelity.md); batch 1024 > 943 users, so batches are drawn with
replacement (docs/reference.md §4.2). `python -m mmssl_jax.data.prepare` builds
such a folder from the MovieLens files.

The dataset folder: --config.data.dir, else $MMSSL_DATA/ml100k, else
data/ml100k; variants, ablations and modalities as config arguments
(`ml100k.py:variant=paper,ablation=wo_cl`): `mmssl_jax/config_lib.py`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("ml100k")
  return config_lib.apply_arg(c, arg)
