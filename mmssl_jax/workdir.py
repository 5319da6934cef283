r"""The training workdir: its files, lock and records, and the resume decision.

A workdir holds:

  config.json      the run's config, written once when the run starts.
  metrics.jsonl    one JSON record per finished epoch, then a final record
                   (`"final": true`) when the run is complete.
  checkpoints/<step>/
                   orbax checkpoints named by the global step
                   (`mmssl_jax.checkpointing`). `<step>.unreadable` and
                   `<step>.partial` are damaged checkpoints and unfinished
                   saves set aside (docs/checkpoints.md): never steps.

Re-running the same command with the same workdir resumes from the latest
checkpoint (`inspect_workdir` decides): the fields of the new config must
equal config.json's except `RESUMABLE_FIELDS` (epochs, patience, checkpoint
and NaN-check settings), otherwise `ConfigMismatchError` lists the differing
dotted fields. A workdir with epoch records but no checkpoint is refused
(`FileExistsError`); a workdir whose metrics.jsonl ends with a final record is
a complete run: the stored final result is returned (the CLI exits 0) and
nothing is trained, unless the new config lets it go on (`extends_run`: more
`train.epochs` than it ran, and not early-stopped under the new
`eval.patience`); then it resumes from its last checkpoint and its final
record is replaced when it ends.

One process trains in a workdir at a time (`WorkdirLock`). In multi-process
runs process 0 alone reads the workdir and writes config.json and
metrics.jsonl; its decisions reach the others (`multihost.on_primary`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections

from mmssl_jax import config_lib

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
# Fields of metrics.jsonl records that depend on wall time, not on the run.
TIMING_FIELDS = ("train_seconds", "eval_seconds")
# Config fields that may differ between a run and its resumption; every other
# field changes the computation (or its shapes) and must match config.json.
RESUMABLE_FIELDS = (
    "train.epochs",
    "train.checkpoint_keep",
    "train.nan_check_every_steps",
    "train.deterministic",
    "train.tensorboard",
    "eval.patience",
    "eval.block_users",
    "data.name",  # names the default folder; data.dir holds the one used
    "data.expected_files",  # a description, in configs of older versions
)


class ConfigMismatchError(ValueError):
  """The config differs from the one of the run stored in the workdir."""


class WorkdirBusyError(FileExistsError):
  """Another process is training in the workdir (`WorkdirLock`)."""


class WorkdirLock:
  """An exclusive `fcntl.flock` on the workdir folder, held while training.

  A second `python -m mmssl_jax.main` on the same workdir (on this host, or
  on a file system whose locks reach every host) fails at once with
  WorkdirBusyError instead of interleaving checkpoints and records with
  the first. The lock is on the folder itself (no lock file) and goes with
  the process, so a crash never leaves a stale one.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only
    fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise WorkdirBusyError(
          f"{self.workdir}: another process is training in this workdir; "
          "wait for it to end or choose another --workdir") from None
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps in `<workdir>/checkpoints` (no orbax needed).

  Orbax names a finished checkpoint by its step and writes unfinished ones
  under a temporary name, so only plain integer folder names count (not the
  `<step>.unreadable` / `<step>.partial` folders set aside after faults).
  """
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


# ----------------------------------------------------------------------------
# metrics.jsonl


def read_records(path: str) -> list[dict[str, Any]]:
  """The JSON records of a metrics.jsonl; a torn last line is ignored."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  records = []
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if n == len(lines) - 1:  # interrupted while writing the last line
        break
      raise FileExistsError(f"{path}: line {n + 1} is not JSON; the workdir "
                            "holds a damaged run") from None
  return records


