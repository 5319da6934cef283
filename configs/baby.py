r"""MMSSL on Amazon-Baby with the authors' Baby settings (the released defaults,
docs/reference.md §6.2).

  python -m mmssl_jax.main --config=configs/baby.py --workdir=runs/baby

Baby's m_topk_rate 1e-4 gives k = 0: regenerated modality graphs are empty
(docs/reference.md §4.4). MMSSL needs at least one <modality>_feat.npy.

Data: the folder `--config.data.dir`, by default `$MMSSL_DATA/baby` when
MMSSL_DATA is set, else `data/baby` under the working directory; it holds
train.json, val.json, test.json (or <name>.inter, or trnMat.pkl, valMat.pkl,
tstMat.pkl) and <modality>_feat.npy files (README, "Data").
Variants: `configs/baby.py:variant=paper`, `:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`:model=lightgcn`, `:modalities=image+text` (combine with commas).
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("baby")
  return config_lib.apply_arg(c, arg)
