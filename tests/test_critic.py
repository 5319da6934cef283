"""Tests for mmssl_jax.critic: the released critic (section 3.5) and WGAN-GP.

The critic is checked against a numpy transcription of the torch modules
(Linear, LeakyReLU, BatchNorm1d, Dropout, 100 * sigmoid), including the
fidelity item of section 10: with slope-1 activations it is exactly the
Linear -> BatchNorm -> Linear -> BatchNorm -> Linear composition.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import critic

N_ITEMS = 64  # hidden widths 16 and 8


def _perturbed_params(seed, n_items=N_ITEMS, batch_norm=True):
  """Init params with non-trivial BatchNorm affine terms and biases."""
  params = critic.init_dense_critic(jax.random.key(seed), n_items,
                                    batch_norm=batch_norm)
  rng = np.random.default_rng(seed)
  out = {}
  for name, layer in params.items():
    out[name] = dict(layer)
    if name.startswith("bn_"):
      out[name]["scale"] = layer["scale"] + 0.2 * rng.normal(
          size=layer["scale"].shape)
    out[name]["bias"] = layer["bias"] + 0.1 * rng.normal(
        size=layer["bias"].shape)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


def _random_stats(seed, params):
  rng = np.random.default_rng(seed)
  stats = critic.init_critic_batch_stats(params)
  return {name: {"mean": jnp.asarray(rng.normal(size=s["mean"].shape),
                                     jnp.float32),
                 "var": jnp.asarray(rng.uniform(0.5, 2.0, size=s["var"].shape),
                                    jnp.float32)}
          for name, s in stats.items()}


def _rows(seed, n, n_items=N_ITEMS):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, n_items)),
                     jnp.float32)


def _np_critic(params, stats, x, *, slope, batch_norm, train, sigmoid_output):
  """The torch modules in float64 numpy, no dropout: (scores, BN inputs)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(x, np.float64)
  bn_inputs = []
  for layer in range(2):
    h = h @ p[f"dense_{layer}"]["kernel"] + p[f"dense_{layer}"]["bias"]
    h = np.where(h >= 0, h, slope * h)
    if batch_norm:
      bn_inputs.append(h)
      if train:
        mean, var = h.mean(0), h.var(0)
      else:
        mean = np.asarray(stats[f"bn_{layer}"]["mean"], np.float64)
        var = np.asarray(stats[f"bn_{layer}"]["var"], np.float64)
      h = ((h - mean) / np.sqrt(var + 1e-5) * p[f"bn_{layer}"]["scale"] +
           p[f"bn_{layer}"]["bias"])
  z = (h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"])[:, 0]
  return (100.0 / (1.0 + np.exp(-z)) if sigmoid_output else z), bn_inputs


# --- init ------------------------------------------------------------------

def test_init_structure_and_kaiming_statistics():
  params = critic.init_dense_critic(jax.random.key(0), 1600)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
      "dense_0": {"kernel": (1600, 400), "bias": (400,)},
      "bn_0": {"scale": (400,), "bias": (400,)},
      "dense_1": {"kernel": (400, 200), "bias": (200,)},
      "bn_1": {"scale": (200,), "bias": (200,)},
      "dense_2": {"kernel": (200, 1), "bias": (1,)},
  }
  for name, fan_in in (("dense_0", 1600), ("dense_1", 400)):
    kernel = np.asarray(params[name]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / fan_in), rtol=0.05)
    assert abs(kernel.mean()) < 0.05 * math.sqrt(2.0 / fan_in)
  for name in ("dense_0", "dense_1", "dense_2"):
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  for name in ("bn_0", "bn_1"):
    np.testing.assert_array_equal(params[name]["scale"], 1.0)
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  stats = critic.init_critic_batch_stats(params)
  assert jax.tree.map(lambda a: a.shape, stats) == {
      "bn_0": {"mean": (400,), "var": (400,)},
      "bn_1": {"mean": (200,), "var": (200,)}}
  np.testing.assert_array_equal(stats["bn_0"]["mean"], 0.0)
  np.testing.assert_array_equal(stats["bn_1"]["var"], 1.0)
  # The module docstring's cost: about 0.28 * I^2 parameters.
  n_params = sum(a.size for a in jax.tree.leaves(params))
  np.testing.assert_allclose(n_params, 0.28 * 1600**2, rtol=0.01)


