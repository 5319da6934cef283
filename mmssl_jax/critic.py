"""The released MMSSL critic ("Discriminator") and the WGAN-GP gradient penalty.

docs/reference.md §3.5. The critic is an MLP over a
whole generated or "real" user row of I item scores:

  Linear(I -> I/4) -> LeakyReLU -> BatchNorm -> Dropout(0.31)
  -> Linear(I/4 -> I/8) -> LeakyReLU -> BatchNorm -> Dropout(0.5)
  -> Linear(I/8 -> 1) -> 100 * sigmoid.

In the reference the LeakyReLU slope is 1.0 (a positional `True`), so the
activations are the identity, and the critic is never put in eval mode.

Everything here is a pure function over plain nested dicts of arrays (params
and BatchNorm running statistics), so the train step can jit, shard and
differentiate it freely, including the double backward of the penalty.

Cost: I*I/4 + I/4*I/8 + I/8 + BatchNorm ~= 0.28 * I^2 parameters
(Baby 14.0 M, Sports 94.8 M, 2.5e11 at I = 1e6; section 9), and about
2 * N * 0.28 * I^2 FLOPs per forward over N rows. Fine for the reference
datasets, quadratic in the catalogue size.

`critic.kind='lowrank'` (`init_lowrank_critic`) factorises the first layer,
the only I-sized part, as W_0 = U V (I x r, r x h_1) with fixed hidden widths:
parameters and cost linear in I. Every function below dispatches on the
structure of params['dense_0'] ('kernel', or 'u' and 'v').
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence

import chex
import jax
import jax.numpy as jnp

from mmssl_jax import noise

Params = dict[str, dict[str, chex.Array]]
BatchStats = dict[str, dict[str, chex.Array]]


@dataclasses.dataclass(frozen=True)
class CriticHParams:
  """Static (hashable) settings of a critic call (`critic.*` in the config).

  negative_slope: LeakyReLU slope (1.0 = identity, the reference).
  batch_norm: BatchNorm after each hidden activation.
  dropout: one rate per hidden layer.
  output_scale: multiplier of the sigmoid output.
  sigmoid_output: output output_scale * sigmoid(z) if True, else raw z.
  train: batch statistics (and running-stat updates) and dropout if True;
    running statistics and no dropout if False. The reference critic is
    always in train mode, including the penalty and generator passes.

  The defaults are the reference critic; the paper variant's is
  negative_slope=0.2, batch_norm=False, sigmoid_output=False, train=False.
  """

  negative_slope: float = 1.0
  batch_norm: bool = True
  dropout: tuple[float, ...] = (0.31, 0.5)
  output_scale: float = 100.0
  sigmoid_output: bool = True
  train: bool = True

  @classmethod
  def from_config(cls, critic_config) -> "CriticHParams":
    return cls(negative_slope=float(critic_config.negative_slope),
               batch_norm=bool(critic_config.batch_norm),
               dropout=tuple(float(r) for r in critic_config.dropout),
               output_scale=float(critic_config.output_scale),
               sigmoid_output=bool(critic_config.sigmoid_output),
               train=bool(critic_config.train_mode))


REFERENCE = CriticHParams()

# torch.nn.BatchNorm1d defaults, used by the reference critic.
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.1


def init_dense_critic(key: chex.PRNGKey, n_items: int, *,
                      hidden: Optional[Sequence[int]] = None,
                      batch_norm: bool = True) -> Params:
  """Initial parameters of the dense critic, section 3.5.

  Kernels are kaiming_normal (fan_in, gain sqrt(2)): N(0, 2 / fan_in), biases
  zero; BatchNorm scale 1 and bias 0 (torch defaults). Kernels are stored
  (in, out), the transpose of torch's Linear weight.

  Args:
    key: PRNG key.
    n_items: I, the width of an input row.
    hidden: hidden widths; defaults to (I // 4, I // 8) as in the reference.
    batch_norm: whether to create BatchNorm parameters after each hidden layer.

  Returns:
    {'dense_0': {'kernel', 'bias'}, 'bn_0': {'scale', 'bias'}, 'dense_1': ...,
     'bn_1': ..., 'dense_2': ...}, float32.
  """
  widths = (n_items // 4, n_items // 8) if hidden is None else tuple(hidden)
  if any(w < 1 for w in widths):
    raise ValueError(
        f"critic hidden widths must be positive, got {widths} for "
        f"n_items={n_items}")
  dims = (n_items, *widths, 1)
  keys = jax.random.split(key, len(dims) - 1)
  params = {}
  for layer, (k, fan_in, fan_out) in enumerate(zip(keys, dims[:-1], dims[1:])):
    std = math.sqrt(2.0 / fan_in)
    params[f"dense_{layer}"] = {
        "kernel": std * jax.random.normal(k, (fan_in, fan_out), jnp.float32),
        "bias": jnp.zeros((fan_out,), jnp.float32),
    }
    if batch_norm and layer < len(widths):
      params[f"bn_{layer}"] = {
          "scale": jnp.ones((fan_out,), jnp.float32),
          "bias": jnp.zeros((fan_out,), jnp.float32),
      }
  return params


DEFAULT_LOWRANK_HIDDEN = (256, 128)


def init_lowrank_critic(key: chex.PRNGKey, n_items: int, *, rank: int = 64,
                        hidden: Optional[Sequence[int]] = None,
                        batch_norm: bool = True) -> Params:
  """A critic with parameters and cost linear in I (critic.kind='lowrank').

  Same layers as `init_dense_critic` except the first Linear, factorised as
  W_0 = U V with U (I, r) and V (r, h_1): I r + r h_1 + h_1 + (the rest)
  parameters instead of 0.28 I^2, and O(N I r) FLOPs per forward over N rows
  (less for generated rows, whose projection onto U has a Gram form:
  `graph.generated_rows_projection`). The hidden widths do not grow with I.

  Init: U ~ N(0, 1/I), V ~ N(0, 2/r), so each entry of U V has variance
  2/I, the kaiming_normal variance of the dense W_0; the other layers are
  initialised as in `init_dense_critic`.

  Args:
    key: PRNG key.
    n_items: I.
    rank: r.
    hidden: hidden widths; defaults to DEFAULT_LOWRANK_HIDDEN (256, 128).
    batch_norm: whether to create BatchNorm parameters after each hidden layer.

  Returns:
    {'dense_0': {'u', 'v', 'bias'}, 'bn_0', 'dense_1', ...}, float32.
  """
  widths = DEFAULT_LOWRANK_HIDDEN if hidden is None else tuple(hidden)
  if rank < 1:
    raise ValueError(f"critic rank must be positive, got {rank}")
  k_first, k_rest = jax.random.split(key)
  # The rest of the MLP is the dense critic's, over an r-wide input (whose
  # first kernel is replaced by the two factors).
  params = init_dense_critic(k_rest, rank, hidden=widths,
                             batch_norm=batch_norm)
  k_u, k_v = jax.random.split(k_first)
  params["dense_0"] = {
      "u": math.sqrt(1.0 / n_items) * jax.random.normal(
          k_u, (n_items, rank), jnp.float32),
      "v": math.sqrt(2.0 / rank) * jax.random.normal(
          k_v, (rank, widths[0]), jnp.float32),
      "bias": jnp.zeros((widths[0],), jnp.float32),
  }
  return params


def init_critic(key: chex.PRNGKey, n_items: int, *, kind: str = "dense",
                rank: int = 64, hidden: Optional[Sequence[int]] = None,
                batch_norm: bool = True) -> Params:
  """`init_dense_critic` (kind='dense') or `init_lowrank_critic` ('lowrank').

  hidden=None (or empty) selects each kind's default widths.
  """
  hidden = tuple(hidden) if hidden else None
  if kind == "dense":
    return init_dense_critic(key, n_items, hidden=hidden,
                             batch_norm=batch_norm)
  if kind == "lowrank":
    return init_lowrank_critic(key, n_items, rank=rank, hidden=hidden,
                               batch_norm=batch_norm)
  raise ValueError(f"unknown critic.kind {kind!r} (expected 'dense' or "
                   "'lowrank')")


def init_critic_batch_stats(params: Mapping[str, Mapping[str, chex.Array]]
                            ) -> BatchStats:
  """BatchNorm running statistics (mean 0, var 1) for every 'bn_k' in params."""
  return {
      name: {"mean": jnp.zeros_like(layer["scale"]),
             "var": jnp.ones_like(layer["scale"])}
      for name, layer in params.items() if name.startswith("bn_")
  }


def _batch_norm(h: chex.Array, bn: Mapping[str, chex.Array],
                stats: Mapping[str, chex.Array],
                train: bool) -> tuple[chex.Array, dict[str, chex.Array]]:
  """torch BatchNorm1d: batch statistics in train mode, running ones in eval.

  Train mode normalises with the biased batch variance and updates the running
  variance with the unbiased one (torch's convention), momentum 0.1.
  """
  if train:
    mean = jnp.mean(h, axis=0)
    var = jnp.var(h, axis=0)
    n = h.shape[0]
    # Running stats are buffers in torch: no gradient flows into them.
    new_stats = {
        "mean": ((1.0 - _BN_MOMENTUM) * stats["mean"] +
                 _BN_MOMENTUM * jax.lax.stop_gradient(mean)),
        "var": ((1.0 - _BN_MOMENTUM) * stats["var"] +
                _BN_MOMENTUM * jax.lax.stop_gradient(var * n / (n - 1))),
    }
  else:
    mean, var = stats["mean"], stats["var"]
    new_stats = dict(stats)
  normed = (h - mean) * jax.lax.rsqrt(var + _BN_EPS)
  return normed * bn["scale"] + bn["bias"], new_stats


def dense_critic_apply(
    params: Mapping[str, Mapping[str, chex.Array]],
    batch_stats: Mapping[str, Mapping[str, chex.Array]],
    x: chex.Array,
    *,
    key: Optional[chex.PRNGKey] = None,
    hp: CriticHParams = REFERENCE,
) -> tuple[chex.Array, BatchStats]:
  """Critic scores of N rows, §3.5.

  Per hidden layer: Linear -> LeakyReLU(negative_slope) -> BatchNorm ->
  Dropout, then a final Linear to one unit and output_scale * sigmoid
  (`CriticHParams` has the switches; its defaults are the reference).

  Args:
    params: from `init_dense_critic` (or `init_lowrank_critic`).
    batch_stats: from `init_critic_batch_stats` (may be {} without BatchNorm).
    x: (N, I) rows; cast to float32 like the reference (which builds them in
      float64).
    key: PRNG key for dropout; required when hp.train and a rate is positive.
    hp: the critic's settings.

  Returns:
    (scores of shape (N,), new batch stats). The stats are unchanged unless
    hp.train and hp.batch_norm.
  """
  chex.assert_rank(x, 2)
  return critic_head(params, batch_stats, first_layer(params, x), key=key,
                     hp=hp)


def first_layer(params: Mapping[str, Mapping[str, chex.Array]],
                x: chex.Array) -> chex.Array:
  """The critic's first Linear, x @ W_0 + b_0 (pre-activation), (N, h_1).

  It holds almost all of the critic's cost (I x I/4 for the dense critic).
  Because it is affine, callers can compute it once per distinct row: the
  released real rows are duplicated to 2B (§3.5), and the penalty's
  interpolates satisfy h(a x_r + (1 - a) x_f) = a h(x_r) + (1 - a) h(x_f).

  Dispatches on the structure of params['dense_0']: {'kernel', 'bias'} is the
  dense W_0 (I, h_1); {'u', 'v', 'bias'} is the low-rank W_0 = U V with
  U (I, r) and V (r, h_1) (`init_lowrank_critic`), computed as (x U) V
  without forming W_0.
  """
  x = x.astype(jnp.float32)
  return first_layer_from_projection(params, x @ first_layer_factor(params))


def is_lowrank(params: Mapping[str, Mapping[str, chex.Array]]) -> bool:
  """Whether the critic's first layer is the low-rank U V."""
  return "u" in params["dense_0"]


def first_layer_factor(params: Mapping[str, Mapping[str, chex.Array]]
                       ) -> chex.Array:
  """The I-sized factor F of the first layer: U (I, r) or the kernel (I, h_1).

  x W_0 + b_0 = first_layer_from_projection(params, x F) for both kinds;
  the step projects rows onto F without forming them
  (`graph.generated_rows_projection`, `graph.fused_real_rows`), so no
  (N, I) row ever exists.
  """
  dense = params["dense_0"]
  return dense["u"] if "u" in dense else dense["kernel"]


def first_layer_from_projection(params: Mapping[str, Mapping[str, chex.Array]],
                                z: chex.Array) -> chex.Array:
  """x W_0 + b_0 from z = x F (`first_layer_factor`): z V + b or z + b."""
  dense = params["dense_0"]
  if "u" in dense:
    return z @ dense["v"] + dense["bias"]
  return z + dense["bias"]


def critic_head(
    params: Mapping[str, Mapping[str, chex.Array]],
    batch_stats: Mapping[str, Mapping[str, chex.Array]],
    h: chex.Array,
    *,
    key: Optional[chex.PRNGKey] = None,
    hp: CriticHParams = REFERENCE,
) -> tuple[chex.Array, BatchStats]:
  """The critic after its first Linear: `dense_critic_apply` = head(first).

  Takes the (N, h_1) pre-activations of `first_layer`; arguments as in
  `dense_critic_apply`.
  """
  dropout, train = hp.dropout, hp.train
  n_hidden = len(dropout)
  if f"dense_{n_hidden}" not in params or f"dense_{n_hidden + 1}" in params:
    raise ValueError(
        f"dropout gives {n_hidden} hidden layers, which does not match the "
        f"critic params {sorted(params)}")
  if train and any(rate > 0 for rate in dropout) and key is None:
    raise ValueError("dense_critic_apply needs a dropout key when train=True")
  if train and hp.batch_norm and h.shape[0] < 2:
    raise ValueError("BatchNorm in train mode needs more than one row "
                     f"(got {h.shape[0]}), as in torch")
  new_stats = dict(batch_stats)
  for layer, rate in enumerate(dropout):
    if layer > 0:
      dense = params[f"dense_{layer}"]
      h = h @ dense["kernel"] + dense["bias"]
    h = jax.nn.leaky_relu(h, hp.negative_slope)
    if hp.batch_norm:
      name = f"bn_{layer}"
      h, new_stats[name] = _batch_norm(h, params[name], batch_stats[name],
                                       train)
    if train and rate > 0:
      h = noise.dropout(jax.random.fold_in(key, layer), h, rate)
  out = params[f"dense_{n_hidden}"]
  z = (h @ out["kernel"] + out["bias"])[:, 0]
  scores = hp.output_scale * jax.nn.sigmoid(z) if hp.sigmoid_output else z
  return scores, new_stats


def _safe_norm(g: chex.Array) -> chex.Array:
  """Row L2 norm whose gradient at a zero row is 0 (torch's norm backward)."""
  sq = jnp.sum(jnp.square(g), axis=-1)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def gradient_penalty(critic_fn: Callable[[chex.Array], chex.Array],
                     real: chex.Array, fake: chex.Array, *,
                     key: chex.PRNGKey) -> chex.Array:
  """WGAN-GP penalty, section 3.5: mean_rows (||grad_x D(x_hat)||_2 - 1)^2.

  x_hat = alpha * real + (1 - alpha) * fake with one alpha ~ U(0, 1) per row.
  The input gradient is that of sum_n D(x_hat)_n, as the reference's
  `torch.autograd.grad(..., grad_outputs=ones)`. It equals the per-row gradient
  only when rows are independent; with BatchNorm in train mode (the reference)
  rows interact through the batch statistics and the gradient of the sum is
  what is replicated. The gradient is built with `jax.grad`, so the penalty is
  differentiable w.r.t. whatever `critic_fn` closes over (double backward).
  real and fake are constants here (the reference detaches them). The weight
  (0.3 * gp_rate) is applied by `losses.wgan_critic_loss`.

  Args:
    critic_fn: x (N, I) -> scores (N,), e.g. `dense_critic_apply` with fixed
      params, stats and dropout key (its running-stat update is dropped).
    real: (N, I) real rows.
    fake: (N, I) fake rows.
    key: PRNG key for alpha.

  Returns:
    Scalar penalty (before the weight).
  """
  chex.assert_rank(real, 2)
  chex.assert_equal_shape([real, fake])
  real = jax.lax.stop_gradient(real)
  fake = jax.lax.stop_gradient(fake)
  alpha = jax.random.uniform(key, (real.shape[0], 1), real.dtype)
  x_hat = alpha * real + (1.0 - alpha) * fake
  grads = jax.grad(lambda x: jnp.sum(critic_fn(x)))(x_hat)
  return jnp.mean(jnp.square(_safe_norm(grads) - 1.0))


def input_gradient_norms(first: Mapping[str, chex.Array] | chex.Array,
                         grad_h: chex.Array) -> chex.Array:
  """Row norms ||grad_h W_0^T|| of the input gradient, without an (N, I) array.

  Args:
    first: the dense kernel W_0 (I, h_1), or params['dense_0'] of either
      kind ({'kernel', ...} or {'u', 'v', ...}).
    grad_h: (N, h_1) gradients w.r.t. the first-layer pre-activations.

  Returns:
    (N,) norms, with a zero gradient at a zero row (as `_safe_norm`).

  For the low-rank W_0 = U V, g = grad_h V^T (N, r) and
  ||g U^T||^2 = g (U^T U) g^T: O(N r^2 + I r^2) through the r x r Gram
  matrix, differentiable w.r.t. U and V (the penalty's double backward).
  """
  if not isinstance(first, Mapping):
    return _safe_norm(grad_h @ first.T)
  if "u" not in first:
    return _safe_norm(grad_h @ first["kernel"].T)
  u, v = first["u"], first["v"]
  g = grad_h @ v.T
  sq = jnp.sum((g @ (u.T @ u)) * g, axis=-1)
  nonzero = sq > 0  # rounding can make a 0 norm slightly negative
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def gradient_penalty_from_hidden(head_fn: Callable[[chex.Array], chex.Array],
                                 h_real: chex.Array, h_fake: chex.Array,
                                 first_kernel: Mapping[str, chex.Array]
                                 | chex.Array, *,
                                 key: chex.PRNGKey) -> chex.Array:
  """`gradient_penalty` for a critic whose first layer is affine, cheaply.

  With h = x W_0 + b_0 the interpolates' pre-activations are
  a h(x_r) + (1 - a) h(x_f), and grad_x sum D = (d sum D / d h) W_0^T, so the
  penalty needs no forward pass over the (N, I) interpolates. It equals
  `gradient_penalty(lambda x: head_fn(first_layer(x)), real, fake, key=key)`
  (same alpha draws for the same key), in value and in its gradient w.r.t.
  the critic parameters, which here flows through h_real, h_fake and
  first_kernel.

  Args:
    head_fn: h (N, h_1) -> scores (N,), e.g. `critic_head` with fixed params,
      stats and dropout key.
    h_real, h_fake: (N, h_1) first-layer outputs of the real and fake rows.
    first_kernel: W_0 (I, h_1), or params['dense_0'] of either critic kind
      (a low-rank U V is never formed: `input_gradient_norms`).
    key: PRNG key for alpha.
  """
  chex.assert_equal_shape([h_real, h_fake])
  alpha = jax.random.uniform(key, (h_real.shape[0], 1), h_real.dtype)
  h_hat = alpha * h_real + (1.0 - alpha) * h_fake
  grad_h = jax.grad(lambda h: jnp.sum(head_fn(h)))(h_hat)
  norms = input_gradient_norms(first_kernel, grad_h)
  return jnp.mean(jnp.square(norms - 1.0))
