"""Tests of the linear-cost critic and the blockwise fused generator.

docs/reference.md §9: `critic.kind='lowrank'` (first layer W_0 = U V, parameters
and cost linear in I) and, with `train.generator_block > 0`, generated rows,
real rows and the top-k refresh computed item block by item block
(`generator.blockwise_topk`, `generator.fused_real_rows`). Each is checked
against the dense computation on small sizes: the low-rank critic against
the dense critic with the explicit kernel U V, the fused paths against
`generator.generated_rows` / `losses.gumbel_real_rows` followed by the first
layer, and one jitted train step against the unfused step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import critic
from mmssl_jax import graph as graph_lib
from mmssl_jax import losses
from mmssl_jax import state as state_lib
from mmssl_jax import steps
from mmssl_jax import train
from mmssl_jax.data import synthetic
from mmssl_jax import run as run_lib
from mmssl_jax import modality_graphs
from mmssl_jax import generator

N_ITEMS, RANK, HIDDEN = 48, 5, (12, 6)


def _lowrank(seed, batch_norm=True):
  """Low-rank params with non-zero biases and BatchNorm affine terms."""
  params = critic.init_lowrank_critic(jax.random.key(seed), N_ITEMS,
                                      rank=RANK, hidden=HIDDEN,
                                      batch_norm=batch_norm)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: a + jnp.asarray(0.1 * rng.normal(size=a.shape), jnp.float32),
      params)


def _as_dense(params):
  """The same critic with the explicit first kernel W_0 = U V."""
  out = dict(params)
  first = params["dense_0"]
  out["dense_0"] = {"kernel": first["u"] @ first["v"], "bias": first["bias"]}
  return out


def _chain_to_factors(dense_grads, params):
  """Gradients w.r.t. (U, V) from those w.r.t. the explicit kernel U V."""
  g = dense_grads["dense_0"]["kernel"]
  out = dict(dense_grads)
  out["dense_0"] = {"u": g @ params["dense_0"]["v"].T,
                    "v": params["dense_0"]["u"].T @ g,
                    "bias": dense_grads["dense_0"]["bias"]}
  return out


def _assert_trees_close(a, b, rtol, atol_frac):
  """Leafwise close, with atol a fraction of the largest entry of b."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  scale = max([float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b)] or [0])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_frac * scale)


# --- low-rank critic ---------------------------------------------------------


def test_lowrank_structure_init_and_parameter_count_linear_in_items():
  params = critic.init_lowrank_critic(jax.random.key(0), 2000, rank=8)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes["dense_0"] == {"u": (2000, 8), "v": (8, 256), "bias": (256,)}
  assert shapes["dense_1"]["kernel"] == (256, 128)
  assert shapes["dense_2"]["kernel"] == (128, 1)
  assert critic.is_lowrank(params)
  # Entries of U V have the dense kaiming variance 2 / I.
  w0 = params["dense_0"]["u"] @ params["dense_0"]["v"]
  np.testing.assert_allclose(np.var(np.asarray(w0)), 2.0 / 2000, rtol=0.1)
  counts = [state_lib.count_params(jax.eval_shape(
      lambda: critic.init_critic(jax.random.key(0), n, kind="lowrank",
                                 rank=8))) for n in (1000, 2000, 4000)]
  assert counts[1] - counts[0] == 1000 * 8  # exactly I * r per item
  assert counts[2] - counts[1] == 2000 * 8
  dense = jax.eval_shape(lambda: critic.init_critic(jax.random.key(0), 64,
                                                   kind="dense"))
  assert dense["dense_0"]["kernel"].shape == (64, 16)
  with pytest.raises(ValueError, match="critic.kind"):
    critic.init_critic(jax.random.key(0), 64, kind="sketch")


@pytest.mark.parametrize("paper", [False, True])
def test_lowrank_critic_equals_dense_critic_with_explicit_kernel(paper):
  """Scores, input gradients and parameter gradients (through U and V by the
  chain rule) equal those of the dense critic with W_0 = U V."""
  kw = (dict(hp=critic.CriticHParams(
      negative_slope=0.2, batch_norm=False, dropout=(0.0, 0.0),
      sigmoid_output=False, train=False)) if paper else {})
  params = _lowrank(1, batch_norm=not paper)
  stats = critic.init_critic_batch_stats(params)
  x = jax.random.uniform(jax.random.key(2), (10, N_ITEMS))
  key = jax.random.key(3)
  apply = lambda p, x: critic.dense_critic_apply(p, stats, x, key=key, **kw)
  loss = lambda p, x: jnp.sum(jnp.sin(apply(p, x)[0]))

  @jax.jit
  def everything(p):
    return apply(p, x), jax.grad(loss, (0, 1))(p, x)

  (scores, new_stats), (gp, gx) = everything(params)
  (scores_d, new_stats_d), (gp_d, gx_d) = everything(_as_dense(params))
  np.testing.assert_allclose(scores, scores_d, rtol=1e-5, atol=1e-5)
  _assert_trees_close(new_stats, new_stats_d, 1e-5, 1e-6)
  # Train-mode BatchNorm amplifies the rounding of (x U) V vs x (U V):
  # tolerances relative to the largest gradient entry.
  _assert_trees_close(gx, gx_d, 1e-4, 1e-4)
  _assert_trees_close(gp, _chain_to_factors(gp_d, params), 1e-4, 1e-4)


