"""New items: a split that holds a fraction of the items out of training.

`hold_out_items(ds, fraction, seed)` draws a seeded random `fraction` of the
items; they become *cold*: every interaction with them, in any split, leaves
training. Half of the cold items (rounded down) are validation items and the
rest test items: every interaction with a validation cold item becomes a
validation target, with a test cold item a test target. So the test split
measures items that neither training nor early stopping ever saw, and a
cold item is never a target of both splits. Warm items keep their split.

A dataset folder can hold such a split (`mmssl_jax.data.prepare
--cold_items=0.2`): its `cold_items.txt` lists the cold item ids, one per
line, and `formats.load_folder` reads it into `Dataset.cold_items`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from mmssl_jax.data import validate
from mmssl_jax.data.dataset import DataError, Dataset, Split

COLD_ITEMS_FILE = "cold_items.txt"


def _keep(split: Split, mask: np.ndarray) -> Split:
  return Split(split.users[mask], split.items[mask])


def _merge(*splits: Split) -> Split:
  users = np.concatenate([s.users for s in splits])
  items = np.concatenate([s.items for s in splits])
  order = np.lexsort((items, users))
  return Split(users[order], items[order])


def hold_out_items(ds: Dataset, fraction: float, seed: int) -> Dataset:
  """`ds` with a seeded random `fraction` of its items held out (cold).

  Raises:
    DataError: a fraction outside (0, 1), fewer than 2 cold items, or a
      split left without interactions.
  """
  if not 0.0 < fraction < 1.0:
    raise DataError(f"{ds.name}: data.cold_items={fraction} must lie "
                    "strictly between 0 and 1")
  if ds.cold_items is not None:
    raise DataError(f"{ds.name}: the dataset already holds a cold-item split "
                    f"({COLD_ITEMS_FILE}); set data.cold_items=0")
  n_cold = int(round(fraction * ds.n_items))
  if n_cold < 2:
    raise DataError(f"{ds.name}: data.cold_items={fraction} of "
                    f"{ds.n_items} items leaves {n_cold} cold items; at least "
                    "2 are needed (one validation, one test)")
  rng = np.random.default_rng(seed)
  cold = rng.permutation(ds.n_items)[:n_cold]
  group = np.zeros(ds.n_items, np.int8)  # 0 warm, 1 validation, 2 test cold
  group[cold[:n_cold // 2]] = 1
  group[cold[n_cold // 2:]] = 2
  every = _merge(ds.train, ds.val, ds.test)
  of = lambda split: group[split.items]
  out = dataclasses.replace(
      ds, train=_keep(ds.train, of(ds.train) == 0),
      val=_merge(_keep(ds.val, of(ds.val) == 0), _keep(every, of(every) == 1)),
      test=_merge(_keep(ds.test, of(ds.test) == 0),
                  _keep(every, of(every) == 2)),
      cold_items=np.sort(cold).astype(np.int32))
  for name in ("train", "val", "test"):
    if not len(getattr(out, name)):
      raise DataError(f"{ds.name}: holding out {n_cold} cold items leaves "
                      f"the {name} split empty")
  return out


def read_cold_items(folder: str | os.PathLike, n_items: int
                    ) -> np.ndarray | None:
  """The sorted cold item ids of a folder's `cold_items.txt`, or None."""
  path = Path(folder) / COLD_ITEMS_FILE
  if not path.exists():
    return None
  tokens = path.read_text(encoding="utf-8").split()
  bad = [t for t in tokens if not t.isdigit()]
  if bad:
    raise validate.error(path, f"{bad[0]!r} is not an item id")
  ids = np.array([int(t) for t in tokens], np.int64)
  validate.check_ids(ids, "item", str(path), limit=n_items)
  if np.unique(ids).size != ids.size:
    raise validate.error(path, "an item is listed twice")
  return np.sort(ids).astype(np.int32)


def write_cold_items(ds: Dataset, folder: str | os.PathLike) -> None:
  """Writes `cold_items.txt` when the dataset has a cold-item split."""
  if ds.cold_items is not None:
    text = "".join(f"{i}\n" for i in ds.cold_items.tolist())
    (Path(folder) / COLD_ITEMS_FILE).write_text(text, encoding="utf-8")


def cold_mask(ds: Dataset) -> np.ndarray:
  """(n_items,) bool: True for the held-out items (none without a split)."""
  mask = np.zeros(ds.n_items, bool)
  if ds.cold_items is not None:
    mask[ds.cold_items] = True
  return mask
