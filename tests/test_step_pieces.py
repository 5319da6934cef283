"""The train step combines its pieces as docs/reference.md says (§3, §4.3, §4.5).

The losses, the critic, the forward and the metrics each have naive tests of
their own; this file checks the COMBINATION. One whole reference step of
`configs/test.py` is recomputed here from the formulas of the document,
without `mmssl_jax.steps`: the critic's loss on the "real" rows of the
no-gradient forward's final embeddings (§3.5) against the fake rows of the
feature representations (§3.4), its Adam step (§4.1, §4.3.2), then every
recommender loss term (§3.1-§3.7) with the updated critic, and its AdamW
step (§4.3.3). `model.forward` is trusted (tests/test_model.py); the critic,
the rows, the losses and both optimiser updates are written out again below.
Only the random streams are shared with the package: the step's keys
(`steps.StepKeys.split`), `noise.uniform` for the Gumbel draws and
`noise.dropout`'s masks (a critic layer's mask from fold_in(key, layer), as
`critic.critic_head` draws it); a hand-made check with the critic's dropout
off needs no dropout stream at all.

The gradients the step applies are read back exactly from the optimiser
states after one step: Adam's first moment is then m = (1 - b1) g.

Teeth: each of these mutations of the naive recomputation is computed too
and must DISAGREE with the step by a clear margin: positives and negatives
swapped in BPR, real rows fed to the critic as fake, real rows built from the
feature representations instead of the final embeddings, and the real rows
without their stop_gradient (the critic loss leaking into the recommender's
gradient, §4.5).

Also: each piece on its own (`critic_step`, `recommender_step`,
`modality_graph_step`, on hand-made small inputs where practical), one
compilation over several calls of every jitted piece, and the LightGCN step.
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from mmssl_jax import critic as critic_lib
from mmssl_jax import model as model_lib
from mmssl_jax import modality_graphs
from mmssl_jax import noise
from mmssl_jax import run as run_lib
from mmssl_jax import steps
from mmssl_jax.data import sampler as sampler_lib

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# ----------------------------------------------------------------------------
# Tolerances (float32 throughout, step and naive version alike)
#
# Gradients: the step and the naive version sum the same float32 terms in a
# different order (CSR products vs gathers, the critic's first layer on
# distinct rows vs on the stacked rows, the penalty through the hidden layer
# vs through the input). Measured (2 cores, jax 0.10.2): relative Frobenius
# error per leaf <= 1.9e-6 (critic, whose penalty is a double backward) and
# <= 1.8e-7 (recommender); elementwise <= 1.1e-6 of the leaf's largest
# entry. GRAD_RTOL = 1e-4 leaves 50x headroom and is still 3-4 orders of
# magnitude below every mutation below (>= 0.3).
GRAD_RTOL = 1e-4
GRAD_ATOL_FRACTION = 1e-5  # of the leaf's largest |gradient|
# Loss terms: the same sums reduced to scalars; measured <= 3e-7 relative.
TERM_RTOL = 1e-5
# Parameters after one Adam(W) step: the first step moves an entry by
# lr * g / (|g| + 1e-8) (+ lr * wd * p), i.e. by about lr whatever |g|; the
# naive update is computed in float64 and the step's parameters are float32,
# whose rounding at |p| <= 1 is <= 6e-8 = 1e-4 lr (measured 3.4e-5 lr).
PARAM_ATOL_LR = 1e-3  # times lr
# A mutation must move the quantity it touches by at least this relative
# amount (measured: 0.66-1.5 for the gradients; 0.1-1.2 for the values).
MUTATION_MIN = 0.05


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _rel(got, want) -> float:
  """||got - want|| / ||want|| over a whole pytree."""
  got, want = _flat(got), _flat(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _first_moment_grads(opt_state, b1):
  """The gradient of a first Adam(W) step, read back from its state:
  optax (like torch) keeps m = b1 * 0 + (1 - b1) g after one step."""
  mu = optax.tree_utils.tree_get(opt_state, "mu")
  return jax.tree.map(lambda m: np.asarray(m, np.float64) / (1.0 - b1), mu)


# ----------------------------------------------------------------------------
# The naive reference, from docs/reference.md


def l2n(x):
  """n(x) = x / max(||x||_2, 1e-12) row-wise (§2.1)."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)), 1e-12)


def masked_rows(p, q, r):
  """§3.4: S_hat = n((P_b . Q_i) (1 - R[b, i])) over all items."""
  return l2n((p @ q.T) * (1.0 - r))


def naive_real_rows(user_b, item, r, key, loss):
  """§3.5: x_r = n(softmax_i(R + s_g g / tau_r) + kappa S_hat(u*[B], i*)),
  g = -log(-log(xi + 1e-8) + 1e-8), xi ~ U(0, 1) per entry."""
  xi = noise.uniform(key, r.shape)
  g = -jnp.log(-jnp.log(xi + 1e-8) + 1e-8)
  observed = jax.nn.softmax(r + loss.gumbel_scale * g / loss.real_data_tau,
                            axis=-1)
  return l2n(observed + loss.ui_pre_scale * masked_rows(user_b, item, r))


