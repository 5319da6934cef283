"""`train_and_evaluate(config, workdir)`: data, state, loop, evaluation, stop.

Data is loaded and validated, and the workdir inspected, before anything is
written to `workdir`, so bad input leaves the workdir untouched. Settings a
small dataset cannot use are adapted with one warning each
(`run.adapt_to_dataset`); config.json holds the adapted values. Validation
runs every `eval.every_epochs`; the test split is evaluated whenever
validation `eval.metric` improves, and the reported result is the test
metrics at the best validation epoch (docs/reference.md §4.6). Training
stops after `eval.patience` further non-improving evaluations.

Reliability (`mmssl_jax.workdir` and `mmssl_jax.checkpointing` have the
details and the notes on determinism):

* A checkpoint is saved at the end of every epoch (after evaluation) and at
  the step boundary where SIGTERM/SIGINT arrives; re-running the same command
  on the same workdir resumes exactly (bit-identical on CPU). A preempted run
  raises `preemption.Preempted` (the CLI exits 128 + signal number).
* NaN guard: every `train.nan_check_every_steps` steps (default 1) the loss
  terms of the steps since the last check are tested with one fused
  `isfinite` reduction per step; the first non-finite term stops training
  with FloatingPointError naming the term and its global step. No
  checkpoint is ever written from a state with NaN/inf, so the last
  checkpoint on disk is the last good one.
* A workdir holding another run is never overwritten: a different config
  raises `workdir.ConfigMismatchError` listing the fields, epoch records
  without checkpoints raise FileExistsError, and a complete run (final record
  in metrics.jsonl) is not trained again: its stored final result is returned,
  unless `config` lets it go on (`workdir.extends_run`), then it resumes from
  its last checkpoint.

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
from mmssl_jax import multihost
from mmssl_jax import parallel
from mmssl_jax import progress
from mmssl_jax import run as run_lib
from mmssl_jax import state as state_lib
from mmssl_jax import workdir as workdir_lib
from mmssl_jax.checkpointing import CheckpointMeta
from mmssl_jax.data import DataError, Dataset
from mmssl_jax.preemption import Preempted, PreemptionGuard
from mmssl_jax.run import ConfigError

# The terminal progress bar reads the loss terms (a device->host copy) of one
# step in this many; nothing is read when stderr is not a terminal.
PROGRESS_TERMS_EVERY = 10
SHOWN_METRICS = ("recall@20", "ndcg@20", "ndcg_mmssl@20")

# Errors of process 0's workdir checks and writes that every process raises
# again, by class name, in multi-process runs (`multihost.on_primary`).
WORKDIR_ERRORS = (workdir_lib.ConfigMismatchError,
                  workdir_lib.WorkdirBusyError, FileExistsError,
                  FileNotFoundError, PermissionError, OSError, DataError,
                  ConfigError, ValueError)


def _format_metrics(metrics: dict[str, float], keys) -> str:
  return " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def _no_best() -> dict[str, Any]:
  return {"epoch": -1, "step": None, "score": None, "val": None, "test": None}


def _final_result(meta: CheckpointMeta) -> dict[str, Any]:
  best = meta.best
  return {"final": True, "best_epoch": best["epoch"], "epochs": meta.epoch,
          "test": best["test"], "val": best["val"]}


def _log_final(result: dict[str, Any]) -> None:
  if result.get("test") is not None:
    logging.info("best validation epoch %d: test %s", result["best_epoch"],
                 _format_metrics(result["test"],
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
    workdir.ConfigMismatchError, FileExistsError: the workdir holds a
      different run (nothing written).
    FloatingPointError: a non-finite loss term or state (NaN guard).
    preemption.Preempted: SIGTERM/SIGINT; a checkpoint was saved.
  """
  # SIGTERM/SIGINT from the first line on: a stop during start-up exits at
  # the next safe point, one during training saves a checkpoint first.
  with PreemptionGuard() as guard:
    config, ds, notes = run_lib.load(config)
    for note in notes:
      if multihost.is_primary():
        logging.warning("adapted to the dataset: %s", note)
    if multihost.process_count() > 1:
      try:
        multihost.check_same_data(ds.name, ds.fingerprint())
      except ValueError as e:
        raise DataError(str(e)) from None
    _stop_if_signalled(guard, "loading the data")
    return _train_in_workdir(config, ds, workdir, guard)


