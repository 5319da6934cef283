"""Meshes and shardings: data parallelism over batch users (design.md "Scale").

One mesh axis, 'data', over the devices of all processes
(`jax.make_mesh`). Parameters, optimiser states, graphs, features and
sampler tables are replicated; inside the step the sampled batch (users,
positives, negatives), its generated / real rows and the critic's
first-layer outputs are constrained to be split over 'data'
(`jax.lax.with_sharding_constraint`), so the O(B * I * d) generator and
critic work is divided between devices and XLA inserts the all-reduces of
the batch means and of the gradients. The full-graph forward (O(nnz * d))
runs replicated. Evaluation splits each block of users over 'data'.
The train step is one `jax.jit` with explicit in/out shardings; no `pmap`.

The CSR propagation path (`jax.experimental.sparse` custom calls, which the
SPMD partitioner cannot split) is dropped for sharded runs: graphs keep only
their edge lists and propagate with `jraph.segment_sum`.

Multi-host: call `jax.distributed.initialize` first (see launch/); every
process builds the same host data and state from the same seed, and
`put_global` turns them into global arrays with
`jax.make_array_from_process_local_data` (every process passes the full
array). Step outputs are replicated, so each process can read them.

Typical use (what `train.Run` needs):

  mesh = parallel.make_mesh(config)
  parallel.shard_run(run, mesh)   # run.step / init_state / evaluate sharded
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmssl_jax import evaluation
from mmssl_jax import graph as graph_lib
from mmssl_jax import state as state_lib
from mmssl_jax import steps

DATA = "data"


def make_mesh(config: ml_collections.ConfigDict | None = None, *,
              n_devices: int | None = None,
              devices=None) -> Mesh:
  """A 1-D ('data',) mesh.

  Args:
    config: reads `train.data_parallel` (0 = all devices) unless n_devices
      is given.
    n_devices: devices on the axis (0 or None with no config: all).
    devices: devices to use (default `jax.devices()`, i.e. of all processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  if n_devices is None:
    n_devices = int(config.train.get("data_parallel", 1)) if config else 0
  if n_devices == 0:
    n_devices = len(devices)
  if not 1 <= n_devices <= len(devices):
    raise ValueError(f"data_parallel={n_devices} needs between 1 and the "
                     f"{len(devices)} available devices")
  return jax.make_mesh((n_devices,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices[:n_devices])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the other axes replicated."""
  return NamedSharding(mesh, P(DATA))


def batch_constraint(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
  """x -> x constrained to `batch_sharding` (for `steps.make_*_step`)."""
  sharding = batch_sharding(mesh)
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                     jax.dtypes.prng_key)


def put_global(tree: Any, sharding: NamedSharding) -> Any:
  """Every leaf as a global array with `sharding`.

  Each process passes the full (identical) value; with one process this is
  `jax.device_put`. Typed PRNG keys travel as their key data.
  """
  def put(x):
    if x is None:
      return None
    if _is_key(x):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)
  return jax.tree.map(put, tree, is_leaf=lambda x: x is None or _is_key(x))


def host_local(tree: Any) -> Any:
  """Numpy copies of replicated (or fully addressable) global arrays."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError("host_local needs replicated arrays")
      x = x.addressable_data(0)
    if _is_key(x):
      return x
    return np.asarray(x)
  return jax.tree.map(get, tree, is_leaf=_is_key)


def strip_csr_inputs(inputs: state_lib.StepInputs) -> state_lib.StepInputs:
  return inputs._replace(graph=graph_lib.without_csr(inputs.graph))


def strip_csr_state(state: state_lib.TrainState) -> state_lib.TrainState:
  return state._replace(modality_graphs={
      m: graph_lib.without_csr(g) for m, g in state.modality_graphs.items()})


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  if config.train.batch_size % mesh.size:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not a "
                     f"multiple of the {mesh.size} devices of the data axis")


def make_sharded_step(config: ml_collections.ConfigDict, shapes: steps.Shapes,
                      mesh: Mesh) -> Callable:
  """`step(state, batch_idx, inputs) -> (state, metrics)` over `mesh`.

  One `jax.jit` with replicated in/out shardings for the state, the step
  inputs (without CSR fields) and the metrics, the state donated; the batch
  is split over 'data' inside (see the module docstring).
  """
  check_batch(config, mesh)
  make = (steps.make_mmssl_step if config.model.name == "mmssl"
          else steps.make_lightgcn_step)
  fn = make(config, shapes, batch_constraint=batch_constraint(mesh),
            jit=False)
  rep = replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=0)


def shard_eval_set(eval_set: evaluation.EvalSet,
                   mesh: Mesh) -> evaluation.EvalSet:
  """Each block of evaluated users split over 'data' (n_users replicated).

  `evaluation.evaluate` then ranks every device's share of a block on that
  device. The block size (eval.block_users, or fewer users) must be a
  multiple of the mesh size; otherwise the set stays replicated.
  """
  if eval_set.users.shape[1] % mesh.size:
    return put_global(eval_set, replicated(mesh))
  split = NamedSharding(mesh, P(None, DATA))
  return evaluation.EvalSet(
      users=put_global(eval_set.users, split),
      valid=put_global(eval_set.valid, split),
      targets=put_global(eval_set.targets, split),
      exclude=put_global(eval_set.exclude, split),
      n_users=put_global(eval_set.n_users, replicated(mesh)))


def shard_run(run, mesh: Mesh):
  """Turns a `train.Run` into a sharded one over `mesh`, in place.

  Replaces its step (`make_sharded_step`), its inputs (CSR fields dropped,
  replicated global arrays), `init_state` (modality graphs without CSR,
  replicated) and its evaluation sets (users split over 'data'); the
  final embeddings then run under jit on the mesh, replicated.
  Returns `run`.
  """
  rep = replicated(mesh)
  run.mesh = mesh
  run.inputs = put_global(strip_csr_inputs(host_local(run.inputs)), rep)
  run.step = make_sharded_step(run.config, run.shapes, mesh)
  base_init = type(run).init_state

  def init_state():
    return put_global(strip_csr_state(base_init(run)), rep)

  run.init_state = init_state
  run.val_set = shard_eval_set(run.val_set, mesh)
  run.test_set = shard_eval_set(run.test_set, mesh)
  return run


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           cpu_collectives: str = "gloo") -> None:
  """`jax.distributed.initialize`, before any other JAX call of the process.

  With no arguments the cluster is auto-detected (TPU pods, SLURM, ...);
  on one machine pass 127.0.0.1:PORT, the number of processes and this
  process's id (launch/local_multiprocess.sh). CPU processes need a
  collectives implementation for cross-process all-reduces ('gloo').
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