def naive_critic(cp, x, key, rates):
  """§3.5 critic: Linear -> LeakyReLU(slope 1 = identity) -> BatchNorm (batch
  statistics, eps 1e-5) -> Dropout, twice, then Linear -> 100 sigmoid.
  Returns the scores and each BatchNorm's (batch mean, unbiased variance)."""
  h, batch_stats = x, []
  for layer, rate in enumerate(rates):
    h = h @ cp[f"dense_{layer}"]["kernel"] + cp[f"dense_{layer}"]["bias"]
    mean, var = h.mean(0), h.var(0)
    batch_stats.append((mean, var * h.shape[0] / (h.shape[0] - 1)))
    bn = cp[f"bn_{layer}"]
    h = (h - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    if rate > 0:  # inverted dropout, the package's mask stream
      keep = noise.uniform(jax.random.fold_in(key, layer), h.shape) >= rate
      h = jnp.where(keep, h / (1.0 - rate), 0.0)
  out = cp[f"dense_{len(rates)}"]
  z = (h @ out["kernel"] + out["bias"])[:, 0]
  return 100.0 * jax.nn.sigmoid(z), batch_stats


def naive_critic_loss(cp, real, fake, keys, *, rates, gp_weight):
  """§3.5: L_D = -mean D(x_r) + mean D(x_f) + gp_weight * GP, the B real
  rows stacked M times against the M*B fake rows; GP on
  x_hat = a x_r + (1 - a) x_f (one a per row) with the gradient of the SUMMED
  scores. Returns (L_D, aux) with the running-statistics inputs."""
  n_mod = fake.shape[0] // real.shape[0]
  real = jnp.concatenate([real] * n_mod)
  d_real, stats_real = naive_critic(cp, real, keys.d_real, rates)
  d_fake, stats_fake = naive_critic(cp, fake, keys.d_fake, rates)
  alpha = jax.random.uniform(keys.gp_alpha, (real.shape[0], 1), jnp.float32)
  x_hat = alpha * real + (1.0 - alpha) * fake
  grad_x = jax.grad(
      lambda x: jnp.sum(naive_critic(cp, x, keys.gp, rates)[0]))(x_hat)
  gp = jnp.mean((jnp.sqrt(jnp.sum(grad_x * grad_x, -1)) - 1.0) ** 2)
  loss = -jnp.mean(d_real) + jnp.mean(d_fake) + gp_weight * gp
  return loss, {"critic": loss, "d_real": jnp.mean(d_real),
                "d_fake": jnp.mean(d_fake), "gp": gp,
                "stats": (stats_real, stats_fake)}


def naive_running_stats(stats, batch_stats_seq):
  """torch BatchNorm running statistics, momentum 0.1, one update per call
  (the real call, then the fake call; the penalty's is not kept)."""
  out = {k: {"mean": np.asarray(v["mean"], np.float64),
             "var": np.asarray(v["var"], np.float64)}
         for k, v in stats.items()}
  for per_layer in batch_stats_seq:
    for layer, (mean, var) in enumerate(per_layer):
      s = out[f"bn_{layer}"]
      s["mean"] = 0.9 * s["mean"] + 0.1 * np.asarray(mean, np.float64)
      s["var"] = 0.9 * s["var"] + 0.1 * np.asarray(var, np.float64)
  return out


def naive_infonce(anchor, positive, tau):
  """§3.6: z1 anchors, intra- and inter-view negatives, 1e-8 in the log."""
  z1, z2 = l2n(anchor), l2n(positive)
  s11 = jnp.exp(z1 @ z1.T / tau)
  s12 = jnp.exp(z1 @ z2.T / tau)
  denominator = s11.sum(1) + s12.sum(1) - jnp.diag(s11)
  return -jnp.mean(jnp.log(jnp.diag(s12) / denominator + 1e-8))


def naive_bpr(u, p, n):
  """§3.1: -mean log sigmoid(u.p - u.n)."""
  return -jnp.mean(jnp.log(jax.nn.sigmoid(jnp.sum(u * p, 1) -
                                          jnp.sum(u * n, 1))))


def naive_adam_first_step(p, g, *, lr, b1, b2, weight_decay=0.0, eps=1e-8):
  """One Adam(W) step from zero moments, in float64 (torch/optax): m, v,
  bias correction, then decoupled decay lr * wd * p for AdamW."""
  p = np.asarray(p, np.float64)
  g = np.asarray(g, np.float64)
  m = (1.0 - b1) * g
  v = (1.0 - b2) * g * g
  m_hat, v_hat = m / (1.0 - b1), v / (1.0 - b2)
  return p - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p), m, v


class Problem:
  """configs/test.py's run, its initial state, the step's keys and batch."""

  def __init__(self, arg=None):
    self.config = helpers.load_config("test", arg)
    self.ds = run_lib.load_dataset(self.config.data)
    self.run = run_lib.Run(self.config, self.ds)
    self.cfg = self.run.step_config
    self.state = self.run.init_state()
    ds = self.ds
    self.r = helpers.dense_counts(ds.train.users, ds.train.items, ds.n_users,
                                  ds.n_items)
    self.next_rng, self.keys = steps.StepKeys.split(self.state.rng)


def _assert_valid_bpr_batch(users, pos, neg, r, batch_size):
  users, pos, neg = map(np.asarray, (users, pos, neg))
  assert users.shape == pos.shape == neg.shape == (batch_size,)
  assert len(set(users.tolist())) == batch_size  # distinct users (§4.2)
  assert np.all(r[users, pos] == 1) and np.all(r[users, neg] == 0)


