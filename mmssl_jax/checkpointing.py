r"""Checkpoints, exact resume, preemption and workdir safety.

A workdir holds:

  config.json      the run's config, written once when the run starts.
  metrics.jsonl    one JSON record per finished epoch, then a final record
                   (`"final": true`) when the run is complete.
  checkpoints/<step>/
                   orbax checkpoints named by the global step (steps done):
                   `state/` holds every array of the `TrainState` (both
                   parameter sets, both optimiser states, critic batch
                   statistics, modality graphs and their accumulation
                   buffers, the step and the PRNG key, which is also the
                   sampler's state), flattened to `{'0000': array, ...}` in
                   `jax.tree.flatten` order; `meta/` is JSON host state
                   (`CheckpointMeta`): epoch, batch index within the epoch,
                   the partial epoch's per-step loss terms, the early-stopping
                   counter, the best validation/test metrics so far, the last
                   epoch record and the leaf paths/shapes/dtypes.

Checkpoints are written at the end of every epoch (after evaluation) and at
the step boundary where SIGTERM/SIGINT arrives. Orbax writes each one to a
temporary folder and renames it when complete, so a crash never leaves a
partial checkpoint behind. The last `train.checkpoint_keep` (default 3)
checkpoints are kept, plus the best-validation one. A checkpoint is never
written from a state with a NaN/inf array (`check_finite`).

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

Multi-process runs (`jax.distributed`; `mmssl_jax.multihost`). The state
of a sharded run (`parallel.shard_run`) is saved as the global arrays it is
(`state_to_global_arrays`, no host copy): every process calls `save` and
`restore` on the same step, orbax's CheckpointManager coordinates them
(barriers; each array shard written once, metadata and `meta/` by process
0) and restores every array straight into the target state's shardings.
The workdir must therefore be on a file system every process sees and
mounts at the same path (NFS, a cluster file system, a bucket mounted with
gcsfuse; not a gs:// URL: config.json and metrics.jsonl use plain file I/O);
with a per-host local disk the processes would see different checkpoints.
Process 0 alone reads the workdir to decide between new/resume/complete
(`inspect_workdir`) and writes config.json and metrics.jsonl; the decision
and its errors reach the other processes (`multihost.on_primary`).
`PreemptionGuard.agree` makes every process stop at the same step boundary
when any of them receives SIGTERM/SIGINT, so the collective save cannot
deadlock. A sharded checkpoint holds the state without CSR fields;
`restore_run` rebuilds such a run on a 1-device mesh of the loading
process, so recommend/export read checkpoints of any mesh.

Determinism. On CPU a run is a pure function of its config and seed: the
same config gives bit-identical metrics and parameters, and a run stopped at
any step boundary and resumed gives bit-identical metrics.jsonl records
(except the timing fields `TIMING_FIELDS`) and parameters
(`tests/test_checkpointing.py`). On GPU, XLA implements scatter-add (segment
sums, the gradients of embedding gathers with repeated users, and the CSR
products, which JAX lowers to gathers and segment sums on GPU unless
`jax_bcoo_cusparse_lowering` is set) with atomics whose summation order
varies from run to run, so losses and parameters drift apart at float
rounding level and the trajectories diverge slowly. The XLA flag
`--xla_gpu_deterministic_ops=true` makes those ops deterministic (at some
speed cost); set `train.deterministic=True` and `mmssl_jax.main` adds it to
XLA_FLAGS before JAX initialises (it must be set before the first JAX
computation; it does nothing on CPU). The GPU claim follows from XLA's
documentation and was not measured here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
from typing import Any, Iterator, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmssl_jax import multihost

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
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
    "data.expected_files",
)
_BEST_METRIC = "val_score"


def _orbax():
  """orbax.checkpoint, imported on first use (it takes ~1 s to import, which
  the CLI's bad-input path does not need)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


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


class Preempted(Exception):
  """Training stopped by a signal after saving a checkpoint.

  `exit_code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT),
  the shell convention for a process ended by that signal.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


# ----------------------------------------------------------------------------
# Preemption


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries.

  Use as a context manager around the training loop (main thread only;
  elsewhere it installs nothing). The first signal sets `signum` and restores
  the previous handlers, so a second signal acts as usual (SIGINT raises
  KeyboardInterrupt, SIGTERM terminates) if the save hangs.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def _handler(self, signum, frame):
    del frame
    self.signum = signum
    self._restore()

  def _restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def agree(self) -> bool:
    """`requested`, agreed by all processes (a collective in multi-process
    runs: every process must call it at the same step boundary).

    A process that received no signal takes the one another process
    received, so every process stops, saves the same checkpoint (orbax saves
    are collective) and raises `Preempted` with the same exit status.
    """
    signum = multihost.agree_signal(self.signum)
    if signum is not None and self.signum is None:
      self.signum = signum
    return self.requested


# ----------------------------------------------------------------------------
# State <-> flat arrays


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


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
  leaves = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
  host = jax.device_get(leaves)
  return {_leaf_name(i): np.asarray(x) for i, x in enumerate(host)}


def leaf_specs(state) -> list[list]:
  """[path, shape, dtype] per leaf (keys as their key data), for checks."""
  out = []
  for path, x in zip(leaf_paths(state), jax.tree.leaves(state)):
    if _is_key(x):
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
    if _is_key(like):
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
  return {_leaf_name(i): jax.random.key_data(x) if _is_key(x) else x
          for i, x in enumerate(leaves)}


def global_arrays_to_state(arrays: dict[str, jax.Array], target):
  """`arrays_to_state` for arrays restored with `target`'s shardings: they
  stay where orbax put them (each process reads its own shards)."""
  leaves, treedef = jax.tree.flatten(target)
  out = []
  for i, like in enumerate(leaves):
    value = arrays[_leaf_name(i)]
    if _is_key(like):
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
           if not _is_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not items:
    return None
  flags = np.asarray(_finite_flags([x for _, x in items]))
  if flags.all():
    return None
  return items[int(np.argmin(flags))][0]


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
  reason: str = "epoch_end"
  version: int = FORMAT_VERSION

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> "CheckpointMeta":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in obj.items() if k in names})


@contextlib.contextmanager
def _quiet_orbax(level: int = logging.WARNING) -> Iterator[None]:
  """Orbax logs a dozen INFO lines per save; keep only its warnings."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(min(verbosity, level))
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


class CheckpointStore:
  """The orbax CheckpointManager of `<workdir>/checkpoints`.

  Keeps the last `keep` checkpoints plus the best-validation one (the
  checkpoints saved with a `best_score`, ranked by it). Saves are
  synchronous: the checkpoint is complete and renamed into place when `save`
  returns, so the state may be donated to the next step right after.
  """

  def __init__(self, directory: str, *, keep: int = 3,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f"train.checkpoint_keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    ocp = _orbax()
    managers = ocp.checkpoint_managers
    best = lambda metrics: metrics[_BEST_METRIC]
    policy = managers.AnyPreservationPolicy([
        managers.LatestN(n=keep),
        managers.BestN(get_metric_fn=best, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, best_fn=best, best_mode="max",
        preservation_policy=None if read_only else policy,
        create=not read_only, read_only=read_only)
    with _quiet_orbax():
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The saved step with the highest best_score (None if none has one)."""
    return self._manager.best_step()

  def save(self, state, meta: CheckpointMeta, *,
           best_score: float | None = None) -> str:
    """Writes `state` + `meta` as checkpoint `meta.step`; returns its path.

    Raises FloatingPointError (and writes nothing) if the state holds NaN/inf.
    A step that already exists is left as it is (same state: runs are
    deterministic).
    """
    check_finite(state, meta.step)
    meta.leaves = leaf_specs(state)
    path = os.path.join(self.directory, str(meta.step))
    if meta.step in self.all_steps():
      return path
    # A state on a mesh is saved as global arrays: every process calls save
    # and orbax writes each shard once (replicated arrays by one replica).
    arrays = (state_to_global_arrays(state) if is_global(state)
              else state_to_arrays(state))
    metrics = None if best_score is None else {_BEST_METRIC: float(best_score)}
    # Without metrics orbax warns on every save that it tracks a best metric.
    ocp = _orbax()
    with _quiet_orbax(logging.WARNING if metrics else logging.ERROR):
      self._manager.save(
          meta.step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(arrays),
              meta=ocp.args.JsonSave(meta.to_json())),
          metrics=metrics, force=True)
      self._manager.wait_until_finished()
    return path

  def restore(self, step: int, target) -> tuple[Any, CheckpointMeta]:
    """Restores checkpoint `step` into the structure of `target`."""
    ocp = _orbax()
    with _quiet_orbax():
      meta = CheckpointMeta.from_json(self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    expected = leaf_specs(target)
    if meta.leaves != expected:
      diff = _first_leaf_difference(meta.leaves, expected)
      raise ConfigMismatchError(
          f"{os.path.join(self.directory, str(step))}: the checkpoint's arrays "
          f"do not match this config's train state ({diff}); a checkpoint "
          "of an older mmssl_jax version cannot be resumed: train it "
          "again in a new workdir")
    sharded = is_global(target)
    abstract = state_to_arrays_abstract(target, with_sharding=sharded)
    with _quiet_orbax():
      arrays = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))["state"]
    if sharded:
      return global_arrays_to_state(arrays, target), meta
    return arrays_to_state(arrays, target), meta

  def close(self) -> None:
    with _quiet_orbax():
      self._manager.close()

  def __enter__(self) -> "CheckpointStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
  leaves = [jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
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


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps in `<workdir>/checkpoints` (no orbax needed).

  Orbax names a finished checkpoint by its step and writes unfinished ones
  under a temporary name, so only plain integer folder names count.
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


def resume_records(path: str, meta: CheckpointMeta) -> list[dict[str, Any]]:
  """Makes metrics.jsonl hold exactly the epochs before `meta.epoch`.

  Records of later epochs (logged after the checkpoint by a run that then
  died) are dropped; the record of epoch `meta.epoch - 1`, saved in the
  checkpoint, is restored if the run died between saving the checkpoint and
  logging it. Returns the records kept.
  """
  records = [r for r in read_records(path)
             if "final" not in r and r.get("epoch", math.inf) < meta.epoch]
  if meta.last_record is not None and (
      not records or records[-1]["epoch"] < meta.last_record["epoch"]):
    records.append(meta.last_record)
  epochs = [r["epoch"] for r in records]
  if epochs != list(range(meta.epoch)):
    raise FileExistsError(
        f"{path}: holds epochs {epochs[:5]}{'...' if len(epochs) > 5 else ''} "
        f"but the latest checkpoint is at epoch {meta.epoch}; the workdir "
        "holds a damaged run")
  write_records(path, records)
  return records


# ----------------------------------------------------------------------------
# Configs and workdirs


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
  from mmssl_jax import config_lib  # local: config_lib is not needed otherwise
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


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """A ConfigDict from config.json (JSON lists back to tuples)."""
  with open(path, encoding="utf-8") as f:
    obj = json.load(f)

  def convert(v):
    if isinstance(v, dict):
      return {k: convert(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(convert(x) for x in v)
    return v

  return ml_collections.ConfigDict(convert(obj))


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
  try:
    saved = load_config_json(config_path)
  except (OSError, ValueError) as e:
    raise FileExistsError(f"{config_path}: unreadable ({e}); the workdir "
                          "holds a damaged run; choose a new --workdir"
                          ) from None
  all_diffs = config_differences(config_to_json(saved), config_to_json(config),
                                 ignore=())
  diffs = config_differences(config_to_json(saved), config_to_json(config))
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


# ----------------------------------------------------------------------------
# Loading a trained run


class RestoredRun(NamedTuple):
  """A run rebuilt from its workdir.

  config: the run's config (from config.json).
  dataset: its dataset, loaded and validated again.
  run: a `train.Run` (final_embeddings, evaluate, ...).
  state: the train state of the checkpoint.
  step: the checkpoint's global step.
  meta: its CheckpointMeta (epoch, best metrics, ...).
  """

  config: ml_collections.ConfigDict
  dataset: Any
  run: Any
  state: Any
  step: int
  meta: CheckpointMeta


def restore_run(workdir: str, *, which: str | int = "best",
                data_dir: str | None = None) -> RestoredRun:
  """Loads a workdir's config, dataset and a checkpoint's train state.

  Args:
    workdir: a training workdir (config.json + checkpoints/).
    which: 'best' (best validation epoch), 'latest', or a step number.
    data_dir: overrides config.data.dir (a moved dataset folder).

  Raises:
    FileNotFoundError: no config.json or no (such) checkpoint.
    DataError: the dataset no longer loads.
    ConfigMismatchError: the dataset's shapes do not match the checkpoint.
  """
  from mmssl_jax import train  # pylint: disable=g-import-not-at-top  # cycle
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: not found; {workdir} is not a "
                            "training workdir")
  config = load_config_json(config_path)
  if data_dir is not None:
    config.data.dir = str(data_dir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"{os.path.join(workdir, CHECKPOINT_DIR)}: no checkpoint")
  store = CheckpointStore(os.path.join(workdir, CHECKPOINT_DIR),
                          read_only=True)
  try:
    if which == "best":
      step = store.best_step()
      if step is None:
        raise FileNotFoundError(
            f"{store.directory}: no checkpoint of an evaluated epoch")
    elif which == "latest":
      step = store.latest_step()
    else:
      step = int(which)
      if step not in store.all_steps():
        raise FileNotFoundError(f"{store.directory}: no checkpoint at step "
                                f"{step} (have {store.all_steps()})")
    ds = train.load_dataset(config.data)
    run = train.Run(config, ds)
    if (int(config.train.get("data_parallel", 1)) != 1
        or int(config.train.get("item_parallel", 1)) != 1):
      # A sharded run's state has no CSR fields (`parallel.shard_run`);
      # restore it as such, on a 1-device mesh of this process.
      from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
      parallel.shard_run(run, parallel.make_mesh(n_devices=1))
    state, meta = store.restore(step, run.init_state())
  finally:
    store.close()
  return RestoredRun(config, ds, run, state, step, meta)


def restore_best(workdir: str, *, data_dir: str | None = None) -> RestoredRun:
  """`restore_run(workdir, which='best')`: the best-validation checkpoint."""
  return restore_run(workdir, which="best", data_dir=data_dir)
