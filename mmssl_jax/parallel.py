"""Meshes and shardings: data and item parallelism (docs/reference.md §9).

A 2-D mesh ('data', 'item') of shape (train.data_parallel,
train.item_parallel) over the devices of all processes (`jax.make_mesh`).

Data axis. Inside the step the sampled batch
(users, positives, negatives), its generated / real rows and the critic's
first-layer outputs are constrained to be split over 'data'
(`jax.lax.with_sharding_constraint`), so the O(B * I * d) generator and
critic work is divided between devices and XLA inserts the all-reduces of
the batch means and of the gradients. The full-graph forward (O(nnz * d))
runs replicated. Evaluation splits each block of users over 'data'.

Item axis (opt-in, train.item_parallel > 1).
The item-indexed arrays are split over 'item' on their first axis:
`item_id_embedding` and its optimiser moments, the raw modality features,
the critic's I-sized first-layer factor (the low-rank 'u' (I, r) or the
dense kernel (I, h_1)) and its Adam moments (`state_shardings`,
`inputs_shardings`). In the step, every (B, I) row array (interactions,
generated, model and real rows) is constrained to ('data', 'item'), and the
blockwise fused generator's stacked item blocks to (None, 'item') and its
(B, block) score blocks to ('data', 'item'), so each device holds B/D x I/N
of every row. Everything else (user embeddings, graphs, sampler tables, the
critic's hidden layers) stays replicated. Evaluation ranks each user block
item-sharded with a local top-K per item shard and a global merge
(`evaluation.evaluate(..., mesh=)`, `jax.shard_map`). n_items must be a
multiple of item_parallel: we refuse otherwise (`check_items`, one line
naming both numbers) rather than pad, because padded items would enter the
BPR negative sampling, the feature-L2 mean, the softmax of the real rows and
the top-k refresh, each of which would need its own mask.

The train step is one `jax.jit` with explicit in/out shardings; no `pmap`.

The CSR propagation path (`jax.experimental.sparse` custom calls, which the
SPMD partitioner cannot split) is dropped for sharded runs: graphs keep only
their edge lists and propagate with `jraph.segment_sum`.

Multi-host: call `jax.distributed.initialize` first (see launch/); every
process builds the same host data and state from the same seed, and
`put_global` turns them into global arrays (every process passes the full
array; each keeps its own shards). Step outputs (loss terms) are
replicated, so each process can read them.

`run.Run(config, ds, mesh)` builds a run's step, state and evaluation on a
mesh from these pieces (`run_mesh(config)` is the mesh of a config, None for
one device).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmssl_jax import evaluation
from mmssl_jax import graph as graph_lib
from mmssl_jax import state as state_lib

DATA = "data"
ITEM = "item"


def is_sharded(config: ml_collections.ConfigDict) -> bool:
  """Whether a config runs on a device mesh (data or item parallelism)."""
  return (int(config.train.data_parallel) != 1
          or int(config.train.item_parallel) != 1)


def run_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """The mesh a config trains on: `make_mesh(config)`, or None for one
  device (`is_sharded` false)."""
  return make_mesh(config) if is_sharded(config) else None


def make_mesh(config: ml_collections.ConfigDict | None = None, *,
              n_devices: int | None = None,
              item_devices: int | None = None,
              devices=None) -> Mesh:
  """A 2-D ('data', 'item') mesh of shape (data devices, item devices).

  Args:
    config: reads `train.data_parallel` (0 = all devices not used by the
      item axis) unless n_devices is given, and `train.item_parallel`
      (default 1) unless item_devices is given.
    n_devices: devices on the 'data' axis (0 or None with no config: all
      devices / item devices).
    item_devices: devices on the 'item' axis (None with no config: 1).
    devices: devices to use (default `jax.devices()`, i.e. of all processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  if n_devices is None:
    n_devices = int(config.train.data_parallel) if config else 0
  if item_devices is None:
    item_devices = int(config.train.item_parallel) if config else 1
  if item_devices < 1:
    raise ValueError(f"item_parallel={item_devices} must be >= 1")
  if n_devices == 0:
    n_devices = len(devices) // item_devices
  if n_devices < 1 or n_devices * item_devices > len(devices):
    raise ValueError(f"data_parallel={n_devices} x item_parallel="
                     f"{item_devices} needs between 1 and the {len(devices)} "
                     "available devices")
  n = n_devices * item_devices
  # 'item' is the minor axis: an item group is consecutive devices, on one
  # host when possible, so the per-block item collectives stay local.
  return jax.make_mesh((n_devices, item_devices), (DATA, ITEM),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:n])


def data_size(mesh: Mesh) -> int:
  return int(mesh.shape[DATA])


