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
import numpy as np

from mmssl_jax import graph as graph_lib
from mmssl_jax import modality_graphs
from mmssl_jax.data import sampler as sampler_lib


class TrainState(NamedTuple):
  """The whole state of a run between two steps (what a checkpoint holds).

  step: () int32, steps done. rng: the typed PRNG key of the next step.
  params, opt_state: the recommender's parameters (`model.init_params`) and
    optimiser state. critic_params, critic_opt_state, critic_stats: the
    critic's (`critic.init_critic`), its optimiser state and BatchNorm
    running statistics (None without a critic).
  modality_graphs: modality -> G^m (`modality_graphs`).
  graph_buffer: the schedule's `GraphBuffer` or `TopkTable`.
  """

  step: jax.Array
  rng: jax.Array
  params: Any
  opt_state: Any
  critic_params: Any
  critic_opt_state: Any
  critic_stats: Any
  modality_graphs: dict[str, graph_lib.BipartiteGraph]
  graph_buffer: modality_graphs.GraphBuffer | modality_graphs.TopkTable | None


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


def is_prng_key(x) -> bool:
  """Whether `x` is a typed PRNG key array (saved and moved as key data)."""
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