def test_lowrank_gradient_penalty_equals_explicit_kernel_and_full_penalty():
  """The Gram-matrix input-gradient norms give the penalty of the (N, I)
  interpolates, in value and in the gradient w.r.t. every parameter."""
  params = _lowrank(4)
  stats = critic.init_critic_batch_stats(params)
  real = jax.random.uniform(jax.random.key(5), (10, N_ITEMS))
  fake = jax.random.uniform(jax.random.key(6), (10, N_ITEMS))
  k_drop, k_alpha = jax.random.key(7), jax.random.key(8)

  def shortcut(p, first):
    head = lambda h: critic.critic_head(p, stats, h, key=k_drop)[0]
    return critic.gradient_penalty_from_hidden(
        head, critic.first_layer(p, real), critic.first_layer(p, fake),
        first(p), key=k_alpha)

  def full(p):
    fn = lambda x: critic.dense_critic_apply(p, stats, x, key=k_drop)[0]
    return critic.gradient_penalty(fn, real, fake, key=k_alpha)

  v_lr, g_lr = jax.jit(jax.value_and_grad(
      lambda p: shortcut(p, lambda p: p["dense_0"])))(params)
  v_dense, g_dense = jax.jit(jax.value_and_grad(
      lambda p: shortcut(p, lambda p: p["dense_0"]["kernel"])))(
          _as_dense(params))
  v_full, g_full = jax.jit(jax.value_and_grad(full))(params)
  assert v_full > 1.0
  np.testing.assert_allclose(v_lr, v_dense, rtol=2e-5)
  np.testing.assert_allclose(v_lr, v_full, rtol=2e-5)
  # dense_0's bias has a zero true gradient under train-mode BatchNorm.
  _assert_trees_close(g_lr, _chain_to_factors(g_dense, params), 1e-3, 1e-5)
  _assert_trees_close(g_lr, g_full, 1e-3, 1e-5)
  # No (N, I) array: the norms come from the r x r Gram matrix.
  grad_h = jax.random.normal(jax.random.key(9), (10, HIDDEN[0]))
  jaxpr = str(jax.make_jaxpr(critic.input_gradient_norms)(
      params["dense_0"], grad_h))
  assert f"10,{N_ITEMS}]" not in jaxpr
  np.testing.assert_allclose(
      critic.input_gradient_norms(params["dense_0"], grad_h),
      jnp.linalg.norm(grad_h @ _as_dense(params)["dense_0"]["kernel"].T,
                      axis=1), rtol=1e-5)
  assert float(critic.input_gradient_norms(
      params["dense_0"], jnp.zeros((1, HIDDEN[0])))[0]) == 0.0


# --- blockwise fused generator -----------------------------------------------

B, I, D, R, L = 6, 37, 5, 4, 7


def _problem(seed):
  """P (B, d), Q (I, d), F (I, r), padded train lists and their dense rows.
  Row 0 has every slot used, the last row one item (many -1 pads)."""
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(I, D)), jnp.float32)
  f = jnp.asarray(rng.normal(size=(I, R)), jnp.float32)
  lists = np.full((B, L), -1, np.int32)
  for b in range(B):
    n = L if b == 0 else 1 if b == B - 1 else rng.integers(1, L + 1)
    lists[b, :n] = np.sort(rng.choice(I, n, replace=False))
  lists = jnp.asarray(lists)
  return p, q, f, lists, generator.dense_rows(lists, I)


def test_interaction_block_is_a_slice_of_the_dense_rows():
  *_, lists, dense = _problem(0)
  for start, size in ((0, 8), (8, 8), (32, 8), (30, 7)):
    block = generator.interaction_block(lists, start, size)
    want = np.zeros((B, size))
    width = min(size, I - start)
    want[:, :width] = dense[:, start:start + width]
    np.testing.assert_array_equal(block, want)


