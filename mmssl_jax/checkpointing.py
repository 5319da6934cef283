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
partial checkpoint behind. The last `train.checkpoint_keep` (default 3)
checkpoints are kept, plus the best-validation one. A checkpoint is never
written from a state with a NaN/inf array (`check_finite`).

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
import logging as std_logging
import os
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax.state import is_prng_key
from mmssl_jax.workdir import ConfigMismatchError

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
  drop = lambda record: not ("orbax" in (record.pathname or "")
                             and record.levelno < min_level)
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
    with quiet_orbax():
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
    with quiet_orbax(std_logging.WARNING if metrics else std_logging.ERROR):
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
    with quiet_orbax():
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
    with quiet_orbax():
      arrays = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))["state"]
    if sharded:
      return global_arrays_to_state(arrays, target), meta
    return arrays_to_state(arrays, target), meta

  def close(self) -> None:
    with quiet_orbax():
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