@pytest.fixture(scope="module", name="compile_events")
def compile_events_fixture():
  """Names of the functions XLA compiles while this module runs."""
  events = []

  def on_event(event, duration, **kw):
    del duration
    if event == COMPILE_EVENT:
      events.append(kw.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


@pytest.fixture(scope="module", name="reference")
def reference_fixture(compile_events):
  """The real jitted step (`make_step`) for 3 iterations from the initial
  state, and the naive recomputation of the first one."""
  pb = Problem()
  run, cfg, keys, config = pb.run, pb.cfg, pb.keys, pb.config
  batch = steps.sample_batch(keys.sample, run.inputs, cfg)
  users, pos, neg = batch.users, batch.pos, batch.neg
  _assert_valid_bpr_batch(users, pos, neg, pb.r, cfg.batch_size)

  before = len(compile_events)
  state = run.init_state()  # donated: a fresh copy of pb.state
  trajectory = []
  for idx in range(3):
    state, metrics = run.step(state, jnp.int32(idx), run.inputs)
    trajectory.append((jax.device_get(state), jax.device_get(metrics)))
  step_compiles = compile_events[before:].count("jit(step)")

  mods = cfg.shapes.modalities
  loss = config.loss
  rates = tuple(config.critic.dropout)
  gp_weight = config.critic.gp_weight * config.critic.gp_rate
  r_b = jnp.asarray(pb.r[np.asarray(users)], jnp.float32)
  # §2.1: G^m starts equal to the base graph (used at idx 0 and 1, §4.4).
  base = {m: run.inputs.graph for m in mods}

  def forward(params, key):
    return model_lib.forward(params, run.inputs.graph, run.inputs.features,
                             base, key=key, train=True, hp=cfg.model)

  def fake_rows(out):  # §3.4: feature branch, image first
    return jnp.concatenate([masked_rows(out.feat_user[m][users],
                                        out.feat_item[m], r_b) for m in mods])

  def real_rows(user, item):
    return naive_real_rows(user[users], item, r_b, keys.gumbel, loss)

  critic_loss = functools.partial(naive_critic_loss, keys=keys, rates=rates,
                                  gp_weight=gp_weight)

  @jax.jit
  def naive_critic_step(params, cp):
    # §4.3.2: the no-gradient forward (critic key) gives both kinds of rows.
    out = jax.lax.stop_gradient(forward(params, keys.critic_forward))
    real, fake = real_rows(out.user, out.item), fake_rows(out)
    (_, aux), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        cp, real, fake)
    # Mutations. (a) real rows fed to the critic as fake.
    as_fake = jnp.concatenate([real] * len(mods))
    (_, aux_as_fake), g_as_fake = jax.value_and_grad(
        critic_loss, has_aux=True)(cp, real, as_fake)
    # (b) real rows from the feature representations, not u*, i*.
    m0 = mods[0]
    feat_real = real_rows(out.feat_user[m0], out.feat_item[m0])
    (_, aux_feat), g_feat = jax.value_and_grad(critic_loss, has_aux=True)(
        cp, feat_real, fake)
    # (c) no stop_gradient on the real rows: L_D's gradient w.r.t. the
    # recommender through them, which would join the recommender's.
    def leaking(p):
      o = forward(p, keys.critic_forward)
      return critic_loss(cp, real_rows(o.user, o.item), fake)[0]
    return {"aux": aux, "grads": grads, "aux_as_fake": aux_as_fake,
            "grads_as_fake": g_as_fake, "aux_feat_real": aux_feat,
            "grads_feat_real": g_feat, "leak": jax.grad(leaking)(params)}

  def rec_loss(params, cp, swap=False):
    # §4.3.3: the second forward, fresh dropout; §3.7's total.
    out = forward(params, keys.recommender_forward)
    p_idx, n_idx = (neg, pos) if swap else (pos, neg)
    u, p, n = out.user[users], out.item[p_idx], out.item[n_idx]
    terms = {
        "bpr": naive_bpr(u, p, n),
        "emb_l2": loss.emb_decay * 0.5 * (
            jnp.sum(u * u) + jnp.sum(p * p) + jnp.sum(n * n)) / cfg.batch_size,
        "feat_l2": loss.feat_decay * 0.5 * sum(
            jnp.sum(out.feat_user[m] ** 2) + jnp.sum(out.feat_item[m] ** 2)
            for m in mods) / pb.ds.n_items,
        "cl": sum(naive_infonce(out.modality_user[m][users], u, loss.tau)
                  for m in mods),
        # L_G through the critic's CURRENT (updated) weights, train mode.
        "gen": -jnp.mean(naive_critic(cp, fake_rows(out), keys.generator,
                                      rates)[0]),
    }
    terms["loss"] = (terms["bpr"] + terms["emb_l2"] + terms["feat_l2"] +
                     loss.cl_rate * terms["cl"] + loss.g_rate * terms["gen"])
    return terms["loss"], terms

  @jax.jit
  def naive_recommender_grads(params, cp):
    (_, terms), grads = jax.value_and_grad(rec_loss, has_aux=True)(params, cp)
    (_, terms_swapped), g_swapped = jax.value_and_grad(
        functools.partial(rec_loss, swap=True), has_aux=True)(params, cp)
    return terms, grads, terms_swapped, g_swapped

  s0 = jax.device_get(pb.state)
  crit = jax.device_get(naive_critic_step(pb.state.params,
                                          pb.state.critic_params))
  ch = cfg.critic_optim
  new_critic = jax.tree.map(
      lambda p, g: naive_adam_first_step(p, g, lr=ch.lr, b1=ch.b1,
                                         b2=ch.b2)[0],
      s0.critic_params, crit["grads"])
  terms, grads, terms_swapped, g_swapped = jax.device_get(
      naive_recommender_grads(
          pb.state.params,
          jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), new_critic)))
  rh = cfg.optim
  new_params = jax.tree.map(
      lambda p, g: naive_adam_first_step(p, g, lr=rh.lr, b1=rh.b1, b2=rh.b2,
                                         weight_decay=rh.weight_decay)[0],
      s0.params, grads)
  naive = dict(
      critic=crit, critic_params=new_critic,
      critic_stats=naive_running_stats(s0.critic_stats,
                                       crit["aux"]["stats"]),
      terms=terms, grads=grads, params=new_params,
      terms_swapped=terms_swapped, grads_swapped=g_swapped)
  return dict(problem=pb, s0=s0, batch=batch, trajectory=trajectory,
              step_compiles=step_compiles, naive=naive)


# ----------------------------------------------------------------------------
# One full reference step, recomputed naively


def test_critic_loss_terms_match_naive(reference):
  # The default reference critic: dropout on, train-mode BatchNorm, 100 *
  # sigmoid, penalty weight 0.3 (§3.5).
  config = reference["problem"].config
  assert config.variant == "reference"
  assert tuple(config.critic.dropout) == (0.31, 0.5)
  assert (config.critic.batch_norm, config.critic.train_mode,
          config.critic.negative_slope) == (True, True, 1.0)
  assert config.critic.gp_weight * config.critic.gp_rate == 0.3
  _, metrics = reference["trajectory"][0]
  aux = reference["naive"]["critic"]["aux"]
  for k in ("critic", "d_real", "d_fake", "gp"):
    np.testing.assert_allclose(metrics[k], aux[k], rtol=TERM_RTOL, err_msg=k)
  # The reference critic at I = 90: scores in (0, 100) and a large penalty.
  assert 0 < metrics["d_real"] < 100 and 0 < metrics["d_fake"] < 100


