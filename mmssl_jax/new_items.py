"""New items served without retraining: their features in, vectors out.

A new-items folder holds one `<modality>_feat.npy` per modality of a trained
run (the names and widths of the run's dataset; float32-castable, finite; the
same number of rows N in every file). Row r of every file describes new item
r; `mmssl_jax.recommend` and `mmssl_jax.export` (`--new_items=FOLDER`) give it
the id n_items + r, after the run's catalogue items 0..n_items-1.

A run trained with `model.cold_start=True` carries the inductive item encoder
`params['cold_encoder']`; `model.encode_items` maps the features to vectors in
the space of the final item vectors i*, so score(u, new item r) = u* . f(x_r),
the score its held-out (cold) items are ranked by. Other runs cannot encode
an item they have not trained on (`check_inductive`).

Every problem is a one-line `DataError` naming the file (and the first bad
row): a missing folder or modality file, a `*_feat.npy` of a modality the run
does not have (other files are ignored), a wrong width, an empty file, a
non-numeric array, NaN or inf, row counts that differ between files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from mmssl_jax import model as model_lib
from mmssl_jax.data.dataset import DataError
from mmssl_jax.data.formats import FEAT_SUFFIX, read_npy
from mmssl_jax.data.validate import error

NO_INDUCTIVE = ("the run has no inductive item path; train with "
                "--config.model.cold_start=True")


def require_folder(folder: str | os.PathLike) -> Path:
  """`folder` as a Path; DataError unless it is an existing folder."""
  path = Path(folder)
  if not path.exists():
    raise error(path, "new-items folder not found (expected a folder with "
                f"one <modality>{FEAT_SUFFIX} per modality of the run)")
  if not path.is_dir():
    raise error(path, "is a file, expected a new-items folder with one "
                f"<modality>{FEAT_SUFFIX} per modality of the run")
  return path


def check_inductive(restored) -> None:
  """DataError unless the run was trained with `model.cold_start=True`."""
  if "cold_encoder" not in restored.state.params:
    raise DataError(NO_INDUCTIVE)


def _check_array(arr: np.ndarray, path: Path, modality: str,
                 width: int) -> np.ndarray:
  """`arr` as float32 (N, width), or DataError naming `path` (and row)."""
  numeric = (np.issubdtype(arr.dtype, np.integer)
             or np.issubdtype(arr.dtype, np.floating))
  if arr.ndim != 2 or not numeric:
    raise error(path, f"expected a 2-D numeric array (new items x {width}), "
                f"got shape {arr.shape} dtype {arr.dtype}")
  if arr.shape[0] == 0:
    raise error(path, "is empty (0 rows; one row per new item)")
  if arr.shape[1] != width:
    raise error(path, f"{arr.shape[1]} columns, but the run's {modality} "
                f"features have {width}")
  with np.errstate(over="ignore"):  # huge float64 values become inf
    arr = arr.astype(np.float32, copy=False)
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    more = int(bad.sum()) - 1
    raise error(path, f"row {int(np.argmax(bad))} is not finite (NaN or inf)"
                + (f"; {more} more such rows" if more else ""))
  return arr


def _read_one(path: Path, modality: str, width: int) -> np.ndarray:
  if path.is_dir():
    raise error(path, "is a directory, expected a .npy file")
  if not path.exists():
    raise error(path, f"file not found: the run's modality {modality!r} "
                f"needs one ({width} columns)")
  if path.stat().st_size == 0:
    raise error(path, "is empty (0 bytes)")
  return _check_array(read_npy(path), path, modality, width)


def read_new_items(folder: str | os.PathLike,
                   restored) -> dict[str, np.ndarray]:
  """The new items' features: modality -> float32 (N, d_m), run's order.

  Args:
    folder: one `<modality>_feat.npy` per modality of the run; files not
      ending in `_feat.npy` are ignored.
    restored: a `restore.RestoredRun` (its dataset gives names and widths).

  Raises:
    DataError: one line naming the file (and the first bad row).
  """
  path = require_folder(folder)
  dims = dict(restored.dataset.modality_dims)
  unknown = sorted(p.name for p in path.iterdir()
                   if p.name.endswith(FEAT_SUFFIX)
                   and p.name[:-len(FEAT_SUFFIX)] not in dims)
  if unknown:
    raise error(path / unknown[0], "not a modality of the run (its "
                f"modalities: {', '.join(dims) or 'none'})")
  if not dims:
    raise error(path, "the run has no modalities to encode new items from")
  features, first = {}, None
  for m, width in dims.items():
    file = path / f"{m}{FEAT_SUFFIX}"
    features[m] = _read_one(file, m, width)
    first = first or (file, len(features[m]))
    if len(features[m]) != first[1]:
      raise error(file, f"{len(features[m])} rows, but {first[0]} has "
                  f"{first[1]} (one row per new item in every file)")
  return features


@jax.jit
def _encode(encoder, features):
  return model_lib.encode_items(encoder, features)


def encode(restored, features: Mapping[str, np.ndarray]) -> np.ndarray:
  """float32 (N, d) vectors of new items (`model.encode_items`, jitted).

  `features` as `read_new_items` returns them; DataError for a run without
  the inductive encoder.
  """
  check_inductive(restored)
  names = list(restored.dataset.modalities)
  if sorted(features) != sorted(names):
    raise DataError(f"new items: features of modalities {sorted(features)}, "
                    f"but the run's are {sorted(names)}")
  ordered = {m: np.asarray(features[m], np.float32) for m in names}
  return np.asarray(jax.device_get(
      _encode(restored.state.params["cold_encoder"], ordered)), np.float32)
