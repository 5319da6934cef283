r"""Top-K recommendations from a trained workdir's best checkpoint.

  python -m mmssl_jax.recommend --workdir=runs/tiktok --users=3,17,42 --k=20
  python -m mmssl_jax.recommend --workdir=runs/tiktok --users-file=users.txt \
      --format=json
  python -m mmssl_jax.recommend --workdir=runs/tiktok --all-users \
      --output=recommendations.csv

The run is rebuilt from the workdir (`restore.restore_run`: config.json,
the dataset, the best-validation checkpoint, or `--checkpoint=latest|STEP`);
the final user and item representations are computed once in eval mode
(`run.Run.final_embeddings`, no dropout), and every user's items are ranked
by the dot product score(u, i) = <u*, i*>, the score training and evaluation
rank by. A user's training items are never recommended (validation and test
items are: they are unseen by the model). Among equal scores the lower item id
comes first. A user with fewer than K unseen items gets fewer rows.

Users are scored in blocks of `--block_users` (`evaluation.topk_items`), so at
most block_users x n_items scores exist at a time, also for `--all-users`.
Blocks always have min(block_users, n_users) rows, so a user's scores do not
depend on which other users are asked for in the same command.

Output (stdout, or `--output=FILE`, never overwriting a file):
  table  (default on stdout) aligned columns `user rank item score`.
  csv    a header `user,rank,item,score`, then one row per recommendation.
  json   JSON lines: one object per user,
         {"user": 3, "items": [41, 7, ...], "scores": [2.1045, ...]}.
With `--output` and no `--format`, the file's extension decides (.csv, or
.json/.jsonl/.ndjson for JSON lines). Scores are printed with 9 significant
digits, enough to recover the float32 values exactly (the table shows 6
decimals).

New items, without retraining (`--new_items=FOLDER`, run trained with
`--config.model.cold_start=True`): FOLDER holds one `<modality>_feat.npy` per
modality of the run (its names and widths; the same number of rows N in each;
row r is new item r; `mmssl_jax.new_items`). The items are encoded by the
run's inductive item encoder (`model.encode_items`) and ranked for the users
by the same dot product. New item r has the id n_items + r in the output.
By default only the new items are candidates (K in [1, N]);
`--new_items_only=false` ranks them together with the catalogue items
(training items still excluded; K in [1, n_items + N]).

  python -m mmssl_jax.recommend --workdir=runs/tiktok --users=3,17 --k=5 \
      --new_items=new_items

Errors print one line `error: ...` on stderr and exit with status 1: a user
id that is not an integer in [0, n_users), K outside [1, n_items], a workdir
without config.json or checkpoints, a dataset that no longer loads (move it
back or pass `--data_dir`), an existing `--output`; with `--new_items` a run
without the inductive encoder, or a bad new-items folder (missing, a missing
or unknown `<modality>_feat.npy`, a wrong width, an empty file, NaN or inf,
row counts that differ: the message names the file and the first bad row).
Nothing is written on an error.
"""

from __future__ import annotations

import io
import json
import logging as std_logging
import os
import re
import sys
import tempfile
from typing import Iterator, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from mmssl_jax.data import print_error
from mmssl_jax.data.dataset import pad_lists

FORMATS = ("table", "csv", "json")
EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json",
              ".ndjson": "json"}
CSV_HEADER = "user,rank,item,score"
DEFAULT_BLOCK_USERS = 1024


class UserError(ValueError):
  """Bad command-line input (user ids, K, output); a one-line message."""


# ----------------------------------------------------------------------------
# Library


def parse_user_ids(text: str, source: str = "--users") -> list[int]:
  """User ids from comma- and/or whitespace-separated text, in order.

  Raises UserError naming the first token that is not a non-negative
  decimal integer (the range is checked later, against the dataset).
  """
  out = []
  for token in re.split(r"[\s,]+", text.strip()):
    if not token:
      continue
    if not re.fullmatch(r"[+-]?\d+", token):
      raise UserError(f"{source}: user id {token!r} is not an integer")
    value = int(token)
    if value < 0:
      raise UserError(f"{source}: user id {value} is negative (ids lie in "
                      "[0, n_users))")
    out.append(value)
  return out


def check_users(users: Sequence[int], n_users: int) -> np.ndarray:
  """The users as int32, or UserError naming the first id out of range."""
  users = np.asarray(users, np.int64).reshape(-1)
  bad = (users < 0) | (users >= n_users)
  if bad.any():
    first = int(users[int(np.argmax(bad))])
    more = int(bad.sum()) - 1
    raise UserError(
        f"unknown user id {first}{f' (and {more} more)' if more else ''}: "
        f"this run's users are 0..{n_users - 1}")
  return users.astype(np.int32)


