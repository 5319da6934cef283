"""Tests for mmssl_jax.data.sampler: the released BPR sampling distribution (§4.2).

B distinct users drawn uniformly from the users with training items (with
replacement when B exceeds their number), one positive uniform over the
user's training items, one negative uniform over the user's non-training items.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax.data import sampler as sampler_lib
from mmssl_jax.data.dataset import Split

N_USERS, N_ITEMS = 12, 30


def _train_lists():
  """Per-user train items, including edge items 0 and N_ITEMS-1, a user with
  a single item and users without any."""
  rng = np.random.default_rng(0)
  lists = {}
  for u in range(N_USERS):
    if u in (3, 7):
      continue  # no train items
    k = 1 if u == 5 else int(rng.integers(2, 12))
    lists[u] = np.sort(rng.choice(N_ITEMS, k, replace=False))
  lists[0] = np.array([0, 1, 2, 15, 28, 29])  # both catalogue ends
  return lists


def _split(lists):
  users = np.concatenate([[u] * len(v) for u, v in lists.items()])
  items = np.concatenate(list(lists.values()))
  perm = np.random.default_rng(1).permutation(len(users))  # unsorted input
  return Split(users[perm], items[perm])


@pytest.fixture(scope="module", name="setup")
def setup_fixture():
  lists = _train_lists()
  tables = jax.tree.map(jnp.asarray, sampler_lib.build_sampler_tables(
      _split(lists), N_USERS))
  return lists, tables


@functools.lru_cache(maxsize=None)
def _sampler(batch_size, n_items=N_ITEMS):
  return jax.jit(functools.partial(sampler_lib.sample_batch,
                                   batch_size=batch_size, n_items=n_items))


def test_build_sampler_tables(setup):
  lists, tables = setup
  assert sorted(np.asarray(tables.exist_users).tolist()) == sorted(lists)
  for u in range(N_USERS):
    want = lists.get(u, np.array([], int))
    row = np.asarray(tables.train_lists[u])
    assert int(tables.degrees[u]) == len(want)
    np.testing.assert_array_equal(row[:len(want)], want)  # sorted
    np.testing.assert_array_equal(row[len(want):], -1)     # padding


def test_distinct_users_from_users_with_train_items(setup):
  lists, tables = setup
  b = len(lists)  # exactly the number of users with train items
  for seed in range(5):
    users, pos, neg = _sampler(b)(jax.random.key(seed), tables)
    users = np.asarray(users)
    assert users.shape == pos.shape == neg.shape == (b,)
    assert users.dtype == np.int32
    assert len(set(users.tolist())) == b  # distinct
    assert set(users.tolist()) == set(lists)
  users = np.asarray(_sampler(8)(jax.random.key(9), tables)[0])
  assert len(set(users.tolist())) == 8
  assert set(users.tolist()) <= set(lists)


def test_distinct_user_subsets_are_uniform(setup):
  lists, tables = setup
  n = 2000
  keys = jax.random.split(jax.random.key(1), n)
  sample = functools.partial(sampler_lib.sample_batch, batch_size=5,
                             n_items=N_ITEMS)
  users = np.asarray(jax.jit(jax.vmap(
      lambda k: sample(k, tables)[0]))(keys))
  assert all(len(set(row)) == 5 for row in users.tolist())
  counts = np.bincount(users.ravel(), minlength=N_USERS)
  assert counts[3] == counts[7] == 0
  expected = n * 5 / len(lists)  # each user in a batch w.p. 5 / 10 (sd 2.2%)
  np.testing.assert_allclose(counts[list(lists)], expected, rtol=0.1)


def test_with_replacement_when_batch_exceeds_users(setup):
  lists, tables = setup
  b = 3 * len(lists)
  users = np.asarray(_sampler(b)(jax.random.key(2), tables)[0])
  assert users.shape == (b,)
  assert set(users.tolist()) <= set(lists)
  assert len(set(users.tolist())) < b  # duplicates (pigeonhole)
  # Uniform over the users with train items.
  users = np.asarray(_sampler(20000)(jax.random.key(3), tables)[0])
  counts = np.bincount(users, minlength=N_USERS)
  assert counts[3] == counts[7] == 0
  np.testing.assert_allclose(counts[list(lists)], 2000, rtol=0.1)


def test_positives_are_train_items_negatives_never(setup):
  lists, tables = setup
  users, pos, neg = map(np.asarray,
                        _sampler(5000)(jax.random.key(4), tables))
  assert neg.min() >= 0 and neg.max() < N_ITEMS
  member = np.zeros((N_USERS, N_ITEMS), bool)
  for u, items in lists.items():
    member[u, items] = True
  assert member[users, pos].all()
  assert not member[users, neg].any()
  # The single-item user always gets that item as positive.
  np.testing.assert_array_equal(pos[users == 5], lists[5][0])


def _one_user_tables(items, n_users=3, user=1):
  split = Split(np.full(len(items), user), np.asarray(items))
  return jax.tree.map(jnp.asarray,
                      sampler_lib.build_sampler_tables(split, n_users))


def _chi2(counts, expected):
  return float(np.sum((counts - expected) ** 2 / expected))


def test_negatives_and_positives_are_uniform_for_one_user():
  train = np.array([0, 3, 4, 5, 11, 12, 20, 28, 29])  # ends and runs
  tables = _one_user_tables(train)
  n_draws = 20000
  users, pos, neg = map(np.asarray, _sampler(n_draws)(jax.random.key(5),
                                                      tables))
  np.testing.assert_array_equal(users, 1)
  free = np.setdiff1d(np.arange(N_ITEMS), train)
  neg_counts = np.bincount(neg, minlength=N_ITEMS)
  np.testing.assert_array_equal(neg_counts[train], 0)
  # chi-square with len(free) - 1 = 20 dof: mean 20, sd ~6.3; 60 is p < 1e-5.
  assert _chi2(neg_counts[free], n_draws / len(free)) < 60
  pos_counts = np.bincount(pos, minlength=N_ITEMS)
  assert pos_counts.sum() == pos_counts[train].sum()
  assert _chi2(pos_counts[train], n_draws / len(train)) < 40  # 8 dof


def test_negative_when_only_one_item_is_free():
  tables = _one_user_tables(np.array([i for i in range(N_ITEMS) if i != 17]))
  _, _, neg = _sampler(64)(jax.random.key(6), tables)
  np.testing.assert_array_equal(neg, 17)


def test_deterministic_for_a_fixed_key(setup):
  _, tables = setup
  a = _sampler(8)(jax.random.key(7), tables)
  b = _sampler(8)(jax.random.key(7), tables)
  c = _sampler(8)(jax.random.key(8), tables)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))
