"""The regenerated modality graphs G^m: their buffers, schedules and updates.

Every step, each batch user's top-k items of its generated row in modality m
(the modality-aware interaction structure, docs/reference.md §4.4) feed the
graph G^m over which the ID embeddings propagate in modality m (§2.3 c).
Two schedules, both jittable with fixed shapes:

* 'reference' (`reference_update`): what the released code does. The top-k
  (user, item) pairs of each batch are appended to lists (`GraphBuffer`);
  at every batch index that is a positive multiple of T the graphs are
  rebuilt from the lists with one-sided weights and the lists cleared. With
  its pairing bug ('tiled') and T = 1 the rebuilt graphs are almost always
  empty (§8.1).
* 'persistent' (`persistent_update`): the paper's modality-aware graphs. A
  per-user (n_users, k) table (`TopkTable`) keeps each user's latest top-k
  items; every T steps the graphs are rebuilt from the whole table with
  symmetric weights.

Until its first regeneration G^m is the base training graph (§2.1), which
the forward reads from the step inputs (`is_base`), so the state holds only
what a regeneration can produce.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mmssl_jax import graph as graph_lib

SCHEDULES = ("reference", "persistent")
PAIRINGS = ("tiled", "per_user")
TOPK_SCORES = ("dot", "cosine")


class GraphBuffer(NamedTuple):
  """Accumulated (user, item) top-k pairs per modality (§4.4, lists x, y).

  users/items: modality -> (capacity,) int32; length: pairs used so far.
  """

  users: dict[str, jax.Array]
  items: dict[str, jax.Array]
  length: jax.Array


class TopkTable(NamedTuple):
  """Persistent per-user modality graphs (the 'persistent' schedule).

  items: modality -> (n_users, k) int32, the top-k items of each user's
    latest generated row; refreshed: (n_users,) bool, rows written so far.
  """

  items: dict[str, jax.Array]
  refreshed: jax.Array


@dataclasses.dataclass(frozen=True)
class GraphSchedule:
  """Static settings of the modality-graph regeneration (`graph_update.*`).

  schedule: 'reference' or 'persistent'.
  period: T, steps between two rebuilds.
  k: top-k items per generated row, floor(I * m_topk_rate) (§4.4).
  pairing: 'tiled' (the released `repeat` bug) or 'per_user'.
  topk_score: 'dot' (the released P_b . Q_i) or 'cosine' (P_b . Q_i / |Q_i|).
  steps_per_epoch: batches per epoch (the reference schedule never rebuilds
    when an epoch has at most T of them).
  """

  schedule: str
  period: int
  k: int
  pairing: str
  topk_score: str
  steps_per_epoch: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, n_items: int,
                  steps_per_epoch: int) -> "GraphSchedule":
    gu = config.graph_update
    return cls(schedule=gu.schedule, period=int(gu.T),
               k=int(n_items * gu.m_topk_rate), pairing=gu.pairing,
               topk_score=gu.topk_score, steps_per_epoch=steps_per_epoch)

  def check(self, n_items: int) -> None:
    """Raises ValueError for settings MMSSL cannot run with."""
    for name, value, allowed in (("schedule", self.schedule, SCHEDULES),
                                 ("pairing", self.pairing, PAIRINGS),
                                 ("topk_score", self.topk_score, TOPK_SCORES)):
      if value not in allowed:
        raise ValueError(f"graph_update.{name}={value!r}: expected one of "
                         f"{allowed}")
    if self.schedule == "persistent" and self.k < 1:
      raise ValueError(
          "graph_update.schedule='persistent' needs k >= 1, but "
          f"m_topk_rate gives k = 0 on {n_items} items")


def buffer_capacity(sched: GraphSchedule, batch_size: int) -> int:
  """Pairs the reference schedule can accumulate between two rebuilds.

  Rebuilds happen at batch indices that are positive multiples of T and the
  lists survive epoch boundaries, so at most (T - 1) + 1 + (T - 1) batches of
  B * k pairs accumulate (end of one epoch, index 0, then up to T - 1 more).
  """
  return (2 * sched.period - 1) * batch_size * sched.k


def empty_buffer(modalities, capacity: int) -> GraphBuffer:
  zeros = lambda: jnp.zeros((capacity,), jnp.int32)
  return GraphBuffer({m: zeros() for m in modalities},
                     {m: zeros() for m in modalities},
                     jnp.zeros((), jnp.int32))


def empty_table(modalities, n_users: int, k: int) -> TopkTable:
  return TopkTable({m: jnp.zeros((n_users, k), jnp.int32) for m in modalities},
                   jnp.zeros((n_users,), bool))


def init_graphs(sched: GraphSchedule, modalities, n_users: int, n_items: int,
                batch_size: int):
  """Initial (modality graphs, GraphBuffer or TopkTable) of a run.

  The graphs are all-zero until the first regeneration (`is_base`); their
  fixed capacity is what a rebuild can produce.
  """
  if sched.schedule == "persistent":
    capacity = n_users * sched.k
    buffer = empty_table(modalities, n_users, sched.k)
  else:
    # k = 0 (Baby settings) never appends; a one-slot buffer keeps every
    # state leaf non-empty (orbax cannot save zero-size arrays).
    capacity = max(buffer_capacity(sched, batch_size), 1)
    buffer = empty_buffer(modalities, capacity)
  graphs = {m: graph_lib.empty_graph(capacity, n_users, n_items)
            for m in modalities}
  return graphs, buffer


def is_base(sched: GraphSchedule, step) -> jax.Array:
  """Whether G^m still equals the base graph in the forwards of `step`.

  G^m starts as the base graph (§2.1) and is first regenerated at the end of
  step T under the released schedule (batch index T of epoch 0; never when
  an epoch has at most T steps, §4.4) and of step T - 1 under the
  persistent one. Until then `model.forward` propagates over the base graph
  (`modality_is_base`), so the state's modality graphs hold only what a
  regeneration can produce (`init_graphs`).
  """
  t = sched.period
  if sched.schedule == "persistent":
    return jnp.asarray(step < t)
  if t >= sched.steps_per_epoch:
    return jnp.ones((), bool)
  return jnp.asarray(step <= t)


def pair_topk(users, top_items, pairing: str):
  """(user, item) pairs from each batch user's top-k items (§4.4).

  'tiled' reproduces the released `repeat(1, k)`: the user list is the batch
  tiled k times while items are read row by row, so position p = b*k + j gets
  user users[p mod B] and item top_items[b, j]. 'per_user' pairs each row's
  items with that row's user.
  """
  b, k = top_items.shape
  items = top_items.reshape(-1)
  if pairing == "tiled":
    return jnp.tile(users, k), items
  if pairing == "per_user":
    return jnp.repeat(users, k), items
  raise ValueError(f"unknown graph_update.pairing {pairing!r}")


TopItems = Callable[[], Mapping[str, jax.Array]]


def top_items_of_rows(rows: Mapping[str, jax.Array], k: int) -> TopItems:
  """`top_items` of whole (B, I) generated rows: their top-k item ids."""
  return lambda: {m: jax.lax.top_k(r, k)[1].astype(jnp.int32)
                  for m, r in rows.items()}


def reference_update(graphs, buffer: GraphBuffer, top_items: TopItems, users,
                     batch_idx, *, k: int, period: int, pairing: str,
                     n_users: int, n_items: int):
  """The released modality-graph regeneration schedule (§4.4).

  At a batch index that is a positive multiple of T, rebuild G^m from the
  accumulated pairs (one-sided weights, duplicates summed) and clear the
  lists; the current batch is not added. Otherwise append this batch's top-k
  pairs, `top_items()` (modality -> (B, k) ids), which is called only in
  that branch. An empty list gives an all-zero graph
  (`graph.empty_graph`, no sort). Rebuilt graphs keep the CSR fields only
  if the current ones have them.
  """
  rebuild = (batch_idx > 0) & (batch_idx % period == 0)

  def do_rebuild(graphs, buffer):
    capacity = next(iter(graphs.values())).n_edges
    new = {}
    for m in graphs:
      u = jnp.zeros((capacity,), jnp.int32)
      i = jnp.zeros((capacity,), jnp.int32)
      n_buf = buffer.users[m].shape[0]
      if n_buf:
        u = u.at[:n_buf].set(buffer.users[m])
        i = i.at[:n_buf].set(buffer.items[m])
      valid = jnp.arange(capacity) < buffer.length
      csr = graphs[m].user_indptr is not None
      new[m] = jax.lax.cond(
          buffer.length > 0,
          lambda u, i, valid: graph_lib.sort_graph(u, i, valid, n_users,
                                                   n_items, csr=csr),
          lambda *_: graph_lib.empty_graph(capacity, n_users, n_items,
                                           csr=csr),
          u, i, valid)
    return new, buffer._replace(length=jnp.zeros((), jnp.int32))

  def do_append(graphs, buffer):
    if k == 0:
      return graphs, buffer
    bu, bi = dict(buffer.users), dict(buffer.items)
    for m, top in top_items().items():
      pu, pi = pair_topk(users, top, pairing)
      bu[m] = jax.lax.dynamic_update_slice(bu[m], pu, (buffer.length,))
      bi[m] = jax.lax.dynamic_update_slice(bi[m], pi, (buffer.length,))
    return graphs, GraphBuffer(bu, bi, buffer.length + users.shape[0] * k)

  return jax.lax.cond(rebuild, do_rebuild, do_append, graphs, buffer)


def persistent_update(graphs, table: TopkTable, top_items: TopItems, users,
                      step, *, period: int, n_items: int):
  """The paper's modality-aware graphs, kept per user.

  Every step writes each batch user's top-k items of its generated row,
  `top_items()` (modality -> (B, k) ids; per user, no pairing scramble),
  into a persistent (n_users, k) table; every T steps, counting the current
  one, the graphs are rebuilt from the whole table
  (`graph.topk_table_graph`). Training positives score 0 in the masked
  rows, so they enter only when fewer than k items score above 0.
  """
  items = {m: table.items[m].at[users].set(top)
           for m, top in top_items().items()}
  table = TopkTable(items, table.refreshed.at[users].set(True))

  def rebuild(graphs):
    capacity = next(iter(graphs.values())).n_edges
    return {m: graph_lib.topk_table_graph(
        items[m], table.refreshed, n_items, capacity,
        csr=graphs[m].user_indptr is not None) for m in graphs}

  graphs = jax.lax.cond((step + 1) % period == 0, rebuild, lambda g: g,
                        graphs)
  return graphs, table


def update(sched: GraphSchedule, graphs, buffer, top_items: TopItems, users,
           batch_idx, step, *, n_users: int, n_items: int):
  """One step of the configured schedule; returns (graphs, buffer).

  Args:
    sched: the schedule.
    graphs: modality -> current `graph.BipartiteGraph` G^m.
    buffer: the `GraphBuffer` ('reference') or `TopkTable` ('persistent').
    top_items: () -> modality -> (B, k) int32 top-k item ids of the batch
      users' generated rows (computed only where the schedule uses them).
    users: (B,) batch users.
    batch_idx: batch index within the epoch (the reference schedule).
    step: global step before this one (the persistent schedule).
    n_users, n_items: node counts.
  """
  if sched.schedule == "reference":
    return reference_update(graphs, buffer, top_items, users, batch_idx,
                            k=sched.k, period=sched.period,
                            pairing=sched.pairing, n_users=n_users,
                            n_items=n_items)
  return persistent_update(graphs, buffer, top_items, users, step,
                           period=sched.period, n_items=n_items)
