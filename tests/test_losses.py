"""Tests for mmssl_jax.losses against naive loop implementations.

Each loss is compared with a literal, loop-based transcription of the formula in
docs/reference.md (values and, through autodiff of the naive
version, gradients), plus hand-computed cases.
"""

import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import losses
from mmssl_jax import noise

RTOL = 1e-5


def _randn(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _interactions(seed, b, i, per_row):
  """A (b, i) 0/1 matrix with `per_row` random ones in every row."""
  rng = np.random.default_rng(seed)
  r = np.zeros((b, i), np.float32)
  for row in range(b):
    r[row, rng.choice(i, per_row, replace=False)] = 1.0
  return jnp.asarray(r)


def _masked_model_rows(seed, r):
  """Masked (positives zeroed), row-normalised scores: S_hat, section 3.4."""
  s = np.abs(np.random.default_rng(seed).normal(size=r.shape))
  s = s * (1 - np.asarray(r))
  return jnp.asarray(s / np.linalg.norm(s, axis=1, keepdims=True), jnp.float32)


def _assert_trees_close(a, b, rtol=RTOL, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _grad(fn, argnums=0):
  # Jitted: eager autodiff dispatches op by op and is several times slower.
  return jax.jit(jax.grad(fn, argnums))


def _assert_matches_naive(fn, naive, *args, atol=1e-6):
  """Same value and same gradient w.r.t. every argument as the naive version."""
  argnums = tuple(range(len(args)))
  np.testing.assert_allclose(jax.jit(fn)(*args), jax.jit(naive)(*args),
                             rtol=RTOL)
  _assert_trees_close(_grad(fn, argnums)(*args), _grad(naive, argnums)(*args),
                      atol=atol)


def test_importable_without_flax():
  code = ("import sys; sys.modules['flax'] = None\n"
          "import mmssl_jax.losses, mmssl_jax.critic\n"
          "assert 'flax' not in [m.split('.')[0] for m in sys.modules "
          "if sys.modules[m] is not None]\n")
  # `-c` puts the working directory on sys.path: run from the repository root.
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])


# --- section 3.1: BPR ---------------------------------------------------------

def _naive_bpr(u, p, n):
  total = 0.0
  for b in range(u.shape[0]):
    x = sum(u[b, k] * p[b, k] for k in range(u.shape[1])) - sum(
        u[b, k] * n[b, k] for k in range(u.shape[1]))
    total = total - jnp.log(1.0 / (1.0 + jnp.exp(-x)))
  return total / u.shape[0]


def test_bpr_loss_matches_naive_value_and_grad():
  u, p, n = _randn(0, 6, 4), _randn(1, 6, 4), _randn(2, 6, 4)
  fn = lambda u, p, n: losses.bpr_loss(user_emb=u, pos_emb=p, neg_emb=n)
  _assert_matches_naive(fn, _naive_bpr, u, p, n)


def test_bpr_loss_hand_value_and_stable_for_large_margins():
  u = jnp.array([[1.0, 0.0]])
  p = jnp.array([[2.0, 0.0]])
  n = jnp.array([[0.0, 5.0]])
  # margin 2 -> -log sigmoid(2) = log(1 + e^-2).
  np.testing.assert_allclose(losses.bpr_loss(user_emb=u, pos_emb=p, neg_emb=n),
                             math.log1p(math.exp(-2.0)), rtol=RTOL)
  # margin -200: log(sigmoid) would be -inf in float32, log_sigmoid is -200.
  big = losses.bpr_loss(user_emb=u, pos_emb=-100 * p, neg_emb=100 * p)
  np.testing.assert_allclose(big, 400.0, rtol=RTOL)


# --- sections 3.2, 3.3: L2 terms ---------------------------------------------

def _naive_embedding_l2(u, p, n, decay, batch_size):
  sq = 0.0
  for m in (u, p, n):
    for b in range(m.shape[0]):
      for k in range(m.shape[1]):
        sq = sq + m[b, k] ** 2
  return decay * 0.5 * sq / batch_size