def check_k(k: int, n_items: int, what: str = "items") -> int:
  """K, or UserError unless 1 <= K <= n_items (`what`: the candidates)."""
  if not 1 <= int(k) <= n_items:
    raise UserError(f"--k={k}: K must lie in [1, {n_items}] (the number of "
                    f"{what})")
  return int(k)


class Recommender:
  """The scores of a restored run, with its final embeddings computed once.

  Args:
    restored: a `restore.RestoredRun`.
    block_users: users scored at a time.
    new_item_emb: optional (N, d) vectors of new items (`new_items.encode`);
      new item r gets the id n_items + r.
    include_catalogue: with `new_item_emb`, rank the new items together
      with the catalogue items (training items excluded); False: only the
      new items are candidates.

  Attributes:
    user_emb, item_emb: final representations (device arrays), eval mode.
    n_users, n_items: the dataset's sizes.
    exclude: int32 (n_users, E) excluded candidates of every user (training
      items; none among new items alone), -1 padded.
    candidates: the (C, d) item vectors ranked; candidate c has the id
      c + id_offset.
  """

  def __init__(self, restored, *, block_users: int = DEFAULT_BLOCK_USERS,
               new_item_emb=None, include_catalogue: bool = False):
    if block_users < 1:
      raise UserError(f"--block_users must be >= 1, got {block_users}")
    ds = restored.dataset
    self.n_users, self.n_items = ds.n_users, ds.n_items
    self.block_users = int(block_users)
    self.user_emb, self.item_emb = restored.run.final_embeddings(
        restored.state)
    self.exclude = pad_lists([np.unique(x) for x in
                              ds.train.user_lists(ds.n_users)])
    self.candidates, self.id_offset, self.what = self.item_emb, 0, "items"
    if new_item_emb is not None:
      new = jnp.asarray(new_item_emb, self.item_emb.dtype)
      if include_catalogue:
        self.candidates = jnp.concatenate([self.item_emb, new])
        self.what = "catalogue and new items"
      else:
        self.candidates, self.id_offset = new, self.n_items
        self.exclude = np.full((self.n_users, 1), -1, np.int32)
        self.what = "new items"
    self.n_candidates = int(self.candidates.shape[0])

  def check_k(self, k: int) -> int:
    return check_k(k, self.n_candidates, self.what)

  def blocks(self, users: Sequence[int], k: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(users, item ids, scores) per block of at most `block_users` users.

    ids and scores are (b, k), best first; slots past a user's number of
    unseen items hold id -1 and score -inf.
    """
    from mmssl_jax import evaluation  # pylint: disable=g-import-not-at-top
    users = check_users(users, self.n_users)
    k = self.check_k(k)
    if not len(users):
      return
    # Every block has the same shape, min(block_users, n_users) rows (the
    # last one padded with user 0), whatever the number of users asked for:
    # the jitted top-k compiles once, and a user's scores are bit-identical
    # whether asked alone, with others or with --all-users (XLA's float
    # summation order can depend on the shape of the product).
    block = min(self.block_users, self.n_users)
    for start in range(0, len(users), block):
      chunk = users[start:start + block]
      padded = np.zeros(block, np.int32)
      padded[:len(chunk)] = chunk
      scores, ids = evaluation.topk_items(
          self.user_emb, self.candidates, jnp.asarray(padded),
          jnp.asarray(self.exclude[padded]), k=k)
      n = len(chunk)
      ids = np.asarray(ids)[:n]
      if self.id_offset:
        ids = np.where(ids >= 0, ids + self.id_offset, -1)
      yield chunk, ids, np.asarray(scores)[:n]

  def top_k(self, users: Sequence[int], k: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(item ids int32 (n, k), scores float32 (n, k)) for `users`."""
    parts = list(self.blocks(users, k))
    if not parts:
      k = self.check_k(k)
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return (np.concatenate([p[1] for p in parts]).astype(np.int32),
            np.concatenate([p[2] for p in parts]).astype(np.float32))


def recommend(restored, users: Sequence[int], k: int, *,
              block_users: int = DEFAULT_BLOCK_USERS
              ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k unseen items of `users` for a `restore.RestoredRun`.

  Args:
    restored: from `restore.restore_best(workdir)` (or `restore_run`).
    users: user ids in [0, n_users).
    k: items per user, in [1, n_items].
    block_users: users scored at a time.

  Returns:
    (item_ids, scores), int32 and float32 arrays of shape (len(users), k),
    best first by the dot product of the final embeddings; training items are
    excluded. Slots past a user's number of unseen items hold -1 and -inf.

  Raises:
    UserError (a ValueError): a user id out of range or k out of range.
  """
  return Recommender(restored, block_users=block_users).top_k(users, k)


def read_new_items(folder, restored) -> dict[str, np.ndarray]:
  """A new-items folder's features, checked against the run: modality ->
  float32 (N, d_m) (`new_items.read_new_items`; DataError naming the file
  and the first bad row)."""
  from mmssl_jax import new_items  # pylint: disable=g-import-not-at-top
  return new_items.read_new_items(folder, restored)


def rank_new_items(restored, users: Sequence[int], new_features, k: int, *,
                   include_catalogue: bool = False,
                   block_users: int = DEFAULT_BLOCK_USERS
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k new items of `users`, encoded from their features (no retraining).

  Args:
    restored: a `restore.RestoredRun` trained with `model.cold_start=True`.
    users: user ids in [0, n_users).
    new_features: modality -> (N, d_m) features of N new items, e.g. from
      `read_new_items`; row r is new item r.
    k: items per user, in [1, N] (with the catalogue, [1, n_items + N]).
    include_catalogue: False: only the new items are candidates; True: the
      new items compete with the catalogue items (training items excluded).
    block_users: users scored at a time.

  Returns:
    (item_ids, scores) as `recommend` returns them; new item r has the id
    n_items + r, catalogue items keep theirs. The score of new item r is
    u* . model.encode_items(cold_encoder, features)[r].

  Raises:
    DataError: the run has no inductive encoder (`new_items.NO_INDUCTIVE`).
    UserError (a ValueError): a user id or k out of range.
  """
  from mmssl_jax import new_items  # pylint: disable=g-import-not-at-top
  emb = new_items.encode(restored, new_features)
  return Recommender(restored, block_users=block_users, new_item_emb=emb,
                     include_catalogue=include_catalogue).top_k(users, k)


# ----------------------------------------------------------------------------
# Output


def _score_text(score: float) -> str:
  return f"{float(score):.9g}"


def _rows(users, ids, scores) -> Iterator[tuple[int, int, int, float]]:
  """(user, rank, item, score) of the real slots (id >= 0), rank from 1."""
  for u, row_ids, row_scores in zip(users, ids, scores):
    for rank, (i, s) in enumerate(zip(row_ids, row_scores), start=1):
      if i >= 0:
        yield int(u), rank, int(i), float(s)


def write_csv(stream: TextIO, users, ids, scores) -> None:
  for u, rank, i, s in _rows(users, ids, scores):
    stream.write(f"{u},{rank},{i},{_score_text(s)}\n")


def write_json_lines(stream: TextIO, users, ids, scores) -> None:
  for u, row_ids, row_scores in zip(users, ids, scores):
    keep = row_ids >= 0
    stream.write(json.dumps({
        "user": int(u), "items": [int(i) for i in row_ids[keep]],
        "scores": [float(_score_text(s)) for s in row_scores[keep]]}) + "\n")


def format_table(users, ids, scores) -> str:
  """An aligned text table, one row per (user, rank)."""
  rows = [(str(u), str(r), str(i), f"{s:.6f}")
          for u, r, i, s in _rows(users, ids, scores)]
  header = ("user", "rank", "item", "score")
  widths = [max([len(h)] + [len(row[c]) for row in rows])
            for c, h in enumerate(header)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  return "\n".join(lines) + "\n"


def resolve_format(fmt: str | None, output: str | None) -> str:
  """The output format: --format, else the extension of --output, else table."""
  if fmt:
    if fmt not in FORMATS:
      raise UserError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
    return fmt
  if output is None:
    return "table"
  ext = os.path.splitext(output)[1].lower()
  if ext not in EXTENSIONS:
    raise UserError(f"--output={output}: cannot tell the format from the "
                    "extension (.csv, .json, .jsonl); pass --format=csv|json")
  return EXTENSIONS[ext]


class _AtomicOutput:
  """A text file written to a temporary name and renamed when complete."""

  def __init__(self, path: str):
    self.path = path
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
      raise UserError(f"--output={path}: exists; refusing to overwrite it")
    if not os.path.isdir(directory):
      raise UserError(f"--output={path}: folder {directory} does not exist")
    fd, self._tmp = tempfile.mkstemp(dir=directory, prefix=".recommend-",
                                     suffix=".tmp")
    self.stream = io.open(fd, "w", encoding="utf-8", newline="\n")

  def commit(self) -> None:
    self.stream.close()
    if os.path.lexists(self.path):
      os.unlink(self._tmp)
      raise UserError(f"--output={self.path}: appeared while writing; "
                      "refusing to overwrite it")
    os.replace(self._tmp, self.path)

  def discard(self) -> None:
    if not self.stream.closed:
      self.stream.close()
    if os.path.exists(self._tmp):
      os.unlink(self._tmp)


def write_recommendations(stream: TextIO, rec: Recommender, users, k: int,
                          fmt: str) -> int:
  """Writes every user's top-k to `stream` in `fmt`; returns the user count.

  csv and json are streamed block by block; the table is aligned over all
  rows, so it is built in memory (meant for a few users).
  """
  n = 0
  if fmt == "table":
    ids, scores = rec.top_k(users, k)
    stream.write(format_table(check_users(users, rec.n_users), ids, scores))
    return len(ids)
  if fmt == "csv":
    stream.write(CSV_HEADER + "\n")
  writer = write_csv if fmt == "csv" else write_json_lines
  for chunk, ids, scores in rec.blocks(users, k):
    writer(stream, chunk, ids, scores)
    n += len(chunk)
  return n


# ----------------------------------------------------------------------------
# Command line


def parse_checkpoint(value: str) -> str | int:
  """--checkpoint: 'best', 'latest' or a step number."""
  if value in ("best", "latest"):
    return value
  if re.fullmatch(r"\d+", value or ""):
    return int(value)
  raise UserError(f"--checkpoint={value}: expected best, latest or a step "
                  "number")


def define_run_flags(flag_values: flags.FlagValues
                     ) -> dict[str, flags.FlagHolder]:
  """--workdir, --data_dir and --checkpoint: which trained run to load
  (`restore.restore_run`), shared by `recommend` and `export`."""
  fv = flag_values
  return {
      "workdir": flags.DEFINE_string(
          "workdir", None, "Training workdir (config.json + checkpoints/).",
          required=True, flag_values=fv),
      "data_dir": flags.DEFINE_string(
          "data_dir", None, "Dataset folder, if it moved since training "
          "(overrides config.data.dir).", flag_values=fv),
      "checkpoint": flags.DEFINE_string(
          "checkpoint", "best", "Which checkpoint: best (validation), latest "
          "or a step number.", flag_values=fv),
  }


def define_new_items_flag(flag_values: flags.FlagValues
                          ) -> dict[str, flags.FlagHolder]:
  """--new_items, shared by `recommend` and `export`."""
  return {"new_items": flags.DEFINE_string(
      "new_items", None, "Folder of new items' features, one "
      "<modality>_feat.npy per modality of the run (same widths, N rows "
      "each); they are encoded by the run's inductive item encoder (trained "
      "with --config.model.cold_start=True) and new item r gets the id "
      "n_items + r.", flag_values=flag_values)}


def load_new_items(restored, folder: str | None):
  """(N, d) vectors of the new items in `folder` (None: None); DataError for
  a run without the inductive encoder or a bad folder."""
  if folder is None:
    return None
  from mmssl_jax import new_items  # pylint: disable=g-import-not-at-top
  new_items.check_inductive(restored)
  return new_items.encode(restored,
                          new_items.read_new_items(folder, restored))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS
                 ) -> dict[str, flags.FlagHolder]:
  """Defines the flags on `flag_values` (the global FLAGS only when run as a
  program, so importing this module next to `mmssl_jax.main` cannot clash on
  --workdir)."""
  fv = flag_values
  f = {
      **define_run_flags(fv),
      "users": flags.DEFINE_string(
          "users", None, "User ids, comma-separated (e.g. 3,17,42).",
          flag_values=fv),
      "users_file": flags.DEFINE_string(
          "users-file", None, "File of user ids, separated by newlines, "
          "commas or spaces.", flag_values=fv),
      "all_users": flags.DEFINE_boolean(
          "all-users", False, "Recommend for every user (needs --output, or "
          "--format=csv|json for stdout).", flag_values=fv),
      "k": flags.DEFINE_integer("k", 20, "Items per user.", flag_values=fv),
      "format": flags.DEFINE_enum(
          "format", None, list(FORMATS), "Output format (default: table on "
          "stdout, or from the --output extension).", flag_values=fv),
      "output": flags.DEFINE_string(
          "output", None, "Write to this file (must not exist) instead of "
          "stdout.", flag_values=fv),
      "block_users": flags.DEFINE_integer(
          "block_users", DEFAULT_BLOCK_USERS, "Users scored at a time.",
          flag_values=fv),
      **define_new_items_flag(fv),
      "new_items_only": flags.DEFINE_boolean(
          "new_items_only", True, "With --new_items: rank only the new "
          "items (true), or the new and the catalogue items together "
          "(false).", flag_values=fv),
  }
  flags.DEFINE_alias("users_file", "users-file", flag_values=fv)
  flags.DEFINE_alias("all_users", "all-users", flag_values=fv)
  return f


def _requested_users(f) -> list[int] | None:
  """The ids of --users/--users-file (None for --all-users)."""
  given = [n for n in ("users", "users_file") if f[n].value is not None]
  if f["all_users"].value:
    if given:
      raise UserError("--all-users cannot be combined with --users or "
                      "--users-file")
    return None
  if len(given) != 1:
    raise UserError("pass exactly one of --users=ID,ID,..., "
                    "--users-file=FILE or --all-users")
  if given[0] == "users":
    users = parse_user_ids(f["users"].value)
  else:
    path = f["users_file"].value
    try:
      with open(path, encoding="utf-8") as fh:
        users = parse_user_ids(fh.read(), source=path)
    except OSError as e:
      raise UserError(f"--users-file={path}: {e.strerror or e}") from None
  if not users:
    raise UserError(f"--{given[0].replace('_', '-')}: no user ids given")
  return users


def _check_flags(f) -> tuple[list[int] | None, str, str | int]:
  """(users, format, checkpoint): the checks that need no restore."""
  from mmssl_jax import new_items  # pylint: disable=g-import-not-at-top
  users = _requested_users(f)
  output = f["output"].value
  fmt = resolve_format(f["format"].value, output)
  if users is None and fmt == "table":
    raise UserError("--all-users writes csv or json: pass --format=csv|json "
                    "or an --output ending in .csv or .jsonl")
  which = parse_checkpoint(f["checkpoint"].value)
  if f["k"].value < 1:
    raise UserError(f"--k={f['k'].value}: K must be >= 1")
  if f["block_users"].value < 1:
    raise UserError(f"--block_users={f['block_users'].value}: must be >= 1")
  if output is not None and os.path.lexists(output):
    raise UserError(f"--output={output}: exists; refusing to overwrite it")
  if f["new_items"].value is not None:
    new_items.require_folder(f["new_items"].value)
  elif f["new_items_only"].present:
    raise UserError("--new_items_only needs --new_items=FOLDER")
  return users, fmt, which


def main(argv: Sequence[str], f: dict[str, flags.FlagHolder], *,
         stdout: TextIO | None = None) -> int:
  """Runs the command for parsed flags `f`; returns the exit status."""
  if len(argv) > 1:
    return print_error(f"unexpected arguments: {' '.join(argv[1:])}")
  stdout = sys.stdout if stdout is None else stdout
  from mmssl_jax import restore  # pylint: disable=g-import-not-at-top
  from mmssl_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from mmssl_jax import workdir  # pylint: disable=g-import-not-at-top
  from mmssl_jax.data import DataError  # pylint: disable=g-import-not-at-top
  output, folder = f["output"].value, f["new_items"].value
  out = None
  try:
    users, fmt, which = _check_flags(f)  # before the (slow) restore
    restored = restore.restore_run(f["workdir"].value, which=which,
                                   data_dir=f["data_dir"].value)
    rec = Recommender(restored, block_users=f["block_users"].value,
                      new_item_emb=load_new_items(restored, folder),
                      include_catalogue=not f["new_items_only"].value)
    if users is None:
      users = range(rec.n_users)
    check_users(users, rec.n_users)
    rec.check_k(f["k"].value)
    if output is not None:
      out = _AtomicOutput(output)
      write_recommendations(out.stream, rec, users, f["k"].value, fmt)
      out.commit()
      out = None
    else:
      write_recommendations(stdout, rec, users, f["k"].value, fmt)
      stdout.flush()
  except BrokenPipeError:  # `... | head`: the reader has what it wanted
    if stdout is sys.stdout:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, sys.stdout.fileno())  # no second error at exit
    return 0
  except (UserError, DataError, run_lib.ConfigError,
          workdir.ConfigMismatchError, FileNotFoundError,
          FileExistsError, OSError, ValueError) as e:
    return print_error(e)
  finally:
    if out is not None:
      out.discard()
  return 0


def run_cli(args: Sequence[str], *, stdout: TextIO | None = None) -> int:
  """`python -m mmssl_jax.recommend ARGS` in this process (own FlagValues);
  returns the exit status. For tests and notebooks."""
  fv = flags.FlagValues()
  f = define_flags(fv)
  try:
    rest = fv(["mmssl_jax.recommend", *args])
  except flags.Error as e:
    return print_error(e)
  return main(rest, f, stdout=stdout)


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
