"""Full-ranking top-K evaluation without a dense users x items matrix.

Implements the reference protocol of section 5 of
docs/reference.md (`utility/batch_test.py::test_torch`,
`metrics.py`): every evaluated user ranks the whole catalogue minus the items of
the excluded splits (the reference excludes train items only), the top max(ks)
items are kept, and Recall, Precision, Hit and NDCG are averaged over the users
with a non-empty target list.

Two NDCG definitions are reported:

* `ndcg@K` is the STANDARD NDCG: DCG of the top K (gain 1 / log2(rank + 1))
  divided by the ideal DCG of min(|T_u|, K) hits.
* `ndcg_mmssl@K` is the reference's NON-STANDARD NDCG inherited from
  NGCF/LATTICE: the ideal DCG is built from the hits found in the top-max(ks)
  list (the reference's top 50), sorted to the front and truncated to K. It is
  0 without hits, never below the standard NDCG, and equal to it when
  |T_u| = 1.

Users are processed in blocks of `block_users` inside one jitted function
(`jax.lax.map` over blocks), so at most block_users x n_items scores exist at a
time. Ties: `jax.lax.top_k` returns the lower item index first among equal
scores (the reference's `heapq.nlargest` order on ties is not reproduced).

At scale, `evaluate(..., mesh=)` with an 'item' mesh axis
of more than one device ranks item-sharded: inside `jax.shard_map`, each
device scores its users of the block (split over 'data') against its item
shard only, masks the excluded items of that shard, keeps a local top-K,
and the n_item_shards * K candidates are all-gathered over 'item' and
merged by a second top-K (`sharded_topk_items`). No device holds the full
block x I scores. The merge returns exactly the unsharded top-K, ties
included: candidates are gathered in shard order, so among equal scores a
lower position is a lower global item id, the order `jax.lax.top_k` uses on
the whole row; and every item of the global top-K (value descending, id
ascending) is within its own shard's top-K under the same order. The metric
means then differ from the unsharded ones only by the order of the float
sums over users (data-sharded partial sums).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from mmssl_jax.data.dataset import Split, pad_lists

METRICS = ("recall", "precision", "hit", "ndcg", "ndcg_mmssl")
# Mesh axis names of `parallel.make_mesh`.
DATA_AXIS, ITEM_AXIS = "data", "item"


class EvalSet(NamedTuple):
  """Evaluated users and their padded item lists, grouped in blocks.

  Attributes:
    users: int32 (n_blocks, block_users) user ids; padding rows hold 0.
    valid: bool (n_blocks, block_users), False on padding rows.
    targets: int32 (n_blocks, block_users, max_targets) target items, -1 padded.
    exclude: int32 (n_blocks, block_users, max_excluded) items never ranked
      (the union of the excluded splits), -1 padded.
    n_users: int32 0-d array, the number of real evaluated users.

  Built once per split; `jax.device_put(eval_set)` keeps it on the accelerator
  instead of copying the numpy arrays at every `evaluate` call.
  """

  users: np.ndarray
  valid: np.ndarray
  targets: np.ndarray
  exclude: np.ndarray
  n_users: np.ndarray


def build_eval_set(*, target: Split, exclude: Sequence[Split], n_users: int,
                   n_items: int, block_users: int = 1024) -> EvalSet:
  """Builds the blocked evaluation arrays on the host (numpy).

  Args:
    target: the split whose items are the ground truth (val or test). Users
      with no target item are not evaluated, as in the reference.
    exclude: splits whose items are removed from each user's candidates
      (normally [train]; [train, val] to also hide val items when testing).
    n_users: number of users; ids must lie in [0, n_users).
    n_items: number of items; ids must lie in [0, n_items).
    block_users: users per block. It is capped at the number of evaluated users
      so that a small evaluation set is not padded to a large block.

  Returns:
    An `EvalSet` whose per-user arrays have shape (n_blocks, block, ...). With
    no evaluated user it holds one all-padding block and n_users = 0.
  """
  if block_users < 1:
    raise ValueError(f"block_users must be >= 1, got {block_users}")
  for split in (target, *exclude):
    if len(split) and (split.users.min() < 0 or split.users.max() >= n_users):
      raise ValueError(f"user ids must lie in [0, {n_users})")
    if len(split) and (split.items.min() < 0 or split.items.max() >= n_items):
      raise ValueError(f"item ids must lie in [0, {n_items})")
  target_lists = [np.unique(x) for x in target.user_lists(n_users)]
  users = np.array([u for u in range(n_users) if len(target_lists[u])],
                   np.int32)
  none = np.zeros(0, np.int32)
  merged = Split(np.concatenate([s.users for s in exclude] + [none]),
                 np.concatenate([s.items for s in exclude] + [none]))
  exclude_lists = [np.unique(x) for x in merged.user_lists(n_users)]

  n_eval = len(users)
  block = min(block_users, max(n_eval, 1))
  n_blocks = max(1, -(-n_eval // block))
  padded = n_blocks * block
  valid = np.arange(padded) < n_eval
  users_padded = np.zeros(padded, np.int32)
  users_padded[:n_eval] = users
  targets = pad_lists([target_lists[u] for u in users] +
                       [none] * (padded - n_eval))
  excl = pad_lists([exclude_lists[u] for u in users] +
                    [none] * (padded - n_eval))
  return EvalSet(
      users=users_padded.reshape(n_blocks, block),
      valid=valid.reshape(n_blocks, block),
      targets=targets.reshape(n_blocks, block, -1),
      exclude=excl.reshape(n_blocks, block, -1),
      n_users=np.asarray(n_eval, np.int32))


@functools.partial(jax.jit, static_argnames=("k",))
def topk_items(user_emb: jax.Array, item_emb: jax.Array, users: jax.Array,
               exclude_lists: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k unexcluded items for each user in `users` by dot-product score.

  Args:
    user_emb: float (n_users, d).
    item_emb: float (n_items, d).
    users: int (B,) user ids.
    exclude_lists: int (B, E) items to exclude per user, -1 padded.
    k: how many items to return (static, at most n_items).

  Returns:
    (scores, ids), each (B, k), best first; among equal scores the lower item
    id comes first. Slots beyond a user's number of candidates hold score -inf
    and id -1, so an excluded item is never returned.
  """
  n_items = item_emb.shape[0]
  scores = user_emb[users] @ item_emb.T
  rows = jnp.arange(users.shape[0])[:, None]
  cols = jnp.where(exclude_lists >= 0, exclude_lists, n_items)
  scores = scores.at[rows, cols].set(-jnp.inf, mode="drop")
  top_scores, top_ids = jax.lax.top_k(scores, k)
  return top_scores, jnp.where(jnp.isneginf(top_scores), -1, top_ids)


