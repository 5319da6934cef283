"""Dataset folder loaders and writers (MMSSL JSON, MMRec .inter, pickled matrices).

Formats (ids are 0-based everywhere):
  mmssl:  train.json / val.json / test.json, each {"<user>": [item, ...]}, as
          read by MMSSL and LATTICE; an optional `train_mat` (pickled scipy
          matrix) fixes the shape and must hold exactly the train.json pairs.
  mmrec:  one `<name>.inter` TSV with a header naming columns userID, itemID
          and x_label (0 train, 1 val, 2 test), as read by MMRec.
  pickle: trnMat.pkl / valMat.pkl / tstMat.pkl, pickled scipy sparse matrices
          (users x items), as shipped by HKUDS for MMSSL / DiffMM.
Every format takes item features from `<modality>_feat.npy` (items x dims).

Loading a pickle (`train_mat`, `*Mat.pkl`) executes code from the file: only
load pickles you trust. Auto-detection prefers the JSON files when a folder
holds both, so the pickles are then not opened (except `train_mat`, which the
mmssl format reads when present).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
import pickle
import re
import tokenize
from typing import NamedTuple, Sequence
import warnings

import numpy as np
import scipy.sparse as sp

from mmssl_jax.data import cold_start
from mmssl_jax.data import validate
from mmssl_jax.data.dataset import DataError, Dataset, Split
from mmssl_jax.data.dataset import check_output_folder
from mmssl_jax.data.validate import error

FORMATS = ("auto", "mmssl", "mmrec", "pickle")
SPLITS = ("train", "val", "test")
JSON_FILES = tuple(f"{s}.json" for s in SPLITS)
PICKLE_FILES = ("trnMat.pkl", "valMat.pkl", "tstMat.pkl")
INTER_COLUMNS = ("userID", "itemID", "x_label")
FEAT_SUFFIX = "_feat.npy"
EXPECTED_FILES = (
    "train.json, val.json, test.json (mmssl), or <name>.inter with columns "
    "userID, itemID, x_label (mmrec), or trnMat.pkl, valMat.pkl, tstMat.pkl "
    "(pickle), plus optional <modality>_feat.npy")
_UINT = re.compile(r"[0-9]+")
_MODALITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _RawSplit(NamedTuple):
  """Parsed, not yet range-checked interactions of one split (int64 ids)."""
  users: np.ndarray
  items: np.ndarray
  source: str
  where: tuple[str, np.ndarray] | None = None  # locates ids in messages


class _Raw(NamedTuple):
  """What a format reader hands to `_assemble`."""
  splits: list[_RawSplit]
  min_users: int = 0  # e.g. the number of JSON keys, including empty users
  shape: tuple[int, int] | None = None  # from a pickled matrix
  shape_source: str = ""


def detect_format(folder: str | os.PathLike) -> str:
  """Returns 'mmssl', 'mmrec' or 'pickle' for a dataset folder."""
  folder = Path(folder)
  validate.require_dir(folder, EXPECTED_FILES)
  if (folder / "train.json").exists():
    return "mmssl"
  if any(_has_x_label(p) for p in folder.glob("*.inter")):
    return "mmrec"
  if (folder / PICKLE_FILES[0]).exists():
    return "pickle"
  raise error(folder,
              f"cannot detect the dataset format; expected {EXPECTED_FILES}")


def load_folder(path: str | os.PathLike, *, format: str = "auto",  # pylint: disable=redefined-builtin
                modalities: Sequence[str] = (),
                name: str | None = None) -> Dataset:
  """Loads and validates a dataset folder.

  Pickled matrices (`train_mat`, `*Mat.pkl`) are read with `pickle`, which
  executes code stored in the file; 'auto' prefers train/val/test.json over
  trnMat.pkl for that reason.

  Args:
    path: the dataset folder.
    format: 'auto', 'mmssl', 'mmrec' or 'pickle' (see the module docstring).
      'auto' picks mmssl if train.json exists, else mmrec if a *.inter file
      has an x_label column, else pickle if trnMat.pkl exists.
    modalities: modality names to load in this order ('image' reads
      image_feat.npy); empty means every *_feat.npy, sorted by name.
    name: dataset label; defaults to the folder's name.

  Returns:
    The validated Dataset: splits deduplicated and sorted, val/test disjoint
    from train per user, features float32.

  Raises:
    DataError: a one-line description of the first problem found.
  """
  folder = Path(path)
  if format not in FORMATS:
    raise error(folder, f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
  validate.require_dir(folder, EXPECTED_FILES)
  fmt = detect_format(folder) if format == "auto" else format
  reader = {"mmssl": _read_mmssl, "mmrec": _read_mmrec, "pickle": _read_pickles}
  raw = reader[fmt](folder)
  features = _read_features(folder, modalities)
  ds = _assemble(name or Path(os.path.abspath(folder)).name, raw, features)
  cold = cold_start.read_cold_items(folder, ds.n_items)
  return ds if cold is None else dataclasses.replace(ds, cold_items=cold)


def _assemble(name: str, raw: _Raw,
              features: dict[str, tuple[np.ndarray, Path]]) -> Dataset:
  """Derives n_users / n_items, range-checks ids and cleans the splits."""
  if raw.shape is not None:
    (n_users, n_items), items_source = raw.shape, raw.shape_source
    users_source = raw.shape_source
  else:
    n_users = max([raw.min_users] + [int(s.users.max(initial=-1)) + 1
                                     for s in raw.splits])
    users_source = ""
    if features:
      first, path = next(iter(features.values()))
      n_items, items_source = first.shape[0], path.name
    else:
      n_items = max(int(s.items.max(initial=-1)) + 1 for s in raw.splits)
      items_source = ""
  for feat, path in features.values():
    validate.check_feature_rows(feat, path, n_items, items_source)
  for s in raw.splits:
    validate.check_ids(s.users, "user", s.source, limit=n_users,
                       limit_source=users_source, where=s.where)
    validate.check_ids(s.items, "item", s.source, limit=n_items,
                       limit_source=items_source, where=s.where)
  train, val, test = validate.clean_splits(
      [Split(s.users, s.items) for s in raw.splits],
      [s.source for s in raw.splits], n_items)
  return Dataset(name=name, n_users=int(n_users), n_items=int(n_items),
                 train=train, val=val, test=test,
                 modalities={m: f for m, (f, _) in features.items()})


# ----------------------------------------------------------------------------
# mmssl: train/val/test.json (+ optional train_mat)


def _read_mmssl(folder: Path) -> _Raw:
  paths = [folder / f for f in JSON_FILES]
  for p in paths:
    validate.require_file(p, JSON_FILES)
  splits, min_users = [], 0
  for p in paths:
    split, n_keys = _read_json_split(p)
    splits.append(split)
    min_users = max(min_users, n_keys)
  mat_path = folder / "train_mat"
  if not mat_path.exists():
    return _Raw(splits, min_users)
  rows, cols, shape = _read_sparse_pickle(mat_path)
  train = splits[0]
  validate.check_ids(train.users, "user", train.source, limit=shape[0],
                     limit_source=mat_path.name, where=train.where)
  validate.check_ids(train.items, "item", train.source, limit=shape[1],
                     limit_source=mat_path.name, where=train.where)
  json_pairs = np.unique(train.users * shape[1] + train.items)
  mat_pairs = np.unique(rows * shape[1] + cols)
  if not np.array_equal(json_pairs, mat_pairs):
    raise error(mat_path, f"nonzeros ({mat_pairs.size} pairs) differ from the "
                f"{json_pairs.size} distinct pairs of train.json")
  return _Raw(splits, min_users, shape, mat_path.name)


def _json_type(value: object) -> str:
  names = {dict: "object", list: "array", str: "string", bool: "boolean",
           int: "number", float: "number", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _read_json_split(path: Path) -> tuple[_RawSplit, int]:
  """Parses {"<user>": [item, ...]}; returns the split and max user key + 1."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    raise error(path, f"malformed JSON at line {e.lineno} column {e.colno} "
                f"(char {e.pos}): {e.msg}") from None
  except UnicodeDecodeError as e:
    raise error(path, f"malformed JSON: not UTF-8 text ({e.reason} at byte "
                f"{e.start})") from None
  except OSError as e:
    raise error(path, f"cannot read file: {e.strerror}") from None
  if not isinstance(obj, dict):
    raise error(path, 'expected a JSON object {"<user id>": [item ids]}, got '
                f"a JSON {_json_type(obj)}")
  uids, lengths = [], []
  for key, items in obj.items():
    if not _UINT.fullmatch(key):
      negative = key.startswith("-") and _UINT.fullmatch(key[1:])
      problem = (f"negative user id {key}" if negative
                 else f"user key {key!r} is not an integer")
      raise error(path, problem)
    uid = int(key)  # leading zeros are fine: "007" is user 7
    if uid > validate.MAX_ID:
      raise error(path, f"user id {uid} too large (ids must be <= "
                  f"{validate.MAX_ID})")
    if not isinstance(items, list):
      raise error(path, f"user {key}: expected a list of item ids, got a JSON "
                  f"{_json_type(items)}")
    # `type is int` rejects floats and booleans (bool subclasses int).
    bad = [x for x in items if type(x) is not int]  # pylint: disable=unidiomatic-typecheck
    if bad:
      raise error(path, f"user {key}: item id {json.dumps(bad[0])} is not an "
                  "integer")
    uids.append(uid)
    lengths.append(len(items))
  users = np.repeat(np.asarray(uids, np.int64), lengths)
  try:
    items = np.fromiter(itertools.chain.from_iterable(obj.values()), np.int64,
                        count=users.size)
  except OverflowError:
    raise error(path, "item id too large (does not fit in 64 bits)") from None
  split = _RawSplit(users, items, str(path), ("user", users))
  validate.check_ids(items, "item", path, where=split.where)
  return split, max(uids, default=-1) + 1


