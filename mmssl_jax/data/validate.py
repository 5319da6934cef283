"""Validation helpers: every problem with input data becomes a one-line DataError.

The loaders in `formats` call these on freshly parsed arrays; `validate_dataset`
re-checks a finished in-memory `Dataset` (synthetic data, prepare tools) with
the same rules. Messages always start with the offending file (or dataset).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import logging
import numpy as np

from mmssl_jax.data.dataset import DataError, Dataset, Split

# Ids end up in int32 index arrays and n = max id + 1 must fit too.
MAX_ID = int(np.iinfo(np.int32).max) - 1

PathLike = str | os.PathLike


def error(source: PathLike, problem: str) -> DataError:
  """A DataError reading '<source>: <problem>', forced onto one line."""
  return DataError(" ".join(f"{source}: {problem}".splitlines()))


def require_dir(path: PathLike, expected: str) -> None:
  """Raises unless `path` is an existing folder; `expected` describes its files."""
  if not os.path.exists(path):
    raise error(path, f"dataset folder not found (expected a folder with {expected})")
  if not os.path.isdir(path):
    raise error(path, f"is a file, expected a dataset folder with {expected}")


def require_file(path: PathLike, expected: Sequence[str]) -> None:
  """Raises unless `path` is a regular file; `expected` lists the sibling files."""
  if os.path.isdir(path):
    raise error(path, "is a directory, expected a file")
  if not os.path.exists(path):
    raise error(path, f"file not found (expected files: {', '.join(expected)})")


def check_ids(ids: np.ndarray, kind: str, source: PathLike, *,
              limit: int | None = None, limit_source: str = "",
              where: tuple[str, np.ndarray] | None = None) -> None:
  """Raises unless every id is in [0, limit) (or [0, MAX_ID] without a limit).

  Args:
    ids: integer ids (int64, so nothing has wrapped yet).
    kind: 'user' or 'item'.
    source: file named in the message.
    limit: n_users / n_items when known from a matrix shape or features.
    limit_source: where `limit` came from, for the message.
    where: ('line', line numbers) or ('user', user ids), parallel to `ids`, to
      locate the first bad id in the message.
  """
  if ids.size == 0:
    return
  bad = (ids < 0) | (ids >= (MAX_ID + 1 if limit is None else limit))
  if not bad.any():
    return
  k = int(np.argmax(bad))
  v = int(ids[k])
  at = f"{where[0]} {where[1][k]}: " if where is not None else ""
  if v < 0:
    problem = f"negative {kind} id {v}"
  elif limit is None:
    problem = f"{kind} id {v} too large (ids must be <= {MAX_ID})"
  else:
    origin = f" from {limit_source}" if limit_source else ""
    problem = f"{kind} id {v} out of range (n_{kind}s {limit}{origin})"
  raise error(source, at + problem)


def check_features(arr: np.ndarray, source: PathLike) -> np.ndarray:
  """Returns `arr` as float32 after checking it is 2-D, numeric and finite."""
  numeric = (np.issubdtype(arr.dtype, np.integer)
             or np.issubdtype(arr.dtype, np.floating))
  if arr.ndim != 2 or not numeric or arr.shape[1] == 0:
    raise error(source, f"features must be a 2-D numeric array (items x dims), "
                f"got shape {arr.shape} dtype {arr.dtype}")
  # Huge float64 values overflow to inf here; the finiteness check reports them.
  with np.errstate(over="ignore"):
    arr = arr.astype(np.float32, copy=False)
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    raise error(source, f"{int(bad.sum())} feature rows contain NaN or inf "
                f"(first: row {int(np.argmax(bad))})")
  return arr


def check_feature_rows(arr: np.ndarray, source: PathLike, n_items: int,
                       n_items_source: str = "") -> None:
  """Raises unless the feature matrix has one row per item."""
  if arr.shape[0] != n_items:
    origin = f" (from {n_items_source})" if n_items_source else ""
    raise error(source,
                f"feature rows {arr.shape[0]} != n_items {n_items}{origin}")


def clean_splits(splits: Sequence[Split], sources: Sequence[str],
                 n_items: int) -> tuple[Split, Split, Split]:
  """Deduplicates train/val/test and removes val/test items seen in train.

  Duplicates within a split and val/test items that a user also has in train
  are dropped with a warning (the evaluation would otherwise count them twice
  or mask them out). A user whose val or test items are ALL in train would be
  left without targets, which points at a broken split, so that is an error.

  Args:
    splits: train, val, test with ids already range-checked.
    sources: the file (or file and label) each split came from.
    n_items: number of items, to encode (user, item) pairs as one int64.

  Returns:
    The cleaned (train, val, test), each sorted by (user, item).
  """
  names = ("train", "val", "test")
  keys = []
  for split, source, name in zip(splits, sources, names):
    k = split.users.astype(np.int64) * n_items + split.items
    unique = np.unique(k)
    if unique.size < k.size:
      logging.warning("%s: dropped %d duplicate interactions in the %s split",
                      source, k.size - unique.size, name)
    if unique.size == 0:
      raise error(source, f"empty {name} split (no interactions)")
    keys.append(unique)
  check_negatives_exist(keys[0] // n_items, n_items, sources[0])
  out = [keys[0]]
  for k, source, name in zip(keys[1:], sources[1:], names[1:]):
    seen = np.isin(k, keys[0], assume_unique=True)
    if seen.any():
      users = k // n_items
      total = np.bincount(users)
      overlap = np.bincount(users[seen], minlength=total.size)
      full = np.flatnonzero((overlap == total) & (total > 0))
      if full.size:
        u = int(full[0])
        raise error(source, f"user {u}: all {total[u]} {name} items are also "
                    f"in that user's train items ({full.size} such users)")
      logging.warning("%s: dropped %d %s interactions whose item is also in "
                      "the user's train items", source, int(seen.sum()), name)
      k = k[~seen]
    out.append(k)
  return tuple(Split(k // n_items, k % n_items) for k in out)


def check_negatives_exist(train_users: np.ndarray, n_items: int,
                          source: PathLike) -> None:
  """BPR needs an item outside each user's train items (§4.2)."""
  degrees = np.bincount(train_users)
  full = np.flatnonzero(degrees >= n_items)
  if full.size:
    raise error(source, f"user {int(full[0])} has all {n_items} items in "
                "train, so no negative item can be sampled")


def validate_dataset(ds: Dataset, source: str) -> None:
  """Re-checks an in-memory Dataset: sizes, id ranges, features, empty train.

  Args:
    ds: the dataset to check.
    source: how to name it in messages (e.g. 'synthetic' or a folder).

  Raises:
    DataError: on the first problem found.
  """
  if ds.n_users < 1 or ds.n_items < 1:
    raise error(source, f"n_users {ds.n_users} and n_items {ds.n_items} "
                "must be positive")
  for name in ("train", "val", "test"):
    split = getattr(ds, name)
    check_ids(split.users.astype(np.int64), "user", f"{source} ({name})",
              limit=ds.n_users)
    check_ids(split.items.astype(np.int64), "item", f"{source} ({name})",
              limit=ds.n_items)
  if len(ds.train) == 0:
    raise error(source, "empty train split (no interactions)")
  check_negatives_exist(ds.train.users, ds.n_items, source)
  for m, feat in ds.modalities.items():
    where = f"{source} (modality {m})"
    if not isinstance(feat, np.ndarray) or feat.dtype != np.float32:
      raise error(where, f"features must be a float32 numpy array, got "
                  f"{getattr(feat, 'dtype', type(feat).__name__)}")
    check_features(feat, where)
    check_feature_rows(feat, where, ds.n_items)