def write_records(path: str, records: list[dict[str, Any]]) -> None:
  """Replaces metrics.jsonl atomically (temporary file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append_record(path: str, record: dict[str, Any]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()


def resume_records(path: str, epoch: int,
                   last_record: dict[str, Any] | None) -> list[dict[str, Any]]:
  """Makes metrics.jsonl hold exactly the records of epochs before `epoch`.

  `epoch` and `last_record` come from the checkpoint resumed from
  (`CheckpointMeta`). Records of later epochs (logged after the checkpoint by
  a run that then died) are dropped; the record of epoch `epoch - 1`, saved
  in the checkpoint, is restored if the run died between saving the
  checkpoint and logging it. Returns the records kept.
  """
  records = [r for r in read_records(path)
             if "final" not in r and r.get("epoch", math.inf) < epoch]
  if last_record is not None and (
      not records or records[-1]["epoch"] < last_record["epoch"]):
    records.append(last_record)
  epochs = [r["epoch"] for r in records]
  if epochs != list(range(epoch)):
    raise FileExistsError(
        f"{path}: holds epochs {epochs[:5]}{'...' if len(epochs) > 5 else ''} "
        f"but the latest checkpoint is at epoch {epoch}; the workdir "
        "holds a damaged run")
  write_records(path, records)
  return records


# ----------------------------------------------------------------------------
# config.json


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as config.json stores it (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(obj, dict) and obj:
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


_ABSENT = object()
# Folders named in a config: the same folder spelt another way (relative to
# the working directory, absolute, through a symlink) is no difference.
_PATH_FIELDS = ("data.dir",)


def _same_path(a, b) -> bool:
  return (isinstance(a, str) and isinstance(b, str) and bool(a) and bool(b)
          and os.path.realpath(a) == os.path.realpath(b))


def config_differences(saved: dict[str, Any], new: dict[str, Any],
                       ignore=RESUMABLE_FIELDS) -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, new value) for fields that differ.

  Fields in `ignore` (and their sub-fields) are skipped; a field present in
  only one config differs (value `None` stands for absent in messages),
  except a field added to the library after the run was saved: absent from
  `saved` and equal to its `config_lib.base_config()` default in `new`, it
  cannot have changed the run. `data.dir` differs only if the two paths name
  different folders (relative paths resolve against the working directory).
  """
  a, b = _flatten(saved), _flatten(new)
  defaults = _flatten(json.loads(config_lib.base_config().to_json()))
  skip = lambda k: any(k == f or k.startswith(f + ".") for f in ignore)
  out = []
  for key in sorted(set(a) | set(b)):
    if skip(key):
      continue
    va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
    if va is _ABSENT and key in defaults and vb == defaults[key]:
      continue
    if key in _PATH_FIELDS and _same_path(va, vb):
      continue
    if va != vb:
      out.append((key, None if va is _ABSENT else va,
                  None if vb is _ABSENT else vb))
  return out


def _describe(differences, limit: int = 8) -> str:
  shown = [f"{k} {json.dumps(a)} -> {json.dumps(b)}"
           for k, a, b in differences[:limit]]
  more = len(differences) - limit
  return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _tuples(value):
  """JSON lists back to the tuples a config holds."""
  if isinstance(value, dict):
    return {k: _tuples(x) for k, x in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(x) for x in value)
  return value


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """The run's config from config.json, with the fields it lacks filled in.

  A field added to a config section (`train.item_parallel`, ...) after the
  run was saved takes its `base_config()` default, which is what that run
  computed (`config_differences`), so code reads every field directly.
  Only the fields of the top-level sections are filled in: dict-valued
  fields (`data.synthetic.modality_dims`) are the run's own.
  """
  with open(path, encoding="utf-8") as f:
    saved = _tuples(json.load(f))
  for name, default in config_lib.base_config().items():
    if name not in saved:
      saved[name] = default
    elif isinstance(default, ml_collections.ConfigDict):
      for key, value in default.items():
        saved[name].setdefault(key, value)
  return ml_collections.ConfigDict(saved)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------
# Starting, resuming or not training again


@dataclasses.dataclass
class WorkdirStatus:
  """What `train_and_evaluate` should do with a workdir.

  kind: 'new' (start; nothing of value there), 'resume' (latest checkpoint
    at `latest_step`; `final` is set when it extends a complete run) or
    'complete' (`final` is the stored final record, `reason` why it does
    not go on).
  changed: allowed config differences from config.json (RESUMABLE_FIELDS).
  """

  kind: str
  latest_step: int | None = None
  final: dict[str, Any] | None = None
  changed: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)
  reason: str = ""  # 'complete': why it does not go on (`why_complete`)


def _evals_since_best(records: list[dict[str, Any]]) -> int:
  final = records[-1]
  return sum(1 for r in records[:-1]
             if r.get("epoch", -1) > final["best_epoch"]
             and any(k.startswith("val/") for k in r))


