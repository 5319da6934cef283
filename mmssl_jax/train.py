"""`train_and_evaluate(config, workdir)`: data, state, loop, evaluation, early stop.

Data is loaded and validated, and the workdir inspected, before anything is
written to `workdir`, so bad input leaves the workdir untouched. Validation
runs every `eval.every_epochs`; the test split is evaluated whenever
validation `eval.metric` improves, and the reported result is the test
metrics at the best validation epoch (`mmssl_reference.md` §4.6). Training
stops after `eval.patience` further non-improving evaluations.

Reliability (`mmssl_jax.checkpointing` has the details and the notes on
determinism):

* A checkpoint is saved at the end of every epoch (after evaluation) and at
  the step boundary where SIGTERM/SIGINT arrives; re-running the same command
  on the same workdir resumes exactly (bit-identical on CPU). A preempted run
  raises `checkpointing.Preempted` (the CLI exits 128 + signal number).
* NaN guard: every `train.nan_check_every_steps` steps (default 1) the loss
  terms of the steps since the last check are tested with one fused
  `isfinite` reduction per step; the first non-finite term stops training
  with FloatingPointError naming the term and its global step. No
  checkpoint is ever written from a state with NaN/inf, so the last
  checkpoint on disk is the last good one.
* A workdir holding another run is never overwritten: a different config
  raises `checkpointing.ConfigMismatchError` listing the fields, epoch records
  without checkpoints raise FileExistsError, and a complete run (final record
  in metrics.jsonl) is not trained again: its stored final result is returned,
  unless `config` lets it go on (`checkpointing.extends_run`: more epochs
  than it ran and early stopping not reached under the new patience), then
  it resumes from its last checkpoint.

Multi-process runs (`jax.distributed`, `train.data_parallel` != 1; see
`mmssl_jax.multihost`): every process runs this same function on the same
config and data. Process 0 alone inspects the workdir and writes
config.json, metrics.jsonl, TensorBoard events and the progress bar, and its
decisions and errors reach every process (`multihost.on_primary`);
checkpoints are saved and restored collectively by orbax; a signal received
by any process stops all of them at the same step (`PreemptionGuard.agree`).
The workdir must be on a file system every process sees.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmssl_jax import checkpointing
from mmssl_jax import evaluation
from mmssl_jax import graph as graph_lib
from mmssl_jax import model as model_lib
from mmssl_jax import multihost
from mmssl_jax import progress
from mmssl_jax import state as state_lib
from mmssl_jax import steps
from mmssl_jax.checkpointing import CheckpointMeta
from mmssl_jax.data import DataError, Dataset
from mmssl_jax.data import formats
from mmssl_jax.data import sampler as sampler_lib
from mmssl_jax.data import synthetic

METRICS_FILE = checkpointing.METRICS_FILE
CONFIG_FILE = checkpointing.CONFIG_FILE
CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR
# The terminal progress bar reads the loss terms (a device->host copy) of one
# step in this many; nothing is read when stderr is not a terminal.
PROGRESS_TERMS_EVERY = 10


class ConfigError(ValueError):
  """A config that cannot run (with this dataset); a one-line message."""


# Errors of process 0's workdir checks and writes that every process raises
# again, by class name, in multi-process runs (`multihost.on_primary`).
WORKDIR_ERRORS = (checkpointing.ConfigMismatchError,
                  checkpointing.WorkdirBusyError, FileExistsError,
                  FileNotFoundError, PermissionError, OSError, DataError,
                  ConfigError, ValueError)


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by `config.data` (synthetic, or a folder on disk)."""
  if data_config.source == "synthetic":
    return synthetic.make_synthetic(data_config.synthetic)
  if data_config.source != "folder":
    raise ConfigError(f"unknown data.source {data_config.source!r} (expected "
                      "'folder' or 'synthetic')")
  if not data_config.dir:
    raise DataError(
        "config.data.dir is not set: pass --config.data.dir=PATH, a folder "
        f"with {data_config.expected_files}")
  return formats.load_folder(data_config.dir, format=data_config.format,
                             modalities=tuple(data_config.modalities))


