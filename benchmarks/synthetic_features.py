"""Seeded synthetic item features for timing datasets that have none.

The Amazon-Sports and Amazon-Baby dataset folders hold interactions only; the
published MMSSL runs used 4096-d image and 1024-d text features (the
reference description, §1.3). For speed and memory
measurements, `add_synthetic_features` adds N(0, 1) float32 matrices of
those shapes. They carry no information about the items: accuracy measured
with them means nothing, and every benchmark that uses them says so in its
JSON (`train_speed.py --synthetic_features=image:4096,text:1024`).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def parse_feature_spec(spec) -> dict[str, int]:
  """['image:4096', 'text:1024'] (or 'image:4096,text:1024') -> dims."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  dims = {}
  for item in filter(None, (i.strip() for i in items)):
    name, sep, dim = item.partition(":")
    if not sep or not name or not dim.isdigit() or int(dim) <= 0:
      raise ValueError(f"bad synthetic feature {item!r}: expected name:dim "
                       "with a positive integer dim, e.g. image:4096")
    if name in dims:
      raise ValueError(f"synthetic feature {name!r} given twice")
    dims[name] = int(dim)
  return dims


def add_synthetic_features(ds, dims: dict[str, int], seed: int = 0):
  """`ds` with seeded N(0, 1) float32 (n_items, dim) features added.

  Each modality gets its own stream (seed, index in sorted name order), so a
  feature does not change when another is added. A real modality of the same
  name is replaced. Modalities end up sorted by name, as `load_folder` sorts
  them. Returns (dataset, names of the real modalities replaced).
  """
  modalities = dict(ds.modalities)
  replaced = sorted(set(dims) & set(modalities))
  for i, name in enumerate(sorted(dims)):
    rng = np.random.default_rng([seed, i])
    modalities[name] = rng.standard_normal((ds.n_items, dims[name]),
                                           dtype=np.float32)
  modalities = {m: modalities[m] for m in sorted(modalities)}
  return dataclasses.replace(ds, modalities=modalities), replaced