def test_critic_gradient_and_adam_step_match_naive(reference):
  pb, s0 = reference["problem"], reference["s0"]
  s1, _ = reference["trajectory"][0]
  naive = reference["naive"]
  ch = pb.cfg.critic_optim
  assert (ch.lr, ch.b1, ch.b2) == (3e-4, 0.5, 0.9)  # §4.1 critic Adam
  got = _leaves(_first_moment_grads(s1.critic_opt_state, ch.b1))
  want = _leaves(naive["critic"]["grads"])
  # The biases before each BatchNorm have a true gradient of 0 (train-mode
  # BatchNorm subtracts the batch mean): both versions hold float32
  # rounding noise there, measured <= 4e-7 of the critic's largest entry.
  scale = max(np.abs(g).max() for g in want.values())
  bn_fed = ("['dense_0']['bias']", "['dense_1']['bias']")
  for name in bn_fed:
    assert np.abs(got[name]).max() < 1e-5 * scale
    assert np.abs(want[name]).max() < 1e-5 * scale
  for name, g in want.items():
    if name not in bn_fed:
      np.testing.assert_allclose(
          got[name], g, rtol=GRAD_RTOL,
          atol=GRAD_ATOL_FRACTION * np.abs(g).max(), err_msg=name)
  nu = _leaves(optax.tree_utils.tree_get(s1.critic_opt_state, "nu"))
  for name in want:
    if name not in bn_fed:
      np.testing.assert_allclose(nu[name], (1 - ch.b2) * want[name] ** 2,
                                 rtol=3 * GRAD_RTOL,
                                 atol=1e-9 * scale ** 2, err_msg=name)
  # Adam's first step from the naive gradient. Where the gradient is pure
  # rounding noise (the BatchNorm-fed biases) its sign is arbitrary and the
  # first step is +-lr: allow 2 lr there.
  new = _leaves(s1.critic_params)
  for name, p in _leaves(naive["critic_params"]).items():
    atol = 2.0 * ch.lr * (1 + 1e-6) if name in bn_fed else (
        PARAM_ATOL_LR * ch.lr)
    np.testing.assert_allclose(new[name], p, rtol=0, atol=atol,
                               err_msg=name)
    assert not np.array_equal(new[name], _leaves(s0.critic_params)[name])


def test_critic_running_statistics_match_naive(reference):
  s1, _ = reference["trajectory"][0]
  want = reference["naive"]["critic_stats"]
  for layer, stats in want.items():
    for k, v in stats.items():
      np.testing.assert_allclose(s1.critic_stats[layer][k], v, rtol=1e-5,
                                 atol=1e-6, err_msg=f"{layer} {k}")


def test_recommender_terms_match_naive(reference):
  _, metrics = reference["trajectory"][0]
  terms = reference["naive"]["terms"]
  assert set(terms) | {"critic", "d_real", "d_fake", "gp"} == set(metrics)
  for k, v in terms.items():
    np.testing.assert_allclose(metrics[k], v, rtol=TERM_RTOL, err_msg=k)


def test_recommender_gradient_and_adamw_step_match_naive(reference):
  pb, s0 = reference["problem"], reference["s0"]
  s1, _ = reference["trajectory"][0]
  naive = reference["naive"]
  rh = pb.cfg.optim
  assert (rh.name, rh.b1, rh.b2, rh.weight_decay) == ("adamw", 0.9, 0.999,
                                                      0.01)  # §4.1
  got = _leaves(_first_moment_grads(s1.opt_state, rh.b1))
  want = _leaves(naive["grads"])
  assert got.keys() == want.keys()
  for name, g in want.items():
    assert np.abs(g).max() > 0, name
    np.testing.assert_allclose(got[name], g, rtol=GRAD_RTOL,
                               atol=GRAD_ATOL_FRACTION * np.abs(g).max(),
                               err_msg=name)
  assert _rel(got, want) < GRAD_RTOL
  new = _leaves(s1.params)
  for name, p in _leaves(naive["params"]).items():
    np.testing.assert_allclose(new[name], p, rtol=0,
                               atol=PARAM_ATOL_LR * rh.lr, err_msg=name)
    assert not np.array_equal(new[name], _leaves(s0.params)[name])
  assert int(s1.step) == 1
  assert int(optax.tree_utils.tree_get(s1.opt_state, "count")) == 1
  np.testing.assert_array_equal(jax.random.key_data(s1.rng),
                                jax.random.key_data(pb.next_rng))


def test_mutations_disagree_with_the_step(reference):
  """The comparisons above have teeth: each mutation of the naive version
  is far outside the tolerances the naive version meets."""
  pb = reference["problem"]
  s1, metrics = reference["trajectory"][0]
  naive = reference["naive"]
  crit = naive["critic"]
  step_critic_grads = _first_moment_grads(s1.critic_opt_state,
                                          pb.cfg.critic_optim.b1)
  step_rec_grads = _first_moment_grads(s1.opt_state, pb.cfg.optim.b1)
  rel_value = lambda a, b: abs(float(a) - float(b)) / abs(float(b))

  # The naive version itself: far below the margin.
  assert _rel(crit["grads"], step_critic_grads) < GRAD_RTOL
  assert _rel(naive["grads"], step_rec_grads) < GRAD_RTOL
  assert rel_value(crit["aux"]["critic"], metrics["critic"]) < TERM_RTOL

  # Positives and negatives swapped in BPR (measured: bpr 1.026 vs 0.471,
  # gradient 1.5 relative).
  assert rel_value(naive["terms_swapped"]["bpr"], metrics["bpr"]) > 0.5
  assert _rel(naive["grads_swapped"], step_rec_grads) > 0.3
  # Real rows fed to the critic as fake (measured: L_D 3.66e4 vs 3.03e4,
  # gradient 0.88 relative).
  assert rel_value(crit["aux_as_fake"]["critic"], metrics["critic"]) > (
      MUTATION_MIN)
  assert abs(crit["aux_as_fake"]["d_fake"] - metrics["d_fake"]) > 0.1
  assert _rel(crit["grads_as_fake"], step_critic_grads) > 0.3
  # Real rows from the feature representations (measured: d_real 52.2 vs
  # 47.8, L_D 3.33e4 vs 3.03e4, gradient 0.66 relative).
  assert abs(crit["aux_feat_real"]["d_real"] - metrics["d_real"]) > 1.0
  assert rel_value(crit["aux_feat_real"]["critic"], metrics["critic"]) > (
      MUTATION_MIN)
  assert _rel(crit["grads_feat_real"], step_critic_grads) > 0.3
  # No stop_gradient on the real rows: L_D's gradient through them would
  # swamp the recommender's (measured 1.4e5-2.7e5 times its norm per leaf).
  leaked = jax.tree.map(lambda g, l: g + np.asarray(l, np.float64),
                        naive["grads"], crit["leak"])
  assert _rel(leaked, step_rec_grads) > 1.0
  for name, leak in _leaves(crit["leak"]).items():
    assert np.linalg.norm(leak) > 10 * np.linalg.norm(
        _leaves(naive["grads"])[name]), name


