"""Tests for mmssl_jax.steps / modality_graphs: the jitted two-player step and
the released modality-graph schedule (§4.3, §4.4, §3.6, §10 "Fidelity tests").

The real jitted step of `configs/test.py` is compiled once per module (a
module-scoped fixture runs a 5-iteration trajectory); spies record, from inside
the compiled step, the generated rows that feed the graph update and the
gradients handed to both optimisers.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from mmssl_jax import config_lib
from mmssl_jax import graph as graph_lib
from mmssl_jax import losses
from mmssl_jax import model as model_lib
from mmssl_jax import modality_graphs
from mmssl_jax import run as run_lib
from mmssl_jax import steps
from mmssl_jax.data import synthetic

N_STEPS = 5


def _recording(records, name):
  """An identity optax transform that records the gradients it receives."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    jax.debug.callback(lambda g: records[name].append(jax.device_get(g)),
                       updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


@pytest.fixture(scope="module", name="test_run")
def test_run_fixture():
  """run_lib.Run on configs/test.py with spies installed before compilation."""
  records = {"rec_grads": [], "critic_grads": [], "graph_update": [],
             "compiles": []}
  real_update, real_opt = steps.modality_graph_step, steps.make_optimizer
  config = helpers.load_config("test")
  critic_optim = steps.OptimHParams.critic(config.critic)

  def spy_update(graphs, buffer, generated, batch, batch_idx, step, cfg):
    jax.debug.callback(
        lambda r, u, i: records["graph_update"].append(
            (int(i), jax.device_get(r), np.asarray(u))),
        generated.rows, batch.users, batch_idx)
    return real_update(graphs, buffer, generated, batch, batch_idx, step, cfg)

  def spy_optimizer(hp):
    name = "critic_grads" if hp == critic_optim else "rec_grads"
    return optax.chain(_recording(records, name), real_opt(hp))

  def on_event(event, duration, **kw):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      records["compiles"].append(kw.get("fun_name"))

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, "modality_graph_step", spy_update)
    mp.setattr(steps, "make_optimizer", spy_optimizer)
    ds = synthetic.make_synthetic(config.data.synthetic)
    run = run_lib.Run(config, ds)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
      yield run, records
    finally:
      jax.monitoring.unregister_event_duration_listener(on_event)


@pytest.fixture(scope="module", name="trajectory")
def trajectory_fixture(test_run):
  """N_STEPS iterations from the initial state with batch_idx 0, 1, 2, ...;
  host copies of every state (index 0 = initial) and the metrics."""
  run, records = test_run
  compiles_before = records["compiles"].count("jit(step)")
  state = run.init_state()
  states = [jax.device_get(state)]
  metrics = []
  for idx in range(N_STEPS):
    state, m = run.step(state, jnp.int32(idx), run.inputs)
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  jax.effects_barrier()
  records["trajectory_compiles"] = (records["compiles"].count("jit(step)")
                                    - compiles_before)
  return run, records, states, metrics


def _weights(graph):
  return np.asarray(graph.to_user_weight), np.asarray(graph.to_item_weight)


# ----------------------------------------------------------------------------
# Compilation


def test_step_compiles_exactly_once(trajectory):
  run, records, _, _ = trajectory
  # N_STEPS iterations with batch_idx 0..N_STEPS-1: one compilation.
  assert records["trajectory_compiles"] == 1
  assert run.step._cache_size() == 1  # pylint: disable=protected-access
  # Further iterations (new batch indices, a fresh initial state) reuse it.
  before = records["compiles"].count("jit(step)")
  state = run.init_state()
  for idx in (7, 3, 0):
    state, _ = run.step(state, jnp.int32(idx), run.inputs)
  jax.block_until_ready(state)
  assert run.step._cache_size() == 1  # pylint: disable=protected-access
  assert records["compiles"].count("jit(step)") == before


