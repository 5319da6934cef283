r"""Builds a dataset folder from a raw interaction log (CSV/TSV) and item features.

  python -m mmssl_jax.data.prepare --interactions=ratings.csv --output=data/mine \
      --features=image:image.npy,text:text.npy --item_ids=items.txt \
      --user_col=user --item_col=item --time_col=timestamp --kcore=5 \
      --split=random --seed=123 --format=mmssl

Steps, in order (the Amazon pipeline of LATTICE / MMSSL, docs/reference.md
§1.3, with string ids and an optional chronological split):
  1. Read the log. A header line is required; the user, item and (optional)
     timestamp columns are found by name. `--sep=auto` uses a tab if the
     header holds one, else a comma. Fields are stripped of surrounding
     whitespace; ids are arbitrary non-empty strings.
  2. Drop duplicate (user, item) pairs. The first row in the file is kept; for
     `--split=chronological` the earliest timestamp is kept.
  3. Iterative k-core: drop users and items with fewer than `--kcore`
     interactions, repeated until nothing changes (`--kcore` 0 or 1 keeps all).
  4. Remap ids to 0..n-1, users and items each sorted by their original id
     string (plain code-point order, so '10' sorts before '9'). The mappings
     are written to `user_mapping.tsv` and `item_mapping.tsv` (a header line
     `original_id<TAB>new_id`, then one line per id in new-id order).
  5. Split per user with the LATTICE rule. A user with n items holds out
       n < 10:  2 items, 1 test + 1 val;
       n >= 10: h = int(0.2 * n) items, h // 2 test and h - h // 2 val
     (so 10..14 items give 1 + 1, 15 give 1 + 2, 20 give 2 + 2). This is
     LATTICE's `build_data.py` exactly, whose `testval[:len//2]` is test.
     Which items are held out:
       random:        a seeded permutation of the user's items (one
                      `np.random.default_rng(seed)` for the whole dataset);
                      the first h//2 of it are test, the next ones val.
       chronological: items ordered by (timestamp, new item id); the latest
                      ones are test, the ones just before them val.
     Users with fewer than 3 interactions (possible only with `--kcore` < 3)
     keep all of them in train: holding out 2 would leave no train item.
  6. Features: each `name:path.npy` is an (items x dims) array whose row r is
     the item whose original id is line r of `--item_ids` (one id per line),
     or the id `str(r)` without `--item_ids`. Rows are reordered to the new
     item ids; rows of items removed by the k-core are dropped; a surviving
     item without a row is an error naming the file.
  7. Write the dataset (`formats.write_mmssl` or `write_mmrec`) and print its
     statistics as a markdown table in the form of the MMSSL README table
     (§1.3). "Interactions" here counts train + val + test (the README's
     counts exclude validation, §1.3); the sparsity is 1 - interactions /
     (users * items), in percent with 3 decimals.

Nothing is written when any step fails, and a non-empty `--output` is never
touched. Problems print one line `error: <message>` and exit with status 1.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from absl import app
from absl import flags
import numpy as np

from mmssl_jax.data import cold_start
from mmssl_jax.data import formats
from mmssl_jax.data import validate
from mmssl_jax.data.dataset import DataError, Dataset, Split, check_output_folder, print_error
from mmssl_jax.data.validate import error

SPLITS = ("random", "chronological")
MIN_SPLIT_ITEMS = 3  # users with fewer interactions keep them all in train
MAPPING_HEADER = "original_id\tnew_id"
TABLE_HEADER = ("| Dataset | Users | Items | Interactions | Sparsity | "
                "Modalities (dim) |\n|---|---|---|---|---|---|")


class Interactions(NamedTuple):
  """A raw interaction log: parallel arrays, one entry per data row."""
  users: np.ndarray  # str
  items: np.ndarray  # str
  times: np.ndarray | None  # float64 (or datetime64), None when not read
  lines: np.ndarray  # 1-based line numbers of the rows, for messages


class Prepared(NamedTuple):
  """The result of `prepare`: the dataset and the original id of every new id."""
  dataset: Dataset
  user_ids: np.ndarray  # user_ids[new user id] = original id string
  item_ids: np.ndarray  # item_ids[new item id] = original id string
  counts: dict[str, int]  # rows, users, items, distinct, after the k-core


def describe(prepared: Prepared, kcore: int) -> str:
  """One line on what reading, deduplication, k-core and splitting did."""
  c, ds = prepared.counts, prepared.dataset
  return (f"{c['rows']:,} rows, {c['rows'] - c['distinct']:,} duplicates "
          f"dropped; {kcore}-core kept {c['kept']:,} of {c['distinct']:,} "
          f"interactions, users {c['users']:,} -> {ds.n_users:,}, items "
          f"{c['items']:,} -> {ds.n_items:,}; train/val/test "
          f"{len(ds.train):,}/{len(ds.val):,}/{len(ds.test):,}")


# ----------------------------------------------------------------------------
# Reading


def _require_file(path: Path, what: str) -> None:
  if path.is_dir():
    raise error(path, f"is a directory, expected {what}")
  if not path.exists():
    raise error(path, f"file not found (expected {what})")


def _delimiter(sep: str, header_line: str) -> str:
  named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
  if sep == "auto":
    return "\t" if "\t" in header_line else ","
  sep = named.get(sep, sep)
  if len(sep) != 1:
    raise ValueError(f"--sep must be auto, tab, comma, semicolon or one "
                     f"character, got {sep!r}")
  return sep


def read_interactions(path: str | os.PathLike, *, user_col: str = "user",
                      item_col: str = "item", time_col: str | None = None,
                      sep: str = "auto") -> Interactions:
  """Reads the user, item (and `time_col`, when given) columns of a CSV/TSV.

  Args:
    path: the interaction log, with a header line naming the columns.
    user_col, item_col: names of the id columns.
    time_col: name of the timestamp column, or None not to read one. Values
      must be numbers, or all ISO 8601 dates ('2014-01-31', '2014-01-31T12:00').
    sep: 'auto' (tab if the header holds one, else comma), 'tab', 'comma',
      'semicolon' or a single character.

  Returns:
    The rows as `Interactions`.

  Raises:
    DataError: a missing file or column, a short row, an empty id or a bad
      timestamp, naming the file and line.
  """
  path = Path(path)
  _require_file(path, "a CSV/TSV interaction log")
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      header_line = f.readline()
      f.seek(0)
      reader = csv.reader(f, delimiter=_delimiter(sep, header_line))
      header = [h.strip() for h in next(reader, [])]
      wanted = [user_col, item_col] + ([time_col] if time_col else [])
      missing = [c for c in wanted if c not in header]
      if missing:
        shown = " | ".join(header) if any(header) else "empty"
        raise error(path, f"line 1: missing column(s) {', '.join(missing)}; "
                    f"header is {shown} (choose columns with --user_col, "
                    "--item_col, --time_col and the separator with --sep)")
      cols = [header.index(c) for c in wanted]
      width = max(cols) + 1
      fields: list[list[str]] = [[] for _ in wanted]
      lines = []
      for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
          continue  # blank line
        if len(row) < width:
          raise error(path, f"line {reader.line_num}: expected {len(header)} "
                      f"fields, got {len(row)}")
        for out, c, name in zip(fields, cols, wanted):
          value = row[c].strip()
          if not value:
            raise error(path, f"line {reader.line_num}: empty {name}")
          out.append(value)
        lines.append(reader.line_num)
  except UnicodeDecodeError as e:
    raise error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  except csv.Error as e:
    raise error(path, f"malformed CSV: {e}") from None
  except OSError as e:
    raise error(path, f"cannot read file: {e.strerror}") from None
  if not lines:
    raise error(path, "no interactions (only a header)")
  line_numbers = np.asarray(lines, np.int64)
  times = (_parse_times(fields[2], line_numbers, path, time_col)
           if time_col else None)
  return Interactions(np.asarray(fields[0]), np.asarray(fields[1]), times,
                      line_numbers)


def _parse_times(values: list[str], lines: np.ndarray, path: Path,
                 col: str) -> np.ndarray:
  """Timestamps as float64, or as datetime64 when every value is a date."""
  try:
    return np.asarray(values, np.float64)
  except ValueError:
    pass
  try:
    return np.asarray(values, "datetime64[s]")
  except ValueError:
    pass
  for k, v in enumerate(values):  # find the first bad value for the message
    try:
      float(v)
    except ValueError:
      try:
        np.datetime64(v)
      except ValueError:
        raise error(path, f"line {lines[k]}: {col} {v!r} is neither a number "
                    "nor an ISO 8601 date") from None
  raise error(path, f"column {col} mixes numbers and dates")


def read_item_ids(path: str | os.PathLike) -> np.ndarray:
  """One original item id per line (row r of every feature file is line r)."""
  path = Path(path)
  _require_file(path, "a text file with one item id per line")
  try:
    ids = [s.strip() for s in path.read_text(encoding="utf-8-sig").splitlines()]
  except UnicodeDecodeError as e:
    raise error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise error(path, f"cannot read file: {e.strerror}") from None
  while ids and not ids[-1]:
    ids.pop()  # trailing blank lines
  if not ids:
    raise error(path, "no item ids")
  if "" in ids:
    raise error(path, f"line {ids.index('') + 1}: empty item id")
  arr = np.asarray(ids)
  uniq, counts = np.unique(arr, return_counts=True)
  if (counts > 1).any():
    dup = str(uniq[np.argmax(counts > 1)])
    raise error(path, f"item id {dup!r} is listed {int(counts.max())} times "
                f"(line {ids.index(dup) + 1} and later)")
  return arr


# ----------------------------------------------------------------------------
# Cleaning, remapping, splitting


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
  """Rows that survive iterative k-core filtering (both sides >= k rows).

  Args:
    users, items: integer codes (0..n-1), one per (deduplicated) interaction.
    k: the core size; k <= 1 keeps everything.

  Returns:
    A boolean mask over the rows.
  """
  alive = np.ones(users.shape, bool)
  if k <= 1:
    return alive
  n_users, n_items = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
  while True:
    user_count = np.bincount(users[alive], minlength=n_users)
    item_count = np.bincount(items[alive], minlength=n_items)
    keep = alive & (user_count[users] >= k) & (item_count[items] >= k)
    if keep.sum() == alive.sum():
      return keep
    alive = keep


def holdout_sizes(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(test, val) counts per user for n interactions (LATTICE, §1.3).

  n < 3: 0 + 0 (all in train); 3 <= n < 10: 1 + 1; n >= 10: h = int(0.2 n),
  h // 2 test and h - h // 2 val.
  """
  n = np.asarray(n, np.int64)
  hold = np.where(n < 10, 2, (n * 2) // 10)  # int(0.2 * n), exact in integers
  hold = np.where(n < MIN_SPLIT_ITEMS, 0, hold)
  n_test = hold // 2
  return n_test, hold - n_test


def split_interactions(users: np.ndarray, items: np.ndarray, n_users: int, *,
                       method: str = "random", seed: int = 123,
                       times: np.ndarray | None = None
                       ) -> tuple[Split, Split, Split]:
  """Splits deduplicated interactions per user into train, val and test.

  Args:
    users, items: new ids (0..n-1), one (user, item) pair per row, no
      duplicates.
    n_users: number of users.
    method: 'random' or 'chronological' (see the module docstring).
    seed: seeds the `np.random.default_rng` of the random split.
    times: per-row timestamps, required for 'chronological'.

  Returns:
    (train, val, test), each sorted by (user, item).
  """
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  if method == "random":
    # Sorting by an iid key within each user is a uniform random permutation.
    key = np.random.default_rng(seed).random(users.shape[0])
    order = np.lexsort((key, users))
  elif method == "chronological":
    if times is None:
      raise ValueError("the chronological split needs timestamps")
    # Latest first: descending (time, item) within each user.
    rank_time = np.unique(times, return_inverse=True)[1].reshape(-1)
    order = np.lexsort((-items, -rank_time, users))
  else:
    raise ValueError(f"unknown split {method!r} (choose from "
                     f"{', '.join(SPLITS)})")
  sorted_users = users[order]
  counts = np.bincount(sorted_users, minlength=n_users)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  position = np.arange(users.shape[0]) - starts[sorted_users]
  n_test, n_val = holdout_sizes(counts)
  label = np.where(position < n_test[sorted_users], 2,
                   np.where(position < (n_test + n_val)[sorted_users], 1, 0))
  out = []
  for split_label in (0, 1, 2):
    rows = order[label == split_label]
    rows = rows[np.lexsort((items[rows], users[rows]))]
    out.append(Split(users[rows], items[rows]))
  return tuple(out)


def _reorder_features(features: Mapping[str, str | os.PathLike],
                      item_ids: np.ndarray, row_ids: np.ndarray | None,
                      row_ids_source: str) -> dict[str, np.ndarray]:
  """Loads each feature file and returns its rows in new-item-id order."""
  out = {}
  for name, path in features.items():
    path = Path(path)
    _require_file(path, f"an (items x dims) .npy array for modality {name}")
    arr = validate.check_features(formats.read_npy(path), path)
    if row_ids is not None and arr.shape[0] != row_ids.shape[0]:
      raise error(path, f"{arr.shape[0]} feature rows but {row_ids_source} "
                  f"lists {row_ids.shape[0]} item ids")
    # Row r is the item whose original id is row_ids[r], or str(r).
    ids = (row_ids.tolist() if row_ids is not None
           else [str(r) for r in range(arr.shape[0])])
    index = {s: r for r, s in enumerate(ids)}
    rows = np.asarray([index.get(s, -1) for s in item_ids.tolist()], np.int64)
    missing = np.flatnonzero(rows < 0)
    if missing.size:
      how = (f"not listed in {row_ids_source}" if row_ids is not None else
             f"row index = item id, {arr.shape[0]} rows; pass --item_ids to "
             "name the item of each row")
      raise error(path, f"no feature row for item {str(item_ids[missing[0]])!r} "
                  f"({missing.size} of {item_ids.size} items without "
                  f"features; {how})")
    out[name] = np.ascontiguousarray(arr[rows])
  return out


def _check_modality_names(names: Sequence[str]) -> None:
  seen = set()
  for m in names:
    if not formats._MODALITY.fullmatch(m):  # pylint: disable=protected-access
      raise ValueError(f"bad modality name {m!r} in --features (letters, "
                       "digits, _ . - only)")
    if m in seen:
      raise ValueError(f"modality {m!r} given twice in --features")
    seen.add(m)


def prepare(interactions: str | os.PathLike, *,
            features: Mapping[str, str | os.PathLike] | None = None,
            item_ids: str | os.PathLike | None = None,
            user_col: str = "user", item_col: str = "item",
            time_col: str = "timestamp", sep: str = "auto", kcore: int = 5,
            split: str = "random", seed: int = 123,
            name: str = "dataset") -> Prepared:
  """Reads, deduplicates, k-core filters, remaps and splits an interaction log.

  See the module docstring for each step. `time_col` is only read (and then
  required) for `split='chronological'`.

  Returns:
    The in-memory dataset (`write_prepared` validates and writes it), the
    original ids of the new users and items, and counts for `describe`.

  Raises:
    DataError: bad input data (one line naming the file).
    ValueError: bad arguments.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
  if kcore < 0:
    raise ValueError(f"kcore must be >= 0, got {kcore}")
  features = dict(features or {})
  _check_modality_names(list(features))
  source = Path(interactions)
  chrono = split == "chronological"
  raw = read_interactions(source, user_col=user_col, item_col=item_col,
                          time_col=time_col if chrono else None, sep=sep)
  user_names, user_codes = np.unique(raw.users, return_inverse=True)
  item_names, item_codes = np.unique(raw.items, return_inverse=True)
  user_codes, item_codes = user_codes.reshape(-1), item_codes.reshape(-1)
  for kind, names_ in (("user", user_names), ("item", item_names)):
    bad = np.zeros(names_.shape, bool)
    for ch in "\t\n\r":
      bad |= np.char.find(names_, ch) >= 0
    if bad.any():
      raise error(source, f"{kind} id {str(names_[np.argmax(bad)])!r} contains "
                  "a tab or line break (the mapping files could not hold it)")

  # Deduplicate: keep the first row, or the earliest one when splitting by time.
  pair = user_codes.astype(np.int64) * item_names.size + item_codes
  order = (np.lexsort((np.arange(pair.size), raw.times)) if chrono
           else np.arange(pair.size))
  _, first = np.unique(pair[order], return_index=True)
  keep = np.sort(order[first])
  user_codes, item_codes = user_codes[keep], item_codes[keep]
  times = raw.times[keep] if chrono else None

  alive = kcore_mask(user_codes, item_codes, kcore)
  if not alive.any():
    raise error(source, f"no interactions survive the {kcore}-core filter "
                f"({user_names.size} users, {item_names.size} items, "
                f"{keep.size} distinct interactions before it)")
  # Codes are ranks of the sorted id strings, so re-ranking the survivors
  # keeps the new ids in original-id string order.
  kept_users, users = np.unique(user_codes[alive], return_inverse=True)
  kept_items, items = np.unique(item_codes[alive], return_inverse=True)
  users, items = users.reshape(-1), items.reshape(-1)
  new_user_ids, new_item_ids = user_names[kept_users], item_names[kept_items]

  train, val, test = split_interactions(
      users, items, kept_users.size, method=split, seed=seed,
      times=times[alive] if chrono else None)
  if len(val) == 0 or len(test) == 0:
    raise error(source, f"no user has {MIN_SPLIT_ITEMS} or more interactions, "
                "so the val and test splits would be empty")

  row_ids = read_item_ids(item_ids) if item_ids is not None else None
  modalities = _reorder_features(features, new_item_ids, row_ids,
                                 str(item_ids) if item_ids else "")
  ds = Dataset(name=name, n_users=int(kept_users.size),
               n_items=int(kept_items.size), train=train, val=val, test=test,
               modalities=modalities)
  counts = {"rows": pair.size, "users": user_names.size,
            "items": item_names.size, "distinct": keep.size,
            "kept": int(alive.sum())}
  return Prepared(ds, new_user_ids, new_item_ids, counts)


# ----------------------------------------------------------------------------
# Writing and reporting


def _write_mapping(path: Path, ids: np.ndarray) -> None:
  lines = [MAPPING_HEADER] + [f"{s}\t{i}" for i, s in enumerate(ids.tolist())]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_prepared(prepared: Prepared, output: str | os.PathLike, *,
                   format: str = "mmssl") -> Path:  # pylint: disable=redefined-builtin
  """Writes the dataset (mmssl or mmrec layout) and the two id mappings."""
  writers = {"mmssl": formats.write_mmssl, "mmrec": formats.write_mmrec}
  if format not in writers:
    raise ValueError(f"unknown format {format!r} (choose from mmssl, mmrec)")
  check_output_folder(output)
  out = writers[format](prepared.dataset, output)
  _write_mapping(out / "user_mapping.tsv", prepared.user_ids)
  _write_mapping(out / "item_mapping.tsv", prepared.item_ids)
  return out


def statistics_row(ds: Dataset) -> str:
  """`| name | users | items | interactions | sparsity | modalities (dim) |`.

  Interactions are train + val + test; sparsity is 1 - interactions /
  (users * items) in percent with 3 decimals, as in the MMSSL README table.
  """
  n = len(ds.train) + len(ds.val) + len(ds.test)
  sparsity = 100.0 * (1.0 - n / (ds.n_users * ds.n_items))
  dims = ", ".join(f"{m} {d}" for m, d in ds.modality_dims.items()) or "none"
  return (f"| {ds.name} | {ds.n_users:,} | {ds.n_items:,} | {n:,} | "
          f"{sparsity:.3f}% | {dims} |")


# ----------------------------------------------------------------------------
# Command line

def define_flags() -> dict[str, flags.FlagHolder]:
  """Defines the command-line flags (only when run as a program, so importing
  this module next to other CLIs cannot clash on names like --output)."""
  return {
      "interactions": flags.DEFINE_string(
          "interactions", None, "CSV/TSV interaction log with a header line.",
          required=True),
      "output": flags.DEFINE_string(
          "output", None, "Folder to write; must be new or empty.",
          required=True),
      "features": flags.DEFINE_list(
          "features", [], "Item features as name:path.npy,... (written as "
          "<name>_feat.npy); rows follow --item_ids."),
      "item_ids": flags.DEFINE_string(
          "item_ids", None, "Text file, one original item id per line: row r "
          "of every feature file is line r. Default: row r is item id 'r'."),
      "user_col": flags.DEFINE_string("user_col", "user", "User id column."),
      "item_col": flags.DEFINE_string("item_col", "item", "Item id column."),
      "time_col": flags.DEFINE_string(
          "time_col", "timestamp", "Timestamp column (numbers or ISO dates); "
          "read only for --split=chronological."),
      "sep": flags.DEFINE_string(
          "sep", "auto", "Field separator: auto (tab if the header has one, "
          "else comma), tab, comma, semicolon or one character."),
      "kcore": flags.DEFINE_integer(
          "kcore", 5, "Keep users and items with at least this many "
          "interactions (iterated until stable).", lower_bound=0),
      "split": flags.DEFINE_enum("split", "random", list(SPLITS),
                                 "Which items each user holds out."),
      "seed": flags.DEFINE_integer("seed", 123, "Seed of the random split."),
      "cold_items": flags.DEFINE_float(
          "cold_items", 0.0, "Fraction of the items to hold out of training "
          "as new items (`data/cold_start.py`; cold_items.txt lists them); "
          "0 = none.", lower_bound=0.0, upper_bound=1.0),
      "cold_seed": flags.DEFINE_integer(
          "cold_seed", 0, "Seed of the held-out items."),
      "format": flags.DEFINE_enum("format", "mmssl", ["mmssl", "mmrec"],
                                  "Output layout."),
      "name": flags.DEFINE_string(
          "name", None, "Dataset name for the statistics (and the mmrec "
          "file); default: the output folder's name."),
  }


def _parse_features(specs: Sequence[str]) -> dict[str, str]:
  out = {}
  for spec in specs:
    name, colon, path = spec.partition(":")
    if not colon or not name or not path:
      raise ValueError(f"--features entries must be name:path.npy, got {spec!r}")
    if name in out:
      raise ValueError(f"modality {name!r} given twice in --features")
    out[name] = path
  return out


def main(argv: Sequence[str], f: dict[str, flags.FlagHolder]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  output = Path(f["output"].value)
  try:
    check_output_folder(output)
    prepared = prepare(
        f["interactions"].value,
        features=_parse_features(f["features"].value),
        item_ids=f["item_ids"].value, user_col=f["user_col"].value,
        item_col=f["item_col"].value, time_col=f["time_col"].value,
        sep=f["sep"].value, kcore=f["kcore"].value, split=f["split"].value,
        seed=f["seed"].value,
        name=f["name"].value or Path(os.path.abspath(output)).name)
    if f["cold_items"].value:
      prepared = prepared._replace(dataset=cold_start.hold_out_items(
          prepared.dataset, f["cold_items"].value, f["cold_seed"].value))
    write_prepared(prepared, output, format=f["format"].value)
  except (DataError, ValueError, OSError) as e:
    return print_error(e)
  print(TABLE_HEADER)
  print(statistics_row(prepared.dataset))
  print(describe(prepared, f["kcore"].value))
  return 0


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
