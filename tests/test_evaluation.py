"""Tests of mmssl_jax.evaluation against a naive numpy reference and toy cases.

The naive reference follows section 5 of docs/reference.md
literally: dense scores, a python loop over users, a binary hit list r of the
top max(ks) candidates, and the reference NDCG DCG(r[:K]) / DCG(sorted(r)[:K]).
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import evaluation
from mmssl_jax.data.dataset import Split

KS = (1, 5, 10, 20)
N_USERS, N_ITEMS, DIM, BLOCK = 37, 53, 8, 16


def _split(lists: list[list[int]]) -> Split:
  users = [u for u, items in enumerate(lists) for _ in items]
  items = [i for items in lists for i in items]
  return Split(np.array(users, np.int32), np.array(items, np.int32))


def _dcg(r) -> float:
  return sum(x / math.log2(i + 2) for i, x in enumerate(r))


def naive_metrics(user_emb, item_emb, target_lists, exclude_lists, ks):
  """Dense, per-user python implementation of the section 5 protocol."""
  scores = np.asarray(user_emb, np.float64) @ np.asarray(item_emb, np.float64).T
  n_items, k_max = scores.shape[1], max(ks)
  per_user = {f"{m}@{k}": [] for k in ks for m in evaluation.METRICS}
  for u, targets in enumerate(target_lists):
    targets = set(targets)
    if not targets:
      continue
    excluded = set(exclude_lists[u])
    cand = np.array([i for i in range(n_items) if i not in excluded])
    order = np.argsort(-scores[u, cand], kind="stable")
    ranked = scores[u, cand][order][:k_max + 1]
    # float32 (JAX) and float64 (here) must agree on the order.
    assert len(ranked) < 2 or np.min(-np.diff(ranked)) > 1e-4
    top = cand[order][:k_max]
    r = [1.0 if i in targets else 0.0 for i in top]
    r += [0.0] * (k_max - len(r))
    for k in ks:
      hits = sum(r[:k])
      ideal_std = _dcg([1.0] * min(len(targets), k))
      ideal_mmssl = _dcg(sorted(r, reverse=True)[:k])
      per_user[f"recall@{k}"].append(hits / len(targets))
      per_user[f"precision@{k}"].append(hits / k)
      per_user[f"hit@{k}"].append(float(hits > 0))
      per_user[f"ndcg@{k}"].append(_dcg(r[:k]) / ideal_std)
      per_user[f"ndcg_mmssl@{k}"].append(
          _dcg(r[:k]) / ideal_mmssl if ideal_mmssl > 0 else 0.0)
  out = {name: float(np.mean(v)) for name, v in per_user.items()}
  out["n_users"] = sum(1 for t in target_lists if len(t))
  return out


def _random_lists(rng, n_users, n_items, max_len, forbid=None, p_empty=0.0):
  lists = []
  for u in range(n_users):
    pool = np.setdiff1d(np.arange(n_items), forbid[u] if forbid else [])
    n = 0 if rng.random() < p_empty else rng.integers(1, max_len + 1)
    lists.append(sorted(rng.choice(pool, size=min(n, len(pool)),
                                   replace=False).tolist()))
  return lists


def _random_problem(seed: int):
  rng = np.random.default_rng(seed)
  user_emb = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
  item_emb = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
  train = _random_lists(rng, N_USERS, N_ITEMS, 8)
  # User 0 has fewer candidates (8) than max(KS): -inf slots must not count.
  train[0] = list(range(45))
  val = _random_lists(rng, N_USERS, N_ITEMS, 3, forbid=train, p_empty=0.3)
  seen = [sorted(set(a) | set(b)) for a, b in zip(train, val)]
  test = _random_lists(rng, N_USERS, N_ITEMS, 5, forbid=seen, p_empty=0.3)
  # Test items that are also train items can never be hits: item 0 for user 0
  # (whose empty top slots must not count) and one item for user 1.
  test[0] = sorted(set(test[0]) | {0})
  test[1] = sorted(set(test[1]) | {train[1][0]}) if train[1] else test[1]
  return user_emb, item_emb, train, val, test


# Seeds whose scores have no near-ties (< 1e-4) in any top list; the naive
# reference asserts this (seed 0 has a 2e-6 gap, below float32 precision).
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["val", "test_exclude_val"])
def test_matches_naive_reference(seed, mode):
  user_emb, item_emb, train, val, test = _random_problem(seed)
  if mode == "val":
    target, exclude = val, [train]
  else:
    target, exclude = test, [train, val]
  excl_lists = [sorted(set().union(*(e[u] for e in exclude)))
                for u in range(N_USERS)]
  eval_set = evaluation.build_eval_set(
      target=_split(target), exclude=[_split(e) for e in exclude],
      n_users=N_USERS, n_items=N_ITEMS, block_users=BLOCK)
  n_eval = sum(1 for t in target if t)
  assert 0 < n_eval < N_USERS  # some users are skipped
  assert max(len(t) for t in target) > 1
  assert eval_set.users.shape[0] == -(-n_eval // BLOCK) > 1
  assert eval_set.users.shape[1] == BLOCK
  assert int(eval_set.valid.sum()) == int(eval_set.n_users) == n_eval

  got = evaluation.evaluate(jnp.asarray(user_emb), jnp.asarray(item_emb),
                            eval_set, ks=KS)
  want = naive_metrics(user_emb, item_emb, target, excl_lists, KS)
  assert set(got) == set(want)
  assert got["n_users"] == want["n_users"] == n_eval
  for name in want:
    assert got[name] == pytest.approx(want[name], abs=1e-6), name
  assert all(isinstance(v, float) for k, v in got.items() if k != "n_users")


def _single_user(scores_by_item, targets, ks):
  """One user with d = 1 embeddings so that score(item i) = scores_by_item[i]."""
  n_items = len(scores_by_item)
  eval_set = evaluation.build_eval_set(
      target=_split([targets]), exclude=[_split([[]])], n_users=1,
      n_items=n_items)
  item_emb = jnp.asarray(scores_by_item, jnp.float32)[:, None]
  return evaluation.evaluate(jnp.ones((1, 1)), item_emb, eval_set, ks=ks)


def test_toy_two_targets():
  # Ranking 4, 0, 2, 1, 3; targets {2, 4} sit at ranks 1 and 3.
  m = _single_user([4.0, 2.0, 3.0, 1.0, 5.0], [2, 4], ks=(1, 3, 5))
  assert m["n_users"] == 1
  assert m["recall@1"] == pytest.approx(0.5)
  assert m["precision@1"] == pytest.approx(1.0)
  assert m["hit@1"] == 1.0
  assert m["ndcg@1"] == pytest.approx(1.0)
  assert m["ndcg_mmssl@1"] == pytest.approx(1.0)
  assert m["recall@3"] == pytest.approx(1.0)
  assert m["precision@3"] == pytest.approx(2 / 3)
  # (1 + 1/log2 4) / (1 + 1/log2 3) = 1.5 / 1.630930 = 0.919721
  ndcg3 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
  assert ndcg3 == pytest.approx(0.919721, abs=1e-6)
  assert m["ndcg@3"] == pytest.approx(ndcg3, abs=1e-6)
  assert m["ndcg_mmssl@3"] == pytest.approx(ndcg3, abs=1e-6)


def test_toy_standard_and_mmssl_ndcg_differ():
  # Ranking 0, 1, 2, 3, 4, 5; targets {1, 4, 5}: the top 3 holds one hit at
  # rank 2, so DCG@3 = 1/log2 3 = 0.630930.
  scores = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
  m = _single_user(scores, [1, 4, 5], ks=(3,))
  dcg = 1 / math.log2(3)
  # Standard ideal: three hits, 1 + 1/log2 3 + 1/2 = 2.130930.
  assert m["ndcg@3"] == pytest.approx(dcg / 2.130930, abs=1e-6)
  assert m["ndcg@3"] == pytest.approx(0.296082, abs=1e-6)
  # MMSSL ideal: the one hit found in the top max(ks) = 3 list, ideal DCG 1.
  assert m["ndcg_mmssl@3"] == pytest.approx(0.630930, abs=1e-6)
  assert m["recall@3"] == pytest.approx(1 / 3)
  assert m["precision@3"] == pytest.approx(1 / 3)
  # With max(ks) = 6 all three hits are in the list, so the MMSSL ideal at
  # K = 3 is the full one again and both definitions agree.
  m = _single_user(scores, [1, 4, 5], ks=(3, 6))
  assert m["ndcg_mmssl@3"] == pytest.approx(0.296082, abs=1e-6)
  assert m["ndcg@3"] == pytest.approx(0.296082, abs=1e-6)
  # DCG@6 = 1/log2 3 + 1/log2 6 + 1/log2 7 = 0.630930 + 0.386853 + 0.356207.
  # = 1.373990, over the same ideal 2.130930: 0.644784.
  assert m["ndcg@6"] == pytest.approx(0.644784, abs=1e-6)
  assert m["ndcg_mmssl@6"] == pytest.approx(0.644784, abs=1e-6)


def test_topk_items_never_returns_excluded():
  rng = np.random.default_rng(7)
  n_users, n_items = 6, 11
  user_emb = jnp.asarray(rng.normal(size=(n_users, 4)), jnp.float32)
  item_emb = jnp.asarray(rng.normal(size=(n_items, 4)), jnp.float32)
  exclude = [[0, 3, 10], [], [5], list(range(n_items)), [1, 2], [9, 4]]
  exclude_lists = np.full((n_users, 11), -1, np.int32)
  for u, items in enumerate(exclude):
    exclude_lists[u, :len(items)] = items
  scores, ids = evaluation.topk_items(
      user_emb, item_emb, jnp.arange(n_users), jnp.asarray(exclude_lists),
      k=n_items)
  scores, ids = np.asarray(scores), np.asarray(ids)
  dense = np.asarray(user_emb @ item_emb.T)
  for u, items in enumerate(exclude):
    n_cand = n_items - len(items)
    returned = ids[u, :n_cand]
    assert sorted(returned) == sorted(set(range(n_items)) - set(items))
    assert np.all(ids[u, n_cand:] == -1)
    assert np.all(np.isneginf(scores[u, n_cand:]))
    np.testing.assert_allclose(scores[u, :n_cand], dense[u, returned],
                               rtol=1e-6)
    assert np.all(np.diff(scores[u, :n_cand]) <= 0)
  # Padding -1 does not exclude the last item.
  assert n_items - 1 in ids[1]


def test_compiles_once_for_same_shapes():
  user_emb, item_emb, train, val, _ = _random_problem(11)
  eval_set = evaluation.build_eval_set(
      target=_split(val), exclude=[_split(train)], n_users=N_USERS,
      n_items=N_ITEMS, block_users=BLOCK)
  compiled = []

  def listener(event: str, _: float, **kwargs) -> None:
    if (event == "/jax/core/compile/backend_compile_duration" and
        "_evaluate_blocks" in kwargs.get("fun_name", "")):
      compiled.append(kwargs["fun_name"])

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ks = (2, 7)  # used by no other test, so the first call compiles
    first = evaluation.evaluate(user_emb, item_emb, eval_set, ks=ks)
    assert len(compiled) == 1
    # numpy and jax inputs, new values, same shapes: no new compilation.
    for scale in (2.0, 3.0, 5.0):
      again = evaluation.evaluate(jnp.asarray(user_emb * scale), item_emb,
                                  eval_set, ks=ks)
      # Positive scaling of the users keeps every ranking.
      assert again == pytest.approx(first, abs=1e-6)
    evaluation.evaluate(user_emb * 7.0, jnp.asarray(item_emb), eval_set, ks=ks)
    assert len(compiled) == 1
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_no_evaluated_users():
  eval_set = evaluation.build_eval_set(
      target=_split([[], []]), exclude=[_split([[0], [1]])], n_users=2,
      n_items=4, block_users=8)
  m = evaluation.evaluate(jnp.ones((2, 3)), jnp.ones((4, 3)), eval_set,
                          ks=(1, 2))
  assert m["n_users"] == 0
  assert all(v == 0.0 for k, v in m.items() if k != "n_users")


def test_rejects_bad_input():
  with pytest.raises(ValueError):
    evaluation.build_eval_set(target=_split([[5]]), exclude=[], n_users=1,
                              n_items=5)
  eval_set = evaluation.build_eval_set(target=_split([[1]]), exclude=[],
                                       n_users=1, n_items=5)
  with pytest.raises(ValueError):
    evaluation.evaluate(jnp.ones((1, 2)), jnp.ones((5, 2)), eval_set, ks=(6,))


PROP_USERS, PROP_ITEMS, PROP_KS = 9, 12, (1, 3, 5, 12)
_item_sets = st.sets(st.integers(0, PROP_ITEMS - 1), max_size=5)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    targets=st.lists(_item_sets, min_size=PROP_USERS, max_size=PROP_USERS),
    train=st.lists(_item_sets, min_size=PROP_USERS, max_size=PROP_USERS))
def test_metric_properties(seed, targets, train):
  rng = np.random.default_rng(seed)
  user_emb = rng.normal(size=(PROP_USERS, 4)).astype(np.float32)
  item_emb = rng.normal(size=(PROP_ITEMS, 4)).astype(np.float32)
  train = [sorted(s - t) for s, t in zip(train, targets)]
  targets = [sorted(t) for t in targets]
  eval_set = evaluation.build_eval_set(
      target=_split(targets), exclude=[_split(train)], n_users=PROP_USERS,
      n_items=PROP_ITEMS, block_users=4)
  m = evaluation.evaluate(user_emb, item_emb, eval_set, ks=PROP_KS)
  assert m["n_users"] == sum(1 for t in targets if t)
  eps = 1e-6
  for k in PROP_KS:
    for name in evaluation.METRICS:
      assert -eps <= m[f"{name}@{k}"] <= 1 + eps
    assert m[f"hit@{k}"] >= m[f"recall@{k}"] - eps
    assert m[f"hit@{k}"] >= m[f"precision@{k}"] - eps
    assert m[f"ndcg_mmssl@{k}"] >= m[f"ndcg@{k}"] - eps
    assert m[f"ndcg_mmssl@{k}"] <= m[f"hit@{k}"] + eps
  for k_lo, k_hi in zip(PROP_KS, PROP_KS[1:]):
    assert m[f"recall@{k_hi}"] >= m[f"recall@{k_lo}"] - eps
    assert m[f"hit@{k_hi}"] >= m[f"hit@{k_lo}"] - eps
  # Targets are disjoint from train, so K = n_items finds every target.
  if m["n_users"]:
    assert m[f"recall@{PROP_ITEMS}"] == pytest.approx(1.0, abs=eps)
