"""New items: the cold-item split, evaluation by item group, the inductive
item path (`model.cold_start`) and the baselines that rank new items."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import baselines
from mmssl_jax import evaluation
from mmssl_jax import model as model_lib
from mmssl_jax import run as run_lib
from mmssl_jax.data import cold_start
from mmssl_jax.data import formats
from mmssl_jax.data import synthetic
from mmssl_jax.data.dataset import DataError, Split


def _pairs(split: Split, n_items: int) -> set[int]:
  return set((split.users.astype(np.int64) * n_items + split.items).tolist())


@pytest.fixture(name="ds", scope="module")
def ds_fixture():
  return synthetic.make_synthetic(helpers.load_config("test").data.synthetic)


def test_split_moves_every_interaction_of_a_held_out_item(ds):
  cold = cold_start.hold_out_items(ds, 0.2, seed=3)
  n = ds.n_items
  assert len(cold.cold_items) == round(0.2 * n)
  is_cold = cold_start.cold_mask(cold)
  # No training interaction with a cold item; every other pair is where it was.
  assert not is_cold[cold.train.items].any()
  before = {s: _pairs(getattr(ds, s), n) for s in ("train", "val", "test")}
  after = {s: _pairs(getattr(cold, s), n) for s in ("train", "val", "test")}
  assert set().union(*before.values()) == set().union(*after.values())
  warm_pairs = lambda pairs: {p for p in pairs if not is_cold[p % n]}
  for s in ("train", "val", "test"):
    assert warm_pairs(after[s]) == warm_pairs(before[s]), s
  # Each cold item's interactions, from any split, are all validation
  # targets or all test targets; half of the cold items (rounded down) are
  # validation items.
  val_items = set(cold.val.items[is_cold[cold.val.items]].tolist())
  test_items = set(cold.test.items[is_cold[cold.test.items]].tolist())
  assert not val_items & test_items
  every = set().union(*before.values())
  for i in cold.cold_items.tolist():
    of_item = {p for p in every if p % n == i}
    where = "val" if i in val_items else "test"
    assert of_item <= after[where], i
  # Seeded: the same seed, the same items; another seed, others.
  again = cold_start.hold_out_items(ds, 0.2, seed=3)
  np.testing.assert_array_equal(again.cold_items, cold.cold_items)
  other = cold_start.hold_out_items(ds, 0.2, seed=4)
  assert not np.array_equal(other.cold_items, cold.cold_items)


def test_split_errors_and_folder_round_trip(ds, tmp_path):
  for fraction in (0.0, 1.0, 0.001):
    with pytest.raises(DataError, match="cold_items"):
      cold_start.hold_out_items(ds, fraction, seed=0)
  cold = cold_start.hold_out_items(ds, 0.25, seed=0)
  formats.write_mmssl(cold, tmp_path / "split")
  back = formats.load_folder(tmp_path / "split")
  np.testing.assert_array_equal(back.cold_items, cold.cold_items)
  assert back.fingerprint() == cold.fingerprint()
  with pytest.raises(DataError, match="already holds a cold-item split"):
    cold_start.hold_out_items(back, 0.2, seed=0)
  (tmp_path / "split" / "cold_items.txt").write_text("3\nx7\n")
  with pytest.raises(DataError, match=r"cold_items.txt.*'x7' is not an item"):
    formats.load_folder(tmp_path / "split")


@pytest.fixture(name="cold_run", scope="module")
def cold_run_fixture():
  config = helpers.load_config("test")
  config.data.cold_items = 0.2
  config.model.cold_start = True
  config, ds, _ = run_lib.load(config)
  return config, ds, run_lib.Run(config, ds)


def test_cold_item_vectors_follow_their_features(cold_run):
  """An item without training interactions (the held-out ones, and any
  other) gets the encoder's vector: it changes with its own feature row (and
  no other item's does), and the encoder receives gradients through it."""
  _, ds, run = cold_run
  state = run.init_state()
  cold = int(ds.cold_items[0])
  user, item = run.final_embeddings(state)
  _, plain = run.final_embeddings(state, inductive=False)
  trained = np.bincount(ds.train.items, minlength=ds.n_items) > 0
  np.testing.assert_array_equal(item[trained], plain[trained])
  assert not np.allclose(item[cold], plain[cold])
  features = {m: x.at[cold].add(1.0) for m, x in run.inputs.features.items()}
  moved = run_lib._final_embeddings(  # pylint: disable=protected-access
      state, run.inputs._replace(features=features),
      run.modality_is_base(state), run.new_items, **run._embedding_args)[1]  # pylint: disable=protected-access
  assert not np.allclose(moved[cold], item[cold])
  np.testing.assert_array_equal(np.delete(np.asarray(moved), cold, 0),
                                np.delete(np.asarray(item), cold, 0))
  score = lambda enc: jnp.sum(model_lib.encode_items(
      enc, {m: x[cold:cold + 1] for m, x in run.inputs.features.items()})
      * user[0])
  grads = jax.grad(score)(state.params["cold_encoder"])
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_the_encoder_leaves_the_rest_of_the_model_as_it_was(cold_run):
  """Three steps with and without model.cold_start from the same seed: every
  parameter but the encoder's moves identically (u* and i* are constants
  of the encoder's loss), and the loss terms are the same plus 'cold'."""
  config, ds, run = cold_run
  plain_config = config.copy_and_resolve_references()
  plain_config.model.cold_start = False
  plain = run_lib.Run(plain_config, ds)
  states, terms = [], []
  for r in (run, plain):
    state = r.init_state()
    for idx in range(3):
      state, t = r.step(state, jnp.int32(idx), r.inputs)
    states.append(jax.device_get(state))
    terms.append(jax.device_get(t))
  with_encoder, without = states
  assert set(terms[0]) == set(terms[1]) | {"cold"}
  for k in terms[1]:
    if k != "loss":
      np.testing.assert_allclose(terms[0][k], terms[1][k], rtol=1e-5)
  params = dict(with_encoder.params)
  del params["cold_encoder"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(without.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The critic's biases that feed a train-mode BatchNorm have a true
  # gradient of 0; their computed one is rounding noise, which Adam turns
  # into steps of +-lr whatever its size: 3 steps, at most 6 lr apart.
  for path, a in jax.tree_util.tree_leaves_with_path(
      with_encoder.critic_params):
    b = without.critic_params[path[0].key][path[1].key]
    noise_bias = path[0].key in ("dense_0", "dense_1") and path[1].key == "bias"
    np.testing.assert_allclose(
        a, b, rtol=0 if noise_bias else 1e-5,
        atol=6 * config.critic.lr if noise_bias else 1e-7,
        err_msg=jax.tree_util.keystr(path))


def test_group_metrics_equal_the_naive_ranking(cold_run):
  """cold/ ranks the cold targets among the cold items, warm/ the warm ones
  among the warm items, cold_all/ the cold targets among all items: each
  equals evaluation on hand-built sub-catalogues."""
  _, ds, run = cold_run
  rng = np.random.default_rng(0)
  user = jnp.asarray(rng.normal(size=(ds.n_users, 4)), jnp.float32)
  item = jnp.asarray(rng.normal(size=(ds.n_items, 4)), jnp.float32)
  got = run.evaluate_embeddings(user, item, "test")
  is_cold = cold_start.cold_mask(ds)
  for prefix, mask in (("cold/", is_cold), ("warm/", ~is_cold)):
    ids = np.flatnonzero(mask)
    local = {int(g): l for l, g in enumerate(ids)}
    keep = lambda s: np.array([i in local for i in s.items.tolist()], bool)
    sub = lambda s: Split(s.users[keep(s)],
                          np.array([local[i] for i in s.items[keep(s)]],
                                   np.int32))
    ks = tuple(sorted({min(k, len(ids)) for k in run.config.eval.ks}))
    want = evaluation.evaluate(user, item[ids], evaluation.build_eval_set(
        target=sub(ds.test), exclude=[sub(ds.train)], n_users=ds.n_users,
        n_items=len(ids)), ks=ks)
    for k, v in want.items():
      assert got[prefix + k] == pytest.approx(v, rel=1e-6), prefix + k
  cold_targets = Split(ds.test.users[is_cold[ds.test.items]],
                       ds.test.items[is_cold[ds.test.items]])
  want = evaluation.evaluate(user, item, evaluation.build_eval_set(
      target=cold_targets, exclude=[ds.train], n_users=ds.n_users,
      n_items=ds.n_items), ks=tuple(run.config.eval.ks))
  for k, v in want.items():
    assert got["cold_all/" + k] == pytest.approx(v, rel=1e-6), k


def test_baselines_score_as_defined(cold_run):
  _, ds, _ = cold_run
  user, item = baselines.popularity(ds)
  degree = np.bincount(ds.train.items, minlength=ds.n_items)
  scores = (user @ item.T)[0]
  np.testing.assert_array_equal(np.floor(scores), degree)  # jitter < 0.5
  assert not degree[ds.cold_items].any()  # new items: all tie at 0 ...
  order = np.argsort(-scores[ds.cold_items])  # ... and come in random order
  assert not np.array_equal(order, np.arange(len(order)))
  user, item = baselines.content_knn(ds)
  u = 5
  mine = ds.train.items[ds.train.users == u]
  want = np.zeros(ds.n_items)
  for feats in ds.modalities.values():
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    profile = unit[mine].mean(0)
    want += unit @ profile / np.linalg.norm(profile)
  np.testing.assert_allclose(user[u] @ item.T, want, rtol=1e-5, atol=1e-6)


def test_lightgcn_refuses_the_inductive_path():
  config = helpers.load_config("test", "model=lightgcn")
  config.model.cold_start = True
  with pytest.raises(run_lib.ConfigError, match="cold_start"):
    run_lib.load(config)