def test_default_backend_options_give_the_same_steps_as_the_fast_ones():
  """The suite compiles with helpers.FAST_COMPILE_OPTIONS (conftest.py);
  users run XLA's default CPU backend options. The same lowered step of
  configs/test.py, compiled both ways, gives the same 3 steps: loss terms to
  rtol 1e-5, and the state after the first step as tests/test_parallel.py
  compares two summation orders (the BatchNorm-fed critic biases, whose true
  gradient is 0, to 2 lr: Adam's first step is +-lr whatever the rounding
  noise; over 3 steps it observed 6 lr)."""
  import test_parallel  # pylint: disable=g-import-not-at-top
  config = helpers.load_config("test")
  run = run_lib.Run(config, synthetic.make_synthetic(config.data.synthetic))
  lowered = run.step.lower(run.init_state(), jnp.int32(0), run.inputs)
  default = lowered.compile(compiler_options=helpers.DEFAULT_COMPILE_OPTIONS)
  fast = lowered.compile(compiler_options=helpers.FAST_COMPILE_OPTIONS)
  assert default.as_text() != fast.as_text()  # the options took effect
  results = []
  for compiled in (default, fast):
    state, terms = run.init_state(), []
    for idx in range(3):
      state, t = compiled(state, jnp.int32(idx), run.inputs)
      terms.append(jax.device_get(t))
      if idx == 0:
        first = helpers.state_arrays(state)
    results.append((terms, first))
  (terms_default, state_default), (terms_fast, state_fast) = results
  for a, b in zip(terms_default, terms_fast):
    assert a.keys() == b.keys() and "critic" in a and "gen" in a
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
  test_parallel._compare_states(  # pylint: disable=protected-access
      state_default, state_fast, critic_lr=config.critic.lr,
      batch_norm_critic=True)


# ----------------------------------------------------------------------------
# One step


