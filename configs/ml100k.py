r"""MMSSL on MovieLens-100K (text + genre features) with the Baby settings.

  python -m mmssl_jax.main --config=configs/ml100k.py --workdir=runs/ml100k

The released code was measured on this data with the Baby settings
(docs/fidelity.md); batch 1024 > 943 users, so batches are drawn with
replacement (docs/reference.md §4.2). `python -m mmssl_jax.data.prepare` builds
such a folder from the MovieLens files.

Data: the folder `--config.data.dir`, by default `$MMSSL_DATA/ml100k` when
MMSSL_DATA is set, else `data/ml100k` under the working directory; it holds
train.json, val.json, test.json (or <name>.inter, or trnMat.pkl, valMat.pkl,
tstMat.pkl) and <modality>_feat.npy files (README, "Data").
Variants: `configs/ml100k.py:variant=paper`, `:ablation=wo_asl|wo_cl|wo_gt|rp_gae`,
`:model=lightgcn`, `:modalities=image+text` (combine with commas).
"""

from mmssl_jax import config_lib


def get_config(arg=None):
  c = config_lib.dataset_config("ml100k")
  return config_lib.apply_arg(c, arg)