def test_later_steps_are_finite_and_compile_once(reference):
  """make_step's step: 3 calls with batch_idx 0, 1, 2, one compilation."""
  assert reference["step_compiles"] == 1
  assert reference["problem"].run.step._cache_size() == 1  # pylint: disable=protected-access
  for state, metrics in reference["trajectory"]:
    assert helpers.tree_all_finite(metrics)
    assert helpers.tree_all_finite((state.params, state.critic_params))
  assert [int(s.step) for s, _ in reference["trajectory"]] == [1, 2, 3]


# ----------------------------------------------------------------------------
# Each piece on its own


def _counted_jit(fn, counts, name):
  """jax.jit(fn, static cfg) that counts its traces in counts[name]."""

  def wrapper(*args, **kwargs):
    counts[name] += 1
    return fn(*args, **kwargs)

  wrapper.__name__ = wrapper.__qualname__ = name
  return jax.jit(wrapper, static_argnames="cfg")


@pytest.fixture(scope="module", name="pieces")
def pieces_fixture(reference, compile_events):
  """Jitted pieces (trace-counted), composed as `train_step` composes them,
  applied to each state the reference trajectory starts a step from (the
  initial state, then the step's own states after 1 and 2 iterations)."""
  pb = reference["problem"]
  run, cfg = pb.run, pb.cfg
  counts = collections.Counter()
  jits = {
      "forward_piece": _counted_jit(
          lambda params, graphs, key, users, is_base, cfg: (
              jax.lax.stop_gradient(model_lib.forward(
                  params, run.inputs.graph, run.inputs.features, graphs,
                  key=key, train=True, hp=cfg.model,
                  modality_is_base=is_base, user_rows=users))),
          counts, "forward_piece"),
      "critic_piece": _counted_jit(steps.critic_step, counts, "critic_piece"),
      "recommender_piece": _counted_jit(steps.recommender_step, counts,
                                        "recommender_piece"),
      "graph_piece": _counted_jit(steps.modality_graph_step, counts,
                                  "graph_piece"),
  }
  before = len(compile_events)
  starts = [reference["s0"]] + [s for s, _ in reference["trajectory"][:2]]
  results = []
  for idx, host_state in enumerate(starts):
    state = jax.device_put(host_state)
    rng, keys = steps.StepKeys.split(state.rng)
    batch = steps.sample_batch(keys.sample, run.inputs, cfg)
    is_base = modality_graphs.is_base(cfg.graphs, state.step)
    critic = steps.CriticState(state.critic_params, state.critic_opt_state,
                               state.critic_stats)
    out = jits["forward_piece"](state.params, state.modality_graphs,
                                keys.critic_forward, batch.users, is_base,
                                cfg=cfg)
    new_critic, critic_metrics = jits["critic_piece"](critic, out, batch,
                                                      keys, cfg=cfg)
    params, opt_state, terms, generated = jits["recommender_piece"](
        state.params, state.opt_state, new_critic, batch, run.inputs,
        state.modality_graphs, is_base, keys, cfg=cfg)
    graphs, buffer = jits["graph_piece"](
        state.modality_graphs, state.graph_buffer, generated, batch,
        jnp.int32(idx), state.step, cfg=cfg)
    results.append(jax.device_get(dict(
        critic=new_critic, critic_metrics=critic_metrics, params=params,
        opt_state=opt_state, terms=terms, graphs=graphs, buffer=buffer,
        rng=jax.random.key_data(rng), batch=batch, is_base=is_base)))
  compiles = collections.Counter(
      e for e in compile_events[before:] if e and "_piece" in e)
  return dict(results=results, counts=dict(counts), compiles=compiles,
              jits=jits, starts=starts)


def test_pieces_compile_once_over_three_calls(pieces):
  """Three (batch, keys, batch_idx) triples: one trace and one compilation
  of each piece (the batch index is traced, the shapes are static)."""
  names = ("forward_piece", "critic_piece", "recommender_piece",
           "graph_piece")
  assert {n: pieces["counts"][n] for n in names} == dict.fromkeys(names, 1)
  assert {n: pieces["compiles"][f"jit({n})"] for n in names} == (
      dict.fromkeys(names, 1))
  batches = [r["batch"] for r in pieces["results"]]
  assert not np.array_equal(batches[0].users, batches[1].users)


def _assert_trees_close(got, want, atol=0.0, rtol=1e-5, skip=()):
  got, want = _leaves(got), _leaves(want)
  assert got.keys() == want.keys()
  for name, w in want.items():
    if not any(name.endswith(part) for part in skip):
      np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol,
                                 err_msg=name)


