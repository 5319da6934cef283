r"""How popularity-like a trained run's rankings are (the first-epoch audit).

  python -m mmssl_jax.export --workdir=RUN --output=RUN_export
  python experiments/popularity_bias.py --export=RUN_export \
      --data_dir=PATH/tiktok

Ranks every item not in a user's training list by the exported scores
(user_embeddings @ item_embeddings.T; `evaluation.evaluate` and
`evaluation.topk_items`, so ties go to the lower item id) and, for the
validation and test users, prints one JSON line with:

* `recall@20` of the run and of item popularity (training degree), and the
  ratio validation / test of each (a popularity ranker has its own ratio);
* `pop_overlap@20`: the mean share of a user's top 20 that is also in the
  popularity top 20 (both with training items excluded);
* `mean_log_degree@20`: the mean log(1 + training degree) of the top 20;
* `item_score_spearman`: the rank correlation over items of the mean score
  (over all users) with the training degree (ties get average ranks).

For an MMSSL export (with `feat_user_<m>.npy`), the same for the two parts
of the final vectors (the reference description's §2.3 g): `id_part` ranks by
ū·ī, with ū = u* - c Σ_m n(H^m_U) and c the run's `model.model_cat_rate`
(from the export's manifest; `--model_cat_rate` overrides it), and
`feature_part` by Σ_m n(H^m_U) · Σ_m n(H^m_I).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import numpy as np
import scipy.stats

from mmssl_jax import config_lib
from mmssl_jax import evaluation
from mmssl_jax import run as run_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("export", None, "Folder written by mmssl_jax.export.")
flags.DEFINE_string("data_dir", None, "The run's dataset folder.")
flags.DEFINE_integer("k", 20, "Cut-off.")
flags.DEFINE_float("model_cat_rate", None,
                   "c of u* = ū + c Σ n(H^m_U); default: the exported run's "
                   "model.model_cat_rate (manifest.json).")
flags.DEFINE_string("output", None, "Also write the JSON to this file.")


def _top_items(user_emb, item_emb, eval_set, k: int) -> np.ndarray:
  """(evaluated users, k) best unexcluded items (`evaluation.topk_items`)."""
  blocks = [np.asarray(evaluation.topk_items(user_emb, item_emb, users,
                                             exclude, k)[1])[valid]
            for users, exclude, valid in zip(eval_set.users, eval_set.exclude,
                                             eval_set.valid)]
  return np.concatenate(blocks)


def audit(user_emb, item_emb, ds, k: int) -> dict:
  degree = np.bincount(ds.train.items, minlength=ds.n_items).astype(
      np.float32)
  popularity = (np.ones((ds.n_users, 1), np.float32), degree[:, None])
  out = {"item_score_spearman": float(scipy.stats.spearmanr(
      user_emb.mean(0) @ item_emb.T, degree).statistic)}
  for name, split in (("val", ds.val), ("test", ds.test)):
    eval_set = evaluation.build_eval_set(target=split, exclude=[ds.train],
                                         n_users=ds.n_users,
                                         n_items=ds.n_items)
    recall = lambda u, i: evaluation.evaluate(u, i, eval_set,
                                              ks=(k,))[f"recall@{k}"]
    run_top = _top_items(user_emb, item_emb, eval_set, k)
    pop_top = _top_items(*popularity, eval_set, k)
    out[name] = {
        "users": int(eval_set.n_users),
        f"recall@{k}": recall(user_emb, item_emb),
        f"popularity_recall@{k}": recall(*popularity),
        f"pop_overlap@{k}": float(np.mean(
            [len(np.intersect1d(a, b)) / k for a, b in zip(run_top, pop_top)])),
        f"mean_log_degree@{k}": float(np.log1p(degree[run_top]).mean()),
    }
  for key in (f"recall@{k}", f"popularity_recall@{k}"):
    out[f"val_over_test_{key}"] = out["val"][key] / out["test"][key]
  return out


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def model_cat_rate(manifest: dict, export: str,
                   given: float | None) -> float | None:
  """c of §2.3 g: `given` (--model_cat_rate), else the exported run's own."""
  if given is not None:
    return given
  c = manifest.get("model", {}).get("model_cat_rate")
  if c is None and manifest.get("modalities"):
    raise app.UsageError(
        f"{os.path.join(export, 'manifest.json')}: no model.model_cat_rate "
        "(an export of an older version); pass --model_cat_rate")
  return c


def parts(export: str, manifest: dict, user, item, c: float) -> dict:
  """(user, item) arrays of the ID part and of the feature part."""
  mods = manifest.get("modalities") or []
  if not mods or not all(os.path.exists(
      os.path.join(export, f"feat_user_{m}.npy")) for m in mods):
    return {}
  load = lambda name: _normalise(np.load(os.path.join(export, name)))
  feat_user = sum(load(f"feat_user_{m}.npy") for m in mods)
  feat_item = sum(load(f"feat_item_{m}.npy") for m in mods)
  return {"id_part": (user - c * feat_user, item - c * feat_item),
          "feature_part": (feat_user, feat_item)}


def main(argv):
  del argv
  manifest = json.load(open(os.path.join(FLAGS.export, "manifest.json"),
                            encoding="utf-8"))
  config = config_lib.base_config()
  config.data.source = "folder"
  config.data.dir = FLAGS.data_dir
  ds = run_lib.load_dataset(config.data)
  user = np.load(os.path.join(FLAGS.export, "user_embeddings.npy"))
  item = np.load(os.path.join(FLAGS.export, "item_embeddings.npy"))
  out = {"benchmark": "popularity_bias", "export": FLAGS.export,
         "checkpoint": manifest.get("checkpoint"), "data": FLAGS.data_dir,
         **audit(user, item, ds, FLAGS.k)}
  for name, (u, i) in parts(FLAGS.export, manifest, user, item,
                            model_cat_rate(manifest, FLAGS.export,
                                           FLAGS.model_cat_rate)).items():
    out[name] = audit(u, i, ds, FLAGS.k)
  line = json.dumps(out)
  print(line)
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  flags.mark_flags_as_required(["export", "data_dir"])
  app.run(main)