def test_embedding_l2_matches_naive_value_and_grad():
  u, p, n = _randn(3, 5, 3), _randn(4, 5, 3), _randn(5, 5, 3)
  fn = lambda u, p, n: losses.embedding_l2(
      user_emb=u, pos_emb=p, neg_emb=n, decay=1e-2, batch_size=8)
  naive = lambda u, p, n: _naive_embedding_l2(u, p, n, 1e-2, 8)
  _assert_matches_naive(fn, naive, u, p, n)


def test_feature_l2_hand_value_and_grad():
  hu = [jnp.full((3, 2), 1.0), jnp.full((3, 2), 2.0)]
  hi = [jnp.full((4, 2), 3.0), jnp.full((4, 2), -1.0)]
  # 0.5 * (6*1 + 6*4 + 8*9 + 8*1) / 4 * 0.1 = 0.5 * 110 / 4 * 0.1.
  fn = lambda hu, hi: losses.feature_l2(user_feats=hu, item_feats=hi, decay=0.1,
                                        n_items=4)
  np.testing.assert_allclose(fn(hu, hi), 0.5 * 110 / 4 * 0.1, rtol=RTOL)
  g_u, g_i = _grad(fn, (0, 1))(hu, hi)
  _assert_trees_close(g_u, [0.1 / 4 * h for h in hu])
  _assert_trees_close(g_i, [0.1 / 4 * h for h in hi])


# --- l2_normalize -------------------------------------------------------------

def test_l2_normalize_matches_torch_semantics():
  x = np.array(_randn(6, 4, 5))
  x[1] = 0.0
  x[2] = 1e-14  # below eps: divided by eps, not by its own norm
  got = losses.l2_normalize(jnp.asarray(x))
  want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got)[[0, 3]], axis=-1),
                             1.0, rtol=RTOL)
  np.testing.assert_array_equal(got[1], 0.0)
  got0 = losses.l2_normalize(jnp.asarray(x), axis=0)
  np.testing.assert_allclose(
      got0, x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-12),
      rtol=RTOL)


def test_l2_normalize_gradient_finite_at_zero_and_correct_elsewhere():
  w = _randn(7, 3)
  loss = lambda x: jnp.sum(w * losses.l2_normalize(x))
  # At 0 the function is x / eps: gradient w / eps, finite (as in torch).
  g0 = _grad(loss)(jnp.zeros(3))
  assert np.all(np.isfinite(g0))
  np.testing.assert_allclose(g0, w / 1e-12, rtol=RTOL)
  x = _randn(8, 3)
  naive = lambda x: jnp.sum(w * x / jnp.sqrt(jnp.sum(x * x)))
  np.testing.assert_allclose(_grad(loss)(x), _grad(naive)(x), rtol=RTOL)


def test_l2_normalize_scale_is_scale_times_normalised_rows():
  x = _randn(9, 5, 4)
  x = x.at[2].set(0.0)  # a zero row stays zero
  got = losses.l2_normalize(x, scale=0.36)
  np.testing.assert_allclose(got, 0.36 * losses.l2_normalize(x), rtol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)
  norms = np.linalg.norm(np.asarray(got), axis=1)
  np.testing.assert_allclose(np.delete(norms, 2), 0.36, rtol=1e-6)
  w = _randn(10, 5, 4)
  scaled = lambda x: jnp.sum(w * losses.l2_normalize(x, scale=0.55))
  naive = lambda x: jnp.sum(w * 0.55 * x / jnp.linalg.norm(x, axis=1,
                                                           keepdims=True))
  y = _randn(11, 5, 4)
  np.testing.assert_allclose(_grad(scaled)(y), _grad(naive)(y), rtol=RTOL)


# --- section 3.5: Gumbel "real" rows ------------------------------------------