# ----------------------------------------------------------------------------
# mmrec: <name>.inter


def _header(path: Path) -> list[str]:
  """The raw header fields of a TSV file ('' for an unreadable file)."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.readline().rstrip("\r\n").split("\t")
  except (OSError, UnicodeDecodeError):
    return []


def _column_names(header: list[str]) -> list[str]:
  # Typed RecBole-style names ('x_label:token') count by their bare name.
  return [h.split(":")[0] for h in header]


def _has_x_label(path: Path) -> bool:
  return path.is_file() and "x_label" in _column_names(_header(path))


def _read_mmrec(folder: Path) -> _Raw:
  inters = sorted(folder.glob("*.inter"))
  if len(inters) != 1:
    found = ", ".join(p.name for p in inters) or "none"
    raise error(folder, "mmrec format expects exactly one <name>.inter file "
                f"with columns userID, itemID, x_label; found: {found}")
  path = inters[0]
  validate.require_file(path, ["<name>.inter"])
  users, items, labels, lines = _read_inter(path)
  splits = []
  for label, split in enumerate(SPLITS):
    keep = labels == label
    splits.append(_RawSplit(users[keep], items[keep],
                            f"{path} (x_label {label}, {split})",
                            ("line", lines[keep])))
  return _Raw(splits)


def _read_inter(path: Path) -> tuple[np.ndarray, ...]:
  """Parses an MMRec .inter TSV into users, items, labels, line numbers."""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise error(path, f"cannot read file: {e.strerror}") from None
  raw_header = lines[0].split("\t") if lines else []
  header = _column_names(raw_header)
  missing = [c for c in INTER_COLUMNS if c not in header]
  if missing:
    hint = (" (this looks like a RecBole atomic file with typed headers, not "
            "an MMRec split file)" if any(":" in h for h in raw_header) else "")
    raise error(path, f"line 1: missing column(s) {', '.join(missing)}; "
                f"header is {' | '.join(raw_header) or 'empty'}{hint}")
  cols = [header.index(c) for c in INTER_COLUMNS]
  width = max(cols) + 1
  users, items, labels, numbers = [], [], [], []
  for n, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < width:
      raise error(path, f"line {n}: expected {len(header)} tab-separated "
                  f"fields, got {len(fields)}")
    values = []
    for c, col in zip(cols, INTER_COLUMNS):
      try:
        values.append(int(fields[c]))
      except ValueError:
        values.append(None)
      if values[-1] is None or (col == "x_label" and values[-1] not in (0, 1, 2)):
        what = ("is not 0, 1 or 2 (train/val/test)" if col == "x_label"
                else "is not an integer")
        raise error(path, f"line {n}: {col} {fields[c]!r} {what}")
    users.append(values[0])
    items.append(values[1])
    labels.append(values[2])
    numbers.append(n)
  try:
    return (np.asarray(users, np.int64), np.asarray(items, np.int64),
            np.asarray(labels, np.int64), np.asarray(numbers, np.int64))
  except OverflowError:
    raise error(path, "id too large (does not fit in 64 bits)") from None


# ----------------------------------------------------------------------------
# pickle: trnMat.pkl / valMat.pkl / tstMat.pkl


def _read_sparse_pickle(path: Path) -> tuple[np.ndarray, np.ndarray,
                                             tuple[int, int]]:
  """Unpickles a scipy sparse matrix; returns nonzero rows, cols and shape."""
  validate.require_file(path, [path.name])
  try:
    with open(path, "rb") as f, warnings.catch_warnings():
      # Old pickles name the deprecated scipy.sparse.coo module.
      warnings.simplefilter("ignore", DeprecationWarning)
      obj = pickle.load(f)
  except Exception as e:  # pylint: disable=broad-except
    # A corrupt pickle can raise nearly any exception type.
    raise error(path, f"unreadable pickle ({type(e).__name__}: {e})") from None
  if not sp.issparse(obj) or len(obj.shape) != 2:
    raise error(path, "expected a pickled 2-D scipy sparse matrix, got "
                f"{type(obj).__name__}")
  coo = sp.coo_matrix(obj)
  nonzero = coo.data != 0
  return (coo.row[nonzero].astype(np.int64), coo.col[nonzero].astype(np.int64),
          (int(coo.shape[0]), int(coo.shape[1])))


def _read_pickles(folder: Path) -> _Raw:
  for f in PICKLE_FILES:
    validate.require_file(folder / f, PICKLE_FILES)
  splits, shape = [], None
  for f in PICKLE_FILES:
    rows, cols, s = _read_sparse_pickle(folder / f)
    if shape is not None and s != shape:
      raise error(folder / f, f"matrix shape {s} != {PICKLE_FILES[0]} shape "
                  f"{shape}")
    shape = s
    splits.append(_RawSplit(rows, cols, str(folder / f)))
  return _Raw(splits, shape=shape, shape_source=PICKLE_FILES[0])


# ----------------------------------------------------------------------------
# Features


def _read_features(folder: Path, modalities: Sequence[str]
                   ) -> dict[str, tuple[np.ndarray, Path]]:
  """Loads `<m>_feat.npy` for each modality as validated float32 arrays."""
  if isinstance(modalities, str):
    raise error(folder, f"modalities must be a list of names, got the string "
                f"{modalities!r}")
  names = list(modalities) or sorted(
      p.name[:-len(FEAT_SUFFIX)] for p in folder.glob(f"*{FEAT_SUFFIX}"))
  if len(set(names)) != len(names):
    raise error(folder, f"duplicate modality names in {names}")
  expected = [f"{m}{FEAT_SUFFIX}" for m in names]
  features = {}
  for m in names:
    if not _MODALITY.fullmatch(m):
      raise error(folder, f"bad modality name {m!r} (letters, digits, _ . - only)")
    path = folder / f"{m}{FEAT_SUFFIX}"
    validate.require_file(path, expected)
    features[m] = (validate.check_features(read_npy(path), path), path)
  return features


def read_npy(path: Path) -> np.ndarray:
  """Reads a .npy file without unpickling anything."""
  try:
    with open(path, "rb") as f:
      # np.load treats any non-.npy bytes as a pickle; check the magic first.
      if f.read(6) != b"\x93NUMPY":
        raise error(path, "unreadable .npy file (not in .npy format)")
      f.seek(0)
      return np.load(f, allow_pickle=False)
  except DataError:
    raise
  except ValueError as e:
    if "allow_pickle" in str(e):  # object arrays are stored as pickles
      raise error(path, "features must be a 2-D numeric array, got an object "
                  "array") from None
    raise error(path, f"unreadable .npy file ({e})") from None
  except (OSError, EOFError, SyntaxError, tokenize.TokenError) as e:
    # numpy parses the header with ast/tokenize: a corrupted header raises
    # SyntaxError or TokenError.
    raise error(path, f"unreadable .npy file ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})") from None


# ----------------------------------------------------------------------------
# Writers


def _fresh_dir(out_dir: str | os.PathLike) -> Path:
  """Creates `out_dir`, refusing to write into a file or a non-empty folder."""
  check_output_folder(out_dir)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  return out


def _write_features(ds: Dataset, out: Path) -> None:
  for m, feat in ds.modalities.items():
    np.save(out / f"{m}{FEAT_SUFFIX}", np.asarray(feat, np.float32))


def write_mmssl(ds: Dataset, out_dir: str | os.PathLike) -> Path:
  """Writes train/val/test.json (every user 0..n_users-1 a key) + features."""
  validate.validate_dataset(ds, ds.name)
  out = _fresh_dir(out_dir)
  for split, file in zip((ds.train, ds.val, ds.test), JSON_FILES):
    lists = split.user_lists(ds.n_users)
    obj = {str(u): items.tolist() for u, items in enumerate(lists)}
    with open(out / file, "w", encoding="utf-8") as f:
      json.dump(obj, f, separators=(",", ":"))
  _write_features(ds, out)
  cold_start.write_cold_items(ds, out)
  return out


def write_mmrec(ds: Dataset, out_dir: str | os.PathLike) -> Path:
  """Writes `<name>.inter` (userID, itemID, x_label TSV) + features.

  MMRec files only list interactions, so users (and, without features, items)
  past the largest id that occurs anywhere do not survive a round trip.
  """
  validate.validate_dataset(ds, ds.name)
  out = _fresh_dir(out_dir)
  rows = ["\t".join(INTER_COLUMNS)]
  for label, split in enumerate((ds.train, ds.val, ds.test)):
    order = np.lexsort((split.items, split.users))
    rows.extend(f"{u}\t{i}\t{label}"
                for u, i in zip(split.users[order].tolist(),
                                split.items[order].tolist()))
  stem = Path(ds.name).name or "dataset"
  (out / f"{stem}.inter").write_text("\n".join(rows) + "\n", encoding="utf-8")
  _write_features(ds, out)
  cold_start.write_cold_items(ds, out)
  return out