def test_pieces_compose_to_the_train_step(reference, pieces):
  """train_step's new state is exactly the pieces' outputs put together:
  the critic fields from critic_step, params and opt_state from
  recommender_step (given the updated critic), graphs and buffer from
  modality_graph_step; step + 1 and the next key; nothing else. Checked for
  each of the trajectory's 3 steps, from the state the step started from."""
  pb = reference["problem"]
  lr, rec_lr = pb.cfg.critic_optim.lr, pb.cfg.optim.lr
  bn_fed = ("['dense_0']['bias']", "['dense_1']['bias']")
  for t, ((state, metrics), piece) in enumerate(
      zip(reference["trajectory"], pieces["results"])):
    assert int(state.step) == t + 1
    np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                  piece["rng"])
    # Separate compilations: float rounding; and the Adam step of the
    # BatchNorm-fed biases (true gradient 0) acts on rounding noise: for
    # these betas |m_hat| / sqrt(v_hat) <= 1.04 over 3 steps, so the two
    # results can differ by up to about 2 lr; allow 3 lr.
    _assert_trees_close(state.critic_params, piece["critic"].params,
                        atol=PARAM_ATOL_LR * lr, rtol=0, skip=bn_fed)
    for name in bn_fed:
      np.testing.assert_allclose(_leaves(state.critic_params)[name],
                                 _leaves(piece["critic"].params)[name],
                                 rtol=0, atol=3 * lr)
    _assert_trees_close(state.critic_stats, piece["critic"].stats,
                        atol=1e-6)
    _assert_trees_close(state.critic_opt_state, piece["critic"].opt_state,
                        rtol=GRAD_RTOL, atol=1e-3, skip=bn_fed)
    _assert_trees_close(state.params, piece["params"], rtol=0,
                        atol=PARAM_ATOL_LR * rec_lr)
    _assert_trees_close(state.opt_state, piece["opt_state"], rtol=GRAD_RTOL,
                        atol=1e-9)
    # The top-k sees the same rows up to rounding: the same pairs.
    _assert_trees_close(state.graph_buffer, piece["buffer"], rtol=0)
    _assert_trees_close(state.modality_graphs, piece["graphs"], rtol=1e-6)
    want_terms = {**piece["terms"], **piece["critic_metrics"]}
    assert set(metrics) == set(want_terms)
    for k, v in want_terms.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-4, err_msg=k)
  # The graph step did its part: an append at idx 0, a rebuild at idx 1.
  first, second = pieces["results"][0], pieces["results"][1]
  k = pb.cfg.graphs.k
  assert int(first["buffer"].length) == pb.cfg.batch_size * k
  assert int(second["buffer"].length) == 0
  assert bool(first["is_base"]) and bool(second["is_base"])


def test_critic_step_changes_only_the_critic(reference, pieces):
  """critic_step returns the critic's new state (parameters, Adam state and
  running statistics all move) and its 4 metrics, nothing else; on the
  reference's first step it is the naive Adam step. It reads the forward
  only through u*, i* (real rows) and H^m (fake rows): scrambling the other
  fields of the forward output changes nothing."""
  pb, s0 = reference["problem"], reference["s0"]
  first = pieces["results"][0]
  naive = reference["naive"]
  lr = pb.cfg.critic_optim.lr
  new_critic = first["critic"]
  assert isinstance(new_critic, steps.CriticState)
  assert set(first["critic_metrics"]) == {"critic", "d_real", "d_fake", "gp"}
  new = _leaves(new_critic.params)
  for name, p in _leaves(naive["critic_params"]).items():
    bn_fed = name in ("['dense_0']['bias']", "['dense_1']['bias']")
    atol = 2.0 * lr * (1 + 1e-6) if bn_fed else PARAM_ATOL_LR * lr
    np.testing.assert_allclose(new[name], p, rtol=0, atol=atol, err_msg=name)
  for k in ("critic", "d_real", "d_fake", "gp"):
    np.testing.assert_allclose(first["critic_metrics"][k],
                               naive["critic"]["aux"][k], rtol=TERM_RTOL)
  assert int(optax.tree_utils.tree_get(new_critic.opt_state, "count")) == 1
  for name in ("bn_0", "bn_1"):
    assert not np.array_equal(new_critic.stats[name]["mean"],
                              s0.critic_stats[name]["mean"])
  # The same call with the forward's modality views scrambled.
  cfg, keys, jits = pb.cfg, pb.keys, pieces["jits"]
  state = jax.device_put(s0)
  out = jits["forward_piece"](state.params, state.modality_graphs,
                              keys.critic_forward, first["batch"].users,
                              first["is_base"], cfg=cfg)
  out = out._replace(
      modality_user={m: -3 * v for m, v in out.modality_user.items()},
      modality_item={m: v + 1 for m, v in out.modality_item.items()})
  critic = steps.CriticState(state.critic_params, state.critic_opt_state,
                             state.critic_stats)
  again, metrics = jax.device_get(jits["critic_piece"](
      critic, out, first["batch"], keys, cfg=cfg))
  _assert_trees_close(again, new_critic, rtol=0)
  for k, v in first["critic_metrics"].items():
    np.testing.assert_array_equal(metrics[k], v)


def test_recommender_step_reads_only_the_critics_weights(reference, pieces):
  """recommender_step's params/opt_state equal the naive AdamW step and do
  not depend on the critic's optimiser state or running statistics (train
  mode), which it cannot change either: it returns no critic."""
  pb = reference["problem"]
  run, cfg = pb.run, pb.cfg
  first = pieces["results"][0]
  naive = reference["naive"]
  _assert_trees_close(first["params"], naive["params"], rtol=0,
                      atol=PARAM_ATOL_LR * cfg.optim.lr)
  state = jax.device_put(reference["s0"])
  batch = first["batch"]
  critic = steps.CriticState(first["critic"].params,
                             jax.tree.map(lambda x: x * 0 + 7,
                                          first["critic"].opt_state),
                             jax.tree.map(lambda x: x * 0 + 3,
                                          first["critic"].stats))
  params, opt_state, terms, _ = pieces["jits"]["recommender_piece"](
      state.params, state.opt_state, critic, batch, run.inputs,
      state.modality_graphs, modality_graphs.is_base(cfg.graphs, state.step),
      pb.keys, cfg=cfg)
  _assert_trees_close(jax.device_get(params), first["params"], rtol=0)
  _assert_trees_close(jax.device_get(opt_state), first["opt_state"], rtol=0)
  for k, v in first["terms"].items():
    np.testing.assert_array_equal(terms[k], v)


# ----------------------------------------------------------------------------
# Hand-made small inputs: the critic without dropout, the graph step

N_USERS, N_ITEMS, BATCH, DIM = 10, 16, 4, 3
MODS = ("image", "text")