@pytest.mark.parametrize("block_size", [5, 8, 37, 100])
def test_blockwise_topk_equals_topk_of_whole_rows(block_size):
  p, q, _, lists, dense = _problem(1)
  rows = generator.generated_rows(p, q, dense, block_size=0)
  top = jax.jit(lambda p, q: generator.blockwise_topk(
      p, q, lists, block_size=block_size, k=6))(p, q)
  np.testing.assert_array_equal(top, jax.lax.top_k(rows, 6)[1])
  # With k = I every item appears once (masked positives score 0).
  everything = jax.jit(lambda p, q: generator.blockwise_topk(
      p, q, lists, block_size=block_size, k=I))(p, q)
  np.testing.assert_array_equal(np.sort(everything, axis=1),
                                np.tile(np.arange(I), (B, 1)))


def test_blockwise_topk_ties_keep_the_lower_item_id():
  p = jnp.ones((2, D))
  q = jnp.ones((I, D))  # every score equal
  lists = jnp.array([[0, 3] + [-1] * (L - 2), [-1] * L], jnp.int32)
  top = generator.blockwise_topk(p, q, lists, block_size=7, k=4)
  np.testing.assert_array_equal(top, [[1, 2, 4, 5], [0, 1, 2, 3]])


def test_generated_rows_projection_then_first_layer_equals_critic_first_layer():
  p, q, _, lists, dense = _problem(2)
  params = critic.init_lowrank_critic(jax.random.key(0), I, rank=R,
                                      hidden=(8, 4))
  proj = generator.generated_rows_projection(
      p, q, generator.batch_positives(lists),
      critic.first_layer_factor(params))
  np.testing.assert_allclose(
      critic.first_layer_from_projection(params, proj),
      critic.first_layer(params, generator.generated_rows(p, q, dense)),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_gumbel,log_logits,scale,tau", [
    (True, False, 1e-5, 0.005),  # reference
    (True, True, 1.0, 0.5),  # paper
    (False, False, 1.0, 1.0),  # wo_gt
])
def test_fused_real_rows_equal_dense_gumbel_rows(use_gumbel, log_logits,
                                                 scale, tau):
  """Same Gumbel uniforms (the fused path's per-block draws) give the
  projection of `losses.gumbel_real_rows`; gradient w.r.t. F too."""
  p, q, f, lists, dense = _problem(3)
  key, block = jax.random.key(4), 8
  n_blocks = -(-I // block)
  xi = jnp.concatenate([generator.block_uniform(key, B, j, block)
                        for j in range(n_blocks)], axis=1)[:, :I]
  model_rows = generator.generated_rows(p, q, dense)
  # losses.gumbel_real_rows draws xi = uniform(key, (B, I)); feed ours.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(losses.jax.random, "uniform", lambda *a, **k: xi)
    real = losses.gumbel_real_rows(
        key=key, interactions=dense, model_rows=model_rows,
        gumbel_scale=scale, tau=tau, ui_pre_scale=100.0,
        use_gumbel=use_gumbel, log_logits=log_logits)
  fused = lambda f: generator.fused_real_rows(
      key, p, q, lists, f, block_size=block, gumbel_scale=scale, tau=tau,
      ui_pre_scale=100.0, use_gumbel=use_gumbel, log_logits=log_logits)
  np.testing.assert_allclose(jax.jit(fused)(f), real @ f, rtol=1e-5,
                             atol=1e-6)
  g = jax.jit(jax.grad(lambda f: jnp.sum(jnp.sin(fused(f)))))(f)
  g_dense = jax.grad(lambda f: jnp.sum(jnp.sin(real @ f)))(f)
  np.testing.assert_allclose(g, g_dense, rtol=1e-4, atol=1e-5)


def test_no_batch_by_items_array_in_the_fused_gradient():
  """Differentiating through the scan stores no (B, I) residual: the jaxpr
  of the gradient holds only (B, block) per-block arrays."""
  big_i, block = 4096, 256
  p = jnp.ones((B, D))
  q = jnp.ones((big_i, D))
  f = jnp.ones((big_i, R))
  lists = jnp.full((B, L), -1, jnp.int32)
  real_grad = jax.grad(lambda f: jnp.sum(generator.fused_real_rows(
      jax.random.key(0), p, q, lists, f, block_size=block, gumbel_scale=1.0,
      tau=0.5, ui_pre_scale=1.0)))
  jaxpr = str(jax.make_jaxpr(real_grad)(f))
  assert f"{B},{big_i}]" not in jaxpr
  assert f"{B},{block}]" in jaxpr


def test_graph_updates_take_precomputed_topk_items():
  p, q, _, lists, dense = _problem(5)
  rows = {"a": generator.generated_rows(p, q, dense),
          "b": generator.generated_rows(q[:B], q, dense)}
  top = {m: jax.lax.top_k(r, 3)[1].astype(jnp.int32) for m, r in rows.items()}
  users = jnp.arange(B, dtype=jnp.int32)
  base = graph_lib.sort_graph(users, users, jnp.ones(B, bool), B, I)
  graphs = {m: graph_lib.pad_graph(base, 40, B, I) for m in rows}
  buffer = modality_graphs.empty_buffer(tuple(rows), 40)
  reference = jax.jit(lambda graphs, state, top, idx: (
      modality_graphs.reference_update(
          graphs, state, lambda: top, users, idx, k=3, period=2,
          pairing="tiled", n_users=B, n_items=I)))
  persistent = jax.jit(lambda graphs, state, top, idx: (
      modality_graphs.persistent_update(graphs, state, lambda: top, users,
                                        idx, period=2, n_items=I)))
  table = modality_graphs.empty_table(tuple(rows), B, 3)
  from_rows = modality_graphs.top_items_of_rows(rows, 3)()
  for m in rows:
    np.testing.assert_array_equal(from_rows[m], top[m])
  for update, state in ((reference, buffer), (persistent, table)):
    for idx in (1, 2):  # an append and a rebuild
      got = update(graphs, state, top, jnp.int32(idx))
      want = update(graphs, state, from_rows, jnp.int32(idx))
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)
  # Graphs without CSR fields are rebuilt without them.
  bare = {m: graph_lib.without_csr(g) for m, g in graphs.items()}
  rebuilt, _ = reference(bare, buffer, top, jnp.int32(2))
  assert all(g.user_indptr is None for g in rebuilt.values())