def test_init_custom_hidden_without_batch_norm_and_bad_widths():
  params = critic.init_dense_critic(jax.random.key(1), 10, hidden=(6, 4, 3),
                                    batch_norm=False)
  assert sorted(params) == ["dense_0", "dense_1", "dense_2", "dense_3"]
  assert params["dense_3"]["kernel"].shape == (3, 1)
  assert critic.init_critic_batch_stats(params) == {}
  with pytest.raises(ValueError, match="positive"):
    critic.init_dense_critic(jax.random.key(0), 7)  # 7 // 8 == 0


# --- forward ---------------------------------------------------------------

def test_identity_activation_equals_linear_batchnorm_composition():
  params = _perturbed_params(0)
  stats = _random_stats(1, params)
  x = _rows(2, 32)
  no_dropout = critic.CriticHParams(dropout=(0.0, 0.0))
  scores, _ = jax.jit(lambda p, s, x: critic.dense_critic_apply(
      p, s, x, key=jax.random.key(0), hp=no_dropout))(params, stats, x)
  want, _ = _np_critic(params, stats, x, slope=1.0, batch_norm=True, train=True,
                       sigmoid_output=True)
  assert scores.shape == (32,) and scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
  # Slope 1 really is the identity: no key is needed without dropout, and the
  # running statistics play no part in train mode.
  again, _ = critic.dense_critic_apply(
      params, critic.init_critic_batch_stats(params), x, hp=no_dropout)
  np.testing.assert_allclose(again, scores, rtol=1e-6)


def test_running_stats_update_matches_torch_formula():
  params = _perturbed_params(3)
  stats = _random_stats(4, params)
  x = _rows(5, 10)
  _, new_stats = critic.dense_critic_apply(params, stats, x,
      hp=critic.CriticHParams(dropout=(0.0, 0.0)))
  _, bn_inputs = _np_critic(params, stats, x, slope=1.0, batch_norm=True,
                            train=True, sigmoid_output=True)
  for layer, h in enumerate(bn_inputs):
    old = stats[f"bn_{layer}"]
    new = new_stats[f"bn_{layer}"]
    # torch: running = (1 - 0.1) running + 0.1 batch, with the unbiased
    # variance (divisor N - 1) for the running var.
    np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) +
                               0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) +
                               0.1 * h.var(0, ddof=1), rtol=1e-5, atol=1e-6)


def test_eval_mode_uses_running_stats_and_no_dropout():
  params = _perturbed_params(6)
  stats = _random_stats(7, params)
  x = _rows(8, 12)
  apply = lambda key: critic.dense_critic_apply(params, stats, x, key=key,
      hp=critic.CriticHParams(train=False))
  scores, new_stats = apply(jax.random.key(0))
  want, _ = _np_critic(params, stats, x, slope=1.0, batch_norm=True,
                       train=False, sigmoid_output=True)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(apply(jax.random.key(1))[0], scores, rtol=1e-6)
  np.testing.assert_allclose(apply(None)[0], scores, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new_stats, stats)
  # One row is fine in eval mode (torch refuses it only in train mode).
  one, _ = critic.dense_critic_apply(params, stats, x[:1],
      hp=critic.CriticHParams(train=False))
  np.testing.assert_allclose(one, scores[:1], rtol=1e-5)


def test_paper_critic_leaky_relu_without_batch_norm_raw_output():
  params = _perturbed_params(9, batch_norm=False)
  stats = critic.init_critic_batch_stats(params)
  x = _rows(10, 9)
  scores, new_stats = critic.dense_critic_apply(
      params, stats, x, hp=critic.CriticHParams(
          negative_slope=0.2, batch_norm=False, sigmoid_output=False,
          train=False))
  want, _ = _np_critic(params, stats, x, slope=0.2, batch_norm=False,
                       train=False, sigmoid_output=False)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
  assert new_stats == {}
  # batch_norm=False leaves whatever stats it was given untouched.
  bn_stats = _random_stats(11, _perturbed_params(11))
  _, same = critic.dense_critic_apply(_perturbed_params(11), bn_stats, x,
      hp=critic.CriticHParams(batch_norm=False, dropout=(0.0, 0.0)))
  jax.tree.map(np.testing.assert_array_equal, same, bn_stats)


def _probe_params(h1, h2, unit_layer):
  """Params whose raw output is the value of hidden unit 0 of `unit_layer`.

  Inputs summing to 1 give 1 in every first-layer unit; layer 1 either copies
  unit 0 of layer 0 everywhere (probing dropout 1) or averages (probing
  dropout 2); the output reads unit 0 of layer 1.
  """
  k1 = np.zeros((h1, h2), np.float32)
  if unit_layer == 0:
    k1[0] = 1.0
  else:
    k1[:] = 1.0 / h1
  k2 = np.zeros((h2, 1), np.float32)
  k2[0] = 1.0
  dense = lambda k: {"kernel": jnp.asarray(k), "bias": jnp.zeros(k.shape[1])}
  return {"dense_0": dense(np.ones((8, h1), np.float32)), "dense_1": dense(k1),
          "dense_2": dense(k2)}