def _stop_if_signalled(guard: PreemptionGuard, phase: str) -> None:
  """Raises Preempted if any process received SIGTERM/SIGINT (collective)."""
  if guard.agree():
    raise Preempted(
        f"stopped by {guard.signal_name} during start-up ({phase}); nothing "
        "was trained since the last checkpoint; run the same command again "
        "to resume", guard.signum)


def _train_in_workdir(config, ds: Dataset, workdir: str,
                      guard: PreemptionGuard) -> dict[str, Any]:
  """`train_and_evaluate` once the data is loaded: lock, inspect, train."""
  # Process 0 locks an existing workdir before reading it, a new one as it
  # creates it (`workdir.prepare_workdir`), and holds the lock to the end.
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    if multihost.on_primary(lambda: os.path.isdir(workdir)):
      multihost.on_primary(lock.acquire, errors=WORKDIR_ERRORS)
    status = workdir_lib.WorkdirStatus(**multihost.on_primary(
        lambda: dataclasses.asdict(workdir_lib.inspect_workdir(
            workdir, config)), errors=WORKDIR_ERRORS))
    if status.kind == "complete":
      logging.info("%s holds a complete run (%d epochs); not training again "
                   "(%s). Stored result:", workdir,
                   status.final.get("epochs", -1), status.reason)
      _log_final(status.final)
      return status.final
    run = _build_run(config, ds, status, workdir)
    del ds  # `run` holds the device copies it needs
    return _train(config, run, status, workdir, lock, guard)
  finally:
    lock.release()


def _build_run(config, ds: Dataset, status: workdir_lib.WorkdirStatus,
               workdir: str) -> run_lib.Run:
  """Logs what changed and the data, and builds the run on its mesh."""
  for field, old, new in status.changed:
    logging.info("config field %s changed from %r to %r", field, old, new)
  if status.final is not None:
    logging.info("extending the complete run in %s (%d epochs, best epoch %d) "
                 "to at most %d epochs", workdir, status.final["epochs"],
                 status.final["best_epoch"], config.train.epochs)
  logging.info("%s", ds.summary())
  try:
    return run_lib.Run(config, ds, parallel.run_mesh(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _train(config, run: run_lib.Run, status: workdir_lib.WorkdirStatus,
           workdir: str, lock: workdir_lib.WorkdirLock,
           guard: PreemptionGuard) -> dict[str, Any]:
  """Starts or resumes the run in `workdir`, trains it, writes the result."""
  state = run.init_state()
  logging.info("model %s (%s), %d recommender parameters%s, %d steps/epoch",
               config.model.name, config.variant,
               state_lib.count_params(state.params),
               (f", {state_lib.count_params(state.critic_params)} critic "
                "parameters" if state.critic_params is not None else ""),
               run.steps_per_epoch)
  if status.kind == "new":
    multihost.on_primary(
        lambda: workdir_lib.prepare_workdir(workdir, config, lock),
        errors=WORKDIR_ERRORS)
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  store = checkpointing.CheckpointStore(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
      keep=int(config.train.checkpoint_keep))
  with store:
    if status.kind == "resume":
      # The newest readable checkpoint; unreadable ones are set aside.
      step, state, meta = store.restore_latest(state)
      multihost.on_primary(lambda: workdir_lib.resume_records(
          metrics_path, meta.epoch, meta.last_record), errors=WORKDIR_ERRORS)
      logging.info("resuming from step %d (epoch %d, batch %d) of %s", step,
                   meta.epoch, meta.batch, store.directory)
    else:
      meta = CheckpointMeta(step=0, epoch=0, batch=0, epoch_terms={},
                            train_seconds=0.0, bad_evals=0, best=_no_best(),
                            last_record=None)
    compile_s = run.compile_step(state)
    if compile_s is not None:
      logging.info("compiled the train step in %.1f s", compile_s)
    _stop_if_signalled(guard, "restoring and compiling")
    tensorboard = bool(config.train.tensorboard) and multihost.is_primary()
    with progress.MetricWriter(workdir, enabled=tensorboard) as writer:
      if tensorboard and not writer.active:
        logging.warning("train.tensorboard=True but tensorboardX is not "
                        "installed (pip install -e \".[tensorboard]\"); "
                        "writing no event files")
      loop = _Loop(config, run, store, guard, metrics_path, writer)
      meta = loop.epochs(state, meta)
  result = _final_result(meta)
  multihost.on_primary(lambda: workdir_lib.append_record(metrics_path, result),
                       errors=WORKDIR_ERRORS)
  _log_final(result)
  return result


@jax.jit
def _terms_finite(terms):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                            for v in jax.tree.leaves(terms)]))