@pytest.fixture(scope="module", name="small")
def small_fixture(reference):
  """A StepConfig of hand-made sizes (10 users, 16 items, B = 4, d = 3,
  k = 2), derived from configs/test.py's, and small inputs."""
  cfg = reference["problem"].cfg
  sched = modality_graphs.GraphSchedule(
      schedule="reference", period=1, k=2, pairing="tiled",
      topk_score="dot", steps_per_epoch=5)
  cfg = dataclasses.replace(
      cfg, shapes=steps.Shapes(N_USERS, N_ITEMS, 30, MODS), batch_size=BATCH,
      critic=dataclasses.replace(cfg.critic, dropout=(0.0, 0.0)),
      graphs=sched)
  rng = np.random.default_rng(0)
  lists = np.array([[0, 3, -1], [5, -1, -1], [1, 2, 15], [7, 9, -1]],
                   np.int32)
  r_b = np.zeros((BATCH, N_ITEMS), np.float32)
  for b, row in enumerate(lists):
    r_b[b, row[row >= 0]] = 1.0
  users = np.array([7, 2, 5, 0], np.int32)
  batch = steps.Batch(jnp.asarray(users), jnp.zeros(BATCH, jnp.int32),
                      jnp.zeros(BATCH, jnp.int32), jnp.asarray(lists), None,
                      jnp.asarray(r_b))
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  out = model_lib.ForwardOutput(
      user=f32(BATCH, DIM), item=f32(N_ITEMS, DIM),
      feat_user={m: f32(N_USERS, DIM) for m in MODS},
      feat_item={m: f32(N_ITEMS, DIM) for m in MODS},
      modality_user={m: f32(N_USERS, DIM) for m in MODS},
      modality_item={m: f32(N_ITEMS, DIM) for m in MODS})
  params = critic_lib.init_dense_critic(jax.random.key(5), N_ITEMS)
  params = jax.tree.map(  # non-trivial BatchNorm affine terms
      lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape), jnp.float32),
      params)
  stats = jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, size=x.shape), jnp.float32),
      critic_lib.init_critic_batch_stats(params))
  critic = steps.CriticState(
      params, steps.make_optimizer(cfg.critic_optim).init(params), stats)
  return dict(cfg=cfg, batch=batch, out=out, critic=critic, r_b=r_b,
              users=users, lists=lists)


def test_critic_step_without_dropout_on_hand_made_rows(small, pieces):
  """critic.dropout = (0, 0): no dropout stream. The critic step on a
  hand-made forward output equals the naive loss and Adam step, and does
  not depend on the dropout keys."""
  cfg, batch, out, critic = (small[k] for k in ("cfg", "batch", "out",
                                                "critic"))
  _, keys = steps.StepKeys.split(jax.random.key(11))
  critic_step = pieces["jits"]["critic_piece"]
  new, metrics = jax.device_get(critic_step(critic, out, batch, keys,
                                            cfg=cfg))
  users, r_b = small["users"], jnp.asarray(small["r_b"])
  real = naive_real_rows(out.user, out.item, r_b, keys.gumbel, cfg.loss)
  fake = jnp.concatenate([masked_rows(out.feat_user[m][users],
                                      out.feat_item[m], r_b) for m in MODS])
  (_, aux), grads = jax.jit(jax.value_and_grad(functools.partial(
      naive_critic_loss, rates=(0.0, 0.0), gp_weight=cfg.gp_weight),
                                               has_aux=True))(
      critic.params, real, fake, keys)
  for k in ("critic", "d_real", "d_fake", "gp"):
    np.testing.assert_allclose(metrics[k], aux[k], rtol=TERM_RTOL, err_msg=k)
  ch = cfg.critic_optim
  step_grads = _leaves(_first_moment_grads(new.opt_state, ch.b1))
  grads = _leaves(grads)
  scale = max(np.abs(g).max() for g in grads.values())
  # True gradient 0: the biases feeding a BatchNorm, and, without dropout
  # between them, bn_0's bias too (a constant shift through dense_1, which
  # BatchNorm 1 subtracts). Both versions hold rounding noise there.
  zero = ("['dense_0']['bias']", "['dense_1']['bias']", "['bn_0']['bias']")
  for name, g in grads.items():
    p, _, _ = naive_adam_first_step(_leaves(critic.params)[name], g,
                                    lr=ch.lr, b1=ch.b1, b2=ch.b2)
    if name in zero:
      assert np.abs(g).max() < 1e-5 * scale, name
      assert np.abs(step_grads[name]).max() < 1e-5 * scale, name
      np.testing.assert_allclose(_leaves(new.params)[name], p, rtol=0,
                                 atol=2 * ch.lr * (1 + 1e-6), err_msg=name)
      continue
    np.testing.assert_allclose(step_grads[name], g, rtol=GRAD_RTOL,
                               atol=GRAD_ATOL_FRACTION * np.abs(g).max(),
                               err_msg=name)
    np.testing.assert_allclose(_leaves(new.params)[name], p, rtol=0,
                               atol=PARAM_ATOL_LR * ch.lr, err_msg=name)
  want_stats = naive_running_stats(critic.stats, aux["stats"])
  for layer, st in want_stats.items():
    for k, v in st.items():
      np.testing.assert_allclose(new.stats[layer][k], v, rtol=1e-5,
                                 atol=1e-6)
  # The dropout keys play no part without dropout.
  other = keys._replace(d_real=jax.random.key(1), d_fake=jax.random.key(2),
                        gp=jax.random.key(3), generator=jax.random.key(4),
                        critic_forward=jax.random.key(5))
  again, metrics_again = jax.device_get(critic_step(critic, out, batch,
                                                    other, cfg=cfg))
  _assert_trees_close(again.params, new.params, rtol=0)
  for k, v in metrics.items():
    np.testing.assert_array_equal(metrics_again[k], v)
  # Real rows fed as fake would change the loss by far more than TERM_RTOL.
  mutated, _ = naive_critic_loss(critic.params, real,
                                 jnp.concatenate([real, real]), keys,
                                 rates=(0.0, 0.0), gp_weight=cfg.gp_weight)
  assert abs(float(mutated) - float(metrics["critic"])) > MUTATION_MIN * abs(
      float(metrics["critic"]))


