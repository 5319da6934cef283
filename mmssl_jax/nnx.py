"""Flax NNX modules over MMSSL's pure functions, to use them inside Flax models.

The computation stays in the pure functions; these modules only hold their
parameters as NNX variables and call them:

  Recommender  `model.init_params` as `nnx.Param`s; __call__ = `model.forward`
               (docs/reference.md §2.2 initialisation, §2.3 forward).
  Critic       `critic.init_critic` as `nnx.Param`s and the BatchNorm running
               statistics as `nnx.BatchStat`s; __call__ =
               `critic.dense_critic_apply` (§3.5).
  LightGCN     the two ID tables; __call__ = `model.lightgcn_forward`.

Each module keeps the pure params' nested structure: a top-level key is an
attribute (`rec.user_id_embedding`, `rec.modality_proj['image']['kernel']`,
`critic.dense_0['kernel']`), a nested dict an `nnx.Dict`, and `params()`
returns the pure pytree again, so a module's parameters can go back to the
pure functions, the train step or a checkpoint. `from_workdir` loads a
trained run's best checkpoint into them.

Dropout keys: `key=` of a call; else, for a module built with `rngs`, its
'dropout' stream (as `nnx.Dropout`); eval-mode calls need none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from mmssl_jax import critic as critic_lib
from mmssl_jax import graph as graph_lib
from mmssl_jax import model as model_lib

Array = jax.Array

# Passed to `model.forward` in eval mode, which ignores it (no dropout).
_EVAL_KEY_SEED = 0


def _variables(tree, kind: type[nnx.Variable]):
  """A nested dict of arrays as nested `nnx.Dict`s of `kind` variables."""
  if isinstance(tree, Mapping):
    return nnx.Dict({k: _variables(v, kind) for k, v in tree.items()})
  return kind(jnp.asarray(tree))


def _arrays(tree):
  """The inverse of `_variables`: nested plain dicts of arrays."""
  if isinstance(tree, nnx.Variable):
    return tree[...]
  return {k: _arrays(v) for k, v in tree.items()}


def _assign(variables, tree) -> None:
  """Writes the arrays of `tree` into the matching `_variables` structure."""
  for k, v in tree.items():
    if isinstance(variables[k], nnx.Variable):
      variables[k][...] = v
    else:
      _assign(variables[k], v)


def _dropout_stream(rngs: nnx.Rngs | None):
  """The module's own dropout stream (as `nnx.Dropout` keeps it): rngs'
  'dropout' stream, else its 'default' one, else None."""
  if rngs is not None:
    try:
      return rngs["dropout"].fork()
    except KeyError:  # neither a 'dropout' nor a 'default' stream
      pass
  return nnx.data(None)


class _PureParams(nnx.Module):
  """A module whose `nnx.Param` attributes are a pure params dict's keys."""

  def _set_params(self, params: Mapping[str, Any]) -> None:
    self._param_names = tuple(params)
    for name, value in params.items():
      setattr(self, name, _variables(value, nnx.Param))

  def params(self) -> dict[str, Any]:
    """The parameters as the pure pytree (`model.init_params`'s layout)."""
    return {name: _arrays(getattr(self, name)) for name in self._param_names}

  def _key(self, key: Array | None, needed: bool) -> Array | None:
    if key is not None or not needed:
      return key
    if self.rngs is None:
      raise ValueError(f"{type(self).__name__} in train mode needs a dropout "
                       "key: pass key=, or build the module with rngs")
    return self.rngs()


