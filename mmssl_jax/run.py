"""Building a run: its dataset, config checks and `Run`: step, state, evaluation.

`Run(config, ds, mesh)` builds, once, everything a run computes with: the
static sizes, the step inputs (training graph, features, sampler tables),
the jitted step, the initial state and the evaluation sets, on one device
(`mesh=None`) or over a device mesh (`parallel.run_mesh(config)`). Training
(`mmssl_jax.train`) and restoring a trained run (`mmssl_jax.restore`) both
start here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmssl_jax import config_lib
from mmssl_jax import evaluation
from mmssl_jax import graph as graph_lib
from mmssl_jax import model as model_lib
from mmssl_jax import modality_graphs
from mmssl_jax import parallel
from mmssl_jax import state as state_lib
from mmssl_jax import steps
from mmssl_jax.data import DataError, Dataset, Split
from mmssl_jax.data import cold_start
from mmssl_jax.data import formats
from mmssl_jax.data import sampler as sampler_lib
from mmssl_jax.data import synthetic


class ConfigError(ValueError):
  """A config that cannot run (with this dataset); a one-line message."""


def resolve_data_dir(config: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """`config` with `data.dir` set to the dataset folder found (a copy).

  A dataset config without `--config.data.dir` looks in
  `config_lib.data_folder_candidates`; the error names every folder it
  looked in and the files a dataset folder holds.
  """
  data = config.data
  if data.source != "folder" or data.dir:
    return config
  tried = config_lib.data_folder_candidates(data)
  found = [path for path in tried if os.path.isdir(path)]
  if not found:
    where = f" (looked in {', '.join(tried)})" if tried else ""
    env = (f", or set MMSSL_DATA to the folder that holds {data.name}/"
           if data.name and not os.environ.get("MMSSL_DATA") else "")
    raise DataError(
        f"no dataset folder for {data.name or 'this config'}{where}: pass "
        f"--config.data.dir=PATH{env}; a dataset folder holds "
        f"{formats.EXPECTED_FILES}")
  config = config.copy_and_resolve_references()
  config.data.dir = os.path.abspath(found[0])
  return config


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by `config.data` (synthetic, or a folder on disk;
  `resolve_data_dir` first for a dataset config's default folder)."""
  if data_config.source == "synthetic":
    return synthetic.make_synthetic(data_config.synthetic)
  if data_config.source != "folder":
    raise ConfigError(f"unknown data.source {data_config.source!r} (expected "
                      "'folder' or 'synthetic')")
  if not data_config.dir:
    raise DataError(
        "config.data.dir is not set: pass --config.data.dir=PATH, a folder "
        f"with {formats.EXPECTED_FILES}")
  return formats.load_folder(
      data_config.dir, format=data_config.format,
      modalities=config_lib.modality_names(data_config.modalities))


def steps_per_epoch(config: ml_collections.ConfigDict, n_train: int) -> int:
  """Batches of one epoch, as the released loop counts them (§4.6)."""
  return n_train // config.train.batch_size + 1


def _adapt_ks(config, n_items: int, name: str) -> list[str]:
  """Cuts eval.ks and eval.metric's K to the catalogue size."""
  notes, ks = [], tuple(int(k) for k in config.eval.ks)
  cut = tuple(sorted({min(k, n_items) for k in ks}))
  if cut != ks:
    config.eval.ks = cut
    notes.append(f"eval.ks {ks} -> {cut}: dataset {name} has {n_items} items")
  metric, _, k = config.eval.metric.partition("@")
  if k.isdigit() and int(k) > n_items:
    config.eval.metric = f"{metric}@{n_items}"
    notes.append(f"eval.metric {metric}@{k} -> {config.eval.metric}: "
                 f"dataset {name} has {n_items} items")
  return notes


def _adapt_graphs(config, ds: Dataset) -> list[str]:
  """The modality-graph schedule on short epochs and small catalogues."""
  gu, notes = config.graph_update, []
  n_steps = steps_per_epoch(config, len(ds.train))
  if gu.schedule == "reference" and gu.T >= n_steps:
    if n_steps > 1:
      notes.append(f"graph_update.T {gu.T} -> {n_steps - 1}: an epoch of "
                   f"dataset {ds.name} has {n_steps} batches")
      gu.T = n_steps - 1
    else:
      notes.append(f"graph_update.T={gu.T}: an epoch of dataset {ds.name} "
                   "is one batch, so the modality graphs are never "
                   "regenerated (as in the released code)")
  if gu.schedule == "persistent" and int(ds.n_items * gu.m_topk_rate) < 1:
    notes.append(f"graph_update.m_topk_rate {gu.m_topk_rate} -> "
                 f"1/{ds.n_items}: the persistent graphs need k >= 1 item "
                 f"of the {ds.n_items} of dataset {ds.name}")
    gu.m_topk_rate = 1.0 / ds.n_items
  return notes