def _user_metrics(hits: jax.Array, n_targets: jax.Array,
                  ks: tuple[int, ...]) -> jax.Array:
  """Per-user metrics (B, len(ks), len(METRICS)) from a (B, max(ks)) hit list."""
  k_max = hits.shape[1]
  discount = 1.0 / jnp.log2(jnp.arange(2, k_max + 2, dtype=jnp.float32))
  # ideal[n] = DCG of n hits at the front of the list (ideal[0] = 0).
  ideal = jnp.concatenate([jnp.zeros(1), jnp.cumsum(discount)])
  n_hits = jnp.cumsum(hits, axis=1)
  dcg = jnp.cumsum(hits * discount, axis=1)
  hits_in_list = n_hits[:, -1].astype(jnp.int32)
  n_t = n_targets.astype(jnp.float32)
  per_k = []
  for k in ks:
    h, dcg_k = n_hits[:, k - 1], dcg[:, k - 1]
    ideal_std = ideal[jnp.minimum(n_targets, k)]
    ideal_mmssl = ideal[jnp.minimum(hits_in_list, k)]
    per_k.append(jnp.stack([
        h / jnp.maximum(n_t, 1.0),
        h / k,
        (h > 0).astype(jnp.float32),
        jnp.where(ideal_std > 0, dcg_k / jnp.maximum(ideal_std, 1e-30), 0.0),
        jnp.where(ideal_mmssl > 0, dcg_k / jnp.maximum(ideal_mmssl, 1e-30),
                  0.0),
    ], axis=-1))
  return jnp.stack(per_k, axis=1)


