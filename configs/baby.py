r"""MMSSL on Amazon-Baby with the authors' Baby settings (the released defaults,
docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/baby.py --workdir=runs/baby

Baby's m_topk_rate 1e-4 gives k = 0: regenerated modality graphs are empty
(docs/reference.md §4.4). MMSSL needs at least one <modality>_feat.npy.

The dataset folder: --config.data.dir, else $MMSSL_DATA/baby, else
data/baby; variants, ablations and modalities as config arguments
(`baby.py:variant=paper,ablation=wo_cl`): `mmssl_jax/config_lib.py`.
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("baby")
  return config_lib.apply_arg(c, arg)