def check_config(config: ml_collections.ConfigDict, ds: Dataset) -> None:
  """Config/data combinations that cannot run, as one-line errors."""
  if config.model.name == "mmssl" and not ds.modalities:
    raise DataError(
        f"{ds.name}: MMSSL needs at least one modality but the dataset has no "
        "<modality>_feat.npy files (use model=lightgcn, or add features)")
  if config.model.name not in ("mmssl", "lightgcn"):
    raise ConfigError(f"unknown model.name {config.model.name!r}")
  if max(config.eval.ks) > ds.n_items:
    raise ConfigError(f"eval.ks {tuple(config.eval.ks)} exceed the "
                      f"{ds.n_items} items of dataset {ds.name}")
  steps_per_epoch = len(ds.train) // config.train.batch_size + 1
  if (config.model.name == "mmssl"
      and steps_per_epoch <= config.graph_update.T):
    raise ConfigError(
        f"graph_update.T={config.graph_update.T} must be smaller than the "
        f"{steps_per_epoch} batches of an epoch of dataset {ds.name}")
  for name, low in (("checkpoint_keep", 1), ("nan_check_every_steps", 1)):
    value = config.train.get(name, low)
    if int(value) < low:
      raise ConfigError(f"train.{name} must be >= {low}, got {value}")


@functools.partial(jax.jit, static_argnames=("is_mmssl", "hp", "layers"))
def _final_embeddings(state: state_lib.TrainState, inputs, is_base=None, *,
                      is_mmssl: bool, hp: model_lib.ModelHParams, layers: int):
  if not is_mmssl:
    return model_lib.lightgcn_forward(state.params, inputs.graph, layers)
  out = model_lib.forward(state.params, inputs.graph, inputs.features,
                          state.modality_graphs, key=state.rng, train=False,
                          hp=hp, modality_is_base=is_base)
  return out.user, out.item


