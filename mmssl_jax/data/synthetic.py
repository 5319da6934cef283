"""The embedded default dataset: synthetic, multi-modal, deterministic.

Users and items have planted latent factors; a user's interactions are drawn
without replacement with probability proportional to
exp(taste * <p_u, q_i> / sqrt(f) - skew * log rank_i), so both taste and a
popularity skew shape the data. Each modality is a noisy nonlinear view of the
item factors with its own dimension (tanh of a random projection plus
Gaussian noise); a modality whose noise is negative is pure noise. Interaction
counts per user are geometric-like around `mean_interactions`, and the split
follows the LATTICE rule: 1 validation + 1 test item for users with fewer than
10 items, else 10% / 10%.

A fair test: item factors are only partly recoverable from the interactions of
tail items, so a model that reads the informative modalities can beat one that
does not, and both should beat popularity.
"""

from __future__ import annotations

import numpy as np

from mmssl_jax.data.dataset import Dataset, Split


def make_synthetic(cfg) -> Dataset:
  """Generates the dataset described by `cfg` (`config.data.synthetic`)."""
  rng = np.random.default_rng(cfg.seed)
  n_users, n_items, f = cfg.n_users, cfg.n_items, cfg.n_factors
  user_f = rng.normal(size=(n_users, f))
  item_f = rng.normal(size=(n_items, f))
  log_pop = -cfg.popularity_skew * np.log(
      rng.permutation(np.arange(1, n_items + 1)))  # Zipf-like popularity
  logits = (cfg.taste_scale * user_f @ item_f.T / np.sqrt(f)
            + log_pop[None, :])
  counts = np.clip(rng.geometric(1.0 / (cfg.mean_interactions - 2), n_users)
                   + 2, 3, n_items // 2)

  train, val, test = ([], []), ([], []), ([], [])
  for u in range(n_users):
    # Gumbel top-k = sampling without replacement proportional to exp(logit).
    g = logits[u] - np.log(-np.log(rng.uniform(size=n_items)))
    items = rng.permutation(np.argpartition(-g, counts[u])[:counts[u]])
    n_hold = 1 if counts[u] < 10 else int(round(0.1 * counts[u]))
    for split, chunk in ((test, items[:n_hold]),
                         (val, items[n_hold:2 * n_hold]),
                         (train, items[2 * n_hold:])):
      split[0].extend([u] * len(chunk))
      split[1].extend(chunk)

  modalities = {}
  for m, dim in cfg.modality_dims.items():
    noise = cfg.modality_noise[m]
    if noise < 0:
      feats = rng.normal(size=(n_items, dim))
    else:
      proj = rng.normal(size=(f, dim)) / np.sqrt(f)
      feats = np.tanh(item_f @ proj * 1.5) + noise * rng.normal(
          size=(n_items, dim))
    modalities[m] = feats.astype(np.float32)
  return Dataset(
      name="synthetic", n_users=n_users, n_items=n_items,
      train=Split(*train), val=Split(*val), test=Split(*test),
      modalities=dict(sorted(modalities.items())))
