"""`train_and_evaluate(config, workdir)`: data, state, loop, evaluation, early stop.

Data is loaded and validated before anything is written to `workdir`, so bad
input leaves the workdir untouched. Validation runs every
`eval.every_epochs`; the test split is evaluated whenever validation
`eval.metric` improves, and the reported result is the test metrics at the best
validation epoch (`mmssl_reference.md` §4.6). Training stops after
`eval.patience` further non-improving evaluations.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmssl_jax import evaluation
from mmssl_jax import graph as graph_lib
from mmssl_jax import model as model_lib
from mmssl_jax import state as state_lib
from mmssl_jax import steps
from mmssl_jax.data import DataError, Dataset
from mmssl_jax.data import formats
from mmssl_jax.data import sampler as sampler_lib
from mmssl_jax.data import synthetic

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by `config.data` (synthetic, or a folder on disk)."""
  if data_config.source == "synthetic":
    return synthetic.make_synthetic(data_config.synthetic)
  if data_config.source != "folder":
    raise ValueError(f"unknown data.source {data_config.source!r}")
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
    raise ValueError(f"unknown model.name {config.model.name!r}")
  if max(config.eval.ks) > ds.n_items:
    raise ValueError(f"eval.ks {tuple(config.eval.ks)} exceed n_items "
                     f"{ds.n_items}")
  steps_per_epoch = len(ds.train) // config.train.batch_size + 1
  if (config.model.name == "mmssl"
      and steps_per_epoch <= config.graph_update.T):
    raise ValueError(
        f"graph_update.T={config.graph_update.T} must be smaller than the "
        f"{steps_per_epoch} batches of an epoch")


class Run:
  """Everything built once for a run: shapes, step inputs, eval sets, step."""

  def __init__(self, config: ml_collections.ConfigDict, ds: Dataset):
    self.config, self.ds = config, ds
    self.is_mmssl = config.model.name == "mmssl"
    self.shapes = steps.Shapes(ds.n_users, ds.n_items, len(ds.train),
                               tuple(ds.modalities))
    norm = "one_sided" if self.is_mmssl else "symmetric"
    self.graph_np = graph_lib.build_graph(ds.train.users, ds.train.items,
                                          ds.n_users, ds.n_items, norm=norm)
    self.inputs = state_lib.StepInputs(
        graph=jax.tree.map(jnp.asarray, self.graph_np),
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
    hp = model_lib.ModelHParams.from_config(config.model)
    layers = config.model.lightgcn_layers

    def final_embeddings(state: state_lib.TrainState, inputs):
      if not self.is_mmssl:
        return model_lib.lightgcn_forward(state.params, inputs.graph, layers)
      out = model_lib.forward(state.params, inputs.graph, inputs.features,
                              state.modality_graphs, key=state.rng,
                              train=False, hp=hp)
      return out.user, out.item

    self._final_embeddings = jax.jit(final_embeddings)

  def init_state(self) -> state_lib.TrainState:
    return steps.init_state(self.config, self.shapes, self.graph_np,
                            self.ds.modality_dims,
                            jax.random.key(self.config.seed))

  def final_embeddings(self, state):
    """Final user and item representations in eval mode (no dropout)."""
    return self._final_embeddings(state, self.inputs)

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
    history = jax.device_get(history)
    means = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
    return state, means


def _format_metrics(prefix: str, metrics: dict[str, float], keys) -> str:
  return " ".join(f"{prefix}{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates `workdir` and writes config.json; refuses to overwrite a run."""
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(metrics_path):
    raise FileExistsError(
        f"{metrics_path} exists: workdir holds an earlier run; choose a new "
        "--workdir")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with early stopping; returns the test metrics at best validation.

  Returns a dict with `best_epoch`, `epochs`, `test` (metrics dict at the best
  validation epoch) and `val` (best validation metrics).
  """
  ds = load_dataset(config.data)
  check_config(config, ds)
  logging.info("%s", ds.summary())
  run = Run(config, ds)
  state = run.init_state()
  logging.info("model %s (%s), %d recommender parameters%s, %d steps/epoch",
               config.model.name, config.variant,
               state_lib.count_params(state.params),
               (f", {state_lib.count_params(state.critic_params)} critic "
                "parameters" if state.critic_params is not None else ""),
               run.steps_per_epoch)
  prepare_workdir(workdir, config)
  metric = config.eval.metric
  best = {"epoch": -1, "val": None, "test": None, "score": -np.inf}
  bad_evals = 0
  show = ("recall@20", "ndcg@20", "ndcg_mmssl@20")
  with open(os.path.join(workdir, METRICS_FILE), "a") as log_file:
    epoch = 0
    for epoch in range(config.train.epochs):
      t0 = time.time()
      state, terms = run.train_epoch(state)
      train_s = time.time() - t0
      bad = [k for k, v in terms.items() if not np.isfinite(v)]
      if bad:
        raise FloatingPointError(
            f"non-finite loss term(s) {', '.join(bad)} in epoch {epoch} "
            f"(step {int(state.step)})")
      record = {"epoch": epoch, "train_seconds": train_s,
                **{f"train/{k}": v for k, v in terms.items()}}
      line = (f"epoch {epoch:3d} | loss {terms['loss']:.4f} "
              + " ".join(f"{k} {v:.4f}" for k, v in terms.items()
                         if k != "loss"))
      if (epoch + 1) % config.eval.every_epochs == 0:
        t1 = time.time()
        val = run.evaluate(state, "val")
        record.update({f"val/{k}": v for k, v in val.items()})
        line += " | val " + _format_metrics("", val, show)
        if val[metric] > best["score"]:
          test = run.evaluate(state, "test")
          record.update({f"test/{k}": v for k, v in test.items()})
          best = {"epoch": epoch, "val": val, "test": test,
                  "score": val[metric]}
          bad_evals = 0
          line += " *"
        else:
          bad_evals += 1
        record["eval_seconds"] = time.time() - t1
      line += f" | {time.time() - t0:.1f}s"
      logging.info("%s", line)
      log_file.write(json.dumps(record) + "\n")
      log_file.flush()
      if bad_evals > config.eval.patience:
        logging.info("early stop: %s did not improve for %d evaluations",
                     metric, bad_evals)
        break
    result = {"final": True, "best_epoch": best["epoch"], "epochs": epoch + 1,
              "test": best["test"], "val": best["val"]}
    log_file.write(json.dumps(result) + "\n")
  if best["test"] is not None:
    logging.info("best validation epoch %d: test %s", best["epoch"],
                 _format_metrics("", best["test"],
                                 ("recall@20", "precision@20", "ndcg@20",
                                  "ndcg_mmssl@20")))
  return result