class Recommender(_PureParams):
  """The MMSSL recommender (docs/reference.md §2.3) as an NNX module.

  Recommender(rngs, n_users, n_items, modality_dims, hp): the released
  initialisation (`model.init_params`, §2.2) with the key `rngs.params()`;
  the same sizes, modality order and key give `init_params`'s arrays.
  `Recommender.from_params(params, hp)` wraps existing parameters (a train
  state's `params`). `params` (keyword) is what from_params passes; the
  sizes are then ignored.
  """

  def __init__(self, rngs: nnx.Rngs | None, n_users: int, n_items: int,
               modality_dims: Mapping[str, int],
               hp: model_lib.ModelHParams = model_lib.ModelHParams(), *,
               params: Mapping[str, Any] | None = None):
    if params is None:
      params = model_lib.init_params(
          rngs.params(), n_users=n_users, n_items=n_items,
          modality_dims=modality_dims, hp=hp)
    self.hp = hp
    self.rngs = _dropout_stream(rngs)
    self._set_params(params)

  @classmethod
  def from_params(cls, params: Mapping[str, Any],
                  hp: model_lib.ModelHParams = model_lib.ModelHParams(), *,
                  rngs: nnx.Rngs | None = None) -> "Recommender":
    """A module holding `params` (from `model.init_params` or a train state)."""
    return cls(rngs, 0, 0, {}, hp, params=params)

  def __call__(self, graph: graph_lib.BipartiteGraph,
               features: Mapping[str, Array],
               modality_graphs: Mapping[str, graph_lib.BipartiteGraph], *,
               train: bool, key: Array | None = None,
               modality_is_base: Array | bool | None = None,
               user_rows: Array | None = None,
               item_rows: Array | None = None) -> model_lib.ForwardOutput:
    """`model.forward` on this module's parameters (§2.3 a-h).

    Arguments as in `model.forward`; `key` (dropout, train=True) defaults to
    the module's dropout stream. For a fresh model, the modality graphs are
    the base graph (`{m: graph for m in features}`) until their first
    regeneration (§2.1, §4.4).
    """
    key = self._key(key, train)
    if key is None:
      key = jax.random.key(_EVAL_KEY_SEED)
    return model_lib.forward(
        self.params(), graph, features, modality_graphs, key=key, train=train,
        hp=self.hp, modality_is_base=modality_is_base, user_rows=user_rows,
        item_rows=item_rows)


class Critic(_PureParams):
  """The MMSSL critic (docs/reference.md §3.5) as an NNX module.

  Critic(rngs, n_items, kind=, rank=, hidden=, hp=): `critic.init_critic`
  with the key `rngs.params()` and BatchNorm statistics from
  `critic.init_critic_batch_stats`. `Critic.from_params(params, stats, hp)`
  wraps existing ones. The statistics are `nnx.BatchStat`s under
  `batch_stats` (not trained by an `nnx.Optimizer(..., wrt=nnx.Param)`).
  """

  def __init__(self, rngs: nnx.Rngs | None, n_items: int, *,
               kind: str = "dense", rank: int = 64,
               hidden: Sequence[int] | None = None,
               hp: critic_lib.CriticHParams = critic_lib.REFERENCE,
               params: Mapping[str, Any] | None = None,
               batch_stats: Mapping[str, Any] | None = None):
    if params is None:
      params = critic_lib.init_critic(rngs.params(), n_items, kind=kind,
                                      rank=rank, hidden=hidden,
                                      batch_norm=hp.batch_norm)
    if batch_stats is None:
      batch_stats = critic_lib.init_critic_batch_stats(params)
    self.hp = hp
    self.rngs = _dropout_stream(rngs)
    self._set_params(params)
    self.batch_stats = _variables(batch_stats, nnx.BatchStat)

  @classmethod
  def from_params(cls, params: Mapping[str, Any],
                  batch_stats: Mapping[str, Any] | None = None,
                  hp: critic_lib.CriticHParams = critic_lib.REFERENCE, *,
                  rngs: nnx.Rngs | None = None) -> "Critic":
    """A module holding `params` and `batch_stats` (default: initial ones)."""
    return cls(rngs, 0, hp=hp, params=params, batch_stats=batch_stats)

  def stats(self) -> dict[str, Any]:
    """The BatchNorm running statistics as the pure pytree."""
    return _arrays(self.batch_stats)

  def __call__(self, rows: Array, *, key: Array | None = None,
               train: bool | None = None) -> Array:
    """Critic scores (N,) of rows (N, I): `critic.dense_critic_apply` (§3.5).

    train: overrides hp.train (None keeps it). In train mode the BatchNorm
    running statistics are updated in place, and dropout draws from `key`
    (default: the module's dropout stream).
    """
    hp = self.hp if train is None else dataclasses.replace(self.hp,
                                                           train=train)
    needs_key = hp.train and any(rate > 0 for rate in hp.dropout)
    scores, new_stats = critic_lib.dense_critic_apply(
        self.params(), self.stats(), rows, key=self._key(key, needs_key),
        hp=hp)
    if hp.train and hp.batch_norm:
      _assign(self.batch_stats, new_stats)
    return scores