def extends_run(records: list[dict[str, Any]],
                config: ml_collections.ConfigDict) -> bool:
  """Whether a complete run (`records` end with its final record) would go on
  under `config`: it ran fewer than `config.train.epochs` epochs and its
  evaluations since the best one are at most `config.eval.patience` (the
  train loop's stopping rule), so raising either continues it."""
  return (records[-1]["epochs"] < int(config.train.epochs)
          and _evals_since_best(records) <= int(config.eval.patience))


def why_complete(records: list[dict[str, Any]],
                 config: ml_collections.ConfigDict) -> str:
  """Why a complete run does not go on under `config`, and how it would."""
  final, since = records[-1], _evals_since_best(records)
  if since > int(config.eval.patience):
    return (f"early-stopped: {since} evaluations without improvement > "
            f"eval.patience {int(config.eval.patience)}; a larger "
            "--config.eval.patience (and train.epochs) continues it")
  return (f"it ran train.epochs = {final['epochs']}; a larger "
          "--config.train.epochs continues it")


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(_tuples(json.load(f)))
  except (OSError, ValueError) as e:
    raise FileExistsError(f"{path}: unreadable ({e}); the workdir holds a "
                          "damaged run; choose a new --workdir") from None


def inspect_workdir(workdir: str, config: ml_collections.ConfigDict
                    ) -> WorkdirStatus:
  """Decides between a new run, a resumption and a complete run (read-only).

  Raises:
    ConfigMismatchError: config.json differs from `config` in a field outside
      RESUMABLE_FIELDS; the message lists the fields.
    FileExistsError: the workdir holds epoch records but no checkpoint, or
      checkpoints without config.json, or a damaged file.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"{workdir}: --workdir exists and is not a folder")
  config_path = os.path.join(workdir, CONFIG_FILE)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  steps = checkpoint_steps(workdir)
  records = read_records(metrics_path)
  if not os.path.exists(config_path):
    if steps or records:
      raise FileExistsError(
          f"{workdir} holds a run ({'checkpoints' if steps else METRICS_FILE}) "
          f"but no {CONFIG_FILE}; choose a new --workdir")
    return WorkdirStatus("new")
  saved = config_to_json(_saved_config(workdir))
  all_diffs = config_differences(saved, config_to_json(config), ignore=())
  diffs = config_differences(saved, config_to_json(config))
  if diffs:
    raise ConfigMismatchError(
        f"{config_path}: the config differs from the run in this workdir in "
        f"{len(diffs)} field(s): {_describe(diffs)}; use the run's config or "
        "a new --workdir")
  changed = [d for d in all_diffs if d not in diffs]
  final = records[-1] if records and records[-1].get("final") else None
  if final is not None and not (steps and extends_run(records, config)):
    reason = (why_complete(records, config) if steps else
              "it has no checkpoint to continue from")
    return WorkdirStatus("complete", steps[-1] if steps else None,
                         final=final, changed=changed, reason=reason)
  if steps:
    # `final` here: the complete run this resumption extends, if any.
    return WorkdirStatus("resume", steps[-1], changed=changed, final=final)
  if records:
    raise FileExistsError(
        f"{metrics_path} holds {len(records)} epoch record(s) but "
        f"{os.path.join(workdir, CHECKPOINT_DIR)} has no checkpoint, so the "
        "run cannot be resumed; choose a new --workdir")
  return WorkdirStatus("new", changed=changed)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict,
                    lock: WorkdirLock | None = None) -> None:
  """Creates `workdir` and writes config.json; refuses to overwrite a run.

  `inspect_workdir` decides whether to start, resume or stop; this is the
  start: it raises FileExistsError if the workdir holds epoch records or
  checkpoints. `lock` (not yet held) is acquired on the new folder before
  the check, so that of two processes starting the same new workdir one
  trains and the other stops.
  """
  os.makedirs(workdir, exist_ok=True)
  if lock is not None and not lock.held:
    lock.acquire()
  if (read_records(os.path.join(workdir, METRICS_FILE))
      or checkpoint_steps(workdir)):
    raise FileExistsError(
        f"{os.path.join(workdir, METRICS_FILE)} exists: workdir holds an "
        "earlier run; choose a new --workdir")
  write_config(workdir, config)
  write_records(os.path.join(workdir, METRICS_FILE), [])