class Run:
  """Everything built once for a run: shapes, step inputs, eval sets, step.

  It keeps device copies of what the steps read and no reference to the
  host `Dataset` (0.6 GiB of host memory at I = 1e6), so a caller that drops
  its own frees it.
  """

  def __init__(self, config: ml_collections.ConfigDict, ds: Dataset):
    self.config = config
    self.modality_dims = ds.modality_dims
    self.is_mmssl = config.model.name == "mmssl"
    self.shapes = steps.Shapes(
        ds.n_users, ds.n_items, len(ds.train), tuple(ds.modalities),
        batch_positives=steps.batch_positives_capacity(
            np.bincount(ds.train.users, minlength=ds.n_users),
            config.train.batch_size))
    norm = "one_sided" if self.is_mmssl else "symmetric"
    graph_np = graph_lib.build_graph(ds.train.users, ds.train.items,
                                     ds.n_users, ds.n_items, norm=norm)
    self.inputs = state_lib.StepInputs(
        graph=jax.tree.map(jnp.asarray, graph_np),
        features={m: jnp.asarray(f) for m, f in ds.modalities.items()},
        sampler=jax.tree.map(jnp.asarray, sampler_lib.build_sampler_tables(
            ds.train, ds.n_users)))
    self.steps_per_epoch = len(ds.train) // config.train.batch_size + 1
    make = steps.make_mmssl_step if self.is_mmssl else steps.make_lightgcn_step
    self.step = make(config, self.shapes)
    block = config.eval.block_users
    self.val_set = evaluation.build_eval_set(
        target=ds.val, exclude=[ds.train], n_users=ds.n_users,
        n_items=ds.n_items, block_users=block)
    test_exclude = [ds.train, ds.val] if config.eval.exclude_val_in_test else [
        ds.train]
    self.test_set = evaluation.build_eval_set(
        target=ds.test, exclude=test_exclude, n_users=ds.n_users,
        n_items=ds.n_items, block_users=block)
    self._embedding_args = dict(
        is_mmssl=self.is_mmssl,
        hp=model_lib.ModelHParams.from_config(config.model),
        layers=int(config.model.lightgcn_layers))

  def init_state(self) -> state_lib.TrainState:
    return steps.init_state(self.config, self.shapes, self.modality_dims,
                            jax.random.key(self.config.seed))

  def compile_step(self, state) -> float | None:
    """Compiles `step` for `state` before the first iteration; returns the
    seconds it took, or None for a step that is not a `jax.jit` function
    (a wrapper, compiled at its first call as before).

    The one compilation of the run, done ahead of time so that the memory
    XLA frees afterwards can be handed back to the OS before the step's
    scratch is allocated: at I = 1e6 it would otherwise stay resident
    (0.5 GiB) next to the step's peak (README, "Speed and memory").
    """
    if not hasattr(self.step, "lower"):
      return None
    t0 = time.perf_counter()
    self.step = self.step.lower(state, jnp.int32(0), self.inputs).compile()
    release_freed_host_memory()
    return time.perf_counter() - t0

  def final_embeddings(self, state):
    """Final user and item representations in eval mode (no dropout)."""
    return _final_embeddings(state, self.inputs, self.modality_is_base(state),
                             **self._embedding_args)

  def modality_is_base(self, state):
    """Whether state's G^m is still the base graph (`model.forward`)."""
    if not self.is_mmssl:
      return None
    return steps.modality_graph_is_base(self.config, self.shapes, state.step)

  def evaluate(self, state, split: str) -> dict[str, float]:
    user, item = self.final_embeddings(state)
    eval_set = self.val_set if split == "val" else self.test_set
    return evaluation.evaluate(user, item, eval_set, ks=self.config.eval.ks)

  def train_epoch(self, state):
    """Runs one epoch of steps; returns the state and mean loss terms."""
    history = []
    for idx in range(self.steps_per_epoch):
      state, terms = self.step(state, jnp.int32(idx), self.inputs)
      history.append(terms)
    return state, _epoch_means(jax.device_get(history))


def release_freed_host_memory() -> None:
  """Returns the free pages of the C heap to the OS (glibc; else nothing).

  Building a run and compiling its step free many small host allocations
  (the compiler's, per-user lists); glibc keeps those pages resident until
  `malloc_trim`, while the step's own big buffers are fresh mappings.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _epoch_means(history) -> dict[str, float]:
  """Mean of each loss term over an epoch's steps (float32, as logged)."""
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


@jax.jit
def _terms_finite(terms):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                            for v in jax.tree.leaves(terms)]))


def _format_metrics(prefix: str, metrics: dict[str, float], keys) -> str:
  return " ".join(f"{prefix}{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict,
                    lock: checkpointing.WorkdirLock | None = None) -> None:
  """Creates `workdir` and writes config.json; refuses to overwrite a run.

  `train_and_evaluate` decides with `checkpointing.inspect_workdir` whether to
  start, resume or stop; this is the start: it raises FileExistsError if
  the workdir holds epoch records or checkpoints. `lock` (not yet held) is
  acquired on the new folder before the check, so that of two processes
  starting the same new workdir one trains and the other stops.
  """
  os.makedirs(workdir, exist_ok=True)
  if lock is not None and not lock.held:
    lock.acquire()
  if (checkpointing.read_records(os.path.join(workdir, METRICS_FILE))
      or checkpointing.checkpoint_steps(workdir)):
    raise FileExistsError(
        f"{os.path.join(workdir, METRICS_FILE)} exists: workdir holds an "
        "earlier run; choose a new --workdir")
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  checkpointing.write_records(os.path.join(workdir, METRICS_FILE), [])


def _no_best() -> dict[str, Any]:
  return {"epoch": -1, "step": None, "score": None, "val": None, "test": None}


def _final_result(meta: CheckpointMeta) -> dict[str, Any]:
  best = meta.best
  return {"final": True, "best_epoch": best["epoch"], "epochs": meta.epoch,
          "test": best["test"], "val": best["val"]}


