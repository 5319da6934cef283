"""The in-memory dataset every loader produces and every later stage consumes.

A `Dataset` is plain numpy: user/item index arrays per split and one float32
feature matrix per modality. Nothing here touches JAX; graphs are built from it
once (`mmssl_jax.graph`) and the arrays are then passed into jitted code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
import sys
from typing import Mapping, Sequence

import numpy as np


class DataError(ValueError):
  """A problem with the user's input data.

  The message is one line that names the offending file (or dataset) and the
  problem; `main` prints it without a traceback and exits non-zero.
  """


def print_error(message) -> int:
  """Prints `error: <message>` as one line on stderr; returns exit status 1.

  Every CLI of the package reports user errors this way (no traceback).
  """
  print("error: " + " ".join(str(message).splitlines()), file=sys.stderr)
  return 1


def check_output_folder(path) -> None:
  """Raises DataError unless `path` is absent or an empty folder: no command
  of the package writes into a folder that holds anything."""
  out = Path(path)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise DataError(f"{out}: output path exists and is not an empty folder; "
                    "refusing to overwrite it")


def pad_lists(lists: Sequence[np.ndarray]) -> np.ndarray:
  """Stacks 1-D int arrays into an int32 matrix padded with -1 (width >= 1)."""
  width = max([1] + [len(x) for x in lists])
  out = np.full((len(lists), width), -1, np.int32)
  for row, items in enumerate(lists):
    out[row, :len(items)] = items
  return out


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of interactions as parallel index arrays (int32, same length)."""

  users: np.ndarray
  items: np.ndarray

  def __post_init__(self):
    object.__setattr__(self, "users", np.asarray(self.users, np.int32))
    object.__setattr__(self, "items", np.asarray(self.items, np.int32))
    if self.users.shape != self.items.shape or self.users.ndim != 1:
      raise ValueError(
          f"Split users/items must be 1-D and equal length, got "
          f"{self.users.shape} and {self.items.shape}")

  def __len__(self) -> int:
    return int(self.users.shape[0])

  def user_lists(self, n_users: int) -> list[np.ndarray]:
    """Per-user sorted item arrays (length n_users; empty for absent users)."""
    order = np.lexsort((self.items, self.users))
    users, items = self.users[order], self.items[order]
    bounds = np.searchsorted(users, np.arange(n_users + 1))
    return [items[bounds[u]:bounds[u + 1]] for u in range(n_users)]

  def csr(self, n_users: int, n_items: int):
    """The split as a scipy CSR matrix of ones (n_users, n_items), float32."""
    import scipy.sparse as sp  # pylint: disable=g-import-not-at-top
    ones = np.ones(len(self), np.float32)
    return sp.csr_matrix((ones, (self.users, self.items)),
                         shape=(n_users, n_items))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Users, items, three splits and per-modality item features.

  Attributes:
    name: a label for logs (folder name or 'synthetic').
    n_users: number of users; user ids are 0..n_users-1.
    n_items: number of items; item ids are 0..n_items-1.
    train, val, test: the interaction splits (deduplicated, disjoint per user
      from train where validation requires it).
    modalities: modality name -> float32 array (n_items, d_m), in a fixed
      (sorted or configured) order.
    cold_items: sorted int32 ids of the items held out of training
      (`data.cold_start`), or None for a dataset without such a split.
  """

  name: str
  n_users: int
  n_items: int
  train: Split
  val: Split
  test: Split
  modalities: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  cold_items: np.ndarray | None = None

  @property
  def modality_dims(self) -> dict[str, int]:
    return {m: int(f.shape[1]) for m, f in self.modalities.items()}

  def fingerprint(self) -> str:
    """A short hash of the sizes, the set of interactions of each split and
    the modalities' names and shapes: the same data in any layout or order
    gives the same fingerprint (feature values are not hashed, only shapes).
    """
    digest = hashlib.sha256(
        f"{self.n_users} {self.n_items} {self.modality_dims}".encode())
    for split in (self.train, self.val, self.test):
      pairs = (split.users.astype(np.int64) * self.n_items
               + split.items.astype(np.int64))
      digest.update(np.sort(pairs).tobytes())
      digest.update(b"|")
    return digest.hexdigest()[:16]

  def summary(self) -> str:
    """One line of statistics in the paper's table form."""
    n = len(self.train) + len(self.val) + len(self.test)
    sparsity = 1.0 - n / max(1, self.n_users * self.n_items)
    dims = ", ".join(f"{m} {d}" for m, d in self.modality_dims.items())
    dims = dims or "none"
    return (f"{self.name}: users {self.n_users:,}, items {self.n_items:,}, "
            f"train/val/test {len(self.train):,}/{len(self.val):,}/"
            f"{len(self.test):,}, sparsity {100 * sparsity:.3f}%, "
            f"modalities: {dims}")
