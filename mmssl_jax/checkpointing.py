r"""Checkpoints: the train state as flat arrays in an orbax CheckpointManager.

`<workdir>/checkpoints/<step>/` holds, for the global step `step` (steps
done): `state/`, every array of the `TrainState` (both parameter sets, both
optimiser states, critic batch statistics, modality graphs and their
accumulation buffers, the step and the PRNG key, which is also the
sampler's state), flattened to `{'0000': array, ...}` in `jax.tree.flatten`
order; and `meta/`, JSON host state (`CheckpointMeta`): epoch, batch index
within the epoch, the partial epoch's per-step loss terms, the
early-stopping counter, the best validation/test metrics so far, the last
epoch record and the leaf paths/shapes/dtypes.

Checkpoints are written at the end of every epoch (after evaluation) and at
the step boundary where SIGTERM/SIGINT arrives. Orbax writes each one to a
temporary folder and renames it when complete, so a crash never leaves a
partial checkpoint under a step's name (see Faults for the folder it does
leave). The last `train.checkpoint_keep` (default 3) checkpoints are kept,
plus the best-validation one. A checkpoint is never written from a state
with a NaN/inf array (`check_finite`).

Faults (docs/checkpoints.md). The meta holds a CRC-32 of every array and a
digest of itself, so a damaged checkpoint fails to restore instead of
restoring wrong values. `restore_first` tries checkpoints in order and sets
each unreadable one aside (`<step>.unreadable`, moved, never deleted; a
read-only store skips it), with a one-line warning; opening a writable
store sets aside the folders of saves that never finished
(`<step>.orbax-checkpoint-tmp*` -> `<step>.partial`). A save that fails
raises `CheckpointWriteError` naming the checkpoint and the cause. In
multi-process runs nothing is moved: an unreadable checkpoint is an error.

Multi-process runs (`jax.distributed`; `mmssl_jax.multihost`). The state of
a run on a mesh is saved as the global arrays it is
(`state_to_global_arrays`, no host copy): every process calls `save` and
`restore` on the same step, orbax's CheckpointManager coordinates them
(barriers; each array shard written once, metadata and `meta/` by process
0) and restores every array straight into the target state's shardings.
The workdir must therefore be on a file system every process sees and
mounts at the same path (NFS, a cluster file system, a bucket mounted with
gcsfuse; not a gs:// URL: config.json and metrics.jsonl use plain file I/O).

Determinism. On CPU a run is a pure function of its config and seed: the
same config gives bit-identical metrics and parameters, and a run stopped at
any step boundary and resumed gives bit-identical metrics.jsonl records
(except the timing fields `workdir.TIMING_FIELDS`) and parameters
(`tests/test_checkpointing.py`). On GPU, XLA implements scatter-add (segment
sums, the gradients of embedding gathers with repeated users, and the CSR
products, which JAX lowers to gathers and segment sums on GPU unless
`jax_bcoo_cusparse_lowering` is set) with atomics whose summation order
varies from run to run, so losses and parameters drift apart at float
rounding level and the trajectories diverge slowly. The XLA flag
`--xla_gpu_deterministic_ops=true` makes those ops deterministic (at some
speed cost); set `train.deterministic=True` and `mmssl_jax.main` adds it to
XLA_FLAGS before JAX initialises (it does nothing on CPU). The GPU claim
follows from XLA's documentation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Iterator
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax.state import is_prng_key
from mmssl_jax.workdir import ConfigMismatchError
from mmssl_jax.workdir import checkpoint_steps  # noqa: F401 (kept name)

FORMAT_VERSION = 1
_BEST_METRIC = "val_score"


def _orbax():
  """orbax.checkpoint, imported on first use (it takes ~1 s to import, which
  the CLI's bad-input path does not need)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


@contextlib.contextmanager
def quiet_orbax(min_level: int = std_logging.WARNING) -> Iterator[None]:
  """Drops orbax's log records below `min_level` inside the block.

  Orbax logs a dozen INFO lines per save, and warns when a checkpoint
  folder is opened read-only; the run's log and the CLIs' stderr keep only
  what needs attention.
  """
  logger = logging.get_absl_logger()
  # Orbax also logs the traceback of an error it raises to us (a failed
  # save or restore); the caller reports that error in one line.
  drop = lambda record: not ("orbax" in (record.pathname or "")
                             and (record.levelno < min_level
                                  or record.exc_info is not None))
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


# ----------------------------------------------------------------------------
# State <-> flat arrays


def leaf_paths(tree) -> list[str]:
  """`jax.tree_util.keystr` of every leaf, in flatten order."""
  return [jax.tree_util.keystr(p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _leaf_name(i: int) -> str:
  return f"{i:04d}"


def state_to_arrays(state) -> dict[str, np.ndarray]:
  """Host copies of every leaf, keyed by flatten index; typed PRNG keys are
  stored as their raw `key_data` (uint32)."""
  leaves = jax.tree.leaves(state)
  leaves = [jax.random.key_data(x) if is_prng_key(x) else x for x in leaves]
  host = jax.device_get(leaves)
  return {_leaf_name(i): np.asarray(x) for i, x in enumerate(host)}


def leaf_specs(state) -> list[list]:
  """[path, shape, dtype] per leaf (keys as their key data), for checks."""
  out = []
  for path, x in zip(leaf_paths(state), jax.tree.leaves(state)):
    if is_prng_key(x):
      x = jax.random.key_data(x)
    out.append([path, list(x.shape), str(x.dtype)])
  return out


def arrays_to_state(arrays: dict[str, Any], target):
  """Rebuilds a state with `target`'s structure, dtypes and key types.

  Arrays go to the default device uncommitted, like a freshly initialised
  state, so the jitted step and evaluation are not compiled again for
  committed inputs.
  """
  leaves, treedef = jax.tree.flatten(target)
  out = []
  for i, like in enumerate(leaves):
    value = np.asarray(arrays[_leaf_name(i)])
    if is_prng_key(like):
      out.append(jax.random.wrap_key_data(jnp.asarray(value),
                                          impl=jax.random.key_impl(like)))
    else:
      out.append(jnp.asarray(value, like.dtype))
  return jax.tree.unflatten(treedef, out)


def is_global(state) -> bool:
  """True for a state of arrays placed on a device mesh (`parallel.shard_run`:
  replicated or sharded global arrays, possibly spanning processes)."""
  return any(isinstance(x, jax.Array)
             and isinstance(x.sharding, jax.sharding.NamedSharding)
             for x in jax.tree.leaves(state))


def state_to_global_arrays(state) -> dict[str, jax.Array]:
  """Every leaf as it is on its mesh (no host copy), keyed like
  `state_to_arrays`; typed PRNG keys as their key data."""
  leaves = jax.tree.leaves(state)
  return {_leaf_name(i): jax.random.key_data(x) if is_prng_key(x) else x
          for i, x in enumerate(leaves)}


def global_arrays_to_state(arrays: dict[str, jax.Array], target):
  """`arrays_to_state` for arrays restored with `target`'s shardings: they
  stay where orbax put them (each process reads its own shards)."""
  leaves, treedef = jax.tree.flatten(target)
  out = []
  for i, like in enumerate(leaves):
    value = arrays[_leaf_name(i)]
    if is_prng_key(like):
      value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    elif value.dtype != like.dtype:
      value = value.astype(like.dtype)
    out.append(value)
  return jax.tree.unflatten(treedef, out)


@jax.jit
def _finite_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_nonfinite(tree) -> str | None:
  """Path of the first floating leaf of `tree` holding NaN/inf, else None."""
  items = [(p, x) for p, x in zip(leaf_paths(tree), jax.tree.leaves(tree))
           if not is_prng_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not items:
    return None
  flags = np.asarray(_finite_flags([x for _, x in items]))
  if flags.all():
    return None
  return items[int(np.argmin(flags))][0]


def array_checksums(arrays: dict[str, Any]) -> list[str]:
  """CRC-32 of every array's bytes, in name order; [] when an array is not
  fully addressable (shards held by other processes: not checked)."""
  if not all(getattr(x, "is_fully_addressable", True)
             for x in arrays.values()):
    return []
  return [f"{zlib.crc32(np.asarray(arrays[k]).tobytes()):08x}"
          for k in sorted(arrays)]


def _digest(obj: dict[str, Any]) -> str:
  """CRC-32 of a meta's canonical JSON, without its own `digest` key."""
  body = {k: v for k, v in obj.items() if k != "digest"}
  return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def check_finite(state, step: int) -> None:
  """Raises FloatingPointError if any array of the state is NaN/inf."""
  bad = first_nonfinite(state)
  if bad is not None:
    raise FloatingPointError(
        f"non-finite values in the train state ({bad}) after step {step}; "
        "not saving a checkpoint")


# ----------------------------------------------------------------------------
# Checkpoint metadata and the orbax store


@dataclasses.dataclass
class CheckpointMeta:
  """Host state saved next to the arrays (JSON).

  epoch: the epoch in progress (batch > 0) or the next epoch to run.
  batch: batches of `epoch` already done (0 at an epoch boundary).
  epoch_terms: per-step loss terms of the partial epoch (float32 values,
    exact in JSON), so that the epoch's means are recomputed bit-identically.
  train_seconds: training time of the partial epoch so far.
  bad_evals: non-improving evaluations since the best one (early stopping).
  best: {'epoch', 'step', 'score', 'val', 'test'} at the best validation
    epoch so far (epoch -1 before any evaluation).
  last_record: the metrics.jsonl record of epoch `epoch - 1` (None before).
  leaves, checksums: [path, shape, dtype] and `array_checksums` of the saved
    arrays, checked on restore (the JSON also holds a `digest` of itself).
  """

  step: int
  epoch: int
  batch: int
  epoch_terms: dict[str, list[float]]
  train_seconds: float
  bad_evals: int
  best: dict[str, Any]
  last_record: dict[str, Any] | None
  leaves: list[list] = dataclasses.field(default_factory=list)
  checksums: list[str] = dataclasses.field(default_factory=list)
  reason: str = "epoch_end"
  version: int = FORMAT_VERSION

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> "CheckpointMeta":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in obj.items() if k in names})


class CheckpointReadError(OSError):
  """A checkpoint could not be restored: damaged, incomplete or missing
  files (the message names it; `cause`: the first line of the error)."""

  cause: str = ""


class NoReadableCheckpointError(CheckpointReadError):
  """Every checkpoint tried was unreadable (all set aside, none deleted)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, read-only folder, ...)."""


def _first_line(error: BaseException) -> str:
  """`Type: first line of the message`, without tensorstore's spec dump."""
  lines = str(error).strip().splitlines()
  if not lines:
    return type(error).__name__
  return f"{type(error).__name__}: " + re.sub(
      r"\s*\[tensorstore_spec=.*$", "", lines[0])


def _drop_failure_echoes() -> None:
  """Silences the echoes of a failed restore or save, for the process.

  When one array fails, orbax closes its event loop while tensorstore still
  completes the other reads and writes: each completion calls back into the
  closed loop (Python reports an unraisable `RuntimeError: Event loop is
  closed`, with a traceback), asyncio logs the tasks whose error nobody
  read, and orbax's threads log their tracebacks, during whatever runs
  next. Those (only those) are dropped; the failure itself is reported in
  one line. Installed when a store opens: the echoes can come from other
  threads before the failed call has even returned.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError)
            and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(
      lambda record: not str(record.msg).startswith(
          "Task exception was never retrieved"))
  # Orbax's threads log the traceback of their part of the failure, some
  # after `save` or `restore` has raised (outside `quiet_orbax`).
  logging.get_absl_logger().addFilter(
      lambda record: not ("orbax" in (record.pathname or "")
                          and record.exc_info is not None))


def _step_folders(directory: str) -> list[int]:
  """Steps of the finished checkpoint folders (plain integer names)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _free_name(directory: str, base: str) -> str:
  """`base`, or `base.1`, `base.2`, ...: the first name not in `directory`."""
  name, n = base, 0
  while os.path.lexists(os.path.join(directory, name)):
    n += 1
    name = f"{base}.{n}"
  return name


def _json_damage(step_dir: str) -> str | None:
  """What is wrong with the small JSON files orbax reads when it opens a
  checkpoint folder (before any restore), or None."""
  for rel in ("_CHECKPOINT_METADATA", os.path.join("metrics", "metrics")):
    path = os.path.join(step_dir, rel)
    if os.path.exists(path):
      try:
        with open(path, encoding="utf-8") as f:
          json.load(f)
      except (OSError, ValueError) as e:
        return f"{rel}: {_first_line(e)}"
  return None


_PARTIAL = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class _Hiding:
  """Orbax's standard step NameFormat, without the steps in `hidden` (the
  unreadable checkpoints a read-only store skips)."""

  def __init__(self, hidden: set[int]):
    self._base = _orbax().step.standard_name_format()
    self._hidden = hidden

  def build_name(self, step: int) -> str:
    return self._base.build_name(step)

  def find_all(self, base_path):
    return (m for m in self._base.find_all(base_path)
            if m.step not in self._hidden)

  def find_step(self, base_path, step: int):
    if step in self._hidden:
      raise ValueError(f"step {step} is unreadable")
    return self._base.find_step(base_path, step)


class CheckpointStore:
  """The orbax CheckpointManager of `<workdir>/checkpoints`.

  Keeps the last `keep` checkpoints plus the best-validation one (the
  checkpoints saved with a `best_score`, ranked by it). Saves are
  synchronous: the checkpoint is complete and renamed into place when `save`
  returns, so the state may be donated to the next step right after.

  Damage (single-process only): opening the store sets aside the folders of
  unfinished saves (writable store) and the checkpoints whose orbax JSON
  files do not parse; `restore_first` sets aside each checkpoint that fails
  to restore. "Aside" is a rename to `<step>.unreadable` (`.partial`), or,
  in a read-only store, skipping it; `warn` gets one line for each, and
  `unreadable` lists them. Orbax ignores folders not named by a step, so
  retention and `best_step` never see them.
  """

  def __init__(self, directory: str, *, keep: int = 3,
               read_only: bool = False,
               warn: Callable[[str], None] | None = None):
    if keep < 1:
      raise ValueError(f"train.checkpoint_keep must be >= 1, got {keep}")
    _drop_failure_echoes()
    self.directory = os.path.abspath(directory)
    self.keep, self.read_only = keep, read_only
    self.warn = warn or logging.warning
    self.unreadable: list[tuple[int, str | None]] = []  # (step, moved to)
    self._hidden: set[int] = set()
    self._tolerant = jax.process_count() == 1
    self._manager = None
    if self._tolerant and not read_only:
      self._set_aside_partial_saves()
    self._open()

  def _open(self) -> None:
    """(Re)creates the manager, so that it sees the folders as they are."""
    if self._manager is not None:
      self.close()
    if self._tolerant:
      for step in _step_folders(self.directory):
        if step in self._hidden:
          continue
        damage = _json_damage(self._path(step))
        if damage is not None:
          self._set_aside(step, damage)
    ocp = _orbax()
    managers = ocp.checkpoint_managers
    best = lambda metrics: metrics[_BEST_METRIC]
    policy = managers.AnyPreservationPolicy([
        managers.LatestN(n=self.keep),
        managers.BestN(get_metric_fn=best, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, best_fn=best, best_mode="max",
        preservation_policy=None if self.read_only else policy,
        create=not self.read_only, read_only=self.read_only,
        step_name_format=_Hiding(self._hidden) if self._hidden else None)
    with quiet_orbax():
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _set_aside_partial_saves(self) -> None:
    """Renames the folders of saves that never finished (the process died
    while orbax wrote `<step>.orbax-checkpoint-tmp*`) to `<step>.partial`."""
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      match = _PARTIAL.match(name)
      if match is None:
        continue
      aside = _free_name(self.directory, f"{match.group(1)}.partial")
      try:
        os.rename(os.path.join(self.directory, name),
                  os.path.join(self.directory, aside))
      except OSError as e:
        self.warn(f"{os.path.join(self.directory, name)}: an unfinished "
                  "save (the process stopped while writing it), ignored; "
                  f"could not move it aside ({_first_line(e)})")
        continue
      self.warn(f"{os.path.join(self.directory, name)}: an unfinished save "
                "(the process stopped while writing it); moved it aside to "
                f"{aside}")

  def _set_aside(self, step: int, reason: str, then: str = "") -> None:
    """Moves checkpoint `step` to `<step>.unreadable` (a read-only store, or
    a failed move: hides it) and warns in one line. The caller reopens."""
    path, moved, note = self._path(step), None, ""
    if not self.read_only:
      name = _free_name(self.directory, f"{step}.unreadable")
      try:
        os.rename(path, os.path.join(self.directory, name))
        moved, note = name, f"; moved it aside to {name}"
      except OSError as e:
        note = f"; skipping it (could not move it aside: {_first_line(e)})"
    if moved is None:
      self._hidden.add(step)
      note = note or "; skipping it"
    self.unreadable.append((step, moved))
    self.warn(f"checkpoint {path} is unreadable ({reason}){note}"
              + (f"; {then}" if then else ""))

  def _no_readable_message(self) -> str:
    tried = ", ".join(
        f"{step} (moved aside to {os.path.join(self.directory, moved)})"
        if moved else str(step) for step, moved in self.unreadable)
    return (f"{os.path.dirname(self.directory)}: no readable checkpoint in "
            f"{self.directory}: tried step(s) {tried or 'none (empty)'}; "
            "all unreadable, nothing was deleted; train again in a new "
            "--workdir")

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The saved step with the highest best_score (None if none has one)."""
    return self._manager.best_step()

  def ranked_steps(self) -> list[int]:
    """Every step, best first: those saved with a best_score by decreasing
    score (the newer of equals first), then the others, newest first."""
    steps = sorted(self.all_steps(), reverse=True)
    scores = {}
    for step in steps:
      metrics = self._manager.metrics(step)
      scores[step] = (metrics or {}).get(_BEST_METRIC)
    scored = sorted((s for s in steps if scores[s] is not None),
                    key=lambda s: -scores[s])
    return scored + [s for s in steps if scores[s] is None]

  def save(self, state, meta: CheckpointMeta, *,
           best_score: float | None = None) -> str:
    """Writes `state` + `meta` as checkpoint `meta.step`; returns its path.

    Raises FloatingPointError (and writes nothing) if the state holds NaN/inf,
    CheckpointWriteError if the checkpoint cannot be written (the earlier
    ones are untouched). A step that already exists is left as it is (same
    state: runs are deterministic).
    """
    check_finite(state, meta.step)
    meta.leaves = leaf_specs(state)
    path = self._path(meta.step)
    if meta.step in self.all_steps():
      return path
    # A state on a mesh is saved as global arrays: every process calls save
    # and orbax writes each shard once (replicated arrays by one replica).
    arrays = (state_to_global_arrays(state) if is_global(state)
              else state_to_arrays(state))
    meta.checksums = array_checksums(arrays)
    obj = meta.to_json()
    obj["digest"] = _digest(obj)
    metrics = None if best_score is None else {_BEST_METRIC: float(best_score)}
    # Without metrics orbax warns on every save that it tracks a best metric.
    ocp = _orbax()
    try:
      with quiet_orbax(std_logging.WARNING if metrics else std_logging.ERROR):
        self._manager.save(
            meta.step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                meta=ocp.args.JsonSave(obj)),
            metrics=metrics, force=True)
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointWriteError(self._write_failure(path, e)) from e
    return path

  def _write_failure(self, path: str, error: Exception) -> str:
    done = [s for s in _step_folders(self.directory) if s not in self._hidden]
    last = (f"the last complete checkpoint, {self._path(done[-1])}, is "
            "untouched" if done else "no checkpoint was completed")
    return (f"could not write checkpoint {path}: {_first_line(error)}; "
            f"{last}; free space or fix the permissions, then run the same "
            "command again to resume")

  def restore(self, step: int, target) -> tuple[Any, CheckpointMeta]:
    """Restores checkpoint `step` into the structure of `target`.

    Raises ConfigMismatchError if its arrays are not those of `target`,
    CheckpointReadError if it cannot be read or fails its checksums.
    """
    try:
      return self._restore(step, target)
    except (ConfigMismatchError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      cause = _first_line(e)
      if isinstance(e, json.JSONDecodeError):  # orbax's files are prescanned
        cause = f"meta/metadata: {cause}"
      error = CheckpointReadError(
          f"checkpoint {self._path(step)} is unreadable ({cause})")
      error.cause = cause
      raise error from e

  def _restore(self, step: int, target) -> tuple[Any, CheckpointMeta]:
    ocp = _orbax()
    with quiet_orbax():
      obj = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if "digest" in obj and obj["digest"] != _digest(obj):
      raise ValueError("meta/metadata does not match its digest")
    meta = CheckpointMeta.from_json(obj)
    expected = leaf_specs(target)
    if meta.leaves != expected:
      diff = _first_leaf_difference(meta.leaves, expected)
      raise ConfigMismatchError(
          f"{self._path(step)}: the checkpoint's arrays "
          f"do not match this config's train state ({diff}); a checkpoint "
          "of an older mmssl_jax version cannot be resumed: train it "
          "again in a new workdir")
    sharded = is_global(target)
    abstract = state_to_arrays_abstract(target, with_sharding=sharded)
    with quiet_orbax():
      arrays = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))["state"]
    _check_arrays(arrays, meta)
    if sharded:
      return global_arrays_to_state(arrays, target), meta
    return arrays_to_state(arrays, target), meta

  def restore_first(self, steps, target) -> tuple[int, Any, CheckpointMeta]:
    """(step, state, meta) of the first of `steps` that restores.

    Each one that fails is set aside with a warning (single-process runs;
    otherwise its CheckpointReadError is raised). Raises
    NoReadableCheckpointError when none restores; ConfigMismatchError as
    `restore` (nothing set aside).
    """
    steps = list(steps)
    for i, step in enumerate(steps):
      try:
        state, meta = self.restore(step, target)
      except CheckpointReadError as e:
        if not self._tolerant:
          raise
        self._set_aside(step, e.cause, then=(
            f"trying step {steps[i + 1]}" if i + 1 < len(steps)
            else "no other checkpoint to try"))
        self._open()
        continue
      return step, state, meta
    raise NoReadableCheckpointError(self._no_readable_message())

  def restore_latest(self, target) -> tuple[int, Any, CheckpointMeta]:
    """`restore_first` over every step, newest first."""
    return self.restore_first(sorted(self.all_steps(), reverse=True), target)

  def close(self) -> None:
    with quiet_orbax():
      self._manager.close()

  def __enter__(self) -> "CheckpointStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_arrays(arrays: dict[str, Any], meta: CheckpointMeta) -> None:
  """Raises ValueError if the restored arrays fail the saved checksums."""
  if not meta.checksums:
    return  # saved without them (an older version, or other processes')
  names = sorted(arrays)
  for i, got in enumerate(array_checksums(arrays)):
    if i < len(meta.checksums) and got != meta.checksums[i]:
      path = meta.leaves[i][0] if i < len(meta.leaves) else "?"
      raise ValueError(f"array {names[i]} ({path}) does not match its "
                       "checksum: the file holding it is damaged")


def state_to_arrays_abstract(state, *, with_sharding: bool = False
                             ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes/dtypes of `state_to_arrays(state)` without copying anything.

  with_sharding: also the leaves' shardings (a state on a mesh), so that
  orbax restores every array straight into its place on the mesh.
  """
  if with_sharding:
    return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            for name, x in state_to_global_arrays(state).items()}
  leaves = jax.tree.leaves(state)
  leaves = [jax.eval_shape(jax.random.key_data, x) if is_prng_key(x) else x
            for x in leaves]
  return {_leaf_name(i): jax.ShapeDtypeStruct(x.shape, x.dtype)
          for i, x in enumerate(leaves)}


def _first_leaf_difference(saved: list, expected: list) -> str:
  if len(saved) != len(expected):
    return f"{len(saved)} arrays saved, {len(expected)} expected"
  for s, e in zip(saved, expected):
    if s != e:
      return (f"{s[0]} saved as {s[2]}{tuple(s[1])}, expected "
              f"{e[0]} {e[2]}{tuple(e[1])}")
  return "metadata differs"