def _naive_real_rows(key, r, model_rows, scale, tau, kappa):
  xi = noise.uniform(key, r.shape)  # the noise the step draws (noise.py)
  rows = []
  for b in range(r.shape[0]):
    logits = [
        # The released `u_ui - s*log(-log(xi+1e-8)+1e-8)/tau`: tau divides
        # only the noise (operator precedence).
        r[b, i] - scale * jnp.log(-jnp.log(xi[b, i] + 1e-8) + 1e-8) / tau
        for i in range(r.shape[1])]
    z = jnp.stack(logits)
    soft = jnp.exp(z - z.max()) / jnp.sum(jnp.exp(z - z.max()))
    row = soft + kappa * model_rows[b]
    rows.append(row / jnp.sqrt(jnp.sum(row * row)))
  return jnp.stack(rows)


def test_gumbel_real_rows_matches_naive():
  key = jax.random.key(0)
  r = _interactions(0, 3, 7, 2)
  m = _masked_model_rows(1, r)
  got = losses.gumbel_real_rows(key=key, interactions=r, model_rows=m,
                                gumbel_scale=0.5, tau=0.7, ui_pre_scale=0.3)
  naive = jax.jit(_naive_real_rows, static_argnums=(3, 4, 5))
  np.testing.assert_allclose(got, naive(key, r, m, 0.5, 0.7, 0.3), rtol=RTOL,
                             atol=1e-7)


def test_reference_softmax_is_temperature_one_on_r():
  """softmax(R + s_g g / tau): tau scales only the noise, so without noise
  each of the k positives gets e / (k e + I - k) and every other item
  1 / (k e + I - k), hand-computed; tau does not sharpen R."""
  r = _interactions(2, 8, 300, 5)
  r = r.at[0].set(0.0).at[0, 3].set(1.0)  # one single-item row as well
  zeros = jnp.zeros_like(r)
  k = jnp.sum(r, axis=1, keepdims=True)
  soft = jnp.where(r > 0, np.e, 1.0) / (k * np.e + 300 - k)
  want = soft / jnp.linalg.norm(soft, axis=1, keepdims=True)
  real_rows = lambda scale, tau: losses.gumbel_real_rows(
      key=jax.random.key(1), interactions=r, model_rows=zeros,
      gumbel_scale=scale, tau=tau, ui_pre_scale=0.0)
  for tau in (0.002, 0.005, 1.0):
    np.testing.assert_allclose(real_rows(1e-12, tau), want, rtol=1e-5)
  # At the reference s_g = 1e-5, tau = 0.002 the logit noise 0.005 g moves
  # each mass by at most exp(0.005 * 19) - 1 ~ 10%, and by more than 1e-4.
  got = real_rows(1e-5, 0.002)
  np.testing.assert_allclose(got, want, rtol=0.11)
  assert float(jnp.max(jnp.abs(got - want) / want)) > 1e-4