class LightGCN(_PureParams):
  """The LightGCN baseline: two ID tables, `model.lightgcn_forward`.

  LightGCN(rngs, n_users, n_items, embed_size, n_layers): xavier-uniform
  tables (`model.init_embeddings`) with the key `rngs.params()`;
  `LightGCN.from_params(params, n_layers)` wraps existing ones.
  """

  def __init__(self, rngs: nnx.Rngs | None, n_users: int, n_items: int,
               embed_size: int = 64, n_layers: int = 3, *,
               params: Mapping[str, Any] | None = None):
    if params is None:
      params = model_lib.init_embeddings(rngs.params(), n_users, n_items,
                                         embed_size)
    self.n_layers = n_layers
    self._set_params(params)

  @classmethod
  def from_params(cls, params: Mapping[str, Any],
                  n_layers: int = 3) -> "LightGCN":
    return cls(None, 0, 0, n_layers=n_layers, params=params)

  def __call__(self, graph: graph_lib.BipartiteGraph) -> tuple[Array, Array]:
    """Final (user (U, d), item (I, d)) embeddings over a symmetric graph."""
    return model_lib.lightgcn_forward(self.params(), graph, self.n_layers)


class WorkdirModules(NamedTuple):
  """A trained run's best checkpoint as NNX modules, with their inputs.

  model: a `Recommender` (model.name='mmssl') or a `LightGCN`.
  critic: the `Critic` with its running statistics, or None (no critic:
    LightGCN, or a config without the adversarial loss).
  graph, features: the run's training graph and item features.
  modality_graphs: the checkpoint's G^m ({} for LightGCN).
  modality_is_base: whether G^m is still the base graph (pass it to the
    Recommender; None for LightGCN).
  restored: the `restore.RestoredRun` (config, dataset, run, state, ...).
  """

  model: Recommender | LightGCN
  critic: Critic | None
  graph: graph_lib.BipartiteGraph
  features: dict[str, Array]
  modality_graphs: dict[str, graph_lib.BipartiteGraph]
  modality_is_base: Array | None
  restored: Any

  def embeddings(self) -> tuple[Array, Array]:
    """Final user and item representations in eval mode: the vectors that
    `Run.final_embeddings` gives and `mmssl_jax.export` writes."""
    if isinstance(self.model, LightGCN):
      return self.model(self.graph)
    out = self.model(self.graph, self.features, self.modality_graphs,
                     train=False, modality_is_base=self.modality_is_base)
    return out.user, out.item


def from_workdir(workdir: str, *, data_dir: str | None = None
                 ) -> WorkdirModules:
  """Loads a training workdir's best checkpoint (`restore.restore_best`)."""
  from mmssl_jax import restore  # pylint: disable=g-import-not-at-top
  restored = restore.restore_best(workdir, data_dir=data_dir)
  config, run, state = restored.config, restored.run, restored.state
  inputs = run.inputs
  if config.model.name == "lightgcn":
    net = LightGCN.from_params(state.params, int(config.model.lightgcn_layers))
    return WorkdirModules(net, None, inputs.graph, dict(inputs.features), {},
                          None, restored)
  net = Recommender.from_params(
      state.params, model_lib.ModelHParams.from_config(config.model))
  critic = None
  if state.critic_params is not None:
    critic = Critic.from_params(
        state.critic_params, state.critic_stats,
        critic_lib.CriticHParams.from_config(config.critic))
  return WorkdirModules(net, critic, inputs.graph, dict(inputs.features),
                        dict(state.modality_graphs),
                        run.modality_is_base(state), restored)
