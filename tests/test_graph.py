"""Tests for mmssl_jax.graph against dense numpy matrices built from the spec.

§2.1 (one-sided D^{-1/2} normalisation with +1e-8), §2.3 (b, c, f), §3.4
(masked, row-normalised generated rows) and §4.4 (duplicates summed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import graph as graph_lib
from mmssl_jax import generator

U, I, D = 11, 13, 6
ATOL = 1e-5


def _random_edges(seed, n_users=U, n_items=I, density=0.3, empty_user=True,
                  empty_item=True):
  """Deduplicated random interactions; optionally one user and one item
  without edges (degree 0, the 1e-8 guard)."""
  rng = np.random.default_rng(seed)
  r = rng.random((n_users, n_items)) < density
  if empty_user:
    r[-1] = False
  if empty_item:
    r[:, -1] = False
  users, items = np.nonzero(r)
  return users.astype(np.int32), items.astype(np.int32)


def _x(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _dense_of(graph, n_users, n_items):
  """(A_UI, A_IU) read back through to_users/to_items on identity inputs."""
  a_ui = graph_lib.to_users(graph, jnp.eye(n_items), n_users)
  a_iu = graph_lib.to_items(graph, jnp.eye(n_users), n_items)
  return np.asarray(a_ui), np.asarray(a_iu)


@pytest.mark.parametrize("norm", ["one_sided", "symmetric"])
def test_build_graph_weights_match_dense(norm):
  users, items = _random_edges(0)
  g = graph_lib.build_graph(users, items, U, I, norm=norm)
  r = helpers.dense_counts(users, items, U, I)
  want_ui, want_iu = (helpers.one_sided_dense(r) if norm == "one_sided"
                      else helpers.symmetric_dense(r))
  got_ui = helpers.dense_from_graph_edges(g.users, g.items, g.to_user_weight,
                                          U, I)
  got_iu = helpers.dense_from_graph_edges(g.users, g.items, g.to_item_weight,
                                          I, U, by_user=False)
  np.testing.assert_allclose(got_ui, want_ui, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_iu, want_iu, rtol=1e-6, atol=1e-7)
  assert g.to_user_weight.dtype == np.float32
  assert g.n_edges == len(users)


def test_one_sided_weights_are_inverse_sqrt_row_degree():
  # Hand-computed: user 0 has 2 items, user 1 has 1; item 0 has 2 users.
  g = graph_lib.build_graph(np.array([0, 0, 1]), np.array([0, 1, 0]), 2, 2,
                            norm="one_sided")
  np.testing.assert_allclose(g.to_user_weight, [2 ** -0.5, 2 ** -0.5, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(g.to_item_weight, [2 ** -0.5, 1.0, 2 ** -0.5],
                             rtol=1e-6)


def test_build_graph_rejects_unknown_norm():
  with pytest.raises(ValueError, match="norm"):
    graph_lib.build_graph(np.array([0]), np.array([0]), 1, 1, norm="mean")


@pytest.mark.parametrize("norm", ["one_sided", "symmetric"])
def test_to_users_and_to_items_equal_dense_products(norm):
  users, items = _random_edges(1)
  g = graph_lib.build_graph(users, items, U, I, norm=norm)
  r = helpers.dense_counts(users, items, U, I)
  a_ui, a_iu = (helpers.one_sided_dense(r) if norm == "one_sided"
                else helpers.symmetric_dense(r))
  xi, xu = _x(2, I, D), _x(3, U, D)
  gj = jax.tree.map(jnp.asarray, g)
  np.testing.assert_allclose(graph_lib.to_users(gj, jnp.asarray(xi), U),
                             a_ui @ xi, atol=ATOL)
  np.testing.assert_allclose(graph_lib.to_items(gj, jnp.asarray(xu), I),
                             a_iu @ xu, atol=ATOL)


def test_lightgcn_propagate_matches_dense_lightgcn():
  users, items = _random_edges(4)
  g = jax.tree.map(jnp.asarray, graph_lib.build_graph(
      users, items, U, I, norm="symmetric"))
  a_ui, a_iu = helpers.symmetric_dense(helpers.dense_counts(users, items, U, I))
  eu, ei = _x(5, U, D), _x(6, I, D)
  n_layers = 3
  us, is_ = [eu.astype(np.float64)], [ei.astype(np.float64)]
  for _ in range(n_layers):  # simultaneous: both use the previous layer
    us, is_ = us + [a_ui @ is_[-1]], is_ + [a_iu @ us[-1]]
  got_u, got_i = graph_lib.lightgcn_propagate(g, jnp.asarray(eu),
                                              jnp.asarray(ei), n_layers)
  np.testing.assert_allclose(got_u, np.mean(us, 0), atol=ATOL)
  np.testing.assert_allclose(got_i, np.mean(is_, 0), atol=ATOL)


@pytest.mark.parametrize("last_softmax", [True, False])
def test_mmssl_id_propagate_matches_dense_port(last_softmax):
  users, items = _random_edges(7)
  g = jax.tree.map(jnp.asarray, graph_lib.build_graph(
      users, items, U, I, norm="one_sided"))
  a_ui, a_iu = helpers.one_sided_dense(helpers.dense_counts(users, items, U, I))
  eu, ei = _x(8, U, D), _x(9, I, D)
  want_u, want_i = helpers.mmssl_id_gcn(a_ui, a_iu, eu.astype(np.float64),
                                        ei.astype(np.float64), 2, last_softmax)
  got_u, got_i = graph_lib.mmssl_id_propagate(
      g, jnp.asarray(eu), jnp.asarray(ei), 2, last_layer_softmax=last_softmax)
  np.testing.assert_allclose(got_u, want_u, atol=ATOL)
  np.testing.assert_allclose(got_i, want_i, atol=ATOL)


def test_mmssl_id_propagate_is_sequential_not_simultaneous():
  # The simultaneous (LightGCN-style) order gives a different result.
  users, items = _random_edges(10)
  g = jax.tree.map(jnp.asarray, graph_lib.build_graph(
      users, items, U, I, norm="one_sided"))
  a_ui, a_iu = helpers.one_sided_dense(helpers.dense_counts(users, items, U, I))
  eu, ei = _x(11, U, D), _x(12, I, D)
  _, got_i = graph_lib.mmssl_id_propagate(
      g, jnp.asarray(eu), jnp.asarray(ei), 1, last_layer_softmax=False)
  simultaneous_i1 = a_iu @ eu
  sequential_i1 = a_iu @ (a_ui @ ei)
  np.testing.assert_allclose(got_i, (ei + sequential_i1) / 2, atol=ATOL)
  assert not np.allclose(got_i, (ei + simultaneous_i1) / 2, atol=1e-3)


def test_pad_graph_leaves_results_unchanged():
  users, items = _random_edges(13)
  g = graph_lib.build_graph(users, items, U, I, norm="one_sided")
  padded = helpers.pad_graph(g, g.n_edges + 17, U, I)
  assert padded.n_edges == g.n_edges + 17
  np.testing.assert_array_equal(padded.to_user_weight[g.n_edges:], 0)
  np.testing.assert_array_equal(padded.to_item_weight[g.n_edges:], 0)
  gj, pj = jax.tree.map(jnp.asarray, g), jax.tree.map(jnp.asarray, padded)
  xi, xu = jnp.asarray(_x(14, I, D)), jnp.asarray(_x(15, U, D))
  np.testing.assert_array_equal(graph_lib.to_users(gj, xi, U),
                                graph_lib.to_users(pj, xi, U))
  np.testing.assert_array_equal(graph_lib.to_items(gj, xu, I),
                                graph_lib.to_items(pj, xu, I))
  for a, b in zip(graph_lib.mmssl_id_propagate(gj, xu, xi, 2),
                  graph_lib.mmssl_id_propagate(pj, xu, xi, 2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Same capacity is a no-op; smaller raises.
  assert helpers.pad_graph(g, g.n_edges, U, I).n_edges == g.n_edges
  with pytest.raises(ValueError):
    helpers.pad_graph(g, g.n_edges - 1, U, I)


@pytest.mark.parametrize("traced", [False, True])
def test_one_sided_weights_with_duplicates_equal_summed_csr(traced):
  """§4.4: A^m = csr of ones at (x, y) with duplicates summed, then csr_norm."""
  rng = np.random.default_rng(16)
  n = 60
  users = rng.integers(0, 5, n).astype(np.int32)   # many duplicates
  items = rng.integers(0, 6, n).astype(np.int32)
  valid = np.arange(n) < 45                         # the tail is padding
  if traced:
    w_u, w_i = jax.jit(lambda u, i, v: graph_lib.one_sided_weights(
        u, i, v, 7, 6))(jnp.asarray(users), jnp.asarray(items),
                        jnp.asarray(valid))
  else:
    w_u, w_i = graph_lib.one_sided_weights(users, items, valid, 7, 6)
  w_u, w_i = np.asarray(w_u), np.asarray(w_i)
  np.testing.assert_array_equal(w_u[~valid], 0)
  np.testing.assert_array_equal(w_i[~valid], 0)
  r = helpers.dense_counts(users[valid], items[valid], 7, 6)
  assert r.max() > 1  # duplicates are really there
  import scipy.sparse as sp  # the reference builds a scipy csr
  csr = sp.csr_matrix((np.ones(valid.sum()), (users[valid], items[valid])),
                      shape=(7, 6))
  np.testing.assert_array_equal(csr.toarray(), r)
  want_ui, want_iu = helpers.one_sided_dense(csr.toarray())
  got_ui = helpers.dense_from_graph_edges(users, items, w_u, 7, 6)
  got_iu = helpers.dense_from_graph_edges(users, items, w_i, 6, 7,
                                          by_user=False)
  np.testing.assert_allclose(got_ui, want_ui, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_iu, want_iu, rtol=1e-6, atol=1e-7)


def test_one_sided_weights_all_invalid_gives_zero_graph():
  users = np.zeros(8, np.int32)
  w_u, w_i = graph_lib.one_sided_weights(jnp.asarray(users),
                                         jnp.asarray(users),
                                         jnp.zeros(8, bool), 3, 4)
  np.testing.assert_array_equal(w_u, 0)
  np.testing.assert_array_equal(w_i, 0)


def test_dense_rows_from_padded_lists():
  lists = np.array([[0, 3, 4, -1, -1], [-1, -1, -1, -1, -1], [5, 1, 2, 0, 3],
                    [2, -1, -1, -1, -1]], np.int32)
  want = np.zeros((4, 6), np.float32)
  for b, row in enumerate(lists):
    for i in row:
      if i >= 0:
        want[b, i] = 1.0
  got = generator.dense_rows(jnp.asarray(lists), 6)
  assert got.shape == (4, 6) and got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)


def _generated_rows_dense(p, q, r):
  s = (p.astype(np.float64) @ q.astype(np.float64).T) * (1.0 - r)
  return helpers.l2n(s)


@pytest.mark.parametrize("block_size", [0, 7, 30, 64])
def test_generated_rows_match_dense(block_size):
  """block 7 is smaller than and does not divide 30 items; 64 > n_items."""
  b, n_items = 5, 30
  p, q = _x(17, b, D), _x(18, n_items, D)
  rng = np.random.default_rng(19)
  r = (rng.random((b, n_items)) < 0.3).astype(np.float32)
  r[3] = 1.0  # every entry of row 3 is masked
  got = jax.jit(lambda p, q, r: generator.generated_rows(
      p, q, r, block_size=block_size))(jnp.asarray(p), jnp.asarray(q),
                                       jnp.asarray(r))
  got = np.asarray(got)
  assert got.shape == (b, n_items)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _generated_rows_dense(p, q, r), atol=ATOL)
  np.testing.assert_array_equal(got[3], 0.0)
  # Training positives are exactly zero, other rows have unit norm.
  np.testing.assert_array_equal(got[r > 0], 0.0)
  np.testing.assert_allclose(np.linalg.norm(got[[0, 1, 2, 4]], axis=1), 1.0,
                             rtol=1e-5)


def test_generated_rows_all_masked_row_has_finite_gradient():
  p, q = jnp.asarray(_x(20, 3, D)), jnp.asarray(_x(21, 10, D))
  r = jnp.zeros((3, 10)).at[1].set(1.0)
  w = jnp.asarray(_x(22, 3, 10))
  grads = jax.jit(jax.grad(
      lambda p, q: jnp.sum(w * generator.generated_rows(p, q, r, block_size=4)),
      argnums=(0, 1)))(p, q)
  assert helpers.tree_all_finite(grads)
  # Nothing reaches the all-masked user's representation.
  np.testing.assert_array_equal(grads[0][1], 0.0)


def _graph_variants(users, items, n_users, n_items):
  """The same one-sided graph as built (sorted, with orderings), padded, and
  as a plain unsorted edge list (fallback path)."""
  g = graph_lib.build_graph(users, items, n_users, n_items, norm="one_sided")
  padded = helpers.pad_graph(g, g.n_edges + 5, n_users, n_items)
  perm = np.random.default_rng(0).permutation(g.n_edges)
  plain = graph_lib.BipartiteGraph(
      *(np.asarray(a)[perm] for a in (g.users, g.items, g.to_user_weight,
                                      g.to_item_weight)))
  return {name: jax.tree.map(jnp.asarray, x) for name, x in
          (("built", g), ("padded", padded), ("plain", plain))}


@pytest.mark.parametrize("variant", ["built", "padded", "plain"])
def test_propagation_gradients_are_the_transposed_products(variant):
  users, items = _random_edges(23)
  g = _graph_variants(users, items, U, I)[variant]
  a_ui, a_iu = helpers.one_sided_dense(helpers.dense_counts(users, items, U, I))
  wu, wi = _x(24, U, D), _x(25, I, D)
  xi, xu = jnp.asarray(_x(26, I, D)), jnp.asarray(_x(27, U, D))
  grad_users = jax.jit(jax.grad(
      lambda x: jnp.sum(wu * graph_lib.to_users(g, x, U))))(xi)
  grad_items = jax.jit(jax.grad(
      lambda x: jnp.sum(wi * graph_lib.to_items(g, x, I))))(xu)
  np.testing.assert_allclose(grad_users, a_ui.T @ wu, atol=ATOL)
  np.testing.assert_allclose(grad_items, a_iu.T @ wi, atol=ATOL)


def test_id_propagation_gradient_matches_finite_differences():
  """The whole ID GCN (sequential layers, softmax) through the sparse
  products: directional derivative vs a float32 central difference."""
  users, items = _random_edges(28)
  g = _graph_variants(users, items, U, I)["padded"]
  eu, ei = jnp.asarray(_x(29, U, D)), jnp.asarray(_x(30, I, D))
  du, di = jnp.asarray(_x(31, U, D)), jnp.asarray(_x(32, I, D))
  wu, wi = jnp.asarray(_x(33, U, D)), jnp.asarray(_x(37, I, D))

  def f(eu, ei):
    u, i = graph_lib.mmssl_id_propagate(g, eu, ei, 2)
    return jnp.sum(wu * u) + jnp.sum(wi * i)

  gu, gi = jax.jit(jax.grad(f, argnums=(0, 1)))(eu, ei)
  eps = 1e-2
  fd = (f(eu + eps * du, ei + eps * di) - f(eu - eps * du, ei - eps * di)) / (
      2 * eps)
  np.testing.assert_allclose(jnp.sum(gu * du) + jnp.sum(gi * di), fd,
                             rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(not hasattr(graph_lib, "sort_graph"),
                    reason="graph.sort_graph not in this version")
def test_sort_graph_matches_dense_one_sided():
  """The jit-able rebuild of §4.4: duplicates summed, invalid edges dropped."""
  rng = np.random.default_rng(34)
  n = 40
  users = rng.integers(0, U, n).astype(np.int32)
  items = rng.integers(0, I, n).astype(np.int32)
  valid = rng.random(n) < 0.7
  g = jax.jit(lambda u, i, v: graph_lib.sort_graph(u, i, v, U, I))(
      jnp.asarray(users), jnp.asarray(items), jnp.asarray(valid))
  assert g.n_edges == n
  w_u, w_i = np.asarray(g.to_user_weight), np.asarray(g.to_item_weight)
  assert np.count_nonzero(w_u) == valid.sum()
  a_ui, a_iu = helpers.one_sided_dense(
      helpers.dense_counts(users[valid], items[valid], U, I))
  np.testing.assert_allclose(
      helpers.dense_from_graph_edges(g.users, g.items, w_u, U, I), a_ui,
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      helpers.dense_from_graph_edges(g.users, g.items, w_i, I, U,
                                     by_user=False), a_iu, rtol=1e-6,
      atol=1e-7)
  xi, xu = _x(35, I, D), _x(36, U, D)
  np.testing.assert_allclose(graph_lib.to_users(g, jnp.asarray(xi), U),
                             a_ui @ xi, atol=ATOL)
  np.testing.assert_allclose(graph_lib.to_items(g, jnp.asarray(xu), I),
                             a_iu @ xu, atol=ATOL)
  gi = jax.grad(lambda x: jnp.sum(graph_lib.to_items(g, x, I) ** 2))(
      jnp.asarray(xu))
  np.testing.assert_allclose(gi, a_iu.T @ (2 * a_iu @ xu), atol=1e-4)


# --- Gram-form projection of the generated rows (low-rank critic) ------------

def _lists_problem(seed, b=9, n_items=40, length=6, d=5, r=3):
  rng = np.random.default_rng(seed)
  lists = np.full((b, length), -1, np.int32)
  for row in range(b):
    n = rng.integers(0, length + 1)
    lists[row, :n] = rng.choice(n_items, n, replace=False)
  lists[0, :] = rng.choice(n_items, length, replace=False)  # a full row
  lists[1, :] = -1                                           # no positives
  return (jnp.asarray(_x(seed, b, d)), jnp.asarray(_x(seed + 1, n_items, d)),
          jnp.asarray(_x(seed + 2, n_items, r)), jnp.asarray(lists))


@pytest.mark.parametrize("slack", [None, 0, 7])
def test_generated_rows_projection_equals_dense_rows_times_factor(slack):
  """n(S) U through Q^T U, Q^T Q and the positives equals generated_rows
  (whole (B, I) rows) times U, in value and in the gradient w.r.t. P, Q
  and U; with and without compacting the positives (capacity = exactly
  the number of positives, or with padding)."""
  p, q, f, lists = _lists_problem(0)
  dense = generator.dense_rows(lists, q.shape[0])
  n_pos = int(jnp.sum(lists >= 0))
  capacity = None if slack is None else n_pos + slack
  positives = generator.batch_positives(lists, capacity)
  got = lambda p, q, f: generator.generated_rows_projection(p, q, positives, f)
  want = lambda p, q, f: generator.generated_rows(p, q, dense,
                                                  block_size=0) @ f
  np.testing.assert_allclose(got(p, q, f), want(p, q, f), rtol=1e-5,
                             atol=1e-6)
  w = jnp.asarray(_x(9, p.shape[0], f.shape[1]))
  g_got = jax.grad(lambda *a: jnp.sum(w * got(*a)), (0, 1, 2))(p, q, f)
  g_want = jax.grad(lambda *a: jnp.sum(w * want(*a)), (0, 1, 2))(p, q, f)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_positives_compaction_keeps_every_pair_once():
  _, _, _, lists = _lists_problem(1)
  n_pos = int(jnp.sum(lists >= 0))
  pos = generator.batch_positives(lists, n_pos + 3)
  assert pos.rows.shape == (n_pos + 3,) and int(jnp.sum(pos.valid)) == n_pos
  got = sorted(zip(np.asarray(pos.rows)[np.asarray(pos.valid)].tolist(),
                   np.asarray(pos.items)[np.asarray(pos.valid)].tolist()))
  want = sorted((b, int(i)) for b, row in enumerate(np.asarray(lists))
                for i in row if i >= 0)
  assert got == want


def test_batch_positives_capacity_is_the_top_b_degree_sum():
  from mmssl_jax import steps  # pylint: disable=g-import-not-at-top
  degrees = [5, 0, 3, 9, 1]
  assert steps.batch_positives_capacity(degrees, 2) == 14   # 9 + 5
  assert steps.batch_positives_capacity(degrees, 4) == 18   # all 4 users
  # More batch rows than users with items: draws with replacement (§4.2).
  assert steps.batch_positives_capacity(degrees, 6) == 54   # 6 * 9


def test_empty_graph_equals_sort_graph_of_invalid_pairs():
  cap = 12
  want = graph_lib.sort_graph(jnp.zeros(cap, jnp.int32),
                              jnp.zeros(cap, jnp.int32),
                              jnp.zeros(cap, bool), U, I)
  got = jax.jit(lambda: graph_lib.empty_graph(cap, U, I))()
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  x = jnp.asarray(_x(3, I, D))
  np.testing.assert_array_equal(graph_lib.to_users(got, x, U), 0.0)


def test_item_major_csr_fields_are_the_permuted_edges():
  users, items = _random_edges(4)
  g = graph_lib.build_graph(users, items, U, I, norm="one_sided")
  order = np.asarray(g.item_order)
  np.testing.assert_array_equal(g.users_by_item, np.asarray(g.users)[order])
  np.testing.assert_array_equal(g.to_user_weight_by_item,
                                np.asarray(g.to_user_weight)[order])
  np.testing.assert_array_equal(g.to_item_weight_by_item,
                                np.asarray(g.to_item_weight)[order])
  assert graph_lib.without_csr(g).users_by_item is None
