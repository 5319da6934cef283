"""Multi-process (multi-host) training: who writes, and how processes agree.

Every process of a `jax.distributed` job runs the same program on the same
config, seed and data (`mmssl_jax.parallel`: replicated host data, the batch
split over the 'data' axis of the global mesh). Host-side decisions that
read the file system or a signal could differ between processes, and a
process that takes another branch than the others deadlocks the next
collective; so:

* `is_primary()` (process 0) is the only writer of config.json,
  metrics.jsonl, TensorBoard events, log lines and progress output
  (`train.py`); checkpoints are written collectively by orbax.
* `on_primary(fn)` runs `fn` (inspect the workdir, write metrics) on process
  0 only and gives every process its JSON result, or raises its error on
  every process, so all take the same branch and fail together.
* `agree_signal(signum)` is the stop flag of preemption: every process learns
  whether any process received SIGTERM/SIGINT, so all stop and checkpoint at
  the same step (`preemption.PreemptionGuard.agree`).
* `check_same_data(name, fingerprint)` stops every process when they loaded
  different copies of the dataset.

With one process every helper is a plain local call (no JAX collective).
The collectives are `jax.experimental.multihost_utils.broadcast_one_to_all`
and `process_allgather`, which run on any backend `jax.distributed` joins
(CPU processes need gloo collectives: `initialize`).
"""

from __future__ import annotations

import json
import socket
from typing import Any, Callable, Sequence, TypeVar

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from mmssl_jax import parallel

T = TypeVar("T")


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  """True on the process that writes files, logs and progress (process 0)."""
  return jax.process_index() == 0


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-serialisable `obj`, on every process (collective).

  Two broadcasts: the length of the UTF-8 JSON text, then its bytes (as
  int32, which every backend's all-reduce supports). Other processes' `obj`
  is ignored.
  """
  if process_count() == 1:
    return obj
  data = json.dumps(obj).encode("utf-8") if is_primary() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  codes = (np.frombuffer(data, np.uint8).astype(np.int32) if is_primary()
           else np.zeros(size, np.int32))
  codes = multihost_utils.broadcast_one_to_all(codes)
  return json.loads(np.asarray(codes, np.uint8).tobytes().decode("utf-8"))


def on_primary(fn: Callable[[], T],
               errors: Sequence[type[BaseException]] = ()) -> T:
  """Runs `fn()` on process 0; every process returns its result (collective).

  The result must be JSON-serialisable (other processes get it decoded:
  tuples become lists). If `fn` raises an Exception, process 0 re-raises it
  and every other process raises the class of the same name from `errors`
  (RuntimeError for any other class) with the same message, so that all
  processes fail together instead of waiting in the next collective.
  """
  if process_count() == 1:
    return fn()
  value, error, payload = None, None, None
  if is_primary():
    try:
      value = fn()
      payload = {"value": value}
    except Exception as e:  # pylint: disable=broad-except  # re-raised below
      error = e
      payload = {"error": type(e).__name__, "message": str(e)}
  payload = broadcast_json(payload)
  if is_primary():
    if error is not None:
      raise error
    return value
  if "error" in payload:
    classes = {cls.__name__: cls for cls in errors}
    cls = classes.get(payload["error"])
    if cls is None:
      raise RuntimeError(f"process 0 failed: {payload['error']}: "
                         f"{payload['message']}")
    raise cls(payload["message"])
  return payload["value"]


def agree_signal(signum: int | None) -> int | None:
  """The signal number received by any process (None: none), on every one.

  Collective: every process must call it at the same point of the program.
  With several signals the lowest process index's wins.
  """
  if process_count() == 1:
    return signum
  gathered = np.asarray(multihost_utils.process_allgather(
      np.int32(signum or 0))).reshape(-1)
  received = [int(s) for s in gathered if s]
  return received[0] if received else None


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable `obj`, in process order (collective)."""
  if process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(
      np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.int32)
  padded[:data.size] = data
  codes = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(row[:n].astype(np.uint8).tobytes().decode("utf-8"))
          for row, n in zip(codes.reshape(len(sizes), -1), sizes)]


def check_same_data(name: str, fingerprint: str) -> None:
  """Raises ValueError on every process unless all loaded the same data.

  Collective. Every process of a run must train on identical data; two hosts
  reading different copies (another path, a stale copy) would otherwise
  drift apart silently. The message names each differing process and host.
  """
  seen = allgather_json([socket.gethostname(), name, fingerprint])
  if len({fp for _, _, fp in seen}) <= 1:
    return
  groups: dict[tuple[str, str], list[str]] = {}
  for i, (host, data, fp) in enumerate(seen):
    groups.setdefault((data, fp), []).append(f"process {i} ({host})")
  detail = "; ".join(f"{', '.join(procs)}: {data}, fingerprint {fp}"
                     for (data, fp), procs in groups.items())
  raise ValueError(f"the processes loaded different data: {detail}; every "
                   "host must read the same dataset")


def initialize(config, coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               cpu_collectives: str = "gloo") -> None:
  """Joins the job (`jax.distributed.initialize`) before any other JAX call.

  With no coordinator the cluster is auto-detected (TPU pods, SLURM, ...);
  on one machine pass 127.0.0.1:PORT, the number of processes and this
  process's id (launch/local_multiprocess.sh). CPU processes need a
  collectives implementation for cross-process all-reduces ('gloo'). With
  several processes, every process must own devices of the config's mesh
  (else it has no part in the sharded step), so the mesh must span all
  devices of the job; the processes other than 0 then log only warnings
  and errors.

  Raises:
    ValueError: the config's mesh does not span the job's devices.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  # JAX's preemption service would turn SIGTERM into a flag of its own; the
  # run's `preemption.PreemptionGuard` handles it from the start instead.
  jax.config.update("jax_enable_preemption_service", False)
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  if process_count() == 1:
    return
  size = parallel.make_mesh(config).size
  if size != jax.device_count():
    raise ValueError(
        f"{jax.process_count()} processes need a mesh over all "
        f"{jax.device_count()} devices, this config's has {size}: pass "
        "--config.train.data_parallel=0 (all devices)")
  if not is_primary():
    logging.set_verbosity(logging.WARNING)