@functools.partial(jax.jit, static_argnames=("ks",))
def _evaluate_blocks(user_emb: jax.Array, item_emb: jax.Array,
                     eval_set: EvalSet, ks: tuple[int, ...]) -> jax.Array:
  """Mean metrics (len(ks), len(METRICS)) over the real users of `eval_set`."""
  n_items = item_emb.shape[0]
  k_max = max(ks)

  def block_sums(block):
    users, valid, targets, exclude = block
    _, top_ids = topk_items(user_emb, item_emb, users, exclude, k=k_max)
    rows = jnp.arange(users.shape[0])[:, None]
    is_target = jnp.zeros((users.shape[0], n_items), bool).at[
        rows, jnp.where(targets >= 0, targets, n_items)].set(True, mode="drop")
    hits = (jnp.take_along_axis(is_target, jnp.maximum(top_ids, 0), axis=1)
            & (top_ids >= 0)).astype(jnp.float32)
    n_targets = jnp.sum(targets >= 0, axis=1)
    metrics = _user_metrics(hits, n_targets, ks)
    return jnp.sum(jnp.where(valid[:, None, None], metrics, 0.0), axis=0)

  sums = jax.lax.map(block_sums, (eval_set.users, eval_set.valid,
                                  eval_set.targets, eval_set.exclude))
  return jnp.sum(sums, axis=0) / jnp.maximum(eval_set.n_users, 1)


# ----------------------------------------------------------------------------
# Item-sharded ranking (see the module docstring)


def _local_cols(lists: jax.Array, offset, n_local: int) -> jax.Array:
  """Global item lists (-1 padded) -> columns of this shard, n_local if out."""
  local = lists - offset
  inside = (lists >= 0) & (local >= 0) & (local < n_local)
  return jnp.where(inside, local, n_local)


def _shard_topk(user_rows: jax.Array, item_local: jax.Array,
                exclude_lists: jax.Array, targets: jax.Array | None, k: int):
  """Inside `shard_map` over 'item': the global top-k from the local shard.

  Returns (scores, ids, hits) (b, k) as `topk_items` (hits: whether each id
  is in `targets`, or None), identical on every item shard.
  """
  n_local = item_local.shape[0]
  offset = jax.lax.axis_index(ITEM_AXIS) * n_local
  rows = jnp.arange(user_rows.shape[0])[:, None]
  scores = user_rows @ item_local.T
  scores = scores.at[rows, _local_cols(exclude_lists, offset, n_local)].set(
      -jnp.inf, mode="drop")
  # A shard with fewer than k items offers all of them.
  values, local_ids = jax.lax.top_k(scores, min(k, n_local))
  # Shard order along the gathered axis keeps lower global ids first among
  # equal scores (module docstring).
  gather = lambda x: jax.lax.all_gather(x, ITEM_AXIS, axis=1, tiled=True,
                                        to="invarying")
  cand_v = gather(values)
  cand_i = gather(local_ids + offset)
  top_v, pos = jax.lax.top_k(cand_v, k)
  found = ~jnp.isneginf(top_v)
  top_i = jnp.where(found, jnp.take_along_axis(cand_i, pos, axis=1), -1)
  hits = None
  if targets is not None:
    is_target = jnp.zeros(scores.shape, bool).at[
        rows, _local_cols(targets, offset, n_local)].set(True, mode="drop")
    cand_h = gather(jnp.take_along_axis(is_target, local_ids, axis=1))
    hits = jnp.take_along_axis(cand_h, pos, axis=1) & found
  return top_v, top_i, hits


def _check_item_mesh(n_items: int, mesh) -> int:
  n = int(dict(mesh.shape).get(ITEM_AXIS, 1))
  if n_items % n:
    raise ValueError(f"item-sharded evaluation: {n_items} items are not a "
                     f"multiple of the {n} devices of the item axis")
  return n


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def sharded_topk_items(user_emb: jax.Array, item_emb: jax.Array,
                       users: jax.Array, exclude_lists: jax.Array, *, k: int,
                       mesh) -> tuple[jax.Array, jax.Array]:
  """`topk_items` with the items split over the mesh's 'item' axis.

  Same arguments and result (bit-identical ids, ties included); users are
  also split over 'data' when their number is a multiple of it. n_items
  must be a multiple of the item axis size.
  """
  _check_item_mesh(item_emb.shape[0], mesh)
  rows = P(DATA_AXIS) if users.shape[0] % mesh.shape[DATA_AXIS] == 0 else P()

  def body(user_emb, item_local, users, exclude):
    top_v, top_i, _ = _shard_topk(user_emb[users], item_local, exclude, None,
                                  k)
    return top_v, top_i

  return jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(ITEM_AXIS), rows, rows),
      out_specs=(rows, rows))(user_emb, item_emb, users, exclude_lists)


