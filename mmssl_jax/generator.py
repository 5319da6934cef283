"""Generated interaction rows: masked, normalised, blockwise, fused with a critic.

The generator of MMSSL (docs/reference.md §3.4) turns the feature
representations of modality m into interaction rows
S^m = n((P^m Q^m^T) * (1 - R)): the batch users' scores over all items, their
training items masked, each row L2-normalised. The critic (§3.5) compares them
with "real" rows built from the observed interactions.

A (B, I) row array is cheap on the reference datasets and impossible at a
million items, so besides the dense form (`generated_rows`) this module has
forms that never hold one: the low-rank critic reads generated rows only
through their projection onto its first-layer factor, which has a Gram form
(`generated_rows_projection`); and `fused_real_rows` and `blockwise_topk`
compute the "real" rows' first layer and the top-k refresh of the modality
graphs (§4.4) one item block at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph

from mmssl_jax import losses
from mmssl_jax import noise


def dense_rows(item_lists: jax.Array, n_items: int) -> jax.Array:
  """0/1 rows (B, n_items) from padded item lists (B, L); -1 marks padding."""
  rows = jnp.zeros((item_lists.shape[0], n_items + 1), jnp.float32)
  idx = jnp.where(item_lists < 0, n_items, item_lists)
  rows = rows.at[jnp.arange(item_lists.shape[0])[:, None], idx].set(1.0)
  return rows[:, :n_items]


def generated_rows(user_repr: jax.Array, item_repr: jax.Array,
                   interactions: jax.Array, *, block_size: int = 1024):
  """Masked, row-L2-normalised score rows: n((P_b . Q_i)(1 - R[b, i])) (§3.4).

  The products are computed over item blocks of `block_size` (as the released
  `u_sim_calculation` does); the full (B, I) rows are then normalised, which
  needs the norm over all items.
  """
  n_items = item_repr.shape[0]
  if block_size and n_items > block_size:
    n_blocks = -(-n_items // block_size)
    pad = n_blocks * block_size - n_items
    blocks = jnp.pad(item_repr, ((0, pad), (0, 0))).reshape(
        n_blocks, block_size, -1)
    scores = jax.lax.map(lambda q: user_repr @ q.T, blocks)  # (nb, B, bs)
    scores = jnp.moveaxis(scores, 0, 1).reshape(user_repr.shape[0], -1)
    scores = scores[:, :n_items]
  else:
    scores = user_repr @ item_repr.T
  scores = scores * (1.0 - interactions)
  return losses.l2_normalize(scores)



class BatchPositives(NamedTuple):
  """The batch users' training items as a flat, padded edge list.

  rows: (E,) int32 batch row b of each entry; items: (E,) int32 item ids;
  valid: (E,) bool (False marks padding, which points at row 0, item 0).
  """

  rows: jax.Array
  items: jax.Array
  valid: jax.Array


def batch_positives(item_lists: jax.Array, capacity: int | None = None
                    ) -> BatchPositives:
  """Compacts padded (B, L) item lists (-1 = padding) into `capacity` entries.

  `capacity` must be at least the number of valid entries (the sum of the B
  largest training degrees bounds it: `steps.Shapes.batch_positives`); None
  keeps all B * L slots. Padded lists are as long as the longest user's
  (603 items on TikTok, where the mean is 6.4), so compaction is what makes
  per-positive work O(edges of the batch), not O(B * L).
  """
  b, length = item_lists.shape
  valid = (item_lists >= 0).reshape(-1)
  rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), length)
  items = jnp.maximum(item_lists.reshape(-1), 0).astype(jnp.int32)
  if capacity is None or capacity >= b * length:
    return BatchPositives(jnp.where(valid, rows, 0), items * valid, valid)
  slot = jnp.where(valid, jnp.cumsum(valid) - 1, capacity)
  put = lambda x: jnp.zeros((capacity,), x.dtype).at[slot].set(x, mode="drop")
  return BatchPositives(put(rows), put(items), put(valid))


def generated_rows_projection(user_repr: jax.Array, item_repr: jax.Array,
                              positives: BatchPositives, factor: jax.Array, *,
                              eps: float = 1e-12) -> jax.Array:
  """n(S) F for the generated rows S = (P Q^T)(1 - R) (§3.4), in Gram form.

  The low-rank critic only ever needs a generated row through its projection
  onto the first-layer factor F (I, r), and both that projection and the
  row norm factor through item-side Gram matrices:

    S F = P (Q^T F) - sum_{i in R_b} (P_b . Q_i) F_i
    ||S_b||^2 = P_b (Q^T Q) P_b^T - sum_{i in R_b} (P_b . Q_i)^2

  so the cost is O(I d (r + d) + B d (r + d) + E (d + r)) for E batch
  positives, with no (B, I) product at all, against O(B I (d + r)) for
  `generated_rows(...) @ F`. Equal to it up to
  float rounding (the masked squares are subtracted from the full sum, so a
  row whose unmasked scores all vanish loses relative precision; the clamp
  at eps^2 keeps it finite, as `losses.l2_normalize` does). Differentiable
  w.r.t. P, Q and F.

  Args:
    user_repr: P, (B, d) user representations of the batch.
    item_repr: Q, (I, d) item representations.
    positives: the batch's training items R (`batch_positives`).
    factor: F (I, r).
    eps: as `losses.l2_normalize`.

  Returns:
    (B, r) projections of the unit-norm generated rows.
  """
  b = user_repr.shape[0]
  valid = positives.valid.astype(user_repr.dtype)
  s_pos = valid * jnp.sum(user_repr[positives.rows] *
                          item_repr[positives.items], axis=-1)      # (E,)
  correction = jraph.segment_sum(s_pos[:, None] * factor[positives.items],
                                 positives.rows, b)
  sf = user_repr @ (item_repr.T @ factor) - correction
  gram = item_repr.T @ item_repr
  sq = (jnp.sum((user_repr @ gram) * user_repr, axis=-1) -
        jraph.segment_sum(jnp.square(s_pos), positives.rows, b))
  return sf / jnp.sqrt(jnp.maximum(sq, eps * eps))[:, None]


# ----------------------------------------------------------------------------
# Blockwise fused generator (critic.kind='lowrank' with train.generator_block)
#
# The functions below never hold a (B, I) array: they loop over item blocks
# with `jax.lax.scan` and keep only per-row accumulators, so memory is
# O(B * (block_size + r + k)) besides the inputs. The scan bodies are
# rematerialised (`jax.checkpoint`) so that reverse-mode differentiation does
# not store the per-block (B, block_size) scores either: the backward pass
# recomputes them block by block.
#
# Item sharding (`parallel.py`): `block_constraint` is
# applied to the stacked item blocks (n_blocks, block_size, ...) and
# `row_constraint` to each (B, block_size) block of scores, so that every
# device computes its (B / data, block_size / item) share of each block; the
# per-row accumulators are then summed over 'item' by XLA. None: no
# constraint (one device, or data parallelism only). A block's items are not
# one shard's contiguous items, so XLA re-lays out the item-sharded (I, d)
# representations and (I, r) factor into blocks with an all-gather per step
# (transient, O(I * (d + r)) per device); a shard-local block order would
# avoid it but would change which Gumbel draws (`block_uniform`) each item
# gets and the running top-k's tie order, i.e. the results.


def _identity(x):
  return x


def _item_blocks(x: jax.Array, n_blocks: int, block_size: int) -> jax.Array:
  """(I, ...) -> (n_blocks, block_size, ...), zero-padded past I."""
  pad = n_blocks * block_size - x.shape[0]
  x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  return x.reshape(n_blocks, block_size, *x.shape[1:])


def _n_blocks(n_items: int, block_size: int) -> tuple[int, int]:
  block_size = int(min(block_size, n_items)) if block_size > 0 else n_items
  return -(-n_items // block_size), block_size


def interaction_block(item_lists: jax.Array, start, block_size: int
                      ) -> jax.Array:
  """0/1 rows (B, block_size) of items start .. start + block_size - 1.

  The block of `dense_rows(item_lists, I)`, built by a scatter of the
  padded lists (-1 = padding), O(B * L).
  """
  local = item_lists - start
  inside = (item_lists >= 0) & (local >= 0) & (local < block_size)
  cols = jnp.where(inside, local, block_size)
  rows = jnp.arange(item_lists.shape[0])[:, None]
  block = jnp.zeros((item_lists.shape[0], block_size + 1), jnp.float32)
  return block.at[rows, cols].set(1.0)[:, :block_size]


def _merge_topk(top_v, top_i, values, cols, k: int):
  """Running top-k: the k largest of the current k and a new block.

  The current entries come first and hold lower item ids, so ties keep the
  lower id first, as `jax.lax.top_k` over the whole row does.
  """
  cand_v = jnp.concatenate([top_v, values], axis=1)
  cand_i = jnp.concatenate(
      [top_i, jnp.broadcast_to(cols, values.shape).astype(jnp.int32)], axis=1)
  top_v, pos = jax.lax.top_k(cand_v, k)
  return top_v, jnp.take_along_axis(cand_i, pos, axis=1)


def blockwise_topk(user_repr: jax.Array, item_repr: jax.Array,
                   item_lists: jax.Array, *, block_size: int, k: int,
                   row_constraint=None, block_constraint=None) -> jax.Array:
  """Top-k item ids of `generated_rows` (the masked top-k refresh of §4.4),
  one item block at a time, with no (B, I) array.

  S = (P Q^T) * (1 - R) (§3.4); a scan over item blocks keeps a running
  top-k of each row of S, whose ranking equals that of n(S). Ties keep the
  lower item id first, as `jax.lax.top_k` over the whole row does. Not
  differentiated (the graph refresh uses ids only).

  Args:
    user_repr: P, (B, d) user representations of the batch.
    item_repr: Q, (I, d) item representations.
    item_lists: (B, L) the batch users' training items, -1 padded
      (`SamplerTables.train_lists[users]`): R.
    block_size: items per block.
    k: top-k size, >= 1.
    row_constraint, block_constraint: sharding constraints (x -> x) of the
      (B, block_size) score blocks and of the stacked item blocks (see the
      section comment); None: none.

  Returns:
    (B, k) int32 item ids.
  """
  n_items = item_repr.shape[0]
  n_blocks, bs = _n_blocks(n_items, block_size)
  b = user_repr.shape[0]
  rows_c = row_constraint or _identity
  blocks_c = block_constraint or _identity
  user_repr = jax.lax.stop_gradient(user_repr)
  xs = {"q": blocks_c(_item_blocks(jax.lax.stop_gradient(item_repr),
                                   n_blocks, bs)),
        "start": jnp.arange(n_blocks, dtype=jnp.int32) * bs}
  carry = {"top_v": jnp.full((b, k), -jnp.inf, jnp.float32),
           "top_i": jnp.full((b, k), -1, jnp.int32)}

  def body(carry, x):
    s = rows_c(user_repr @ x["q"].T)
    s = rows_c(s * (1.0 - interaction_block(item_lists, x["start"], bs)))
    cols = x["start"] + jnp.arange(bs, dtype=jnp.int32)
    values = jnp.where(cols < n_items, s, -jnp.inf)
    top_v, top_i = _merge_topk(carry["top_v"], carry["top_i"], values, cols,
                               k)
    return {"top_v": top_v, "top_i": top_i}, None

  carry, _ = jax.lax.scan(body, carry, xs)
  return carry["top_i"]


def block_uniform(key: jax.Array, n_rows: int, block: int,
                  block_size: int) -> jax.Array:
  """The U(0, 1) draws of one item block of `fused_real_rows`' Gumbel noise.

  Columns block * block_size ... of `noise.uniform(key, (n_rows, I))`: both
  passes (and the backward pass) see the same noise, and so does the dense
  path (`losses.gumbel_real_rows`) for the same key.
  """
  return noise.uniform(key, (n_rows, block_size),
                       col_offset=block * block_size)


def _real_row_stats(block_terms, xs, b: int, use_gumbel: bool):
  """The first scan of `fused_real_rows`: per row, ||S||^2 and (with the
  Gumbel transform) the softmax's running max and sum over item blocks."""

  def body(carry, x):
    _, s, z = block_terms(x)
    carry = dict(carry, sq=carry["sq"] + jnp.sum(jnp.square(s), axis=-1))
    if use_gumbel:
      new_max = jnp.maximum(carry["max"], jnp.max(z, axis=-1))
      carry["sum"] = (carry["sum"] * jnp.exp(carry["max"] - new_max) +
                      jnp.sum(jnp.exp(z - new_max[:, None]), axis=-1))
      carry["max"] = new_max
    return carry, None

  init = {"sq": jnp.zeros((b,), jnp.float32)}
  if use_gumbel:
    init.update(max=jnp.full((b,), -jnp.inf, jnp.float32),
                sum=jnp.zeros((b,), jnp.float32))
  return jax.lax.scan(body, init, xs)[0]


