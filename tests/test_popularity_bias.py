"""experiments/popularity_bias.py: hand-built rankings with known overlap,
recall and rank correlation."""

import sys

from absl import app
import numpy as np
import pytest

import helpers
from mmssl_jax.data.dataset import Dataset, Split

sys.path.insert(0, str(helpers.REPO_ROOT / "experiments"))
import popularity_bias  # pylint: disable=g-import-not-at-top,wrong-import-position


def _dataset():
  # 4 users, 6 items; training degrees of items 0..5: 3, 2, 2, 1, 0, 0.
  train = Split([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 2, 0, 3, 1, 2])
  val = Split([0, 1], [2, 5])
  test = Split([0, 1, 2, 3], [4, 1, 1, 0])
  return Dataset(name="t", n_users=4, n_items=6, train=train, val=val,
                 test=test)


def test_popularity_scores_overlap_fully_and_correlate_perfectly():
  ds = _dataset()
  degree = np.array([3, 2, 2, 1, 0, 0], float)
  user = np.ones((4, 1))
  item = degree[:, None]
  out = popularity_bias.audit(user, item, ds, k=2)
  assert np.isclose(out["item_score_spearman"], 1.0)
  for split in ("val", "test"):
    assert out[split]["pop_overlap@2"] == 1.0
    assert out[split]["recall@2"] == out[split]["popularity_recall@2"]
  # Top 2 without training items: user 0 -> {2, 3}, user 1 -> {1, 3},
  # user 2 -> {1, 2}, user 3 -> {0, 3}. Val: user 0 hits 2, user 1 misses 5.
  assert out["val"]["recall@2"] == 0.5
  # Test: user 0 misses 4; users 1, 2, 3 hit 1, 1, 0.
  assert out["test"]["recall@2"] == 0.75
  assert np.isclose(out["val_over_test_recall@2"], 0.5 / 0.75)
  assert np.isclose(out["val"]["mean_log_degree@2"],
                    np.mean(np.log1p([2, 1, 2, 1])))


def test_anti_popular_scores_have_no_overlap_and_negative_correlation():
  ds = _dataset()
  item = -np.array([3, 2, 2, 1, 0, 0], float)[:, None]
  out = popularity_bias.audit(np.ones((4, 1)), item, ds, k=2)
  assert np.isclose(out["item_score_spearman"], -1.0)
  # Users 0 and 1: run top {4, 5}, popularity tops {2, 3} and {1, 3}.
  assert out["val"]["pop_overlap@2"] == 0.0
  assert out["val"]["recall@2"] == 0.5  # user 1 hits its val item 5


def test_parts_split_the_final_vectors_into_id_and_feature_terms(tmp_path):
  rng = np.random.default_rng(0)
  id_user, id_item = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
  feats = {m: (rng.normal(size=(4, 3)), rng.normal(size=(6, 3)))
           for m in ("audio", "image")}
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  for m, (fu, fi) in feats.items():
    np.save(tmp_path / f"feat_user_{m}.npy", fu)
    np.save(tmp_path / f"feat_item_{m}.npy", fi)
  feat_user = sum(unit(fu) for fu, _ in feats.values())
  feat_item = sum(unit(fi) for _, fi in feats.values())
  user, item = id_user + 0.55 * feat_user, id_item + 0.55 * feat_item
  out = popularity_bias.parts(str(tmp_path), {"modalities": list(feats)},
                              user, item, 0.55)
  np.testing.assert_allclose(out["id_part"][0], id_user, atol=1e-12)
  np.testing.assert_allclose(out["id_part"][1], id_item, atol=1e-12)
  np.testing.assert_allclose(out["feature_part"][1], feat_item, atol=1e-12)
  assert popularity_bias.parts(str(tmp_path), {"modalities": ["text"]},
                               user, item, 0.55) == {}


def test_model_cat_rate_comes_from_the_manifest_unless_given():
  mmssl = {"modalities": ["audio"], "model": {"model_cat_rate": 0.4}}
  older = {"modalities": ["audio"], "model": {"name": "mmssl"}}
  rate = popularity_bias.model_cat_rate
  assert rate(mmssl, "EXPORT", None) == 0.4
  with pytest.raises(app.UsageError, match="EXPORT/manifest.json"):
    rate(older, "EXPORT", None)
  assert rate({"modalities": []}, "EXPORT", None) is None
  assert rate(mmssl, "EXPORT", 0.7) == 0.7
  assert rate(older, "EXPORT", 0.7) == 0.7
