"""BPR batch sampling on device, as a pure function of a PRNG key.

The released sampler (docs/reference.md §4.2) draws B distinct users
uniformly from the users with training items (with replacement when B exceeds
their number), one positive uniformly from each user's training items and one
negative uniformly from the items that are not training items of that user.
We draw the same distribution inside the jitted step, so a batch costs no host
round trip and the whole sampler state is the train state's PRNG key (exact
resume for free).

Negatives are exact, without rejection: with the user's sorted training items
s_0 < s_1 < ... and r uniform in [0, I - deg), the r-th non-training item is
r + #{j : s_j - j <= r}.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax.data.dataset import Split, pad_lists


class SamplerTables(NamedTuple):
  """Device arrays the sampler needs (built once on the host).

  exist_users: (n_exist,) users with at least one training item.
  train_lists: (n_users, L) each user's sorted training items, padded with -1.
  degrees: (n_users,) number of training items per user.
  """

  exist_users: jax.Array | np.ndarray
  train_lists: jax.Array | np.ndarray
  degrees: jax.Array | np.ndarray


def padded_lists(split: Split, n_users: int) -> tuple[np.ndarray, np.ndarray]:
  """(n_users, max_len) sorted item lists padded with -1, and their lengths."""
  lists = split.user_lists(n_users)
  return pad_lists(lists), np.array([len(l) for l in lists], np.int32)


def build_sampler_tables(train: Split, n_users: int) -> SamplerTables:
  table, degrees = padded_lists(train, n_users)
  exist = np.flatnonzero(degrees > 0).astype(np.int32)
  return SamplerTables(exist, table, degrees)


def sample_batch(key: jax.Array, tables: SamplerTables, *, batch_size: int,
                 n_items: int):
  """Samples (users, positives, negatives), each (batch_size,) int32."""
  k_users, k_pos, k_neg = jax.random.split(key, 3)
  n_exist = tables.exist_users.shape[0]
  # Static decision: distinct users when possible, as random.sample does.
  users = tables.exist_users[jax.random.choice(
      k_users, n_exist, (batch_size,), replace=batch_size > n_exist)]
  lists = tables.train_lists[users]                      # (B, L)
  deg = tables.degrees[users]
  slot = jnp.floor(jax.random.uniform(k_pos, (batch_size,)) * deg)
  slot = jnp.minimum(slot.astype(jnp.int32), deg - 1)
  positives = jnp.take_along_axis(lists, slot[:, None], axis=1)[:, 0]
  n_free = n_items - deg
  r = jnp.floor(jax.random.uniform(k_neg, (batch_size,)) * n_free)
  r = jnp.minimum(r.astype(jnp.int32), n_free - 1)
  shifted = lists - jnp.arange(lists.shape[1])[None, :]
  below = (lists >= 0) & (shifted <= r[:, None])
  negatives = r + below.sum(axis=1).astype(jnp.int32)
  return users, positives, negatives
