"""Pure MMSSL losses: BPR, L2 terms, Gumbel "real" rows, InfoNCE, WGAN.

Every function is pure, takes its hyper-parameters as keyword-only arguments and
checks shapes at entry with chex (so the checks also run under `jax.jit`). The
module depends on jax and chex only, not on Flax, so it can be imported into
any JAX code. Section numbers refer to docs/reference.md, the
specification of the released PyTorch code (`variant='reference'`).
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from mmssl_jax import noise

# The reference adds 1e-8 inside both logarithms of the Gumbel transform and
# inside the InfoNCE logarithm (sections 3.5 and 3.6).
_LOG_EPS = 1e-8


def l2_normalize(x: chex.Array, axis: int = -1, eps: float = 1e-12, *,
                 scale: float | None = None) -> chex.Array:
  """x / max(||x||_2, eps) along `axis`: torch `F.normalize` (section 2.1 n).

  The norm is computed as sqrt(max(sum x^2, eps^2)), which equals
  max(||x||, eps) but has a finite gradient at x = 0: there the function is
  x / eps, so its Jacobian is I / eps, as in torch. `jnp.linalg.norm` would give
  NaN (0/0) there. eps^2 = 1e-24 is representable in float32 and bfloat16
  (not in float16).

  Args:
    x: array of any rank.
    axis: axis along which to normalise.
    eps: lower bound on the norm; zero vectors map to zero.
    scale: optional factor c: returns c * n(x), with c applied to the
      per-row inverse norm rather than to the whole array (XLA:CPU's YNNPACK
      fusions take a scalar times a table as a materialised table-sized
      operand: 0.24 GiB per use for a (1e6, 64) table).

  Returns:
    An array of the shape and dtype of `x`.
  """
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.maximum(sq_norm, eps * eps))
  if scale is None:
    return x / norm
  return x * (scale / norm)


def bpr_loss(*, user_emb: chex.Array, pos_emb: chex.Array,
             neg_emb: chex.Array) -> chex.Array:
  """BPR loss, section 3.1: -mean_u log sigmoid(u.p_u - u.n_u).

  Args:
    user_emb: (B, d) final user embeddings u* of the batch users.
    pos_emb: (B, d) final embeddings i* of their positive items.
    neg_emb: (B, d) final embeddings i* of their negative items.

  Returns:
    Scalar loss.
  """
  chex.assert_rank(user_emb, 2)
  chex.assert_equal_shape([user_emb, pos_emb, neg_emb])
  margin = jnp.sum(user_emb * pos_emb, -1) - jnp.sum(user_emb * neg_emb, -1)
  # log_sigmoid stays finite for large negative margins, unlike log(sigmoid).
  return -jnp.mean(jax.nn.log_sigmoid(margin))


def embedding_l2(*, user_emb: chex.Array, pos_emb: chex.Array,
                 neg_emb: chex.Array, decay: float,
                 batch_size: int) -> chex.Array:
  """Embedding L2 on the final embeddings, section 3.2.

  L_emb = decay * 0.5 * (|U|_F^2 + |P|_F^2 + |N|_F^2) / batch_size.

  Args:
    user_emb: (B, d) final user embeddings of the batch.
    pos_emb: (B, d) final positive item embeddings.
    neg_emb: (B, d) final negative item embeddings.
    decay: lambda_e (`regs[0]`, 1e-5 in the reference).
    batch_size: the configured batch size B (the reference divides by it,
      not by the number of rows).

  Returns:
    Scalar loss.
  """
  chex.assert_rank(user_emb, 2)
  chex.assert_equal_shape([user_emb, pos_emb, neg_emb])
  sq = (jnp.sum(jnp.square(user_emb)) + jnp.sum(jnp.square(pos_emb)) +
        jnp.sum(jnp.square(neg_emb)))
  return decay * 0.5 * sq / batch_size


def feature_l2(*, user_feats: Sequence[chex.Array],
               item_feats: Sequence[chex.Array], decay: float,
               n_items: int) -> chex.Array:
  """Feature L2 over all users and items, section 3.3.

  L_feat = decay * 0.5 * (sum_m |H^m_I|_F^2 + sum_m |H^m_U|_F^2) / n_items.
  The sums run over every user and item (not the batch), and the divisor is
  the number of items, as in the reference.

  Args:
    user_feats: per-modality (U, d) user feature representations H^m_U.
    item_feats: per-modality (I, d) item feature representations H^m_I.
    decay: lambda_f (`feat_reg_decay`, 1e-5 in the reference).
    n_items: I.

  Returns:
    Scalar loss.
  """
  chex.assert_rank(list(user_feats) + list(item_feats), 2)
  sq = sum(jnp.sum(jnp.square(h)) for h in (*user_feats, *item_feats))
  return decay * 0.5 * sq / n_items


def standard_gumbel(xi: chex.Array) -> chex.Array:
  """Standard Gumbel noise from U[0, 1) draws, as the released code: g =
  -log(-log(xi + 1e-8) + 1e-8) (docs/reference.md §3.5)."""
  return -jnp.log(-jnp.log(xi + _LOG_EPS) + _LOG_EPS)


def gumbel_logits(*, interactions: chex.Array, gumbel: chex.Array,
                  counts: chex.Array, gumbel_scale: float, tau: float,
                  log_logits: bool) -> chex.Array:
  """The logits whose softmax over items is the real rows' observed part.

  Reference (log_logits=False), as the released code computes it (§3.5):
    R + s_g * g / tau.
  The released expression is `softmax(u_ui - s_g*log(-log(xi+1e-8)+1e-8)/tau)`:
  by operator precedence only the noise term is divided by tau, so the 0/1
  row R enters the softmax at temperature 1 (mass e/(k e + I - k) on each of
  the k positives, 1/(k e + I - k) elsewhere) and `real_data_tau` only scales
  the noise. Dividing the whole logits, (R + s_g g)/tau, would put all the
  mass on the positives; the released code does not (docs/fidelity.md).
  Paper (log_logits=True), a Gumbel-softmax sample of one observed item:
    (log(R / |R|_1 + 1e-8) + s_g * g) / tau.

  Args:
    interactions: (B, n) 0/1 rows (or an item block of them).
    gumbel: (B, n) standard Gumbel noise g.
    counts: (B, 1) |R|_1 of the full rows.
    gumbel_scale, tau, log_logits: as `gumbel_real_rows`.
  """
  if log_logits:
    logp = jnp.log(interactions / jnp.maximum(counts, 1.0) + _LOG_EPS)
    return (logp + gumbel_scale * gumbel) / tau
  return interactions + gumbel_scale * gumbel / tau


def gumbel_real_rows(*, key: chex.PRNGKey, interactions: chex.Array,
                     model_rows: chex.Array, gumbel_scale: float, tau: float,
                     ui_pre_scale: float,
                     use_gumbel: bool = True,
                     log_logits: bool = False) -> chex.Array:
  """The critic's "real" rows, section 3.5 (Gumbel transform + augmentation).

  With use_gumbel:
    x_r = n( softmax_i(gumbel_logits(R, g)) + kappa * model_rows ),
    g = -log(-log(xi + 1e-8) + 1e-8),  xi = noise.uniform(key, (B, I)),
  where the reference's logits are R + s_g * g / tau (see `gumbel_logits` for
  why tau divides only the noise). With use_gumbel=False (the `wo_gt`
  ablation), the softmax is replaced by the L1-normalised interactions:
    x_r = n( R / max(sum_i R, 1) + kappa * model_rows ).
  n is the row-wise `l2_normalize`. At the reference defaults (s_g = 1e-5,
  kappa = 100) the observed part has an L2 norm of about
  sqrt(I) / (k e + I - k) (0.012 on TikTok) against kappa on the unit-norm
  model row: the real rows are n(model_rows) up to about 1e-4.

  The reference duplicates the B rows to 2B to match the fake rows; the caller
  does that. The reference computes these rows without gradients; the caller
  applies `jax.lax.stop_gradient`, but the function is differentiable.

  Args:
    key: PRNG key for the Gumbel noise (unused when use_gumbel is False).
    interactions: (B, I) dense 0/1 train rows R of the batch users.
    model_rows: (B, I) masked, row-normalised model scores S_hat(u*[B], i*).
    gumbel_scale: s_g (`log_log_scale`).
    tau: tau_r (`real_data_tau`).
    ui_pre_scale: kappa (`ui_pre_scale`, 100 in the reference).
    use_gumbel: False for the `wo_gt` ablation.
    log_logits: the paper variant's fix: a Gumbel-softmax sample of the
      user's observed items (a soft one-hot for small tau, the uniform
      R / |R|_1 for large tau); see `gumbel_logits`.

  Returns:
    (B, I) float rows of unit L2 norm.
  """
  chex.assert_rank(interactions, 2)
  chex.assert_equal_shape([interactions, model_rows])
  interactions = interactions.astype(model_rows.dtype)
  counts = jnp.sum(interactions, axis=-1, keepdims=True)
  if use_gumbel:
    xi = noise.uniform(key, interactions.shape, dtype=model_rows.dtype)
    gumbel = standard_gumbel(xi)
    observed = jax.nn.softmax(
        gumbel_logits(interactions=interactions, gumbel=gumbel, counts=counts,
                      gumbel_scale=gumbel_scale, tau=tau,
                      log_logits=log_logits), axis=-1)
  else:
    observed = interactions / jnp.maximum(counts, 1.0)
  return l2_normalize(observed + ui_pre_scale * model_rows)


def alignment_loss(*, predicted: chex.Array, target: chex.Array
                   ) -> chex.Array:
  """mean_b ||predicted_b - target_b||^2, with no gradient into `target`.

  The inductive item encoder's pull towards warm items' final vectors
  (`model.encode_items`).

  Args:
    predicted: (B, d) encoded items.
    target: (B, d) their final representations i*.
  """
  chex.assert_equal_shape([predicted, target])
  diff = predicted - jax.lax.stop_gradient(target)
  return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


def infonce(*, anchor: chex.Array, positive: chex.Array,
            tau: float) -> chex.Array:
  """GRACE-style cross-modal InfoNCE, section 3.6 (one direction, z1 anchors).

  With z1 = n(anchor), z2 = n(positive) and s(a, b) = exp(a.b / tau):
    l_b = -log( s(z1_b, z2_b) / (sum_j s(z1_b, z1_j) + sum_j s(z1_b, z2_j)
                                 - s(z1_b, z1_b)) + 1e-8 ),
  and the loss is mean_b l_b. Intra-view negatives are included and the self
  term removed; the 1e-8 sits inside the log, after the division.

  A zero anchor (the reference's empty modality graph) gives similarities of
  exactly 1, so the loss is -log(1/(2B-1) + 1e-8), i.e. log(2B-1) up to
  (2B-1)*1e-8, a constant with zero gradient w.r.t. `positive`. The gradient
  w.r.t. the raw anchor at 0 is finite but not zero (n(x) = x/eps near 0, as in
  torch); in the model the anchor is an empty graph times the item embeddings,
  so nothing reaches the parameters.

  Similarities are exponentiated directly as in the reference; the float32
  sums of 2B terms up to exp(1/tau) stay finite for tau > 0.0124 at B = 1024.

  Args:
    anchor: (B, d) z1, the modality view E^m_U[B].
    positive: (B, d) z2, the final fused user embeddings u*[B].
    tau: temperature (`args.tau`, 0.5; 0.3 for allrecipes).

  Returns:
    Scalar loss.
  """
  chex.assert_rank(anchor, 2)
  chex.assert_equal_shape([anchor, positive])
  z1 = l2_normalize(anchor)
  z2 = l2_normalize(positive)
  refl = jnp.exp(z1 @ z1.T / tau)
  between = jnp.exp(z1 @ z2.T / tau)
  denominator = refl.sum(-1) + between.sum(-1) - jnp.diagonal(refl)
  return -jnp.mean(jnp.log(jnp.diagonal(between) / denominator + _LOG_EPS))


def wgan_critic_loss(*, d_real: chex.Array, d_fake: chex.Array,
                     gradient_penalty: chex.Array,
                     gp_weight: float) -> chex.Array:
  """Critic loss, section 3.5: -mean D(x_r) + mean D(x_f) + gp_weight * GP.

  Args:
    d_real: (N,) critic scores of the real rows.
    d_fake: (N',) critic scores of the fake rows.
    gradient_penalty: scalar mean_rows (||grad D(x_hat)|| - 1)^2
      (`critic.gradient_penalty`).
    gp_weight: 0.3 * gp_rate in the reference (0.3 is hard-coded there).

  Returns:
    Scalar loss.
  """
  chex.assert_rank([d_real, d_fake, gradient_penalty], [1, 1, 0])
  return -jnp.mean(d_real) + jnp.mean(d_fake) + gp_weight * gradient_penalty


def wgan_generator_loss(*, d_fake: chex.Array) -> chex.Array:
  """Generator loss, section 3.5: L_G = -mean D([S^v; S^t]).

  Args:
    d_fake: (N,) critic scores of the generated (fake) rows.

  Returns:
    Scalar loss.
  """
  chex.assert_rank(d_fake, 1)
  return -jnp.mean(d_fake)


def edge_likelihood_loss(*, generated_rows: chex.Array,
                         interactions: chex.Array,
                         eps: float = 1e-8) -> chex.Array:
  """Edge reconstruction loss for the `rp_gae` ablation (section 7.2).

  The `r/p-GAE` ablation replaces the adversarial task by a graph-auto-encoder
  style likelihood of the observed edges. With scores s (raw, UNMASKED,
  unnormalised user x item scores: the reference generator zeroes the positives,
  which would make their likelihood constant) and the 0/1 mask R, it computes
    L = - sum_{b,i} R[b,i] log sigmoid(s[b,i]) / (sum R + eps)
        - sum_{b,i} (1 - R[b,i]) log(1 - sigmoid(s[b,i])) / (sum (1 - R) + eps),
  i.e. the mean positive log-likelihood plus the mean negative log-likelihood,
  each pooled over the whole (B, I) block, so positives and negatives weigh
  equally however sparse R is. eps only guards an empty set (that term is then
  0). log(1 - sigmoid(s)) is computed as log_sigmoid(-s) for stability.

  Args:
    generated_rows: (B, I) raw scores s of the batch users over all items.
    interactions: (B, I) 0/1 train rows R of the batch users.
    eps: guard added to both counts.

  Returns:
    Scalar loss.
  """
  chex.assert_rank(generated_rows, 2)
  chex.assert_equal_shape([generated_rows, interactions])
  observed = interactions.astype(generated_rows.dtype)
  unobserved = 1.0 - observed
  pos_ll = jnp.sum(observed * jax.nn.log_sigmoid(generated_rows))
  neg_ll = jnp.sum(unobserved * jax.nn.log_sigmoid(-generated_rows))
  return (-pos_ll / (jnp.sum(observed) + eps) -
          neg_ll / (jnp.sum(unobserved) + eps))