def test_one_step_is_finite_and_changes_both_parameter_sets(trajectory):
  run, _, states, metrics = trajectory
  s0, s1 = states[0], states[1]
  assert int(s1.step) == 1
  for tree in (s1.params, s1.critic_params, s1.critic_stats,
               s1.opt_state, s1.critic_opt_state, metrics[0]):
    assert helpers.tree_all_finite(tree)
  # Every recommender parameter moves (AdamW with non-zero gradients).
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
    assert a.shape == b.shape
    assert not np.array_equal(a, b)
  # The critic's weight matrices and BatchNorm scales move (Adam step), and the
  # running statistics are updated (train-mode BatchNorm).
  for name, layer in s1.critic_params.items():
    if name.startswith("dense"):
      assert not np.array_equal(layer["kernel"],
                                s0.critic_params[name]["kernel"])
    else:
      assert not np.array_equal(layer["scale"],
                                s0.critic_params[name]["scale"])
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(s0.critic_stats), jax.tree.leaves(s1.critic_stats)))
  assert s1.critic_params["dense_0"]["kernel"].shape == (
      run.shapes.n_items, run.shapes.n_items // 4)


def test_metrics_terms_add_up_to_the_total_loss(trajectory):
  run, _, _, metrics = trajectory
  c = run.config.loss
  assert set(metrics[0]) == {"bpr", "emb_l2", "feat_l2", "cl", "gen", "loss",
                             "critic", "d_real", "d_fake", "gp"}
  for m in metrics:
    total = (m["bpr"] + m["emb_l2"] + m["feat_l2"] + c.cl_rate * m["cl"]
             + c.g_rate * m["gen"])
    np.testing.assert_allclose(m["loss"], total, rtol=1e-5)
    assert 0 < m["d_real"] < 100 and 0 < m["d_fake"] < 100  # 100 * sigmoid


def test_gradients_of_both_losses_are_finite(trajectory):
  _, records, _, _ = trajectory
  rec, critic = records["rec_grads"], records["critic_grads"]
  assert len(rec) >= N_STEPS and len(critic) >= N_STEPS
  for grads in rec[:N_STEPS] + critic[:N_STEPS]:
    assert helpers.tree_all_finite(grads)
  first = rec[0]
  for name, g in jax.tree_util.tree_leaves_with_path(first):
    assert np.any(g != 0), f"zero gradient for {name} on the base graph"


# ----------------------------------------------------------------------------
# The graph schedule with T = 1 (§4.4 table, §10 "schedule simulation")


def _schedule(config, n_items, steps_per_epoch=100):
  return modality_graphs.GraphSchedule.from_config(config, n_items,
                                                   steps_per_epoch)


def test_topk_k_matches_the_papers_settings():
  cases = {"baby": (7050, 0), "sports": (18357, 367), "tiktok": (6710, 67),
           "allrecipes": (10067, 201), "test": (90, 4)}
  for name, (n_items, k) in cases.items():
    assert _schedule(helpers.load_config(name), n_items).k == k, name


def test_modality_graph_is_base_until_the_first_regeneration(test_run):
  """G^m is the base graph in the forwards of steps 0..T (released schedule,
  first rebuild at batch index T of epoch 0), of steps 0..T-1 (persistent,
  first rebuild at the end of step T-1), and forever when an epoch has at
  most T steps (the released schedule never reaches index T)."""
  run, _ = test_run
  n = run.steps_per_epoch
  assert n > 3
  is_base = lambda config, step: bool(modality_graphs.is_base(
      _schedule(config, run.shapes.n_items, n), jnp.int32(step)))
  config = helpers.load_config("test")
  for t, want in ((1, [True, True, False, False]),
                  (2, [True, True, True, False])):
    config.graph_update.T = t
    assert [is_base(config, s) for s in range(4)] == want
  config.graph_update.T = n
  assert all(is_base(config, s) for s in (0, n, 5 * n))
  config = helpers.load_config("test", "variant=paper")
  config.graph_update.T = 2
  assert [is_base(config, s) for s in range(4)] == [True, True, False, False]


def test_initial_forward_equals_forward_over_the_base_graph(test_run):
  """The initial state's empty G^m plus the base graph's share (while
  modality_is_base) is the released initial G^m = the base graph (§2.1)."""
  run, _ = test_run
  state = run.init_state()
  hp = model_lib.ModelHParams.from_config(run.config.model)
  fwd = jax.jit(functools.partial(
      model_lib.forward, key=jax.random.key(0), train=True, hp=hp))
  inputs = run.inputs
  got = fwd(state.params, inputs.graph, inputs.features,
            state.modality_graphs, modality_is_base=jnp.bool_(True))
  want = fwd(state.params, inputs.graph, inputs.features,
             {m: inputs.graph for m in state.modality_graphs})
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for m in state.modality_graphs:
    assert float(jnp.abs(got.modality_user[m]).max()) > 0
  # Once regenerated, only the state's graphs count: here, all-zero.
  after = fwd(state.params, inputs.graph, inputs.features,
              state.modality_graphs, modality_is_base=jnp.bool_(False))
  for m in state.modality_graphs:
    np.testing.assert_array_equal(after.modality_user[m], 0.0)


def test_t1_schedule_graph_from_batch0_then_empty(trajectory):
  run, records, states, metrics = trajectory
  config = run.config
  b, k = config.train.batch_size, run.step_config.graphs.k
  n_users, n_items = run.shapes.n_users, run.shapes.n_items
  assert (config.graph_update.T, config.graph_update.pairing, k) == (1, "tiled",
                                                                     4)
  calls = {idx: (rows, users) for idx, rows, users in
           records["graph_update"][:N_STEPS]}
  assert sorted(calls) == list(range(N_STEPS))
  rows0, users0 = calls[0]
  assert len(set(users0.tolist())) == b
  train_lists = np.asarray(run.inputs.sampler.train_lists)

  for m in run.shapes.modalities:
    # Recorded rows are the masked, normalised generated rows (§3.4).
    rows = np.asarray(rows0[m])
    assert rows.shape == (b, n_items)
    for row, u in zip(rows, users0):
      items = train_lists[u][train_lists[u] >= 0]
      np.testing.assert_array_equal(row[items], 0.0)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    want_users = np.array([users0[p % b] for p in range(b * k)])  # tiled bug

    # idx 0: append batch 0's pairs; G^m is still the initial (base) graph.
    s = states[1]
    assert int(s.graph_buffer.length) == b * k
    np.testing.assert_array_equal(s.graph_buffer.users[m][:b * k], want_users)
    # Items are row b's top-k, read row by row (ties, e.g. items with the
    # same neighbours, may come in any order).
    want_items = np.asarray(s.graph_buffer.items[m][:b * k])
    top = want_items.reshape(b, k)
    for row, chosen in zip(rows, top):
      assert len(set(chosen.tolist())) == k
      np.testing.assert_array_equal(np.sort(row[chosen])[::-1],
                                    np.sort(row)[::-1][:k])
    for x, y in zip(s.modality_graphs[m], states[0].modality_graphs[m]):
      np.testing.assert_array_equal(x, y)

    # idx 1: rebuild from batch 0's pairs only (the current batch is dropped).
    g = states[2].modality_graphs[m]
    w_u, w_i = _weights(g)
    assert np.count_nonzero(w_u) == np.count_nonzero(w_i) == b * k
    valid = w_u > 0  # the edges (in any order) are exactly batch 0's pairs
    assert sorted(zip(np.asarray(g.users)[valid].tolist(),
                      np.asarray(g.items)[valid].tolist())) == sorted(
                          zip(want_users.tolist(), want_items.tolist()))
    want_ui, want_iu = helpers.one_sided_dense(
        helpers.dense_counts(want_users, want_items, n_users, n_items))
    np.testing.assert_allclose(
        helpers.dense_from_graph_edges(g.users, g.items, w_u, n_users,
                                       n_items), want_ui, rtol=1e-6)
    np.testing.assert_allclose(
        helpers.dense_from_graph_edges(g.users, g.items, w_i, n_items,
                                       n_users, by_user=False),
        want_iu, rtol=1e-6)
    assert int(states[2].graph_buffer.length) == 0

    # idx >= 2: rebuilt from empty lists, so all-zero forever.
    for s in states[3:]:
      w_u, w_i = _weights(s.modality_graphs[m])
      assert not np.any(w_u) and not np.any(w_i)
      assert int(s.graph_buffer.length) == 0

  # The scrambled graph is really scrambled: some edge's user is not the row
  # the item was chosen for.
  assert any(users0[p % b] != users0[p // k] for p in range(b * k))

  # With an empty graph the contrastive term is the constant log(2B - 1) per
  # modality (§3.6); idx 3 and 4 run on the graph emptied at idx 2.
  n_mod = len(run.shapes.modalities)
  const = -math.log(1.0 / (2 * b - 1) + 1e-8)
  for idx in (3, 4):
    np.testing.assert_allclose(metrics[idx]["cl"], n_mod * const, rtol=1e-5)
  for idx in (0, 1, 2):
    assert abs(metrics[idx]["cl"] - n_mod * const) > 1e-3
  # ... and the fusion matrix then gets exactly zero gradient.
  rec = records["rec_grads"]
  assert np.any(rec[0]["w_self_attention_cat"] != 0)
  np.testing.assert_array_equal(rec[3]["w_self_attention_cat"], 0.0)
  np.testing.assert_array_equal(rec[4]["w_self_attention_cat"], 0.0)


# ----------------------------------------------------------------------------
# reference_graph_update called directly (T = 2, k = 0, pairing)


def _simulate(schedule, base_r, period, k, pairing, mods):
  """Naive transcription of §4.4: lists x, y per modality, rebuild at positive
  multiples of T from the lists (current batch dropped), else append."""
  x = {m: [] for m in mods}
  y = {m: [] for m in mods}
  dense = {m: helpers.one_sided_dense(base_r) for m in mods}
  out = []
  for idx, users, rows in schedule:
    b = len(users)
    for m in mods:
      if idx > 0 and idx % period == 0:
        r = helpers.dense_counts(np.array(x[m], int), np.array(y[m], int),
                                 *base_r.shape)
        dense[m] = helpers.one_sided_dense(r)
        x[m], y[m] = [], []
      else:
        top = np.argsort(-rows[m], axis=1, kind="stable")[:, :k]
        for p in range(b * k):
          x[m].append(users[p % b] if pairing == "tiled" else users[p // k])
          y[m].append(top.reshape(-1)[p])
    out.append({m: dense[m] for m in mods})
  return out


@pytest.mark.parametrize("pairing", ["tiled", "per_user"])
def test_t2_schedule_accumulates_and_survives_epoch_boundary(pairing):
  n_users, n_items, b, k, period = 10, 12, 3, 2, 2
  mods = ("image", "text")
  rng = np.random.default_rng(0)
  base_r = (rng.random((n_users, n_items)) < 0.3).astype(float)
  base = graph_lib.build_graph(*np.nonzero(base_r), n_users, n_items,
                               norm="one_sided")
  cap = (2 * period - 1) * b * k
  graphs = helpers.initial_modality_graphs(
      base, mods, max(base.n_edges, cap),
      n_users, n_items)
  buffer = modality_graphs.empty_buffer(mods, cap)
  update = jax.jit(lambda graphs, buffer, rows, users, idx: (
      modality_graphs.reference_update(
          graphs, buffer, modality_graphs.top_items_of_rows(rows, k), users,
          idx, k=k, period=period, pairing=pairing, n_users=n_users,
          n_items=n_items)))
  # An epoch of N = 4 batches: ... N-2, N-1 | 0, 1, 2 (lists survive).
  idx_seq = [0, 1, 2, 3, 0, 1, 2]
  schedule = [(idx, rng.choice(n_users, b, replace=False).astype(np.int32),
               {m: rng.random((b, n_items)).astype(np.float32) for m in mods})
              for idx in idx_seq]
  want = _simulate(schedule, base_r, period, k, pairing, mods)
  n_valid = []
  for (idx, users, rows), expected in zip(schedule, want):
    graphs, buffer = update(graphs, buffer,
                            {m: jnp.asarray(r) for m, r in rows.items()},
                            jnp.asarray(users), jnp.int32(idx))
    for m in mods:
      g = graphs[m]
      w_u, w_i = _weights(g)
      np.testing.assert_allclose(
          helpers.dense_from_graph_edges(g.users, g.items, w_u, n_users,
                                         n_items), expected[m][0],
          rtol=1e-6, atol=1e-7, err_msg=f"idx {idx} {m}")
      np.testing.assert_allclose(
          helpers.dense_from_graph_edges(g.users, g.items, w_i, n_items,
                                         n_users, by_user=False),
          expected[m][1], rtol=1e-6, atol=1e-7, err_msg=f"idx {idx} {m}")
    n_valid.append(int(np.count_nonzero(_weights(graphs["image"])[0])))
  # Rebuilds at idx 2 (batches 0, 1), idx 2 of the next epoch (batches 3,
  # 0', 1'): the last graph holds three batches, the buffer's full capacity.
  assert n_valid[2] == 2 * b * k and n_valid[3] == 2 * b * k
  assert n_valid[6] == 3 * b * k == cap


def test_k0_graph_is_empty_after_the_first_rebuild():
  """Baby: k = floor(7050 * 1e-4) = 0, so the graph is empty from idx 1 on."""
  sched = _schedule(helpers.load_config("baby"), 7050)
  k = sched.k
  assert k == 0
  n_users, n_items, b = 6, 8, 3
  base = graph_lib.build_graph(np.arange(6), np.arange(6), n_users, n_items,
                               norm="one_sided")
  cap = 0
  assert modality_graphs.buffer_capacity(sched, 1024) == cap
  graphs = helpers.initial_modality_graphs(
      base, ("image",), max(6, cap), n_users,
      n_items)
  buffer = modality_graphs.empty_buffer(("image",), cap)
  rows = {"image": jnp.asarray(np.random.default_rng(0).random((b, n_items)),
                               jnp.float32)}
  users = jnp.arange(b, dtype=jnp.int32)
  for idx in range(4):
    graphs, buffer = modality_graphs.reference_update(
        graphs, buffer, modality_graphs.top_items_of_rows(rows, k), users,
        jnp.int32(idx), k=k, period=1, pairing="tiled", n_users=n_users,
        n_items=n_items)
    w_u, _ = _weights(graphs["image"])
    if idx == 0:
      assert np.count_nonzero(w_u) == 6  # still the base graph
    else:
      assert not np.any(w_u)


def test_pair_topk_tiled_scramble_and_per_user():
  users = jnp.asarray([10, 11, 12], jnp.int32)
  top = jnp.asarray([[1, 2], [3, 4], [5, 6]], jnp.int32)
  b, k = top.shape
  pu, pi = modality_graphs.pair_topk(users, top, "tiled")
  np.testing.assert_array_equal(pi, np.asarray(top).reshape(-1))
  np.testing.assert_array_equal(
      pu, [int(users[p % b]) for p in range(b * k)])
  np.testing.assert_array_equal(pu, [10, 11, 12, 10, 11, 12])
  pu, pi = modality_graphs.pair_topk(users, top, "per_user")
  np.testing.assert_array_equal(pi, [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(pu, [10, 10, 11, 11, 12, 12])
  with pytest.raises(ValueError, match="pairing"):
    modality_graphs.pair_topk(users, top, "shuffled")


def test_buffer_capacity_formula():
  sched = _schedule(helpers.load_config("sports"), 18357)
  assert sched.period == 2 and sched.k == 367
  assert modality_graphs.buffer_capacity(sched, 1024) == 3 * 1024 * 367


# ----------------------------------------------------------------------------
# Contrastive loss of an empty graph (§3.6)


def test_empty_graph_contrastive_loss_is_log_2b_minus_1_with_zero_grad(
    test_run):
  run, _ = test_run
  config = run.config
  hp = model_lib.ModelHParams.from_config(config.model)
  state = run.init_state()
  b = config.train.batch_size
  exist = np.asarray(run.inputs.sampler.exist_users)
  users = jnp.asarray(np.random.default_rng(0).choice(exist, b, replace=False))
  # G^m starts as the base graph (the forward reads it from the inputs while
  # `modality_graphs.is_base`; the state holds only regenerations).
  base_graphs = {m: run.inputs.graph for m in state.modality_graphs}
  # Every weight field (both orderings) zeroed: the base structure, empty.
  empty = {m: jax.tree.map(lambda x: jnp.zeros_like(x)
                           if x.dtype == jnp.float32 else x, g)
           for m, g in base_graphs.items()}

  @jax.jit
  def cl_and_grad(params, graphs):
    def loss(p):
      out = model_lib.forward(p, run.inputs.graph, run.inputs.features,
                              graphs, key=jax.random.key(1), train=True,
                              hp=hp)
      per_mod = {m: losses.infonce(anchor=out.modality_user[m][users],
                                   positive=out.user[users],
                                   tau=config.loss.tau) for m in graphs}
      return sum(per_mod.values()), per_mod
    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, per_mod), grads = cl_and_grad(state.params, empty)
  for m, value in per_mod.items():
    np.testing.assert_allclose(value, math.log(2 * b - 1), rtol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    np.testing.assert_array_equal(g, 0.0, err_msg=str(path))
  # On the (non-empty) initial graph the same loss has gradients.
  (total, _), grads = cl_and_grad(state.params, base_graphs)
  assert abs(float(total) - 2 * math.log(2 * b - 1)) > 1e-3
  assert np.any(grads["item_id_embedding"] != 0)


# ----------------------------------------------------------------------------
# Ablations and LightGCN (one step each, compiled at low optimisation level)


@pytest.mark.parametrize("arg", ["variant=wo_asl", "variant=wo_cl",
                                 "variant=wo_gt", "variant=rp_gae",
                                 "model=lightgcn"])
def test_ablation_builds_and_runs_one_step(arg):
  config = helpers.load_config("test", arg)
  ds = synthetic.make_synthetic(config.data.synthetic)
  run = run_lib.Run(config, ds)
  state = run.init_state()
  before = jax.device_get(state.params)
  state, metrics = run.step(state, jnp.int32(0), run.inputs)
  metrics = jax.device_get(metrics)
  assert helpers.tree_all_finite(metrics)
  assert helpers.tree_all_finite(state.params)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(state.params)))
  variant = arg.partition("=")[2]
  if variant in ("wo_asl", "rp_gae", "lightgcn"):
    assert state.critic_params is None
    assert "critic" not in metrics
  else:
    assert state.critic_params is not None
    assert helpers.tree_all_finite(state.critic_params)
    assert "critic" in metrics
  if variant == "wo_cl":
    assert "cl" not in metrics
  elif variant != "lightgcn":
    assert "cl" in metrics
  if variant == "wo_asl":
    assert "gen" not in metrics
  if variant == "rp_gae":
    assert "gen" in metrics
  if variant == "wo_gt":
    assert config.loss.gumbel_transform is False
  if variant == "lightgcn":
    assert set(state.params) == {"user_id_embedding", "item_id_embedding"}
    assert set(metrics) == {"bpr", "emb_l2", "loss"}
  if arg.startswith("variant"):  # recorded as the variant or the ablation
    assert variant in (config.variant, config.get("ablation"))


def test_apply_arg_rejects_unknown_values():
  c = helpers.load_config("test")
  for bad in ("variant=wo_xyz", "model=mf", "lr=1", "variant"):
    with pytest.raises(ValueError):
      config_lib.apply_arg(c, bad)
