"""Non-learned baselines as user and item vectors scored by their dot product.

Both plug into `run.Run.evaluate_embeddings`, so they are ranked exactly as
the models are (full ranking minus training items, every item group).

* `popularity`: an item's score is its number of training interactions,
  ties broken at random (seeded). Items without any (new items) all tie at
  0: popularity cannot rank them, and among them the order is random (an
  id order could carry information: MovieLens numbers its films in order).
* `content_knn`: a user's profile in modality m is the mean of its training
  items' L2-normalised features; an item's score is the sum over modalities
  of the cosine between the profile and the item's features. It needs no
  interaction of the item, so it ranks new items as well as old ones.
"""

from __future__ import annotations

import numpy as np

from mmssl_jax.data.dataset import Dataset


def _unit_rows(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def popularity(ds: Dataset, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(users (U, 1) of ones, items (I, 1) training degree + U[0, 0.5)), float32
  (the jitter orders only items of equal degree)."""
  degree = np.bincount(ds.train.items, minlength=ds.n_items)
  jitter = np.random.default_rng(seed).uniform(0.0, 0.5, ds.n_items)
  return (np.ones((ds.n_users, 1), np.float32),
          (degree + jitter).astype(np.float32)[:, None])


def content_knn(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """(users (U, D), items (I, D)), D the sum of the modality widths:
  user . item = sum_m cos(profile_u^m, x_i^m)."""
  if not ds.modalities:
    raise ValueError(f"{ds.name}: content_knn needs item features")
  users, items = [], []
  counts = np.bincount(ds.train.users, minlength=ds.n_users)[:, None]
  for feats in ds.modalities.values():
    unit = _unit_rows(np.asarray(feats, np.float64))
    profile = np.zeros((ds.n_users, unit.shape[1]))
    np.add.at(profile, ds.train.users, unit[ds.train.items])
    users.append(_unit_rows(profile / np.maximum(counts, 1)))
    items.append(unit)
  return (np.concatenate(users, 1).astype(np.float32),
          np.concatenate(items, 1).astype(np.float32))