def _write_record(path: str, step: int, record: dict[str, Any],
                  writer: progress.MetricWriter | None) -> None:
  """Appends an epoch record to metrics.jsonl and TensorBoard (process 0)."""
  workdir_lib.append_record(path, record)
  if writer is not None:
    writer.write_scalars(step, record)


@dataclasses.dataclass
class _Loop:
  """The epoch loop of one `train_and_evaluate` call.

  A progress bar (`progress.EpochProgress`) redraws one line of stderr while
  an epoch runs, only when stderr is a terminal; `writer` receives the
  numeric fields of every epoch record at the epoch's global step.
  """

  config: ml_collections.ConfigDict
  run: run_lib.Run
  store: checkpointing.CheckpointStore
  guard: PreemptionGuard
  metrics_path: str
  writer: progress.MetricWriter | None

  def epochs(self, state, meta: CheckpointMeta) -> CheckpointMeta:
    """Epochs from `meta` on; returns the meta of the last epoch boundary."""
    config = self.config
    while (meta.bad_evals <= config.eval.patience
           and meta.epoch < config.train.epochs):
      t0 = time.time()
      state, history = self._epoch_steps(state, meta, t0)
      state, meta = self._end_epoch(state, meta, history, t0)
    return meta

  def _nan_message(self, epoch: int, batch: int, terms) -> str:
    step = epoch * self.run.steps_per_epoch + batch
    bad = [k for k, v in terms.items() if not np.all(np.isfinite(v))]
    # The total is non-finite whenever a term is: name the term first.
    bad.sort(key=lambda k: k == "loss")
    first = bad[0]
    also = f" (also non-finite: {', '.join(bad[1:])})" if bad[1:] else ""
    latest = self.store.latest_step()
    kept = (f"the last good checkpoint is step {latest} in "
            f"{self.store.directory}" if latest is not None
            else "no checkpoint was saved yet")
    return (f"non-finite loss term {first} = {float(terms[first])} at step "
            f"{step} (epoch {epoch}, batch {batch}){also}; training stopped, "
            f"{kept}")

  def _epoch_steps(self, state, meta: CheckpointMeta, t0: float):
    """The remaining steps of epoch `meta.epoch`: NaN checks, progress bar
    and preemption at step boundaries. Returns (state, per-step terms)."""
    run, epoch, spe = self.run, meta.epoch, self.run.steps_per_epoch
    every = int(self.config.train.nan_check_every_steps)
    single_process = multihost.process_count() == 1
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
        preempt = (self.guard.agree() and not last
                   if check or single_process else False)
        if check or preempt:
          ok = jax.device_get([flag for _, flag in pending])
          if not all(ok):
            bad = pending[int(np.argmin(ok))][0]
            raise FloatingPointError(self._nan_message(
                epoch, bad, jax.device_get(history[bad])))
          pending = []
        # Terms are read (a device sync) only when the bar is on a terminal.
        bar.update(terms if idx % PROGRESS_TERMS_EVERY == 0 or last else None)
        if preempt:
          self._save_preempted(state, meta, history, idx + 1, t0)
    return state, history

  def _save_preempted(self, state, meta: CheckpointMeta, history, batch: int,
                      t0: float) -> None:
    host = jax.device_get(history)
    saved = CheckpointMeta(
        step=int(state.step), epoch=meta.epoch, batch=batch,
        epoch_terms={k: [float(h[k]) for h in host] for k in host[0]},
        train_seconds=meta.train_seconds + time.time() - t0,
        bad_evals=meta.bad_evals, best=meta.best,
        last_record=meta.last_record, reason="preemption")
    path = self.store.save(state, saved)
    raise Preempted(
        f"stopped by {self.guard.signal_name} at step {saved.step} (epoch "
        f"{meta.epoch}, batch {batch} of {self.run.steps_per_epoch}); "
        f"checkpoint saved to {path}; run the same command again to resume",
        self.guard.signum)

  def _evaluate(self, state, epoch: int, step: int, meta: CheckpointMeta,
                record: dict[str, Any]):
    """Validation (and test at a new best): (best, bad_evals, best_score,
    line suffix); `record` receives the metrics."""
    metric = self.config.eval.metric
    best, bad_evals, best_score = meta.best, meta.bad_evals, None
    t1 = time.time()
    val = self.run.evaluate(state, "val")
    record.update({f"val/{k}": v for k, v in val.items()})
    line = " | val " + _format_metrics(val, SHOWN_METRICS)
    if best["score"] is None or val[metric] > best["score"]:
      test = self.run.evaluate(state, "test")
      record.update({f"test/{k}": v for k, v in test.items()})
      best = {"epoch": epoch, "step": step, "score": val[metric],
              "val": val, "test": test}
      best_score, bad_evals = val[metric], 0
      line += " *"
    else:
      bad_evals += 1
    record["eval_seconds"] = time.time() - t1
    return best, bad_evals, best_score, line

  def _end_epoch(self, state, meta: CheckpointMeta, history, t0: float):
    """Evaluation, checkpoint, record and log line of a finished epoch;
    early stopping and preemption. Returns (state, new meta)."""
    config, epoch = self.config, meta.epoch
    terms = run_lib.epoch_means(jax.device_get(history))
    step = int(state.step)
    checkpointing.check_finite(state, step)
    record = {"epoch": epoch,
              "train_seconds": meta.train_seconds + time.time() - t0,
              **{f"train/{k}": v for k, v in terms.items()}}
    line = (f"epoch {epoch:3d} | loss {terms['loss']:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in terms.items()
                       if k != "loss"))
    best, bad_evals, best_score = meta.best, meta.bad_evals, None
    if (epoch + 1) % config.eval.every_epochs == 0:
      best, bad_evals, best_score, suffix = self._evaluate(
          state, epoch, step, meta, record)
      line += suffix
    meta = CheckpointMeta(step=step, epoch=epoch + 1, batch=0, epoch_terms={},
                          train_seconds=0.0, bad_evals=bad_evals, best=best,
                          last_record=record)
    self.store.save(state, meta, best_score=best_score)
    multihost.on_primary(functools.partial(
        _write_record, self.metrics_path, step, record, self.writer),
                         errors=WORKDIR_ERRORS)
    logging.info("%s | %.1fs", line, time.time() - t0)
    stop = self.guard.agree()  # before the branches: a collective
    if bad_evals > config.eval.patience:
      logging.info("early stop: %s did not improve for %d evaluations",
                   config.eval.metric, bad_evals)
    elif stop and meta.epoch < config.train.epochs:
      raise Preempted(
          f"stopped by {self.guard.signal_name} at step {step} (end of epoch "
          f"{epoch}); checkpoint saved to "
          f"{os.path.join(self.store.directory, str(step))}; run the same "
          "command again to resume", self.guard.signum)
    return state, meta