@functools.partial(jax.jit, static_argnames=("ks", "mesh"))
def _evaluate_blocks_sharded(user_emb: jax.Array, item_emb: jax.Array,
                             eval_set: EvalSet, ks: tuple[int, ...],
                             mesh) -> jax.Array:
  """`_evaluate_blocks` with items over 'item' and block users over 'data'.

  Hits are looked up on each item shard for its own candidates (a
  (b, I / n_item_shards) mask, like the scores) and travel with them, so
  no (b, I) array exists on any device.
  """
  k_max = max(ks)
  split = eval_set.users.shape[1] % mesh.shape[DATA_AXIS] == 0
  users_spec = P(None, DATA_AXIS) if split else P()

  def body(user_emb, item_local, users, valid, targets, exclude, n_users):
    def block_sums(block):
      users, valid, targets, exclude = block
      _, _, hits = _shard_topk(user_emb[users], item_local, exclude, targets,
                               k_max)
      n_targets = jnp.sum(targets >= 0, axis=1)
      metrics = _user_metrics(hits.astype(jnp.float32), n_targets, ks)
      return jnp.sum(jnp.where(valid[:, None, None], metrics, 0.0), axis=0)

    sums = jnp.sum(jax.lax.map(block_sums, (users, valid, targets, exclude)),
                   axis=0)
    if split:
      sums = jax.lax.psum(sums, DATA_AXIS)
    return sums / jnp.maximum(n_users, 1)

  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(P(), P(ITEM_AXIS), users_spec, users_spec, users_spec,
                users_spec, P()),
      out_specs=P())(user_emb, item_emb, eval_set.users, eval_set.valid,
                     eval_set.targets, eval_set.exclude, eval_set.n_users)


def evaluate(user_emb: jax.Array, item_emb: jax.Array, eval_set: EvalSet, *,
             ks: Sequence[int] = (10, 20, 50),
             mesh=None) -> dict[str, float]:
  """Full-ranking metrics of dot-product scores, averaged over evaluated users.

  Args:
    user_emb: float (n_users, d) final user embeddings.
    item_emb: float (n_items, d) final item embeddings.
    eval_set: from `build_eval_set` with the same n_items.
    ks: cut-offs; the top max(ks) items are ranked (max(ks) <= n_items).
    mesh: a `parallel.make_mesh` mesh; with more than one device on its
      'item' axis, ranking is item-sharded (`_evaluate_blocks_sharded`;
      n_items must be a multiple of that axis). None: `_evaluate_blocks`
      (which follows the shardings of its inputs).

  Returns:
    Python floats keyed `recall@K`, `precision@K` (hits / K), `hit@K`,
    `ndcg@K` (standard NDCG) and `ndcg_mmssl@K` (the reference's NDCG, ideal
    DCG from the hits in the top max(ks)) for each K, plus `n_users`, the
    number of evaluated users. Metrics are 0.0 when no user is evaluated.
  """
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1 or max(ks) > item_emb.shape[0]:
    raise ValueError(f"ks must lie in [1, n_items={item_emb.shape[0]}], "
                     f"got {ks}")
  if mesh is not None and _check_item_mesh(item_emb.shape[0], mesh) > 1:
    means = _evaluate_blocks_sharded(user_emb, item_emb, eval_set, ks=ks,
                                     mesh=mesh)
  else:
    means = _evaluate_blocks(user_emb, item_emb, eval_set, ks=ks)
  means = np.asarray(means)
  out = {f"{name}@{k}": float(means[i, j])
         for i, k in enumerate(ks) for j, name in enumerate(METRICS)}
  out["n_users"] = int(eval_set.n_users)
  return out