@pytest.mark.parametrize("unit_layer,rates",
                         [(0, (0.31, 0.0)), (1, (0.0, 0.5))])
def test_dropout_rate_and_inverted_scaling(unit_layer, rates):
  params = _probe_params(4, 3, unit_layer)
  x = jnp.full((20000, 8), 1.0 / 8)
  hp = critic.CriticHParams(batch_norm=False, dropout=rates,
                            sigmoid_output=False)
  apply = jax.jit(lambda key: critic.dense_critic_apply(
      params, {}, x, key=key, hp=hp)[0])
  z = np.asarray(apply(jax.random.key(0)))
  rate = rates[unit_layer]
  dropped = np.isclose(z, 0.0)
  # Binomial std sqrt(p (1 - p) / 20000) < 0.0036: allow 4 std.
  assert abs(dropped.mean() - rate) < 0.015
  np.testing.assert_allclose(z[~dropped], 1.0 / (1.0 - rate), rtol=1e-5)
  np.testing.assert_array_equal(apply(jax.random.key(0)), z)
  assert not np.array_equal(apply(jax.random.key(1)), z)


def test_forward_casts_input_and_rejects_bad_calls():
  params = _perturbed_params(12)
  stats = critic.init_critic_batch_stats(params)
  x = _rows(13, 4)
  scores, _ = critic.dense_critic_apply(params, stats, x.astype(jnp.float16),
                                        key=jax.random.key(0))
  assert scores.dtype == jnp.float32
  with pytest.raises(ValueError, match="key"):
    critic.dense_critic_apply(params, stats, x)
  with pytest.raises(ValueError, match="more than one row"):
    critic.dense_critic_apply(params, stats, x[:1], key=jax.random.key(0))
  with pytest.raises(ValueError, match="hidden layers"):
    critic.dense_critic_apply(params, stats, x, key=jax.random.key(0),
        hp=critic.CriticHParams(dropout=(0.1, 0.1, 0.1)))


# --- gradient penalty ------------------------------------------------------

def _linear_gp(w, real, fake):
  return critic.gradient_penalty(lambda x: x @ w, real, fake,
                                 key=jax.random.key(3))


def test_gradient_penalty_of_linear_critics():
  real, fake = _rows(14, 8, 5), _rows(15, 8, 5)
  w = jnp.asarray(np.random.default_rng(16).normal(size=5), jnp.float32)
  unit = w / jnp.linalg.norm(w)
  gp = jax.jit(_linear_gp)
  assert float(gp(unit, real, fake)) < 1e-10  # 1-Lipschitz: no penalty
  np.testing.assert_allclose(gp(2.0 * unit, real, fake), 1.0, rtol=1e-6)
  # Double backward: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||.
  for scale in (0.5, 2.0, 3.0):
    v = scale * unit
    np.testing.assert_allclose(
        jax.jit(jax.grad(_linear_gp))(v, real, fake),
        2.0 * (scale - 1.0) * unit, rtol=1e-5, atol=1e-6)
  # A critic with zero input gradient: penalty 1 and a finite (zero) gradient,
  # as torch's norm backward gives at 0.
  zero = jnp.zeros(5)
  np.testing.assert_allclose(gp(zero, real, fake), 1.0)
  np.testing.assert_array_equal(jax.grad(_linear_gp)(zero, real, fake), 0.0)