def _one_step(config):
  ds = synthetic.make_synthetic(config.data.synthetic)
  run = run_lib.Run(config, ds)
  state = run.init_state()
  state, terms = run.step(state, jnp.int32(0), run.inputs)
  return jax.device_get(state), jax.device_get(terms), run.step_config


def test_fused_step_equals_unfused_lowrank_step():
  """configs/test.py, paper variant (no BatchNorm), low-rank critic, Gumbel
  noise on (both paths draw the same `noise.uniform` values for one key):
  one step with generator_block=32 (fused) equals the step with whole
  rows."""
  results = []
  for block in (0, 32):
    config = helpers.load_config("test", "variant=paper")
    config.critic.kind = "lowrank"
    config.critic.rank = 8
    config.train.generator_block = block
    results.append(_one_step(config))
    assert results[-1][2].fused == (block > 0)
  (s0, t0, _), (s1, t1, _) = results
  assert set(t0) == set(t1) and "gen" in t0 and "critic" in t0
  for k in t0:
    np.testing.assert_allclose(t1[k], t0[k], rtol=1e-5, atol=1e-7)
  assert critic.is_lowrank(s1.critic_params)
  for part in ("params", "critic_params"):
    _assert_trees_close(getattr(s1, part), getattr(s0, part), 1e-5, 1e-6)
  for x, y in zip(jax.tree.leaves((s1.graph_buffer, s1.modality_graphs)),
                  jax.tree.leaves((s0.graph_buffer, s0.modality_graphs))):
    np.testing.assert_array_equal(x, y)


def test_gram_positives_of_the_batch_or_of_all_users_give_the_same_step():
  """The low-rank step subtracts the batch's training positives, or (when
  their bound exceeds the training set) every user's, for all users at
  once: one step of configs/test.py (reference variant, low-rank critic)
  agrees either way."""
  config = helpers.load_config("test")
  config.critic.kind = "lowrank"
  config.critic.rank = 8
  ds = synthetic.make_synthetic(config.data.synthetic)
  results = []
  for capacity in (None, len(ds.train) + 1):  # exact batch bound, all users
    run = run_lib.Run(config, ds)
    if capacity is not None:
      shapes = dataclasses.replace(run.shapes, batch_positives=capacity)
    else:
      shapes = run.shapes
      assert shapes.batch_positives < shapes.n_train  # the per-batch path
    step = steps.make_step(dataclasses.replace(run.step_config,
                                               shapes=shapes))
    state = run.init_state()
    state, terms = step(state, jnp.int32(0), run.inputs)
    results.append(jax.device_get((state, terms)))
  # The loss terms (critic, d_fake, gen read the projections) agree; the
  # parameters are not compared: Adam's first step moves an entry with a
  # rounding-level gradient by +-lr whatever its sign.
  (_, t0), (_, t1) = results
  assert {"critic", "d_fake", "gen"} <= set(t0)
  for k in t0:
    np.testing.assert_allclose(t1[k], t0[k], rtol=1e-5, atol=1e-6)
