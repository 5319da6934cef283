"""mmssl_jax.nnx: the Flax NNX modules compute what the pure functions do.

On configs/test.py data: module outputs equal the pure forward / critic /
LightGCN on the same parameters, a few NNX training steps lower the BPR loss,
a trained workdir loaded into the modules reproduces its exported vectors,
and the README's NNX example runs.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import helpers
from mmssl_jax import critic as critic_lib
from mmssl_jax import export
from mmssl_jax import graph as graph_lib
from mmssl_jax import losses
from mmssl_jax import model as model_lib
from mmssl_jax import nnx as mnnx
from mmssl_jax import run as run_lib
from mmssl_jax import train

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", name="setup")
def setup_fixture():
  """(config, dataset, Run, initial state) of configs/test.py."""
  config = helpers.load_config("test")
  ds = run_lib.load_dataset(config.data)
  run = run_lib.Run(config, ds)
  return config, ds, run, run.init_state()


def _assert_trees_close(actual, expected, **tol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **(tol or TOL))


def test_recommender_init_and_params_round_trip(setup):
  config, ds, _, state = setup
  hp = model_lib.ModelHParams.from_config(config.model)
  key = jax.random.key(3)
  rec = mnnx.Recommender(nnx.Rngs(params=key), ds.n_users, ds.n_items,
                         ds.modality_dims, hp)
  # The released initialisation: init_params with the key of rngs.params().
  expected = model_lib.init_params(nnx.Rngs(params=key).params(),
                                   n_users=ds.n_users, n_items=ds.n_items,
                                   modality_dims=ds.modality_dims, hp=hp)
  _assert_trees_close(rec.params(), expected, rtol=0, atol=0)
  wrapped = mnnx.Recommender.from_params(state.params, hp)
  _assert_trees_close(wrapped.params(), state.params, rtol=0, atol=0)
  # One nnx.Param per leaf of the pure pytree, nothing else trainable.
  n_params = len(jax.tree.leaves(nnx.state(wrapped, nnx.Param)))
  assert n_params == len(jax.tree.leaves(state.params))
  graphdef, params, rest = nnx.split(wrapped, nnx.Param, ...)
  merged = nnx.merge(graphdef, params, rest)
  _assert_trees_close(merged.params(), state.params, rtol=0, atol=0)


@pytest.mark.parametrize("train_mode", [False, True])
def test_recommender_matches_pure_forward(setup, train_mode):
  config, _, run, state = setup
  hp = model_lib.ModelHParams.from_config(config.model)
  inputs, is_base = run.inputs, run.modality_is_base(state)
  key = jax.random.key(7)
  kwargs = dict(train=train_mode, modality_is_base=is_base)
  expected = model_lib.forward(state.params, inputs.graph, inputs.features,
                               state.modality_graphs, key=key, hp=hp,
                               **kwargs)
  rec = mnnx.Recommender.from_params(state.params, hp)
  got = rec(inputs.graph, inputs.features, state.modality_graphs, key=key,
            **kwargs)
  _assert_trees_close(got._asdict(), expected._asdict())
  if not train_mode:  # the final vectors evaluation ranks by
    user, item = run.final_embeddings(state)
    np.testing.assert_allclose(got.user, user, **TOL)
    np.testing.assert_allclose(got.item, item, **TOL)


def test_recommender_dropout_stream_without_key(setup):
  config, _, run, state = setup
  hp = model_lib.ModelHParams.from_config(config.model)
  inputs = run.inputs
  args = (inputs.graph, inputs.features, state.modality_graphs)
  with pytest.raises(ValueError, match="dropout key"):
    mnnx.Recommender.from_params(state.params, hp)(*args, train=True)
  rec = mnnx.Recommender.from_params(state.params, hp,
                                     rngs=nnx.Rngs(dropout=1))
  first = rec(*args, train=True, modality_is_base=True).user
  second = rec(*args, train=True, modality_is_base=True).user
  assert not np.allclose(first, second)  # the stream advances per call


def test_critic_matches_pure_apply(setup):
  config, ds, _, state = setup
  hp = critic_lib.CriticHParams.from_config(config.critic)
  assert hp.train and hp.batch_norm  # the reference critic
  rows = jax.random.uniform(jax.random.key(0), (16, ds.n_items))
  key = jax.random.key(1)
  expected, expected_stats = critic_lib.dense_critic_apply(
      state.critic_params, state.critic_stats, rows, key=key, hp=hp)
  critic = mnnx.Critic.from_params(state.critic_params, state.critic_stats,
                                   hp)
  np.testing.assert_allclose(critic(rows, key=key), expected, **TOL)
  _assert_trees_close(critic.stats(), expected_stats)  # updated in place
  assert len(jax.tree.leaves(nnx.state(critic, nnx.BatchStat))) == 4
  # Eval mode reads the running statistics and leaves them alone.
  eval_hp = critic_lib.CriticHParams(train=False)
  expected, _ = critic_lib.dense_critic_apply(
      state.critic_params, expected_stats, rows, hp=eval_hp)
  np.testing.assert_allclose(critic(rows, train=False), expected, **TOL)
  _assert_trees_close(critic.stats(), expected_stats)
  fresh = mnnx.Critic(nnx.Rngs(params=5, dropout=6), ds.n_items, hp=hp)
  _assert_trees_close(fresh.params(), critic_lib.init_critic(
      nnx.Rngs(params=5).params(), ds.n_items), rtol=0, atol=0)
  assert fresh(rows).shape == (16,)  # dropout from the module's stream


def test_lightgcn_matches_pure_forward(setup):
  _, ds, _, _ = setup
  graph = graph_lib.build_graph(ds.train.users, ds.train.items, ds.n_users,
                                ds.n_items, norm="symmetric")
  lg = mnnx.LightGCN(nnx.Rngs(0), ds.n_users, ds.n_items, 16, n_layers=3)
  expected = model_lib.lightgcn_forward(lg.params(), graph, 3)
  _assert_trees_close(lg(graph), expected)
  assert sorted(lg.params()) == ["item_id_embedding", "user_id_embedding"]


def test_nnx_training_lowers_bpr_loss(setup):
  config, ds, run, state = setup
  hp = model_lib.ModelHParams.from_config(config.model)
  rec = mnnx.Recommender(nnx.Rngs(params=0, dropout=1), ds.n_users,
                         ds.n_items, ds.modality_dims, hp)
  opt = nnx.Optimizer(rec, optax.adam(1e-2), wrt=nnx.Param)
  inputs = run.inputs
  graphs, is_base = state.modality_graphs, run.modality_is_base(state)
  rng = np.random.default_rng(0)
  pick = rng.integers(0, len(ds.train), 256)  # one held batch of triples
  u, p = ds.train.users[pick], ds.train.items[pick]
  n = rng.integers(0, ds.n_items, 256)

  def bpr(rec, train_mode):
    out = rec(inputs.graph, inputs.features, graphs, train=train_mode,
              modality_is_base=is_base)
    return losses.bpr_loss(user_emb=out.user[u], pos_emb=out.item[p],
                           neg_emb=out.item[n])

  @nnx.jit
  def step(rec, opt):  # dropout keys from the module's stream
    loss, grads = nnx.value_and_grad(lambda r: bpr(r, True))(rec)
    opt.update(rec, grads)
    return loss

  before = float(bpr(rec, False))
  for _ in range(20):
    step(rec, opt)
  after = float(bpr(rec, False))
  # Measured (CPU, jax 0.10.2, flax 0.12.8): 0.527 -> 0.116 in eval mode
  # over 20 Adam(1e-2) steps with dropout.
  assert after < 0.5 * before, (before, after)
  assert int(opt.step[...]) == 20


@pytest.fixture(scope="module", name="exported")
def exported_fixture(tmp_path_factory):
  """configs/test.py trained 1 epoch, then exported: (workdir, export dir)."""
  config = helpers.load_config("test")
  config.train.epochs = 1
  root = tmp_path_factory.mktemp("nnx_workdir")
  workdir, out = root / "run", root / "export"
  train.train_and_evaluate(config, str(workdir))
  assert export.run_cli([f"--workdir={workdir}", f"--output={out}"]) == 0
  return workdir, out


def test_from_workdir_reproduces_exported_embeddings(exported):
  workdir, out = exported
  loaded = mnnx.from_workdir(str(workdir))
  assert isinstance(loaded.model, mnnx.Recommender)
  state = loaded.restored.state
  _assert_trees_close(loaded.model.params(), state.params, rtol=0, atol=0)
  _assert_trees_close(loaded.critic.params(), state.critic_params,
                      rtol=0, atol=0)
  _assert_trees_close(loaded.critic.stats(), state.critic_stats,
                      rtol=0, atol=0)
  out_user = np.load(out / "user_embeddings.npy")
  out_item = np.load(out / "item_embeddings.npy")
  user, item = loaded.embeddings()
  np.testing.assert_allclose(user, out_user, **TOL)
  np.testing.assert_allclose(item, out_item, **TOL)
  # The same through an explicit eval-mode call, with the per-modality views.
  fwd = loaded.model(loaded.graph, loaded.features, loaded.modality_graphs,
                     train=False, modality_is_base=loaded.modality_is_base)
  np.testing.assert_allclose(fwd.user, out_user, **TOL)
  for m in loaded.features:
    np.testing.assert_allclose(fwd.feat_item[m],
                               np.load(out / f"feat_item_{m}.npy"), **TOL)
    np.testing.assert_allclose(fwd.modality_user[m],
                               np.load(out / f"modality_user_{m}.npy"), **TOL)


def test_readme_nnx_example(capsys):
  # ---- README.md, "Flax NNX" example, verbatim ----
  import jax, jax.numpy as jnp, optax
  from flax import nnx
  from mmssl_jax import config_lib, graph, losses, model, run
  from mmssl_jax.nnx import Recommender

  config = config_lib.base_config()
  config.data.source = "synthetic"  # the embedded synthetic dataset
  ds = run.load_dataset(config.data)
  g = graph.build_graph(ds.train.users, ds.train.items, ds.n_users, ds.n_items,
                        norm="one_sided")
  feats = {m: jnp.asarray(f) for m, f in ds.modalities.items()}

  class Rescored(nnx.Module):  # MMSSL's recommender + a linear user head
    def __init__(self, rngs):
      self.rec = Recommender(rngs, ds.n_users, ds.n_items, ds.modality_dims,
                             model.ModelHParams(embed_size=32))
      self.head = nnx.Linear(32, 32, rngs=rngs)
    def __call__(self, g, feats):  # G^m is the base graph until regenerated
      out = self.rec(g, feats, {m: g for m in feats}, train=True)
      return self.head(out.user), out.item

  net = Rescored(nnx.Rngs(params=0, dropout=1))
  opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
  u, p = ds.train.users[::8], ds.train.items[::8]  # (user, positive) pairs
  n = jax.random.randint(jax.random.key(2), u.shape, 0, ds.n_items)
  bpr = lambda user, item: losses.bpr_loss(user_emb=user[u], pos_emb=item[p],
                                           neg_emb=item[n])
  @nnx.jit
  def step(net, opt, g, feats):
    loss, grads = nnx.value_and_grad(lambda net: bpr(*net(g, feats)))(net)
    opt.update(net, grads)
    return loss
  for i in range(5):
    print(f"step {i}: BPR loss {step(net, opt, g, feats):.4f}")
  # ---- end of the example ----
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in lines] == [f"step {i}" for i in
                                                    range(5)]
  first, last = (float(lines[i].rsplit(" ", 1)[1]) for i in (0, -1))
  assert last < first, lines