def test_gradient_penalty_interpolates_per_row():
  # A critic whose input gradient at x is x itself (D = |x|^2 / 2): the
  # penalty then reveals x_hat = alpha * real + (1 - alpha) * fake.
  real, fake = _rows(17, 6, 4), _rows(18, 6, 4)
  key = jax.random.key(4)
  got = critic.gradient_penalty(lambda x: 0.5 * jnp.sum(x * x, -1), real, fake,
                                key=key)
  alpha = jax.random.uniform(key, (6, 1))
  x_hat = alpha * real + (1 - alpha) * fake
  want = np.mean((np.linalg.norm(x_hat, axis=1) - 1.0) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert len(np.unique(np.asarray(alpha))) == 6


def test_gradient_penalty_uses_gradient_of_sum_under_batch_norm():
  # Identity activations + train-mode BatchNorm + raw output: the batch sum of
  # the scores is N * constant (normalised features sum to zero over the
  # batch), so the gradient of the sum vanishes and the penalty is 1, although
  # every single row's own gradient is non-zero. This is what the reference's
  # autograd.grad(grad_outputs=ones) computes.
  params = _perturbed_params(19)
  stats = critic.init_critic_batch_stats(params)
  real, fake = _rows(20, 16), _rows(21, 16)
  critic_fn = lambda p: lambda x: critic.dense_critic_apply(p, stats, x,
      hp=critic.CriticHParams(dropout=(0.0, 0.0), sigmoid_output=False))[0]
  gp = jax.jit(lambda p: critic.gradient_penalty(
      critic_fn(p), real, fake, key=jax.random.key(5)))(params)
  np.testing.assert_allclose(gp, 1.0, atol=1e-4)
  row_grad = jax.jit(jax.grad(lambda x: critic_fn(params)(x)[0]))(real)
  assert float(jnp.linalg.norm(row_grad[0])) > 1e-2


def test_gradient_penalty_double_backward_through_reference_critic():
  params = _perturbed_params(22)
  stats = critic.init_critic_batch_stats(params)
  real, fake = 0.1 * _rows(23, 16), 0.1 * _rows(24, 16)

  def penalty(p):
    fn = lambda x: critic.dense_critic_apply(p, stats, x,
                                             key=jax.random.key(6))[0]
    return critic.gradient_penalty(fn, real, fake, key=jax.random.key(7))

  value, grads = jax.jit(jax.value_and_grad(penalty))(params)
  assert float(value) > 0
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # Directional derivative vs central finite differences (float32, loose).
  direction = jax.tree.map(
      lambda g: jnp.asarray(np.random.default_rng(25).normal(size=g.shape),
                            jnp.float32), grads)
  analytic = sum(jnp.vdot(g, d)
                 for g, d in zip(leaves, jax.tree.leaves(direction)))
  step = 1e-3
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  f = jax.jit(penalty)
  numeric = (f(shifted(step)) - f(shifted(-step))) / (2 * step)
  np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


def test_gradient_penalty_from_hidden_equals_the_full_penalty():
  """The first-layer shortcut equals the penalty over (N, I) interpolates,
  in value and in its gradient w.r.t. every critic parameter (reference
  critic: identity activations, BatchNorm in train mode, dropout)."""
  n_items, n = 48, 10
  k_init, k_real, k_fake, k_drop, k_alpha = jax.random.split(
      jax.random.key(3), 5)
  params = critic.init_dense_critic(k_init, n_items)
  stats = critic.init_critic_batch_stats(params)
  real = jax.random.uniform(k_real, (n, n_items))
  fake = jax.random.uniform(k_fake, (n, n_items))

  def full(p):
    fn = lambda x: critic.dense_critic_apply(p, stats, x, key=k_drop)[0]
    return critic.gradient_penalty(fn, real, fake, key=k_alpha)

  def shortcut(p):
    head = lambda h: critic.critic_head(p, stats, h, key=k_drop)[0]
    return critic.gradient_penalty_from_hidden(
        head, critic.first_layer(p, real), critic.first_layer(p, fake),
        p["dense_0"]["kernel"], key=k_alpha)

  v_full, g_full = jax.value_and_grad(full)(params)
  v_short, g_short = jax.value_and_grad(shortcut)(params)
  assert v_full > 1.0  # a non-trivial penalty, not a vacuous comparison
  np.testing.assert_allclose(v_short, v_full, rtol=2e-5)
  # dense_0's bias has an exactly zero true gradient (BatchNorm removes any
  # shift), so compare with a tolerance on the scale of the whole gradient.
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_full))
  for a, b in zip(jax.tree.leaves(g_short), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def test_critic_head_of_first_layer_equals_apply():
  params = critic.init_dense_critic(jax.random.key(0), 40)
  stats = critic.init_critic_batch_stats(params)
  x = jax.random.uniform(jax.random.key(1), (6, 40))
  key = jax.random.key(2)
  full, s_full = critic.dense_critic_apply(params, stats, x, key=key)
  split, s_split = critic.critic_head(params, stats,
                                      critic.first_layer(params, x), key=key)
  np.testing.assert_array_equal(full, split)
  for a, b in zip(jax.tree.leaves(s_full), jax.tree.leaves(s_split)):
    np.testing.assert_array_equal(a, b)
