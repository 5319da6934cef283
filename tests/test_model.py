"""Tests for mmssl_jax.model: fidelity to the released forward (§2.2-§2.4).

The reference values come from dense numpy ports written from the spec, in
particular a literal port of the released (buggy) "multi-head self-attention"
(`helpers.released_attention`), not from the code under test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import graph as graph_lib
from mmssl_jax import model as model_lib

N_USERS, N_ITEMS, DIM, HEADS = 7, 9, 8, 4
MOD_DIMS = {"image": 5, "text": 3}


def _rand(seed, *shape, scale=1.0):
  return scale * np.random.default_rng(seed).normal(size=shape)


# ----------------------------------------------------------------------------
# §2.4: the released attention is mean_m(E^m) @ W_sum


@pytest.mark.parametrize("n", [5, 8, 13])
def test_released_attention_equals_mean_times_wsum(n):
  d, h = 64, 4
  views = [_rand(1, n, d), _rand(2, n, d)]
  w_q = _rand(3, d, d, scale=0.5)  # non-trivial attention weights
  w_cat = _rand(4, h * d, d, scale=0.1)
  z, _, _ = helpers.released_attention(views, w_q, w_cat, h)
  hp = model_lib.ModelHParams(embed_size=d, head_num=h)
  got = model_lib.fuse_modalities(
      {"w_self_attention_cat": jnp.asarray(w_cat, jnp.float32)},
      [jnp.asarray(v, jnp.float32) for v in views], hp)
  np.testing.assert_allclose(got, z.mean(0), rtol=1e-5, atol=1e-5)
  # The port is independent of w_q, as the spec says.
  z2, _, _ = helpers.released_attention(views, 3 * w_q + 1, w_cat, h)
  np.testing.assert_allclose(z2, z, atol=1e-9)
  # And each modality's output is V[i] @ W_sum (bug 2).
  w_sum = w_cat.reshape(h, d, d).sum(0)
  for m in range(2):
    np.testing.assert_allclose(z[m], views[m] @ w_sum, atol=1e-9)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_released_attention_k_scramble_formula(n):
  """K[h', m', n'] = Q[h, m, n], f = 4N m' + 4 n' + h', n = f mod N,
  m = floor(f/N) mod 2, h = floor(f/2N) (§2.4, bug 1)."""
  d, h = 64, 4
  views = [_rand(5, n, d), _rand(6, n, d)]
  _, kk, qq = helpers.released_attention(views, _rand(7, d, d),
                                         _rand(8, h * d, d), h)
  assert kk.shape == qq.shape == (h, 2, n, d // h)
  for h2 in range(h):
    for m2 in range(2):
      for n2 in range(n):
        f = 4 * n * m2 + 4 * n2 + h2
        np.testing.assert_array_equal(
            kk[h2, m2, n2], qq[f // (2 * n), (f // n) % 2, f % n])
  # Each node's key is another node's query: (4 n' + h') mod N.
  assert not np.allclose(kk, qq)


def test_fuse_modalities_rejects_unknown_fusion():
  hp = model_lib.ModelHParams(embed_size=4, head_num=2, fusion="bogus")
  with pytest.raises(ValueError, match="fusion"):
    model_lib.fuse_modalities({"w_self_attention_cat": jnp.zeros((8, 4))},
                              [jnp.zeros((3, 4))] * 2, hp)


# ----------------------------------------------------------------------------
# The full forward (§2.3 a-h) vs a dense numpy port


def _problem(seed):
  rng = np.random.default_rng(seed)
  r = (rng.random((N_USERS, N_ITEMS)) < 0.35).astype(np.float64)
  r[0, 0] = r[1, 2] = 1.0
  r[-1] = 0.0  # a user without train items
  feats = {m: rng.normal(size=(N_ITEMS, dm)).astype(np.float32)
           for m, dm in MOD_DIMS.items()}
  # A different (non-empty) modality graph, with a duplicate pair as in §4.4.
  gu = np.concatenate([rng.integers(0, N_USERS, 12), [2, 2]])
  gi = np.concatenate([rng.integers(0, N_ITEMS, 12), [3, 3]])
  return r, feats, gu.astype(np.int32), gi.astype(np.int32)


CAPACITY = 48  # every graph is padded to this many edges: one compile


def _graph(users, items, valid=None):
  valid = np.ones(len(users), bool) if valid is None else valid
  w_u, w_i = graph_lib.one_sided_weights(users, items, valid, N_USERS, N_ITEMS)
  g = graph_lib.BipartiteGraph(users, items, w_u, w_i)
  return jax.tree.map(jnp.asarray,
                      helpers.pad_graph(g, CAPACITY, N_USERS, N_ITEMS))


def _base(r):
  g = graph_lib.build_graph(*np.nonzero(r), N_USERS, N_ITEMS,
                            norm="one_sided")
  return jax.tree.map(jnp.asarray,
                      helpers.pad_graph(g, CAPACITY, N_USERS, N_ITEMS))


@functools.lru_cache(maxsize=None)
def _init_fn(hp, n_users, n_items, dims):
  """init_params under jit (eager initialisers compile op by op: slow)."""
  return jax.jit(lambda key: model_lib.init_params(
      key, n_users=n_users, n_items=n_items, modality_dims=dict(dims),
      hp=hp))


def _init(seed, hp, n_users=N_USERS, n_items=N_ITEMS, dims=None):
  dims = MOD_DIMS if dims is None else dims
  return _init_fn(hp, n_users, n_items, tuple(dims.items()))(
      jax.random.key(seed))


# All arrays are arguments (nothing closed over), so tests share compilations.
_forward = jax.jit(model_lib.forward, static_argnames=("train", "hp"))


def _params(seed, hp):
  params = _init(seed, hp)
  # Larger ID embeddings than xavier on tiny tables, so every term matters.
  params["user_id_embedding"] = params["user_id_embedding"] * 5
  params["item_id_embedding"] = params["item_id_embedding"] * 5
  return params


def _feats(feats):
  return {m: jnp.asarray(f) for m, f in feats.items()}


def _compare(out, want, atol=2e-5):
  np.testing.assert_allclose(out.user, want["user"], atol=atol)
  np.testing.assert_allclose(out.item, want["item"], atol=atol)
  for field in ("feat_user", "feat_item", "modality_user", "modality_item"):
    got = getattr(out, field)
    assert list(got) == list(MOD_DIMS)
    for m in MOD_DIMS:
      np.testing.assert_allclose(got[m], want[field][m], atol=atol)


def test_forward_eval_matches_dense_port_nonempty_modality_graph():
  # Non-default residual weights, so that their wiring is checked too; the
  # defaults (0.36, 0.55) are used in the empty-graph test below.
  id_cat, model_cat = 0.9, 0.2
  hp = model_lib.ModelHParams(embed_size=DIM, head_num=HEADS,
                              id_cat_rate=id_cat, model_cat_rate=model_cat)
  r, feats, gu, gi = _problem(0)
  params = _params(1, hp)
  mod_graphs = {"image": _graph(gu, gi),
                "text": _graph(gu[::-1].copy(), gi)}
  g_dense = {
      "image": helpers.one_sided_dense(helpers.dense_counts(
          gu, gi, N_USERS, N_ITEMS)),
      "text": helpers.one_sided_dense(helpers.dense_counts(
          gu[::-1], gi, N_USERS, N_ITEMS)),
  }
  out = _forward(params, _base(r), _feats(feats), mod_graphs,
                 key=jax.random.key(0), train=False, hp=hp)
  want = helpers.mmssl_forward_dense(
      params, r, feats, g_dense, head_num=HEADS, id_cat_rate=id_cat,
      model_cat_rate=model_cat)
  assert np.abs(want["modality_user"]["image"]).max() > 0.1
  _compare(out, want)
  # Score = dot product of the final representations (§2.3 h).
  scores = np.asarray(out.user) @ np.asarray(out.item).T
  np.testing.assert_allclose(scores, want["user"] @ want["item"].T, atol=1e-4)


def test_forward_with_empty_modality_graph_has_u0_equal_to_id_embedding(
    monkeypatch):
  hp = model_lib.ModelHParams(embed_size=DIM, head_num=HEADS)
  r, feats, gu, gi = _problem(2)
  params = _params(3, hp)
  base = _base(r)
  empty = _graph(gu, gi, valid=np.zeros(len(gu), bool))
  assert not np.any(np.asarray(empty.to_user_weight))
  zeros = np.zeros((N_USERS, N_ITEMS))
  seen = {}
  real_propagate = graph_lib.mmssl_id_propagate

  def spy(graph, user_ego, item_ego, n_layers, **kw):
    seen["u0"], seen["i0"] = user_ego, item_ego
    return real_propagate(graph, user_ego, item_ego, n_layers, **kw)

  monkeypatch.setattr(model_lib.graph_lib, "mmssl_id_propagate", spy)

  @jax.jit  # its own jit: the spy must be traced
  def fwd(params):
    out = model_lib.forward(params, base, _feats(feats),
                            {"image": empty, "text": empty},
                            key=jax.random.key(0), train=False, hp=hp)
    return out, dict(seen)  # the spied values, from inside the same trace

  out, seen = fwd(params)
  # n(0) = 0: the ego embeddings are exactly the ID embeddings.
  np.testing.assert_array_equal(seen["u0"], params["user_id_embedding"])
  np.testing.assert_array_equal(seen["i0"], params["item_id_embedding"])
  for m in MOD_DIMS:
    np.testing.assert_array_equal(out.modality_user[m], 0.0)
    np.testing.assert_array_equal(out.modality_item[m], 0.0)
  want = helpers.mmssl_forward_dense(
      params, r, feats, {m: (zeros, zeros.T) for m in MOD_DIMS},
      head_num=HEADS)
  np.testing.assert_array_equal(want["u0"],
                                np.asarray(params["user_id_embedding"],
                                           np.float64))
  _compare(out, want)


def test_forward_differs_between_empty_and_nonempty_modality_graph():
  hp = model_lib.ModelHParams(embed_size=DIM, head_num=HEADS)
  r, feats, gu, gi = _problem(4)
  params = _params(5, hp)
  full = _graph(gu, gi)
  empty = _graph(gu, gi, valid=np.zeros(len(gu), bool))
  a, b = (_forward(params, _base(r), _feats(feats), {"image": g, "text": g},
                   key=jax.random.key(0), train=False, hp=hp)
          for g in (full, empty))
  assert not np.allclose(a.user, b.user, atol=1e-4)
  # The feature branch does not read the modality graphs.
  for m in MOD_DIMS:
    np.testing.assert_array_equal(a.feat_user[m], b.feat_user[m])


@pytest.mark.parametrize("fusion,softmax", [("mean_wsum", True),
                                             ("attention", False)])
def test_forward_rows_equal_whole_forward_gathered(fusion, softmax):
  """`user_rows` / `item_rows` (the training step's readout of the batch
  rows only) give the whole forward's rows, and the same gradients."""
  hp = model_lib.ModelHParams(embed_size=DIM, head_num=HEADS, fusion=fusion,
                              last_layer_softmax=softmax)
  r, feats, gu, gi = _problem(6)
  params = _params(7, hp)
  base, graphs = _base(r), {"image": _graph(gu, gi), "text": _graph(gi % 7,
                                                                     gi)}
  users = jnp.asarray([3, 0, 3, 6], jnp.int32)  # a repeat, a cold user
  items = jnp.asarray([8, 1, 1, 0, 5], jnp.int32)
  w_u = jnp.asarray(_rand(8, 4, DIM), jnp.float32)
  w_i = jnp.asarray(_rand(9, 5, DIM), jnp.float32)
  key = jax.random.key(3)  # train mode: the dropout masks must agree too

  def loss(p, rows):
    kw = dict(user_rows=users, item_rows=items) if rows else {}
    out = model_lib.forward(p, base, _feats(feats), graphs, key=key,
                            train=True, hp=hp, **kw)
    u, i = (out.user, out.item) if rows else (out.user[users],
                                              out.item[items])
    return jnp.sum(jnp.tanh(u) * w_u) + jnp.sum(jnp.sin(i) * w_i), (u, i)

  (l0, (u0, i0)), g0 = jax.value_and_grad(
      functools.partial(loss, rows=False), has_aux=True)(params)
  (l1, (u1, i1)), g1 = jax.value_and_grad(
      functools.partial(loss, rows=True), has_aux=True)(params)
  assert u1.shape == (4, DIM) and i1.shape == (5, DIM)
  np.testing.assert_allclose(u1, u0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(i1, i0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert any(np.abs(np.asarray(a)).max() > 1e-3 for a in flat0)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# Initialisation (§2.2)


def test_init_params_statistics():
  hp = model_lib.ModelHParams(embed_size=64, head_num=4)
  n_users, n_items = 3000, 2000
  dims = {"image": 400, "text": 16}
  params = _init(7, hp, n_users, n_items, dims)
  assert set(params) == {"user_id_embedding", "item_id_embedding",
                         "w_self_attention_cat", "modality_proj"}

  def check_uniform(x, bound, shape):
    x = np.asarray(x)
    assert x.shape == shape and x.dtype == np.float32
    assert np.abs(x).max() <= bound * (1 + 1e-6)
    assert np.abs(x).max() >= 0.97 * bound  # the bound is reached
    # U(-b, b): mean 0, std b / sqrt(3).
    assert abs(x.mean()) < 0.05 * bound
    np.testing.assert_allclose(x.std(), bound / np.sqrt(3), rtol=0.05)

  check_uniform(params["user_id_embedding"], np.sqrt(6 / (n_users + 64)),
                (n_users, 64))
  check_uniform(params["item_id_embedding"], np.sqrt(6 / (n_items + 64)),
                (n_items, 64))
  check_uniform(params["w_self_attention_cat"], np.sqrt(6 / (256 + 64)),
                (256, 64))
  assert np.sqrt(6 / 320) == pytest.approx(0.137, abs=1e-3)
  for m, dm in dims.items():
    proj = params["modality_proj"][m]
    check_uniform(proj["kernel"], np.sqrt(6 / (dm + 64)), (dm, 64))
    bias = np.asarray(proj["bias"])
    bound = 1 / np.sqrt(dm)  # PyTorch's default Linear bias
    assert bias.shape == (64,)
    assert np.abs(bias).max() <= bound * (1 + 1e-6)
    assert np.abs(bias).max() >= 0.8 * bound
  # Independent draws per table.
  assert not np.allclose(params["modality_proj"]["image"]["bias"],
                         params["modality_proj"]["text"]["bias"])


def test_init_params_deterministic_per_key():
  hp = model_lib.ModelHParams(embed_size=DIM, head_num=HEADS)
  a, b, c = _init(1, hp), _init(1, hp), _init(2, hp)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a["user_id_embedding"], c["user_id_embedding"])


# ----------------------------------------------------------------------------
# Dropout (§2.3 a)


def test_dropout_train_vs_eval():
  hp = model_lib.ModelHParams(embed_size=DIM, head_num=HEADS, drop_rate=0.2)
  r, feats, gu, gi = _problem(6)
  params = _params(7, hp)
  base, f, g = _base(r), _feats(feats), {"image": _graph(gu, gi),
                                         "text": _graph(gu, gi)}
  fwd = lambda key, train: _forward(params, base, f, g, key=key, train=train,
                                    hp=hp)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  t1, t1b, t2 = fwd(k1, True), fwd(k1, True), fwd(k2, True)
  e1, e2 = fwd(k1, False), fwd(k2, False)
  np.testing.assert_array_equal(t1.user, t1b.user)        # same key
  assert not np.allclose(t1.user, t2.user, atol=1e-5)      # different keys
  assert not np.allclose(t1.feat_item["image"], t2.feat_item["image"])
  assert not np.allclose(t1.user, e1.user, atol=1e-5)      # dropout active
  for a, b in zip(jax.tree.leaves(e1), jax.tree.leaves(e2)):
    np.testing.assert_array_equal(a, b)                    # eval ignores key
  # Dropout only touches the feature projection: ID views are unchanged.
  np.testing.assert_array_equal(t1.modality_user["text"],
                                e1.modality_user["text"])


def test_dropout_rate_statistics_and_scaling():
  """Inverted dropout with p = drop_rate: about p of the projected entries are
  zero and the kept ones are scaled by 1 / (1 - p) (torch semantics)."""
  hp = model_lib.ModelHParams(embed_size=64, head_num=4, drop_rate=0.2)
  n_items = 400
  params = _init(0, hp, 3, n_items, {"image": 6})
  feats = jnp.asarray(_rand(1, n_items, 6), jnp.float32)
  x_clean = np.asarray(feats @ params["modality_proj"]["image"]["kernel"]
                       + params["modality_proj"]["image"]["bias"])
  key = jax.random.key(3)
  dropped = np.asarray(model_lib._dropout(  # pylint: disable=protected-access
      key, jnp.asarray(x_clean), 0.2, True))
  zero = dropped == 0
  assert abs(zero.mean() - 0.2) < 0.01
  np.testing.assert_allclose(dropped[~zero], x_clean[~zero] / 0.8, rtol=1e-6)
  np.testing.assert_array_equal(
      model_lib._dropout(key, jnp.asarray(x_clean), 0.2, False), x_clean)  # pylint: disable=protected-access


def test_lightgcn_forward_matches_dense():
  rng = np.random.default_rng(8)
  r = (rng.random((N_USERS, N_ITEMS)) < 0.4).astype(np.float64)
  g = jax.tree.map(jnp.asarray, graph_lib.build_graph(
      *np.nonzero(r), N_USERS, N_ITEMS, norm="symmetric"))
  params = jax.jit(lambda k: model_lib.init_embeddings(
      k, N_USERS, N_ITEMS, DIM))(jax.random.key(0))
  a_ui, a_iu = helpers.symmetric_dense(r)
  us = [np.asarray(params["user_id_embedding"], np.float64)]
  is_ = [np.asarray(params["item_id_embedding"], np.float64)]
  for _ in range(3):
    us, is_ = us + [a_ui @ is_[-1]], is_ + [a_iu @ us[-1]]
  u, i = jax.jit(model_lib.lightgcn_forward, static_argnums=2)(
      params, g, 3)
  np.testing.assert_allclose(u, np.mean(us, 0), atol=1e-6)
  np.testing.assert_allclose(i, np.mean(is_, 0), atol=1e-6)
