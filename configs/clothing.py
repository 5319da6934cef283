r"""MMSSL on Amazon-Clothing with the released defaults (no settings were published).

  python -m mmssl_jax.main --config=configs/clothing.py --workdir=runs/clothing

Clothing is named in the released code's options only.

Data: the folder `--config.data.dir`, by default `$MMSSL_DATA/clothing` when
MMSSL_DATA is set, else `data/clothing` under the working directory; it holds
train.json, val.json, test.json (or <name>.inter, or trnMat.pkl, valMat.pkl,
tstMat.pkl) and <modality>_feat.npy files (README, "Data").
Variants: `configs/clothing.py:variant=paper`, `:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`:model=lightgcn`, `:modalities=image+text` (combine with commas).
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("clothing")
  return config_lib.apply_arg(c, arg)
