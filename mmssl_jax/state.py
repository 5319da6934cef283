"""The train state pytree and the fixed inputs of the jitted steps.

Everything a step reads or writes lives in `TrainState` (both parameter sets,
both optimiser states, critic batch statistics, modality graphs and their
accumulation buffers, the PRNG key, the step). Large constant arrays (graphs,
features, sampler tables) travel in `StepInputs` as jit arguments, never as
closed-over constants.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax import graph as graph_lib
from mmssl_jax.data import sampler as sampler_lib


class GraphBuffer(NamedTuple):
  """Accumulated (user, item) top-k pairs per modality (§4.4 lists x, y).

  users/items: modality -> (capacity,) int32; length: pairs used so far.
  """

  users: dict[str, jax.Array]
  items: dict[str, jax.Array]
  length: jax.Array


class TopkTable(NamedTuple):
  """Persistent per-user modality graphs (the 'persistent' schedule).

  items: modality -> (n_users, k) int32, the top-k items of each user's
    latest generated row; refreshed: (n_users,) bool, rows written so far.
  """

  items: dict[str, jax.Array]
  refreshed: jax.Array


class TrainState(NamedTuple):
  step: jax.Array
  rng: jax.Array
  params: Any
  opt_state: Any
  critic_params: Any
  critic_opt_state: Any
  critic_stats: Any
  modality_graphs: dict[str, graph_lib.BipartiteGraph]
  graph_buffer: GraphBuffer | TopkTable | None


class StepInputs(NamedTuple):
  """Constant arrays every step reads (passed to jit, not closed over).

  graph: the training graph (one-sided weights for MMSSL, symmetric for
    LightGCN).
  features: modality -> (I, d_m) float32 item features.
  sampler: BPR sampler tables (also give each batch user's training row).
  """

  graph: graph_lib.BipartiteGraph
  features: dict[str, jax.Array]
  sampler: sampler_lib.SamplerTables


def empty_buffer(modalities, capacity: int) -> GraphBuffer:
  zeros = lambda: jnp.zeros((capacity,), jnp.int32)
  return GraphBuffer({m: zeros() for m in modalities},
                     {m: zeros() for m in modalities},
                     jnp.zeros((), jnp.int32))


def empty_table(modalities, n_users: int, k: int) -> TopkTable:
  return TopkTable({m: jnp.zeros((n_users, k), jnp.int32) for m in modalities},
                   jnp.zeros((n_users,), bool))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