def fused_real_rows(key: jax.Array, user_repr: jax.Array,
                    item_repr: jax.Array, item_lists: jax.Array,
                    factor: jax.Array, *, block_size: int,
                    gumbel_scale: float, tau: float, ui_pre_scale: float,
                    use_gumbel: bool = True, log_logits: bool = False,
                    row_constraint=None, block_constraint=None) -> jax.Array:
  """n(x_r) F for the critic's "real" rows (§3.5), blockwise, no (B, I) array.

  x_r = softmax_i(losses.gumbel_logits(R, g)) + kappa * n(S), S the masked model
  scores (u* i*^T)(1 - R): the rows of `losses.gumbel_real_rows` (same
  switches) before their final `l2_normalize`, whose projection onto
  F (I, r) is returned. Two scans over item blocks: the first accumulates
  ||S||^2 and the softmax's running max and sum, the second
  x_r,b F_b and ||x_r,b||^2. The Gumbel uniforms of block j are
  `block_uniform(key, B, j, block_size)`, the dense path's draw for the
  same key restricted to the block's items.
  Differentiable w.r.t. F (the critic's U); the rows themselves are
  constants of the critic step, like the reference's no-grad real rows.

  Args:
    key: PRNG key of the Gumbel noise.
    user_repr: (B, d) final user representations u*[B].
    item_repr: (I, d) final item representations i*.
    item_lists: (B, L) training items of the batch users, -1 padded (R).
    factor: F (I, r).
    block_size, gumbel_scale, tau, ui_pre_scale, use_gumbel, log_logits: as
      `losses.gumbel_real_rows` (block_size: items per block).
    row_constraint, block_constraint: as `blockwise_topk`.
  """
  n_items = item_repr.shape[0]
  n_blocks, bs = _n_blocks(n_items, block_size)
  b = user_repr.shape[0]
  counts = jnp.sum(item_lists >= 0, axis=1).astype(jnp.float32)[:, None]
  user_repr = jax.lax.stop_gradient(user_repr)
  item_repr = jax.lax.stop_gradient(item_repr)
  rows_c = row_constraint or _identity
  blocks_c = block_constraint or _identity
  xs = {"q": blocks_c(_item_blocks(item_repr, n_blocks, bs)),
        "j": jnp.arange(n_blocks, dtype=jnp.int32)}

  def block_terms(x):
    start = x["j"] * bs
    r = rows_c(interaction_block(item_lists, start, bs))
    s = rows_c((user_repr @ x["q"].T) * (1.0 - r))
    valid = (start + jnp.arange(bs)) < n_items
    if not use_gumbel:
      return r, s, None
    xi = block_uniform(key, b, x["j"], bs)
    gumbel = losses.standard_gumbel(xi)
    logits = losses.gumbel_logits(
        interactions=r, gumbel=gumbel, counts=counts,
        gumbel_scale=gumbel_scale, tau=tau, log_logits=log_logits)
    z = rows_c(jnp.where(valid, logits, -jnp.inf))
    return r, s, z

  stats = _real_row_stats(block_terms, xs, b, use_gumbel)
  model_scale = ui_pre_scale / jnp.sqrt(jnp.maximum(stats["sq"], 1e-24))

  def project_body(carry, x):
    acc, sq = carry
    r, s, z = block_terms(x)
    if use_gumbel:
      observed = jnp.exp(z - stats["max"][:, None]) / stats["sum"][:, None]
    else:
      observed = r / jnp.maximum(counts, 1.0)
    rows = rows_c(observed + model_scale[:, None] * s)
    return (acc + rows @ x["f"], sq + jnp.sum(jnp.square(rows), axis=-1)), None

  xs["f"] = blocks_c(_item_blocks(factor, n_blocks, bs))
  (acc, sq), _ = jax.lax.scan(
      jax.checkpoint(project_body),
      (jnp.zeros((b, factor.shape[1]), jnp.float32),
       jnp.zeros((b,), jnp.float32)), xs)
  return acc / jnp.sqrt(jnp.maximum(sq, 1e-24))[:, None]
