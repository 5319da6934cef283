r"""MMSSL on Amazon-Clothing with the released defaults (no settings were published).

  python -m mmssl_jax.main --config=configs/clothing.py --workdir=runs/clothing

Clothing is named in the released code's options only.

The dataset folder: --config.data.dir, else $MMSSL_DATA/clothing, else
data/clothing; variants, ablations and modalities as config arguments
(`clothing.py:variant=paper,ablation=wo_cl`): `mmssl_jax/config_lib.py`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("clothing")
  return config_lib.apply_arg(c, arg)