def test_gumbel_rows_unit_norm_and_wo_gt_close_at_reference_defaults():
  r = _interactions(3, 64, 500, 8)
  m = _masked_model_rows(4, r)
  kwargs = dict(interactions=r, model_rows=m, gumbel_scale=1e-5, tau=0.005,
                ui_pre_scale=100.0)
  with_gt = losses.gumbel_real_rows(key=jax.random.key(2), **kwargs)
  wo_gt = losses.gumbel_real_rows(key=jax.random.key(2), use_gumbel=False,
                                  **kwargs)
  np.testing.assert_allclose(np.linalg.norm(with_gt, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(wo_gt, axis=1), 1.0, rtol=1e-5)
  # kappa = 100 dominates both: the observed parts (norms 0.045 and 0.35
  # here) move a unit row by less than 1e-2, and with_gt is the noise-free
  # n(softmax(R) + kappa * S_hat) up to the 0.005 g logit noise.
  n_m = m / jnp.linalg.norm(m, axis=1, keepdims=True)
  assert float(jnp.max(jnp.abs(with_gt - n_m))) < 1e-3
  assert float(jnp.max(jnp.abs(wo_gt - n_m))) < 1e-2
  soft = jnp.where(r > 0, np.e, 1.0) / (8 * np.e + 500 - 8)
  noise_free = soft + 100.0 * m
  noise_free = noise_free / jnp.linalg.norm(noise_free, axis=1, keepdims=True)
  np.testing.assert_allclose(with_gt, noise_free, atol=1e-5)
  # wo_gt is exactly n(R/|R|_1 + kappa * S_hat).
  want = r / 8 + 100.0 * m
  np.testing.assert_allclose(
      wo_gt, want / jnp.linalg.norm(want, axis=1, keepdims=True), rtol=RTOL,
      atol=1e-7)
  # Strong noise and a warm softmax make the transform matter.
  strong = dict(kwargs, gumbel_scale=1.0, tau=1.0, ui_pre_scale=0.0)
  diff = jnp.abs(
      losses.gumbel_real_rows(key=jax.random.key(2), **strong) -
      losses.gumbel_real_rows(key=jax.random.key(2), use_gumbel=False,
                              **strong))
  assert float(jnp.max(diff)) > 0.1


def test_gumbel_rows_differentiable_and_fresh_noise_per_key():
  r = _interactions(5, 4, 20, 3)
  m = _masked_model_rows(6, r)
  fn = lambda m, key: losses.gumbel_real_rows(
      key=key, interactions=r, model_rows=m, gumbel_scale=1.0, tau=0.5,
      ui_pre_scale=1.0)
  g = _grad(lambda m: jnp.sum(fn(m, jax.random.key(0))[:, 0]))(m)
  assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
  assert float(jnp.max(jnp.abs(fn(m, jax.random.key(0)) -
                               fn(m, jax.random.key(1))))) > 1e-3


# --- section 3.6: InfoNCE -----------------------------------------------------

def _naive_infonce(z1, z2, tau):
  b_size = z1.shape[0]
  n1 = [z1[b] / jnp.maximum(jnp.sqrt(jnp.sum(z1[b] ** 2)), 1e-12)
        for b in range(b_size)]
  n2 = [z2[b] / jnp.maximum(jnp.sqrt(jnp.sum(z2[b] ** 2)), 1e-12)
        for b in range(b_size)]
  s = lambda a, c: jnp.exp(jnp.dot(a, c) / tau)
  total = 0.0
  for b in range(b_size):
    den = (sum(s(n1[b], n1[j]) for j in range(b_size)) +
           sum(s(n1[b], n2[j]) for j in range(b_size)) - s(n1[b], n1[b]))
    total = total - jnp.log(s(n1[b], n2[b]) / den + 1e-8)
  return total / b_size


def test_infonce_matches_naive_value_and_grad():
  z1, z2 = _randn(10, 4, 3), _randn(11, 4, 3)
  _assert_matches_naive(
      lambda a, p: losses.infonce(anchor=a, positive=p, tau=0.5),
      lambda a, p: _naive_infonce(a, p, 0.5), z1, z2)


def test_infonce_two_user_hand_example():
  z1 = jnp.array([[3.0, 0.0], [0.0, 0.5]])  # normalises to e1, e2
  z2 = jnp.array([[2.0, 0.0], [1.0, 0.0]])  # normalises to e1, e1
  e2 = math.exp(2.0)  # exp(cos / tau) with cos = 1, tau = 0.5
  # b = 0: num e^2; den (e^2 + 1) + (e^2 + e^2) - e^2 = 2e^2 + 1.
  # b = 1: num e^0 = 1; den (1 + e^2) + (1 + 1) - e^2 = 3.
  want = 0.5 * (-math.log(e2 / (2 * e2 + 1) + 1e-8) - math.log(1 / 3 + 1e-8))
  np.testing.assert_allclose(losses.infonce(anchor=z1, positive=z2, tau=0.5),
                             want, rtol=RTOL)


@pytest.mark.parametrize("batch", [16, 1024])
def test_infonce_empty_graph_is_log_2b_minus_1_with_zero_gradient(batch):
  # The reference's empty modality graph: anchor = G @ E_I with G all zero.
  graph = jnp.zeros((batch, 50))
  item_emb = _randn(12, 50, 64)
  positive = _randn(13, batch, 64)
  fn = lambda e, p: losses.infonce(anchor=graph @ e, positive=p, tau=0.5)
  value = jax.jit(fn)(item_emb, positive)
  np.testing.assert_allclose(value, -math.log(1 / (2 * batch - 1) + 1e-8),
                             rtol=1e-6)
  # log(2B-1) up to the 1e-8 inside the log: (2B-1) * 1e-8 <= 2.1e-5.
  np.testing.assert_allclose(value, math.log(2 * batch - 1), atol=3e-5)
  g_items, g_pos = _grad(fn, (0, 1))(item_emb, positive)
  np.testing.assert_array_equal(g_items, 0.0)
  np.testing.assert_array_equal(g_pos, 0.0)
  # W.r.t. the raw zero anchor the gradient is finite (n(x) = x/eps near 0).
  g_anchor = _grad(lambda a: losses.infonce(anchor=a, positive=positive,
                                            tau=0.5))(graph @ item_emb)
  assert np.all(np.isfinite(g_anchor))


# --- section 3.5: WGAN losses -------------------------------------------------

def test_wgan_losses_hand_values_and_grads():
  d_real = jnp.array([90.0, 70.0])
  d_fake = jnp.array([10.0, 20.0, 30.0, 40.0])
  gp = jnp.array(2.0)
  # -80 + 25 + 0.3 * 2.
  np.testing.assert_allclose(
      losses.wgan_critic_loss(d_real=d_real, d_fake=d_fake, gradient_penalty=gp,
                              gp_weight=0.3), -54.4, rtol=RTOL)
  np.testing.assert_allclose(losses.wgan_generator_loss(d_fake=d_fake), -25.0,
                             rtol=RTOL)
  critic_loss = lambda r, f, p: losses.wgan_critic_loss(
      d_real=r, d_fake=f, gradient_penalty=p, gp_weight=0.3)
  g_real, g_fake, g_gp = _grad(critic_loss, (0, 1, 2))(d_real, d_fake, gp)
  np.testing.assert_allclose(g_real, [-0.5, -0.5])
  np.testing.assert_allclose(g_fake, [0.25] * 4)
  np.testing.assert_allclose(g_gp, 0.3, rtol=RTOL)
  np.testing.assert_allclose(
      _grad(lambda f: losses.wgan_generator_loss(d_fake=f))(d_fake),
      [-0.25] * 4)


# --- r/p-GAE ablation: edge likelihood ---------------------------------------

def _naive_edge_likelihood(s, r):
  pos, neg, n_pos, n_neg = 0.0, 0.0, 0, 0
  for b in range(s.shape[0]):
    for i in range(s.shape[1]):
      p = 1.0 / (1.0 + jnp.exp(-s[b, i]))
      if r[b, i] > 0:
        pos, n_pos = pos + jnp.log(p), n_pos + 1
      else:
        neg, n_neg = neg + jnp.log(1.0 - p), n_neg + 1
  return -pos / n_pos - neg / n_neg


def test_edge_likelihood_matches_naive_value_and_grad():
  s = _randn(14, 4, 6)
  r = _interactions(15, 4, 6, 2)
  _assert_matches_naive(
      lambda s: losses.edge_likelihood_loss(generated_rows=s, interactions=r),
      lambda s: _naive_edge_likelihood(s, np.asarray(r)), s, atol=1e-7)


def test_edge_likelihood_hand_values():
  # Positives at score 0 (log 2 each), negatives at 0 too: log 2 + log 2.
  s = jnp.zeros((2, 3))
  r = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(
      losses.edge_likelihood_loss(generated_rows=s, interactions=r),
      2 * math.log(2.0), rtol=RTOL)
  # Equal weight: one positive at +inf-ish and many negatives at -inf-ish -> 0.
  s = jnp.where(r > 0, 50.0, -50.0)
  assert float(losses.edge_likelihood_loss(generated_rows=s,
                                          interactions=r)) < 1e-6
  # No unobserved entries: only the positive term remains.
  full = jnp.ones((2, 3))
  np.testing.assert_allclose(
      losses.edge_likelihood_loss(generated_rows=jnp.zeros((2, 3)),
                                  interactions=full),
      math.log(2.0), rtol=RTOL)