def adapt_to_dataset(config: ml_collections.ConfigDict, ds: Dataset
                     ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The settings a small dataset cannot use, adapted; one note each.

  Top-K cut to the catalogue (eval.ks, eval.metric), the reference
  schedule's T to the batches of an epoch, the persistent graphs' k to at
  least 1, the dense critic's hidden widths to at least 1. Returns a copy of
  `config` (`config` itself when nothing changes) and the notes, which the
  caller prints as warnings. Adapting an adapted config changes nothing, so
  a resumed or restored run is built the same.
  """
  adapted = config.copy_and_resolve_references()
  notes = _adapt_ks(adapted, ds.n_items, ds.name)
  if config.model.name == "mmssl":
    notes += _adapt_graphs(adapted, ds)
    critic = adapted.critic
    if (critic.kind == "dense" and not critic.hidden and ds.n_items < 8
        and adapted.loss.adversarial == "wgan"):
      critic.hidden = (max(1, ds.n_items // 4), 1)
      notes.append(f"critic.hidden () -> {tuple(critic.hidden)}: dataset "
                   f"{ds.name} has {ds.n_items} items")
  return (adapted, notes) if notes else (config, [])


def check_config(config: ml_collections.ConfigDict, ds: Dataset) -> None:
  """Config/data combinations that cannot run, as one-line errors."""
  if config.model.name == "mmssl" and not ds.modalities:
    raise DataError(
        f"{ds.name}: MMSSL needs at least one modality but the dataset has no "
        "<modality>_feat.npy files (use model=lightgcn, or add features)")
  if config.model.name not in ("mmssl", "lightgcn"):
    raise ConfigError(f"unknown model.name {config.model.name!r}")
  if config.model.cold_start and config.model.name != "mmssl":
    raise ConfigError("model.cold_start encodes items from their features: "
                      "it needs model.name='mmssl'")
  for name, low in (("checkpoint_keep", 1), ("nan_check_every_steps", 1)):
    value = config.train[name]
    if int(value) < low:
      raise ConfigError(f"train.{name} must be >= {low}, got {value}")


def load(config: ml_collections.ConfigDict
         ) -> tuple[ml_collections.ConfigDict, Dataset, list[str]]:
  """The dataset of `config` and the config to run it with.

  Finds the dataset folder (`resolve_data_dir`), spells `data.modalities`
  as a tuple of names, loads and validates the data, adapts the settings
  the dataset cannot use (`adapt_to_dataset`) and checks the rest
  (`check_config`). Returns (config, dataset, notes); the notes say what
  was adapted.
  """
  config = resolve_data_dir(config)
  names = config_lib.modality_names(config.data.modalities)
  if names != tuple(config.data.modalities):
    config = config.copy_and_resolve_references()
    config.data.modalities = names
  ds = load_dataset(config.data)
  if config.data.cold_items:
    ds = cold_start.hold_out_items(ds, float(config.data.cold_items),
                                   int(config.data.cold_seed))
  config, notes = adapt_to_dataset(config, ds)
  check_config(config, ds)
  return config, ds, notes


@functools.partial(jax.jit, static_argnames=("is_mmssl", "hp", "layers"))
def _final_embeddings(state: state_lib.TrainState, inputs, is_base=None,
                      new_items=None, *, is_mmssl: bool,
                      hp: model_lib.ModelHParams, layers: int):
  if not is_mmssl:
    return model_lib.lightgcn_forward(state.params, inputs.graph, layers)
  out = model_lib.forward(state.params, inputs.graph, inputs.features,
                          state.modality_graphs, key=state.rng, train=False,
                          hp=hp, modality_is_base=is_base)
  if new_items is None:
    return out.user, out.item
  encoded = model_lib.encode_items(state.params["cold_encoder"],
                                   inputs.features)
  return out.user, jnp.where(new_items[:, None], encoded, out.item)


class GroupEval(NamedTuple):
  """The evaluation of one group of target items (`item_group_sets`).

  eval_set: users and targets; items: the sub-catalogue the targets are
  ranked in (item ids), None for all items; ks: its cut-offs.
  """

  eval_set: evaluation.EvalSet
  items: np.ndarray | None
  ks: tuple[int, ...]


def _within(items: np.ndarray, n_items: int, split: Split) -> Split:
  """`split`'s pairs whose item is in `items`, with local item ids (the
  position in `items`)."""
  local = np.full(n_items, -1, np.int32)
  local[items] = np.arange(len(items), dtype=np.int32)
  keep = local[split.items] >= 0
  return Split(split.users[keep], local[split.items[keep]])


def item_group_sets(ds: Dataset, target: Split, exclude: list[Split],
                    block: int, ks) -> dict[str, GroupEval]:
  """Metrics by item group for a dataset with held-out (cold) items.

  'cold/': cold targets ranked among the cold items only; 'cold_all/':
  cold targets ranked among all items (the new items competing with the
  old); 'warm/': warm targets ranked among the warm items only. Users
  without a target of the group are not evaluated in it. {} without a
  cold-item split.
  """
  if ds.cold_items is None:
    return {}
  cold = cold_start.cold_mask(ds)
  n_users, n_items = ds.n_users, ds.n_items

  def among(items: np.ndarray) -> GroupEval:
    eval_set = evaluation.build_eval_set(
        target=_within(items, n_items, target),
        exclude=[_within(items, n_items, s) for s in exclude],
        n_users=n_users, n_items=len(items), block_users=block)
    return GroupEval(eval_set, items,
                     tuple(sorted({min(int(k), len(items)) for k in ks})))

  return {
      "cold/": among(np.flatnonzero(cold).astype(np.int32)),
      "cold_all/": GroupEval(evaluation.build_eval_set(
          target=Split(target.users[cold[target.items]],
                       target.items[cold[target.items]]),
          exclude=exclude, n_users=n_users, n_items=n_items,
          block_users=block), None, tuple(ks)),
      "warm/": among(np.flatnonzero(~cold).astype(np.int32)),
  }


def _host_inputs(config, ds: Dataset) -> state_lib.StepInputs:
  """The step inputs as numpy arrays (graph, features, sampler tables)."""
  norm = "one_sided" if config.model.name == "mmssl" else "symmetric"
  return state_lib.StepInputs(
      graph=graph_lib.build_graph(ds.train.users, ds.train.items, ds.n_users,
                                  ds.n_items, norm=norm),
      features=dict(ds.modalities),
      sampler=sampler_lib.build_sampler_tables(ds.train, ds.n_users))


class Run:
  """Everything built once for a run: shapes, step inputs, eval sets, step.

  Args:
    config: the run config.
    ds: its dataset (validated).
    mesh: the device mesh to shard the run over (`parallel.run_mesh`), or
      None for one device. On a mesh the step is one `jax.jit` with explicit
      in/out shardings, the inputs and state are global arrays (item-indexed
      ones split over 'item'), graphs propagate without their CSR fields
      (`graph.without_csr`), and evaluation splits each user block over
      'data' (and ranks item shard by item shard with an item axis).

  It keeps device copies of what the steps read and no reference to the
  host `Dataset` (0.6 GiB of host memory at I = 1e6), so a caller that drops
  its own frees it.

  Raises:
    ValueError: sizes the mesh cannot split (batch, items, item blocks).
  """

  def __init__(self, config: ml_collections.ConfigDict, ds: Dataset,
               mesh: Mesh | None = None):
    self.config, self.mesh = config, mesh
    self.modality_dims = ds.modality_dims
    self.is_mmssl = config.model.name == "mmssl"
    self.shapes = steps.Shapes(
        ds.n_users, ds.n_items, len(ds.train), tuple(ds.modalities),
        batch_positives=steps.batch_positives_capacity(
            np.bincount(ds.train.users, minlength=ds.n_users),
            config.train.batch_size))
    if mesh is not None:
      parallel.check_batch(config, mesh)
      parallel.check_items(config, ds.n_items, mesh)
    self.step_config = steps.StepConfig.from_config(
        config, self.shapes, parallel.StepSharding.of(mesh))
    self.steps_per_epoch = steps_per_epoch(config, len(ds.train))
    block, ks = config.eval.block_users, tuple(config.eval.ks)
    test_exclude = ([ds.train, ds.val] if config.eval.exclude_val_in_test
                    else [ds.train])
    self.val_set, self.test_set = (
        evaluation.build_eval_set(target=target, exclude=exclude,
                                  n_users=ds.n_users, n_items=ds.n_items,
                                  block_users=block)
        for target, exclude in ((ds.val, [ds.train]), (ds.test, test_exclude)))
    self.groups = {
        "val": item_group_sets(ds, ds.val, [ds.train], block, ks),
        "test": item_group_sets(ds, ds.test, test_exclude, block, ks)}
    # Items without training interactions take the inductive encoder's
    # vectors (`model.cold_start`); None: every item keeps i*.
    self.new_items = (jnp.asarray(np.bincount(ds.train.items,
                                              minlength=ds.n_items) == 0)
                      if self.step_config.model.cold_start else None)
    self._embedding_args = dict(is_mmssl=self.is_mmssl,
                                hp=self.step_config.model,
                                layers=self.step_config.lightgcn_layers)
    inputs = _host_inputs(config, ds)
    if mesh is None:
      self.inputs = jax.tree.map(jnp.asarray, inputs)
      self.state_shardings = None
      self.step = steps.make_step(self.step_config)
    else:
      self._place_on_mesh(inputs)

  def _place_on_mesh(self, inputs: state_lib.StepInputs) -> None:
    """Global inputs, state shardings, the sharded step and eval sets."""
    mesh = self.mesh
    inputs = parallel.strip_csr_inputs(inputs)
    input_s = parallel.inputs_shardings(inputs, mesh)
    self.inputs = parallel.put_global(inputs, input_s)
    abstract = jax.eval_shape(self._init_state_unplaced)
    self.state_shardings = parallel.state_shardings(abstract, mesh,
                                                    self.shapes.n_items)
    rep = parallel.replicated(mesh)
    self.step = steps.make_step(
        self.step_config, in_shardings=(self.state_shardings, rep, input_s),
        out_shardings=(self.state_shardings, rep))
    self.val_set = parallel.shard_eval_set(self.val_set, mesh)
    self.test_set = parallel.shard_eval_set(self.test_set, mesh)
    self.groups = {split: {p: g._replace(eval_set=parallel.shard_eval_set(
        g.eval_set, mesh)) for p, g in groups.items()}
                   for split, groups in self.groups.items()}

  def _init_state_unplaced(self) -> state_lib.TrainState:
    state = steps.init_state(self.config, self.step_config,
                             self.modality_dims,
                             jax.random.key(self.config.seed))
    if self.mesh is None:
      return state
    return parallel.strip_csr_state(state)

  def init_state(self) -> state_lib.TrainState:
    """The initial train state (placed on the mesh, if any)."""
    state = self._init_state_unplaced()
    if self.mesh is None:
      return state
    return parallel.put_global(state, self.state_shardings)

  def compile_step(self, state) -> float | None:
    """Compiles `step` for `state` before the first iteration; returns the
    seconds it took, or None for a step that is not a `jax.jit` function
    (a wrapper, compiled at its first call).

    The one compilation of the run, done ahead of time so that the memory
    XLA frees afterwards can be handed back to the OS before the step's
    scratch is allocated: at I = 1e6 it would otherwise stay resident
    (0.5 GiB) next to the step's peak (docs/results.md, scale).
    """
    if not hasattr(self.step, "lower"):
      return None
    t0 = time.perf_counter()
    self.step = self.step.lower(state, jnp.int32(0), self.inputs).compile()
    release_freed_host_memory()
    return time.perf_counter() - t0

  def final_embeddings(self, state, inductive: bool = True):
    """Final user and item representations in eval mode (no dropout).

    With `model.cold_start`, items without training interactions take the
    inductive encoder's vectors, unless `inductive` is False.
    """
    new_items = self.new_items if inductive else None
    return _final_embeddings(state, self.inputs, self.modality_is_base(state),
                             new_items, **self._embedding_args)

  def modality_is_base(self, state):
    """Whether state's G^m is still the base graph (`model.forward`)."""
    if not self.is_mmssl:
      return None
    return modality_graphs.is_base(self.step_config.graphs, state.step)

  def evaluate(self, state, split: str,
               inductive: bool = True) -> dict[str, float]:
    """Full-ranking metrics of `state` on the 'val' or 'test' split; with a
    cold-item split also by item group ('cold/', 'cold_all/', 'warm/'
    prefixes, `item_group_sets`). `inductive` as in `final_embeddings`."""
    return self.evaluate_embeddings(*self.final_embeddings(state, inductive),
                                    split)

  def evaluate_embeddings(self, user, item, split: str) -> dict[str, float]:
    """`evaluate` for any (n_users, d) user and (n_items, d) item vectors
    scored by their dot product (e.g. `baselines`)."""
    eval_set = self.val_set if split == "val" else self.test_set
    item_mesh = self.mesh if self.step_config.sharding.split_items else None
    metrics = evaluation.evaluate(user, item, eval_set,
                                  ks=self.config.eval.ks, mesh=item_mesh)
    for prefix, group in self.groups[split].items():
      items = item if group.items is None else item[group.items]
      mesh = item_mesh if group.items is None else None
      metrics.update({prefix + k: v for k, v in evaluation.evaluate(
          user, items, group.eval_set, ks=group.ks, mesh=mesh).items()})
    return metrics

  def train_epoch(self, state):
    """Runs one epoch of steps; returns the state and mean loss terms."""
    history = []
    for idx in range(self.steps_per_epoch):
      state, terms = self.step(state, jnp.int32(idx), self.inputs)
      history.append(terms)
    return state, epoch_means(jax.device_get(history))


def epoch_means(history) -> dict[str, float]:
  """Mean of each loss term over an epoch's steps (float32, as logged)."""
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


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
