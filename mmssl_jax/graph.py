"""Bipartite graphs: building (numpy, once) and propagation (JAX).

Graphs are edge lists (`BipartiteGraph`): parallel `users`/`items` index arrays
plus one weight per direction, so that one function serves the one-sided
normalisation of the released code (docs/reference.md §2.1), LightGCN's
symmetric normalisation and the fixed-capacity modality graphs regenerated
during training (§4.4). Aggregation is `jraph.segment_sum` over the edges, the
sparse product A @ X without ever forming A densely.

We keep our own edge-list container instead of `jraph.GraphsTuple`: the graph
is bipartite with two weight vectors (one per direction), which GraphsTuple's
homogeneous node set would only obscure.

The generated interaction rows computed from propagated representations are
in `mmssl_jax.generator`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import sparse
import jraph
import numpy as np


# The released code adds 1e-8 inside the inverse square root (`csr_norm`).
DEGREE_EPS = 1e-8


class BipartiteGraph(NamedTuple):
  """User-item edges with a weight for each direction of propagation.

  Attributes:
    users: (E,) int32 user end of each edge.
    items: (E,) int32 item end of each edge.
    to_user_weight: (E,) float32, weight of the edge in A_UI (items -> users).
    to_item_weight: (E,) float32, weight of the edge in A_IU (users -> items).
    user_indptr: optional (U+1,) int32 CSR row pointers of A_UI; when given
      the edges must be sorted by user, and `item_order` (E,) sorts them by
      item with `item_indptr` (I+1,) the row pointers of A_IU in that order.
      `build_graph`, `sort_graph` and `pad_graph` fill them in.
    users_by_item, to_user_weight_by_item, to_item_weight_by_item: with the
      CSR fields, `users`, `to_user_weight` and `to_item_weight` permuted by
      `item_order`: the item-major CSR data, gathered once per graph, not in
      every product (a product's backward pass keeps the transposed CSR as
      its residual, which then is the graph itself, not a copy per call).
      They must agree with the user-major fields: build graphs with
      `with_csr` (or the builders above), and change weights in all four
      weight fields.
  Padding edges (fixed-capacity graphs) carry weight 0.

  With the CSR fields, products run as CSR x dense kernels
  (`jax.experimental.sparse`, a native kernel on CPU, cuSPARSE on GPU), and
  the backward pass is the transposed product over the other ordering. On
  the 2-core CPU this is 3-4x faster than segment sums (XLA scatter).
  Without them (e.g. for sharded edges) propagation uses
  `jraph.segment_sum`.
  """

  users: jax.Array | np.ndarray
  items: jax.Array | np.ndarray
  to_user_weight: jax.Array | np.ndarray
  to_item_weight: jax.Array | np.ndarray
  user_indptr: jax.Array | np.ndarray | None = None
  item_order: jax.Array | np.ndarray | None = None
  item_indptr: jax.Array | np.ndarray | None = None
  users_by_item: jax.Array | np.ndarray | None = None
  to_user_weight_by_item: jax.Array | np.ndarray | None = None
  to_item_weight_by_item: jax.Array | np.ndarray | None = None

  @property
  def n_edges(self) -> int:
    return int(self.users.shape[0])


def one_sided_weights(users, items, valid, n_users: int, n_items: int):
  """Weights of D_u^{-1/2} R and D_i^{-1/2} R^T (§2.1, `csr_norm`).

  Degrees count every valid entry, so duplicate (u, i) entries behave like the
  summed duplicates of a scipy csr built from the same lists (§4.4).
  Works on numpy and on traced jax arrays alike.
  """
  xp = jnp if isinstance(valid, jax.Array) else np
  valid = valid.astype(xp.float32)
  if xp is jnp:
    deg_u = jraph.segment_sum(valid, users, n_users)
    deg_i = jraph.segment_sum(valid, items, n_items)
  else:
    deg_u = np.bincount(users, valid, minlength=n_users).astype(np.float32)
    deg_i = np.bincount(items, valid, minlength=n_items).astype(np.float32)
  to_user = valid * (deg_u[users] + DEGREE_EPS) ** -0.5
  to_item = valid * (deg_i[items] + DEGREE_EPS) ** -0.5
  return to_user.astype(xp.float32), to_item.astype(xp.float32)


def build_graph(users: np.ndarray, items: np.ndarray, n_users: int,
                n_items: int, *, norm: str) -> BipartiteGraph:
  """Builds the normalised bipartite graph of the given interactions (numpy).

  Args:
    users, items: interaction index arrays (deduplicated).
    n_users, n_items: node counts.
    norm: 'one_sided' for the released code's D_row^{-1/2} A in both
      directions (§2.1), or 'symmetric' for LightGCN's
      D_u^{-1/2} A D_i^{-1/2}.
  """
  order = np.lexsort((items, users))
  users = np.asarray(users, np.int32)[order]
  items = np.asarray(items, np.int32)[order]
  valid = np.ones(users.shape, bool)
  to_user, to_item = one_sided_weights(users, items, valid, n_users, n_items)
  if norm == "symmetric":
    # to_user is deg_u^-1/2 and to_item is deg_i^-1/2 on every edge.
    to_user = to_item = (to_user * to_item).astype(np.float32)
  elif norm != "one_sided":
    raise ValueError(f"unknown graph norm {norm!r}")
  return with_csr(BipartiteGraph(users, items, to_user, to_item), n_users,
                  n_items)


def with_csr(graph: BipartiteGraph, n_users: int,
             n_items: int) -> BipartiteGraph:
  """Adds the CSR fields to a graph whose edges are sorted by user.

  Works on numpy and (inside jit) on jax arrays.
  """
  xp = jnp if isinstance(graph.users, jax.Array) else np
  item_order = xp.argsort(graph.items, stable=True).astype(xp.int32)
  user_indptr = xp.searchsorted(graph.users, xp.arange(n_users + 1),
                                side="left").astype(xp.int32)
  item_indptr = xp.searchsorted(graph.items[item_order],
                                xp.arange(n_items + 1),
                                side="left").astype(xp.int32)
  return graph._replace(
      user_indptr=user_indptr, item_order=item_order, item_indptr=item_indptr,
      users_by_item=graph.users[item_order],
      to_user_weight_by_item=graph.to_user_weight[item_order],
      to_item_weight_by_item=graph.to_item_weight[item_order])


def sort_graph(users, items, valid, n_users: int,
               n_items: int, *, csr: bool = True) -> BipartiteGraph:
  """A one-sided graph (§4.4 `csr_norm`) from unsorted, partly invalid pairs.

  Jit-able. Invalid pairs get weight 0 and join the last user and item, so
  they sort to the end of both orderings. csr=False leaves out the CSR
  fields (segment_sum propagation, e.g. for sharded runs).
  """
  users = jnp.where(valid, users, n_users - 1).astype(jnp.int32)
  items = jnp.where(valid, items, n_items - 1).astype(jnp.int32)
  order = jnp.argsort(users, stable=True)
  users, items, valid = users[order], items[order], valid[order]
  to_user, to_item = one_sided_weights(users, items, valid, n_users, n_items)
  graph = BipartiteGraph(users, items, to_user, to_item)
  return with_csr(graph, n_users, n_items) if csr else graph


def empty_graph(capacity: int, n_users: int, n_items: int, *,
                csr: bool = True) -> BipartiteGraph:
  """An all-zero modality graph of `capacity` edges, jit-able, no sort.

  Equal to `sort_graph` of `capacity` invalid pairs (every edge joins the
  last user and the last item with weight 0), which is what the reference
  schedule rebuilds from an empty list (§4.4) on all but one step of each
  epoch at T = 1: building it directly skips the argsorts.
  """
  users = jnp.full((capacity,), n_users - 1, jnp.int32)
  items = jnp.full((capacity,), n_items - 1, jnp.int32)
  # Two buffers, not one aliased twice: the train state is donated.
  graph = BipartiteGraph(users, items, jnp.zeros((capacity,), jnp.float32),
                         jnp.zeros((capacity,), jnp.float32))
  if not csr:
    return graph
  last = lambda n: jnp.where(jnp.arange(n + 1) < n, 0, capacity).astype(
      jnp.int32)
  return graph._replace(user_indptr=last(n_users),
                        item_order=jnp.arange(capacity, dtype=jnp.int32),
                        item_indptr=last(n_items),
                        users_by_item=jnp.full((capacity,), n_users - 1,
                                               jnp.int32),
                        to_user_weight_by_item=jnp.zeros((capacity,),
                                                         jnp.float32),
                        to_item_weight_by_item=jnp.zeros((capacity,),
                                                         jnp.float32))


def topk_table_graph(table: jax.Array, refreshed: jax.Array, n_items: int,
                     capacity: int, *, csr: bool = True) -> BipartiteGraph:
  """The modality graph of per-user top-k tables (paper variant), jit-able.

  Edges (u, table[u, j]) for every refreshed user u, binary, with symmetric
  weights 1/sqrt(d_u d_i) in both directions (LightGCN's normalisation).
  We use the symmetric form, not the released one-sided one, because items
  collect edges from every user whose top-k contains them: with the
  one-sided 1/sqrt(d_i) a popular item's message grows like sqrt(d_i),
  while the symmetric form keeps the operator's spectral norm at most 1.
  The graph is padded with zero-weight edges to `capacity`. csr=False
  leaves out the CSR fields (as `sort_graph`).

  Each row holds k distinct items (a top-k), so the edges are unique (u, i)
  pairs: with the rows sorted, the item-major order is one sort of the
  scalar keys i * n_users + u (`_item_major_csr`) instead of `with_csr`'s
  argsort: on CPU the rebuild of TikTok's 624k edges takes 0.046 s instead
  of 0.148 s. This graph is rebuilt every T steps, at T = 1 every step.
  """
  n_users, k = table.shape
  # Rows not yet written hold zeros: give them k distinct placeholder items
  # (weight 0) so that every (u, i) pair stays unique.
  rows = jnp.where(refreshed[:, None], table.astype(jnp.int32),
                   jnp.arange(k, dtype=jnp.int32)[None, :] % n_items)
  rows = jnp.sort(rows, axis=1)
  users = jnp.repeat(jnp.arange(n_users, dtype=jnp.int32), k)
  items = rows.reshape(-1)
  valid = jnp.repeat(refreshed, k)
  pad = capacity - n_users * k
  fast = (csr and pad == 0 and k <= n_items
          and n_users * n_items < 2**32)
  users = jnp.pad(users, (0, pad), constant_values=n_users - 1)
  items = jnp.pad(items, (0, pad), constant_values=n_items - 1)
  valid = jnp.pad(valid, (0, pad))
  to_user, to_item = one_sided_weights(users, items, valid, n_users, n_items)
  weight = to_user * to_item
  graph = BipartiteGraph(users, items, weight, weight)
  if not csr:
    return graph
  if not fast:
    return with_csr(graph, n_users, n_items)
  return _item_major_csr(graph, rows, n_users, n_items)


def _item_major_csr(graph: BipartiteGraph, rows: jax.Array, n_users: int,
                    n_items: int) -> BipartiteGraph:
  """`with_csr` of a graph whose edge e = u * k + j is (u, rows[u, j]), rows
  sorted and distinct, by one sort of unique uint32 keys (no argsort)."""
  k = rows.shape[1]
  key = (graph.items.astype(jnp.uint32) * jnp.uint32(n_users)
         + graph.users.astype(jnp.uint32))
  key = jnp.sort(key)
  items_by_item = (key // jnp.uint32(n_users)).astype(jnp.int32)
  users_by_item = (key % jnp.uint32(n_users)).astype(jnp.int32)
  # Column j of (u, i) in the sorted row u: a binary search over k entries.
  col = jnp.zeros_like(users_by_item)
  for bit in reversed(range(max(k - 1, 1).bit_length())):
    cand = col + (1 << bit)
    probe = rows[users_by_item, jnp.minimum(cand, k) - 1]
    col = jnp.where((cand <= k) & (probe < items_by_item), cand, col)
  item_order = users_by_item * k + col
  user_indptr = jnp.arange(n_users + 1, dtype=jnp.int32) * k
  item_indptr = jnp.searchsorted(items_by_item, jnp.arange(n_items + 1),
                                 side="left").astype(jnp.int32)
  return graph._replace(
      user_indptr=user_indptr, item_order=item_order, item_indptr=item_indptr,
      users_by_item=users_by_item,
      to_user_weight_by_item=graph.to_user_weight[item_order],
      to_item_weight_by_item=graph.to_item_weight[item_order])


def without_csr(graph: BipartiteGraph) -> BipartiteGraph:
  """The graph without its CSR fields: propagation by `jraph.segment_sum`.

  The CSR products are `jax.experimental.sparse` custom calls that XLA's
  SPMD partitioner cannot split; sharded runs use this form.
  """
  return graph._replace(user_indptr=None, item_order=None, item_indptr=None,
                        users_by_item=None, to_user_weight_by_item=None,
                        to_item_weight_by_item=None)


def pad_graph(graph: BipartiteGraph, capacity: int, n_users: int,
              n_items: int) -> BipartiteGraph:
  """Pads a numpy graph to `capacity` edges with zero-weight edges.

  Padding edges join the last user and the last item, so an edge list sorted
  by user stays sorted.
  """
  pad = capacity - graph.n_edges
  if pad < 0:
    raise ValueError(f"graph has {graph.n_edges} edges > capacity {capacity}")
  padded = BipartiteGraph(
      np.pad(np.asarray(graph.users), (0, pad), constant_values=n_users - 1),
      np.pad(np.asarray(graph.items), (0, pad), constant_values=n_items - 1),
      np.pad(np.asarray(graph.to_user_weight), (0, pad)),
      np.pad(np.asarray(graph.to_item_weight), (0, pad)))
  if graph.user_indptr is None:
    return padded
  return with_csr(padded, n_users, n_items)


def _csr_product(csr, x):
  data, indices, indptr = csr
  matrix = sparse.BCSR((data, indices, indptr),
                       shape=(indptr.shape[0] - 1, x.shape[0]))
  return matrix @ x


@jax.custom_vjp
def _csr_matmul(x, csr, csr_transposed):
  """csr @ x, whose backward pass is csr_transposed @ g (no scatter)."""
  del csr_transposed
  return _csr_product(csr, x)


def _csr_matmul_fwd(x, csr, csr_transposed):
  return _csr_product(csr, x), csr_transposed


def _csr_matmul_bwd(csr_transposed, g):
  return _csr_product(csr_transposed, g), None, None


_csr_matmul.defvjp(_csr_matmul_fwd, _csr_matmul_bwd)


def _csr_pair(graph: BipartiteGraph, to: str):
  """(A, A^T) as CSR triples (data, indices, indptr) towards users or items."""
  if to == "users":  # A_UI over the user-sorted edges, A_UI^T by item
    return ((graph.to_user_weight, graph.items, graph.user_indptr),
            (graph.to_user_weight_by_item, graph.users_by_item,
             graph.item_indptr))
  return ((graph.to_item_weight_by_item, graph.users_by_item,
           graph.item_indptr),
          (graph.to_item_weight, graph.items, graph.user_indptr))


def to_users(graph: BipartiteGraph, item_x: jax.Array, n_users: int):
  """A_UI @ item_x: each user sums its items' rows, weighted (§2.3 b, c, f)."""
  if graph.user_indptr is not None:
    return _csr_matmul(item_x, *_csr_pair(graph, "users"))
  messages = graph.to_user_weight[:, None] * item_x[graph.items]
  return jraph.segment_sum(messages, graph.users, n_users)


def to_items(graph: BipartiteGraph, user_x: jax.Array, n_items: int):
  """A_IU @ user_x: each item sums its users' rows, weighted."""
  if graph.user_indptr is not None:
    return _csr_matmul(user_x, *_csr_pair(graph, "items"))
  messages = graph.to_item_weight[:, None] * user_x[graph.users]
  return jraph.segment_sum(messages, graph.items, n_items)


def lightgcn_propagate(graph: BipartiteGraph, user_emb, item_emb,
                       n_layers: int):
  """LightGCN (He et al. 2020): simultaneous layers, mean over layers 0..K.

  With symmetric weights, layer l+1 is e_u = sum_i e_i / sqrt(d_u d_i).
  """
  n_users, n_items = user_emb.shape[0], item_emb.shape[0]
  users, items = [user_emb], [item_emb]
  for _ in range(n_layers):
    u, i = users[-1], items[-1]
    users.append(to_users(graph, i, n_users))
    items.append(to_items(graph, u, n_items))
  return jnp.mean(jnp.stack(users), 0), jnp.mean(jnp.stack(items), 0)


def mmssl_id_propagate(graph: BipartiteGraph, user_ego, item_ego,
                       n_layers: int, *, last_layer_softmax: bool = True,
                       user_rows=None, item_rows=None):
  """The released code's ID GCN (§2.3 f): sequential layers, softmax last.

  Layer l: u^l = A_UI i^{l-1}, then i^l = A_IU u^l (items use the fresh
  users). On the last layer both are passed through a softmax over the
  embedding dimensions. Readout is the mean over layers 0..n_layers.

  `user_rows` / `item_rows` (optional index arrays): return the readout of
  those rows only. The item softmax and the layer mean are row-wise, so
  they are taken after the gather; the training step needs only the batch
  rows, and this keeps (U or I, d) softmax outputs and readouts, and their
  cotangents, out of the backward pass. The user softmax stays whole: the
  items' last layer reads every user's.
  """
  n_users, n_items = user_ego.shape[0], item_ego.shape[0]
  users, items = [user_ego], [item_ego]
  for layer in range(n_layers):
    last = last_layer_softmax and layer == n_layers - 1
    u = to_users(graph, items[-1], n_users)
    if last:
      u = jax.nn.softmax(u, axis=-1)
    i = to_items(graph, u, n_items)
    if last and item_rows is None:
      i = jax.nn.softmax(i, axis=-1)
    users.append(u)
    items.append(i)
  if user_rows is not None:
    users = [x[user_rows] for x in users]
  if item_rows is not None:
    items = [x[item_rows] for x in items]
    if last_layer_softmax and n_layers:
      items[-1] = jax.nn.softmax(items[-1], axis=-1)
  return jnp.mean(jnp.stack(users), 0), jnp.mean(jnp.stack(items), 0)