def _log_final(result: dict[str, Any]) -> None:
  if result.get("test") is not None:
    logging.info("best validation epoch %d: test %s", result["best_epoch"],
                 _format_metrics("", result["test"],
                                 ("recall@20", "precision@20", "ndcg@20",
                                  "ndcg_mmssl@20")))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with early stopping; returns the test metrics at best validation.

  Resumes from `workdir`'s latest checkpoint when it holds an unfinished run
  of the same config; returns the stored result of a complete run.

  Returns a dict with `best_epoch`, `epochs`, `test` (metrics dict at the best
  validation epoch) and `val` (best validation metrics).

  Raises:
    DataError, ConfigError: bad input data or config (nothing written).
    checkpointing.ConfigMismatchError, FileExistsError: the workdir holds a
      different run (nothing written).
    FloatingPointError: a non-finite loss term or state (NaN guard).
    checkpointing.Preempted: SIGTERM/SIGINT; a checkpoint was saved.
  """
  ds = load_dataset(config.data)
  check_config(config, ds)
  # Process 0 locks an existing workdir before reading it, a new one as it
  # creates it (`prepare_workdir`), and holds the lock to the end.
  lock = checkpointing.WorkdirLock(workdir)
  try:
    if multihost.on_primary(lambda: os.path.isdir(workdir)):
      multihost.on_primary(lock.acquire, errors=WORKDIR_ERRORS)
    # The locked part takes the only reference to the host dataset and
    # drops it once `Run` holds the device copies.
    data = [ds]
    del ds
    return _train_and_evaluate_locked(config, workdir, data, lock)
  finally:
    lock.release()


def _train_and_evaluate_locked(config: ml_collections.ConfigDict,
                               workdir: str, data: list[Dataset],
                               lock: checkpointing.WorkdirLock
                               ) -> dict[str, Any]:
  """`train_and_evaluate` once the data is valid (and an existing workdir
  locked); `data` holds the dataset, which is popped and freed after use."""
  ds = data.pop()
  # Process 0 decides (a shared workdir could change between processes'
  # reads); every process follows it.
  status = checkpointing.WorkdirStatus(**multihost.on_primary(
      lambda: dataclasses.asdict(checkpointing.inspect_workdir(
          workdir, config)), errors=WORKDIR_ERRORS))
  if status.kind == "complete":
    logging.info("%s holds a complete run (%d epochs); not training again "
                 "(%s). Stored result:", workdir,
                 status.final.get("epochs", -1), status.reason)
    _log_final(status.final)
    return status.final
  for field, old, new in status.changed:
    logging.info("config field %s changed from %r to %r", field, old, new)
  if status.final is not None:
    logging.info("extending the complete run in %s (%d epochs, best epoch %d) "
                 "to at most %d epochs", workdir, status.final["epochs"],
                 status.final["best_epoch"], config.train.epochs)
  logging.info("%s", ds.summary())
  run = Run(config, ds)
  del ds
  if (int(config.train.get("data_parallel", 1)) != 1
      or int(config.train.get("item_parallel", 1)) != 1):
    from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
    try:
      parallel.shard_run(run, parallel.make_mesh(config))
    except ValueError as e:
      raise ConfigError(str(e)) from None
  state = run.init_state()
  logging.info("model %s (%s), %d recommender parameters%s, %d steps/epoch",
               config.model.name, config.variant,
               state_lib.count_params(state.params),
               (f", {state_lib.count_params(state.critic_params)} critic "
                "parameters" if state.critic_params is not None else ""),
               run.steps_per_epoch)
  if status.kind == "new":
    multihost.on_primary(lambda: prepare_workdir(workdir, config, lock),
                         errors=WORKDIR_ERRORS)
  store = checkpointing.CheckpointStore(
      os.path.join(workdir, CHECKPOINT_DIR),
      keep=int(config.train.get("checkpoint_keep", 3)))
  with store:
    if status.kind == "resume":
      step = store.latest_step()
      state, meta = store.restore(step, state)
      multihost.on_primary(lambda: _resume_records(workdir, meta),
                           errors=WORKDIR_ERRORS)
      logging.info("resuming from step %d (epoch %d, batch %d) of %s", step,
                   meta.epoch, meta.batch, store.directory)
    else:
      meta = CheckpointMeta(step=0, epoch=0, batch=0, epoch_terms={},
                            train_seconds=0.0, bad_evals=0, best=_no_best(),
                            last_record=None)
    compile_s = run.compile_step(state)
    if compile_s is not None:
      logging.info("compiled the train step in %.1f s", compile_s)
    tensorboard = (bool(config.train.get("tensorboard", False))
                   and multihost.is_primary())
    with progress.MetricWriter(workdir, enabled=tensorboard) as writer:
      if tensorboard and not writer.active:
        logging.warning("train.tensorboard=True but tensorboardX is not "
                        "installed (pip install -e \".[tensorboard]\"); "
                        "writing no event files")
      with checkpointing.PreemptionGuard() as guard:
        meta = _train_loop(config, run, state, meta, store, guard, workdir,
                           writer=writer)
  result = _final_result(meta)
  multihost.on_primary(lambda: checkpointing.append_record(
      os.path.join(workdir, METRICS_FILE), result), errors=WORKDIR_ERRORS)
  _log_final(result)
  return result


def _resume_records(workdir: str, meta: CheckpointMeta) -> None:
  checkpointing.resume_records(os.path.join(workdir, METRICS_FILE), meta)


def _nan_message(epoch: int, batch: int, step: int, terms: dict[str, Any],
                 store: checkpointing.CheckpointStore) -> str:
  bad = [k for k, v in terms.items() if not np.all(np.isfinite(v))]
  # The total is non-finite whenever a term is: name the term first.
  bad.sort(key=lambda k: k == "loss")
  first = bad[0]
  also = f" (also non-finite: {', '.join(bad[1:])})" if bad[1:] else ""
  latest = store.latest_step()
  kept = (f"the last good checkpoint is step {latest} in {store.directory}"
          if latest is not None else "no checkpoint was saved yet")
  return (f"non-finite loss term {first} = {float(terms[first])} at step "
          f"{step} (epoch {epoch}, batch {batch}){also}; training stopped, "
          f"{kept}")


def _write_record(path: str, step: int, record: dict[str, Any],
                  writer: progress.MetricWriter | None) -> None:
  """Appends an epoch record to metrics.jsonl and TensorBoard (process 0)."""
  checkpointing.append_record(path, record)
  if writer is not None:
    writer.write_scalars(step, record)


def _train_loop(config, run: Run, state, meta: CheckpointMeta,
                store: checkpointing.CheckpointStore,
                guard: checkpointing.PreemptionGuard,
                workdir: str, *,
                writer: progress.MetricWriter | None = None
                ) -> CheckpointMeta:
  """Epochs from `meta` on; returns the meta of the last epoch boundary.

  A progress bar (`progress.EpochProgress`) redraws one line of stderr while
  an epoch runs, only when stderr is a terminal; `writer` receives the
  numeric fields of every epoch record at the epoch's global step.
  """
  metric = config.eval.metric
  patience = config.eval.patience
  every = int(config.train.get("nan_check_every_steps", 1))
  spe = run.steps_per_epoch
  show = ("recall@20", "ndcg@20", "ndcg_mmssl@20")
  metrics_path = os.path.join(workdir, METRICS_FILE)
  single_process = multihost.process_count() == 1
  while meta.bad_evals <= patience and meta.epoch < config.train.epochs:
    epoch = meta.epoch
    t0 = time.time()
    # Loss terms of the steps already done in this epoch (a resumed epoch).
    history = [{k: np.float32(v[i]) for k, v in meta.epoch_terms.items()}
               for i in range(meta.batch)]
    pending = []  # (batch index, device bool: all terms finite)
    # A resumed epoch's bar starts at the batch the checkpoint stopped at.
    with progress.EpochProgress(
        spe, epoch=epoch, initial=meta.batch,
        enabled=None if multihost.is_primary() else False) as bar:
      for idx in range(meta.batch, spe):
        state, terms = run.step(state, jnp.int32(idx), run.inputs)
        history.append(terms)
        pending.append((idx, _terms_finite(terms)))
        last = idx == spe - 1
        check = len(pending) >= every or last
        # One process polls its signal flag every step; several agree on it
        # (a collective) at the NaN-check boundaries, the same on all.
        if check or single_process:
          preempt = guard.agree() and not last
        else:
          preempt = False
        if check or preempt:
          ok = jax.device_get([flag for _, flag in pending])
          if not all(ok):
            bad = pending[int(np.argmin(ok))][0]
            raise FloatingPointError(_nan_message(
                epoch, bad, epoch * spe + bad, jax.device_get(history[bad]),
                store))
          pending = []
        # Terms are read (a device sync) only when the bar is on a terminal.
        bar.update(terms if idx % PROGRESS_TERMS_EVERY == 0 or last else None)
        if preempt:
          host = jax.device_get(history)
          saved = CheckpointMeta(
              step=int(state.step), epoch=epoch, batch=idx + 1,
              epoch_terms={k: [float(h[k]) for h in host] for k in host[0]},
              train_seconds=meta.train_seconds + time.time() - t0,
              bad_evals=meta.bad_evals, best=meta.best,
              last_record=meta.last_record, reason="preemption")
          path = store.save(state, saved)
          raise checkpointing.Preempted(
              f"stopped by {guard.signal_name} at step {saved.step} (epoch "
              f"{epoch}, batch {idx + 1} of {spe}); checkpoint saved to "
              f"{path}; run the same command again to resume", guard.signum)
    terms = _epoch_means(jax.device_get(history))
    train_s = meta.train_seconds + time.time() - t0
    step = int(state.step)
    checkpointing.check_finite(state, step)
    record = {"epoch": epoch, "train_seconds": train_s,
              **{f"train/{k}": v for k, v in terms.items()}}
    line = (f"epoch {epoch:3d} | loss {terms['loss']:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in terms.items()
                       if k != "loss"))
    best, bad_evals, best_score = meta.best, meta.bad_evals, None
    if (epoch + 1) % config.eval.every_epochs == 0:
      t1 = time.time()
      val = run.evaluate(state, "val")
      record.update({f"val/{k}": v for k, v in val.items()})
      line += " | val " + _format_metrics("", val, show)
      if best["score"] is None or val[metric] > best["score"]:
        test = run.evaluate(state, "test")
        record.update({f"test/{k}": v for k, v in test.items()})
        best = {"epoch": epoch, "step": step, "score": val[metric],
                "val": val, "test": test}
        best_score = val[metric]
        bad_evals = 0
        line += " *"
      else:
        bad_evals += 1
      record["eval_seconds"] = time.time() - t1
    meta = CheckpointMeta(step=step, epoch=epoch + 1, batch=0, epoch_terms={},
                          train_seconds=0.0, bad_evals=bad_evals, best=best,
                          last_record=record)
    store.save(state, meta, best_score=best_score)
    multihost.on_primary(functools.partial(_write_record, metrics_path, step,
                                           record, writer),
                         errors=WORKDIR_ERRORS)
    logging.info("%s | %.1fs", line, time.time() - t0)
    stop = guard.agree()  # before the branches: a collective
    if bad_evals > patience:
      logging.info("early stop: %s did not improve for %d evaluations",
                   metric, bad_evals)
    elif stop and meta.epoch < config.train.epochs:
      raise checkpointing.Preempted(
          f"stopped by {guard.signal_name} at step {step} (end of epoch "
          f"{epoch}); checkpoint saved to "
          f"{os.path.join(store.directory, str(step))}; run the same command "
          "again to resume", guard.signum)
  return meta