def test_modality_graph_step_on_hand_made_rows(small, pieces):
  """The graph piece reads only the generated rows' top-k: idx 0 appends
  the tiled pairs (graphs unchanged), idx 1 rebuilds one-sided graphs from
  them and drops its own batch (§4.4)."""
  cfg, batch = small["cfg"], small["batch"]
  k, users = cfg.graphs.k, small["users"]
  rows = np.zeros((BATCH, N_ITEMS), np.float32)
  top = np.array([[4, 11], [0, 6], [3, 8], [14, 2]])
  for b, (i, j) in enumerate(top):
    rows[b, i], rows[b, j] = 0.9, 0.5
    rows[b, (i + 1) % N_ITEMS] = 0.1
  generated = steps.Generated(
      {m: jnp.asarray(rows if m == "image" else rows[:, ::-1].copy())
       for m in MODS},
      {m: jnp.zeros((BATCH, DIM)) for m in MODS},
      {m: jnp.zeros((N_ITEMS, DIM)) for m in MODS})
  graphs, buffer = modality_graphs.init_graphs(cfg.graphs, MODS, N_USERS,
                                               N_ITEMS, BATCH)
  graph_step = pieces["jits"]["graph_piece"]
  g1, b1 = jax.device_get(graph_step(graphs, buffer, generated, batch,
                                     jnp.int32(0), jnp.int32(0), cfg=cfg))
  _assert_trees_close(g1, jax.device_get(graphs), rtol=0)  # unchanged
  assert int(b1.length) == BATCH * k
  want_items = {"image": top.reshape(-1),
                "text": (N_ITEMS - 1 - top).reshape(-1)}
  want_users = np.tile(users, k)  # the released repeat(1, k): users[p % B]
  for m in MODS:
    np.testing.assert_array_equal(b1.users[m][:BATCH * k], want_users)
    np.testing.assert_array_equal(b1.items[m][:BATCH * k], want_items[m])
  # idx 1: rebuild from the lists; this call's rows are not added.
  other = steps.Generated({m: jnp.asarray(np.roll(rows, 5, axis=1))
                           for m in MODS}, generated.feat_user,
                          generated.feat_item)
  g2, b2 = jax.device_get(graph_step(g1, b1, other, batch, jnp.int32(1),
                                     jnp.int32(1), cfg=cfg))
  assert int(b2.length) == 0
  for m in MODS:
    want_ui, want_iu = helpers.one_sided_dense(helpers.dense_counts(
        want_users, want_items[m], N_USERS, N_ITEMS))
    g = g2[m]
    np.testing.assert_allclose(helpers.dense_from_graph_edges(
        g.users, g.items, g.to_user_weight, N_USERS, N_ITEMS), want_ui,
                               rtol=1e-6)
    np.testing.assert_allclose(helpers.dense_from_graph_edges(
        g.users, g.items, g.to_item_weight, N_ITEMS, N_USERS,
        by_user=False), want_iu, rtol=1e-6)


# ----------------------------------------------------------------------------
# LightGCN


def test_lightgcn_step_matches_naive_bpr_and_ego_l2(compile_events):
  """One LightGCN step: BPR on the layer-mean embeddings over the symmetric
  graph, L2 on the batch's EGO embeddings (/ B), one Adam step; 3 calls of
  its jitted step compile once."""
  pb = Problem("model=lightgcn")
  run, cfg, config = pb.run, pb.cfg, pb.config
  s0 = jax.device_get(pb.state)
  before = len(compile_events)
  state, metrics = run.step(run.init_state(), jnp.int32(0), run.inputs)
  s1, metrics = jax.device_get((state, metrics))
  for idx in (1, 2):
    state, _ = run.step(state, jnp.int32(idx), run.inputs)
  jax.block_until_ready(state)
  assert compile_events[before:].count("jit(step)") == 1

  # The batch: the step's own key split (next rng, sample key).
  next_rng, k_sample = jax.random.split(pb.state.rng)
  np.testing.assert_array_equal(jax.random.key_data(s1.rng),
                                jax.random.key_data(next_rng))
  users, pos, neg = sampler_lib.sample_batch(
      k_sample, run.inputs.sampler, batch_size=cfg.batch_size,
      n_items=pb.ds.n_items)
  _assert_valid_bpr_batch(users, pos, neg, pb.r, cfg.batch_size)
  a_ui, a_iu = (jnp.asarray(a, jnp.float32)
                for a in helpers.symmetric_dense(pb.r))
  n_layers, decay, b = config.model.lightgcn_layers, config.loss.emb_decay, (
      cfg.batch_size)

  def loss_fn(params, l2_on_final=False):
    e_u, e_i = params["user_id_embedding"], params["item_id_embedding"]
    us, is_ = [e_u], [e_i]
    for _ in range(n_layers):  # simultaneous layers, mean of 0..K
      us, is_ = us + [a_ui @ is_[-1]], is_ + [a_iu @ us[-1]]
    user, item = sum(us) / (n_layers + 1), sum(is_) / (n_layers + 1)
    bpr = naive_bpr(user[users], item[pos], item[neg])
    src_u, src_i = (user, item) if l2_on_final else (e_u, e_i)
    reg = decay * 0.5 * (jnp.sum(src_u[users] ** 2) +
                         jnp.sum(src_i[pos] ** 2) +
                         jnp.sum(src_i[neg] ** 2)) / b
    return bpr + reg, {"bpr": bpr, "emb_l2": reg, "loss": bpr + reg}

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(pb.state.params)
  (_, terms_final), _ = jax.value_and_grad(
      functools.partial(loss_fn, l2_on_final=True), has_aux=True)(
          pb.state.params)
  assert set(metrics) == set(terms)
  for k, v in terms.items():
    np.testing.assert_allclose(metrics[k], v, rtol=TERM_RTOL, err_msg=k)
  # L2 on the final (propagated) embeddings instead: a clearly other value.
  assert abs(float(terms_final["emb_l2"]) - float(metrics["emb_l2"])) > (
      0.2 * float(metrics["emb_l2"]))
  oh = cfg.optim
  assert (oh.name, oh.weight_decay) == ("adam", 0.0)
  step_grads = _leaves(_first_moment_grads(s1.opt_state, oh.b1))
  for name, g in _leaves(grads).items():
    np.testing.assert_allclose(step_grads[name], g, rtol=GRAD_RTOL,
                               atol=GRAD_ATOL_FRACTION * np.abs(g).max(),
                               err_msg=name)
    p, _, _ = naive_adam_first_step(_leaves(s0.params)[name], g, lr=oh.lr,
                                    b1=oh.b1, b2=oh.b2)
    np.testing.assert_allclose(_leaves(s1.params)[name], p, rtol=0,
                               atol=PARAM_ATOL_LR * oh.lr, err_msg=name)