def item_size(mesh: Mesh) -> int:
  """Devices on the 'item' axis (1 for a mesh without one)."""
  return int(dict(mesh.shape).get(ITEM, 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def item_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (item) axis split over 'item', the other axes replicated."""
  return NamedSharding(mesh, P(ITEM))


@dataclasses.dataclass(frozen=True)
class StepSharding:
  """Where a train step's batch and (B, I) arrays live on a device mesh.

  With a mesh, every array whose leading axis is the batch (sampled users,
  positives, negatives, their rows and first-layer outputs) is constrained
  to be split over 'data'; with `split_items` every (B, I) row array
  (interactions, generated, model and real rows) over ('data', 'item') and
  the fused generator's stacked item blocks (n_blocks, block_size, ...)
  over (None, 'item'), so every step of its block scan is item-parallel.
  Without a mesh nothing is constrained. Static and hashable: part of
  `steps.StepConfig`.
  """

  mesh: Mesh | None = None
  split_items: bool = False

  @classmethod
  def of(cls, mesh: Mesh | None) -> "StepSharding":
    return cls(mesh, mesh is not None and item_size(mesh) > 1)

  def _constrain(self, x, spec):
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def batch(self, x):
    return x if self.mesh is None else self._constrain(x, P(DATA))

  def rows(self, x):
    return self._constrain(x, P(DATA, ITEM)) if self.split_items else (
        self.batch(x))

  def block_kwargs(self) -> dict[str, Callable | None]:
    """The fused generator's constraints (`generator.blockwise_topk`): the
    (B, block) score blocks and the stacked item blocks, or none."""
    if not self.split_items:
      return dict(row_constraint=None, block_constraint=None)
    return dict(row_constraint=self.rows,
                block_constraint=lambda x: self._constrain(x, P(None, ITEM)))


def put_global(tree: Any, sharding: NamedSharding | Any) -> Any:
  """Every leaf as a global array with `sharding` (one, or a matching tree).

  Each process passes the full (identical) value; with one process this is
  `jax.device_put`, with several each process keeps its addressable shards.
  Typed PRNG keys travel as their key data.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: sharding, tree)
  else:
    shardings = sharding

  def put(x, s):
    if state_lib.is_prng_key(x):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x), s),
                                      impl=impl)
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    x = np.asarray(x)
    if s.is_fully_replicated:
      return jax.make_array_from_process_local_data(s, x, x.shape)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def host_local(tree: Any) -> Any:
  """Numpy copies of replicated (or fully addressable) global arrays."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError("host_local needs replicated arrays")
      x = x.addressable_data(0)
    if state_lib.is_prng_key(x):
      return x
    return np.asarray(x)
  return jax.tree.map(get, tree, is_leaf=state_lib.is_prng_key)


def strip_csr_inputs(inputs: state_lib.StepInputs) -> state_lib.StepInputs:
  return inputs._replace(graph=graph_lib.without_csr(inputs.graph))


def strip_csr_state(state: state_lib.TrainState) -> state_lib.TrainState:
  return state._replace(modality_graphs={
      m: graph_lib.without_csr(g) for m, g in state.modality_graphs.items()})


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  if config.train.batch_size % data_size(mesh):
    raise ValueError(f"train.batch_size={config.train.batch_size} is not a "
                     f"multiple of the {data_size(mesh)} devices of the data "
                     "axis")


def check_items(config: ml_collections.ConfigDict, n_items: int,
                mesh: Mesh) -> None:
  """Item-axis sizes that cannot be split evenly (no padding; module doc)."""
  n = item_size(mesh)
  if n_items % n:
    raise ValueError(f"train.item_parallel={n} does not divide the "
                     f"{n_items} items of the dataset (n_items must be a "
                     "multiple of item_parallel)")
  block = int(config.train.generator_block)
  if n > 1 and block > 0 and block < n_items and block % n:
    raise ValueError(f"train.generator_block={block} is not a multiple of "
                     f"train.item_parallel={n}")


def _dict_keys(path) -> list[Any]:
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def is_item_leaf(path) -> bool:
  """Whether a `TrainState` leaf is item-indexed on its first axis.

  `item_id_embedding` in params and the recommender optimiser state (its
  Adam moments mirror params), and the critic's first-layer factor
  (dense_0's 'u' or 'kernel') in the critic params and its optimiser state.
  """
  field = getattr(path[0], "name", None) if path else None
  keys = _dict_keys(path)
  if field in ("params", "opt_state"):
    return "item_id_embedding" in keys
  if field in ("critic_params", "critic_opt_state"):
    return any(a == "dense_0" and b in ("u", "kernel")
               for a, b in zip(keys, keys[1:]))
  return False


def state_shardings(state: Any, mesh: Mesh, n_items: int) -> Any:
  """NamedShardings of a `TrainState` (or its `jax.eval_shape`).

  Item-indexed leaves (`is_item_leaf`) go over 'item' when the mesh has
  more than one item device; everything else is replicated.
  """
  rep, item = replicated(mesh), item_sharding(mesh)
  split = item_size(mesh) > 1

  def rule(path, leaf):
    if (split and is_item_leaf(path) and len(leaf.shape) >= 1
        and leaf.shape[0] == n_items):
      return item
    return rep
  return jax.tree_util.tree_map_with_path(rule, state)


def inputs_shardings(inputs: state_lib.StepInputs,
                     mesh: Mesh) -> state_lib.StepInputs:
  """Step inputs: features over 'item' (item axis > 1), the rest replicated.

  The training graph and the sampler tables are indexed by edge and by
  user, and gathered at arbitrary items, so they stay replicated.
  """
  rep = replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, inputs)
  if item_size(mesh) > 1:
    shardings = shardings._replace(
        features={m: item_sharding(mesh) for m in inputs.features})
  return shardings


def shard_eval_set(eval_set: evaluation.EvalSet,
                   mesh: Mesh) -> evaluation.EvalSet:
  """Each block of evaluated users split over 'data' (n_users replicated).

  `evaluation.evaluate` then ranks every device's share of a block on that
  device (and, with an item axis, every item shard of it). The block size
  (eval.block_users, or fewer users) must be a multiple of the data axis;
  otherwise the set stays replicated.
  """
  if eval_set.users.shape[1] % data_size(mesh):
    return put_global(eval_set, replicated(mesh))
  split = NamedSharding(mesh, P(None, DATA))
  return evaluation.EvalSet(
      users=put_global(eval_set.users, split),
      valid=put_global(eval_set.valid, split),
      targets=put_global(eval_set.targets, split),
      exclude=put_global(eval_set.exclude, split),
      n_users=put_global(eval_set.n_users, replicated(mesh)))
