"""Jitted train steps: MMSSL's two-player iteration and the LightGCN baseline.

`make_mmssl_step` builds one function per run that does, in the released order
(`mmssl_reference.md` §4.3): sample a batch; a no-gradient forward; the critic
(D) update with Adam; a second forward with a fresh dropout key; the
recommender update with AdamW; and the modality-graph bookkeeping (§4.4). The
step is compiled once: shapes are static, the batch index within the epoch is
a traced argument, the state is donated.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmssl_jax import critic as critic_lib
from mmssl_jax import graph as graph_lib
from mmssl_jax import losses
from mmssl_jax import model as model_lib
from mmssl_jax.data import sampler as sampler_lib
from mmssl_jax import state as state_lib
from mmssl_jax.state import GraphBuffer, StepInputs, TrainState


def make_optimizer(optim: ml_collections.ConfigDict):
  """The recommender optimiser: AdamW (decoupled decay, as torch) or Adam."""
  if optim.name == "adamw":
    return optax.adamw(optim.lr, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=optim.weight_decay)
  if optim.name == "adam":
    return optax.adam(optim.lr)
  raise ValueError(f"unknown optim.name {optim.name!r}")


def make_critic_optimizer(critic: ml_collections.ConfigDict):
  return optax.adam(critic.lr, b1=critic.b1, b2=critic.b2)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static sizes of a run."""

  n_users: int
  n_items: int
  n_train: int
  modalities: tuple[str, ...]
  # Most training items a batch can hold (`batch_positives_capacity`); None:
  # unknown, so the low-rank step subtracts every user's positives.
  batch_positives: int | None = None


def batch_positives_capacity(degrees, batch_size: int) -> int:
  """Most training items B sampled users can have: static, from the data.

  The sum of the B largest training degrees when users are drawn without
  replacement (B <= users with items, §4.2), else B times the largest.
  """
  degrees = np.asarray(degrees, np.int64)
  degrees = -np.sort(-degrees[degrees > 0])
  if batch_size > degrees.size:
    return max(1, batch_size * int(degrees[0])) if degrees.size else 1
  return max(1, int(degrees[:batch_size].sum()))


def topk_k(config, n_items: int) -> int:
  """k = floor(I * m_topk_rate) (§4.4); 0 for the Baby settings."""
  return int(n_items * config.graph_update.m_topk_rate)


def buffer_capacity(config, n_items: int) -> int:
  """Pairs the reference schedule can accumulate between two rebuilds.

  Rebuilds happen at batch indices that are positive multiples of T and the
  lists survive epoch boundaries, so at most (T - 1) + 1 + (T - 1) batches of
  B * k pairs accumulate (end of one epoch, index 0, then up to T - 1 more).
  """
  t = config.graph_update.T
  return (2 * t - 1) * config.train.batch_size * topk_k(config, n_items)


def _critic_head(config, params, stats, key):
  """h -> (scores, stats): the critic after its first layer, as configured."""
  c = config.critic
  return lambda h: critic_lib.critic_head(
      params, stats, h, key=key, negative_slope=c.negative_slope,
      batch_norm=c.batch_norm, dropout=tuple(c.dropout),
      output_scale=c.output_scale, sigmoid_output=c.sigmoid_output,
      train=c.train_mode)


def critic_loss(critic_params, config, critic_stats, real_rows, fake_rows,
                n_modalities: int, keys):
  """WGAN-GP critic loss (§3.5) with the first layer computed once per row.

  `real_rows` are the B distinct real rows; the released code stacks them
  n_modalities times to match the fake rows, which only matters after the
  first (affine) layer, so that layer runs on B rows instead of M*B. The
  penalty reuses the real and fake first-layer outputs
  (`critic.gradient_penalty_from_hidden`). Returns (loss, aux).
  """
  return critic_loss_from_hidden(
      critic_params, config, critic_stats,
      critic_lib.first_layer(critic_params, real_rows),
      critic_lib.first_layer(critic_params, fake_rows), n_modalities, keys)


def critic_loss_from_hidden(critic_params, config, critic_stats, h_real,
                            h_fake, n_modalities: int, keys):
  """`critic_loss` given the first-layer outputs of the B real rows (h_real)
  and the M*B fake rows (h_fake), e.g. from the blockwise fused generator."""
  k_real, k_fake, k_gp, k_alpha = keys
  h_real = jnp.tile(h_real, (n_modalities, 1))
  d_real, stats = _critic_head(config, critic_params, critic_stats,
                               k_real)(h_real)
  d_fake, stats = _critic_head(config, critic_params, stats, k_fake)(h_fake)
  gp = critic_lib.gradient_penalty_from_hidden(
      lambda h: _critic_head(config, critic_params, stats, k_gp)(h)[0],
      h_real, h_fake, critic_params["dense_0"], key=k_alpha)
  loss = losses.wgan_critic_loss(
      d_real=d_real, d_fake=d_fake, gradient_penalty=gp,
      gp_weight=config.critic.gp_weight * config.critic.gp_rate)
  return loss, (stats, jnp.mean(d_real), jnp.mean(d_fake), gp)


def _pair_topk(users, top_items, pairing: str):
  """(user, item) pairs from each batch user's top-k items (§4.4).

  'tiled' reproduces the released `repeat(1, k)`: the user list is the batch
  tiled k times while items are read row by row, so position p = b*k + j gets
  user users[p mod B] and item top_items[b, j]. 'per_user' pairs each row's
  items with that row's user.
  """
  b, k = top_items.shape
  items = top_items.reshape(-1)
  if pairing == "tiled":
    return jnp.tile(users, k), items
  if pairing == "per_user":
    return jnp.repeat(users, k), items
  raise ValueError(f"unknown graph_update.pairing {pairing!r}")


def _top_items(gen_rows, top_items, k: int):
  """modality -> (B, k) top-k item ids: given, computed by `top_items()` when
  it is a function (only in the branch that appends), or from the rows."""
  if callable(top_items):
    return top_items()
  if top_items is not None:
    return top_items
  return {m: jax.lax.top_k(rows, k)[1].astype(jnp.int32)
          for m, rows in gen_rows.items()}


def reference_graph_update(graphs, buffer: GraphBuffer, gen_rows, users,
                           batch_idx, *, k: int, period: int, pairing: str,
                           n_users: int, n_items: int, top_items=None):
  """The released modality-graph regeneration schedule (§4.4).

  At a batch index that is a positive multiple of T, rebuild G^m from the
  accumulated pairs (one-sided weights, duplicates summed) and clear the
  lists; the current batch is not added. Otherwise append this batch's top-k
  pairs. An empty list gives an all-zero graph. `top_items` (modality ->
  (B, k) ids, or a function returning them, called only where pairs are
  appended) replaces the top-k of `gen_rows` (then None). A rebuild from an
  empty list is `graph.empty_graph` (no sort). Rebuilt graphs keep the CSR
  fields only if the current ones have them.
  """
  rebuild = (batch_idx > 0) & (batch_idx % period == 0)

  def do_rebuild(graphs, buffer):
    capacity = next(iter(graphs.values())).n_edges
    new = {}
    for m in graphs:
      u = jnp.zeros((capacity,), jnp.int32)
      i = jnp.zeros((capacity,), jnp.int32)
      n_buf = buffer.users[m].shape[0]
      if n_buf:
        u = u.at[:n_buf].set(buffer.users[m])
        i = i.at[:n_buf].set(buffer.items[m])
      valid = jnp.arange(capacity) < buffer.length
      csr = graphs[m].user_indptr is not None
      new[m] = jax.lax.cond(
          buffer.length > 0,
          lambda u, i, valid: graph_lib.sort_graph(u, i, valid, n_users,
                                                   n_items, csr=csr),
          lambda *_: graph_lib.empty_graph(capacity, n_users, n_items,
                                           csr=csr),
          u, i, valid)
    return new, buffer._replace(length=jnp.zeros((), jnp.int32))

  def do_append(graphs, buffer):
    if k == 0:
      return graphs, buffer
    bu, bi = dict(buffer.users), dict(buffer.items)
    for m, top in _top_items(gen_rows, top_items, k).items():
      pu, pi = _pair_topk(users, top, pairing)
      bu[m] = jax.lax.dynamic_update_slice(bu[m], pu, (buffer.length,))
      bi[m] = jax.lax.dynamic_update_slice(bi[m], pi, (buffer.length,))
    return graphs, GraphBuffer(bu, bi, buffer.length + users.shape[0] * k)

  return jax.lax.cond(rebuild, do_rebuild, do_append, graphs, buffer)


def persistent_graph_update(graphs, table: state_lib.TopkTable, gen_rows,
                            users, step, *, k: int, period: int,
                            n_items: int, top_items=None):
  """The paper's modality-aware graphs, kept per user (issue: paper variant).

  Every step writes each batch user's top-k items of its generated row (per
  user, no pairing scramble) into a persistent (n_users, k) table; every T
  steps, counting the current one, the graphs are rebuilt from the whole
  table (`graph.topk_table_graph`). Training positives score 0 in the
  masked rows, so they enter only when fewer than k items score above 0.
  `top_items` as in `reference_graph_update`.
  """
  items = {m: table.items[m].at[users].set(top)
           for m, top in _top_items(gen_rows, top_items, k).items()}
  table = state_lib.TopkTable(items, table.refreshed.at[users].set(True))

  def rebuild(graphs):
    capacity = next(iter(graphs.values())).n_edges
    return {m: graph_lib.topk_table_graph(
        items[m], table.refreshed, n_items, capacity,
        csr=graphs[m].user_indptr is not None) for m in graphs}

  graphs = jax.lax.cond((step + 1) % period == 0, rebuild, lambda g: g,
                        graphs)
  return graphs, table


def modality_graph_is_base(config: ml_collections.ConfigDict, shapes: Shapes,
                           step) -> jax.Array:
  """Whether G^m still equals the base graph in the forwards of `step`.

  G^m starts as the base graph (§2.1) and is first regenerated at the end of
  step T under the released schedule (batch index T of epoch 0; never when
  an epoch has at most T steps, §4.4) and of step T - 1 under the
  persistent one. Until then `model.forward` propagates over the base graph
  (`modality_is_base`), so the state's modality graphs hold only what a
  regeneration can produce (`init_state`).
  """
  t = config.graph_update.T
  if config.graph_update.schedule == "persistent":
    return jnp.asarray(step < t)
  if t >= shapes.n_train // config.train.batch_size + 1:
    return jnp.ones((), bool)
  return jnp.asarray(step <= t)


def uses_fused_generator(config: ml_collections.ConfigDict) -> bool:
  """Whether the step runs the blockwise fused generator + critic.

  Selected by train.generator_block > 0 together with critic.kind='lowrank':
  the real rows and the top-k refresh are then computed item block by item
  block (`graph.fused_real_rows`, `graph.blockwise_topk`) and no
  (B, I) array is formed (except for the `rp_gae` ablation's edge
  likelihood, which needs the raw rows). The low-rank critic's generated
  rows never need one, fused or not (`graph.generated_rows_projection`).
  With the dense critic, generator_block only splits the score product into
  blocks.
  """
  return (config.train.generator_block > 0
          and config.critic.get("kind", "dense") == "lowrank")


def step_compiler_options() -> dict[str, str] | None:
  """XLA options of the train step: the memory-optimised scheduler on CPU.

  XLA:CPU's default scheduler orders a program for concurrency and starts
  many (U or I) x d temporaries (zero cotangents, optimiser-moment copies)
  long before they are used, so they are all alive across the backward
  pass. The memory-optimised one about halves the step's scratch (I = 1e5:
  0.92 -> 0.49 GiB, `benchmarks/scale.py --compile_only`) at the same
  speed (README, "Speed and memory"). Other backends keep their defaults.
  """
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def jit_step(step: Callable, **shardings) -> Callable:
  """`jax.jit` of a train step: state donated, `step_compiler_options`.

  shardings: `in_shardings` / `out_shardings` for the sharded step
  (`parallel.make_sharded_step`); none for one device.
  """
  return jax.jit(step, donate_argnums=0,
                 compiler_options=step_compiler_options(), **shardings)


def make_mmssl_step(config: ml_collections.ConfigDict, shapes: Shapes, *,
                    batch_constraint: Callable | None = None,
                    rows_constraint: Callable | None = None,
                    blocks_constraint: Callable | None = None,
                    jit: bool = True) -> Callable:
  """Returns jitted `step(state, batch_idx, inputs) -> (state, metrics)`.

  Args:
    config: the run config.
    shapes: static sizes.
    batch_constraint: applied to every array whose leading axis is the batch
      (sampled users, positives, negatives, their rows and first-layer
      outputs); `parallel` passes a sharding constraint over the 'data' mesh
      axis. None: no constraint.
    rows_constraint: applied to every (B, I) row array (interactions,
      generated, model and real rows) and to the (B, block) score blocks of
      the fused generator; `parallel` passes ('data', 'item') for item
      sharding (issue #5 item 2). None: batch_constraint.
    blocks_constraint: applied to the fused generator's stacked item blocks
      (n_blocks, block_size, ...); `parallel` passes (None, 'item'). None:
      no constraint.
    jit: return the jitted step (donating the state); False returns the
      plain function (`parallel.make_sharded_step` jits it with shardings).
  """
  hp = model_lib.ModelHParams.from_config(config.model)
  tx = make_optimizer(config.optim)
  critic_tx = make_critic_optimizer(config.critic)
  loss_cfg, gu = config.loss, config.graph_update
  batch_size = config.train.batch_size
  n_users, n_items = shapes.n_users, shapes.n_items
  n_mod = len(shapes.modalities)
  k = topk_k(config, n_items)
  block = config.train.generator_block
  fused = uses_fused_generator(config)
  adversarial = loss_cfg.adversarial
  constrain = batch_constraint or (lambda x: x)
  constrain_rows = rows_constraint or constrain
  block_kw = dict(row_constraint=rows_constraint,
                  block_constraint=blocks_constraint)
  if adversarial not in ("wgan", "none", "edge_likelihood"):
    raise ValueError(f"unknown loss.adversarial {adversarial!r}")
  if gu.schedule not in ("reference", "persistent"):
    raise ValueError(f"unknown graph_update.schedule {gu.schedule!r}")
  topk_score = gu.get("topk_score", "dot")
  if topk_score not in ("dot", "cosine"):
    raise ValueError(f"graph_update.topk_score={topk_score!r}: expected "
                     "'dot' or 'cosine'")
  if gu.schedule == "persistent" and k < 1:
    raise ValueError(
        f"graph_update.schedule='persistent' needs k >= 1, but "
        f"m_topk_rate={gu.m_topk_rate} gives k = 0 on {n_items} items")

  # The low-rank critic reads a generated row only through its projection
  # onto the factor U, which has a Gram form with no (B, I) product
  # (`graph.generated_rows_projection`); the dense critic needs whole rows.
  lowrank = (adversarial == "wgan"
             and config.critic.get("kind", "dense") == "lowrank")
  needs_rows = adversarial == "wgan" and not lowrank

  def gen_rows(out, users, interactions):
    return {m: constrain_rows(graph_lib.generated_rows(
        out.feat_user[m][users], out.feat_item[m], interactions,
        block_size=block)) for m in shapes.modalities}

  # The Gram form subtracts the training positives of the rows it projects:
  # those of the batch (at most `shapes.batch_positives`), or, when that
  # bound exceeds the whole training set (B >= users, or heavy users), those
  # of every user, for all users at once, then the batch's rows.
  all_users = (shapes.batch_positives or batch_size * n_items) >= shapes.n_train

  def projected_fake(out, users, positives, factor):
    """modality -> n(S^m) U (B, r), the fake rows' first-layer input."""
    def project(m):
      p = out.feat_user[m] if all_users else out.feat_user[m][users]
      z = graph_lib.generated_rows_projection(p, out.feat_item[m], positives,
                                              factor)
      return z[users] if all_users else z
    return [constrain(project(m)) for m in shapes.modalities]

  def first_layer_of_projections(critic_params, projections):
    return constrain(jnp.concatenate([
        critic_lib.first_layer_from_projection(critic_params, z)
        for z in projections]))

  def top_items_fn(feat_user, feat_item, lists):
    """A function computing modality -> (B, k) top-k ids of the generated
    rows (§4.4), called only where the graph update uses them."""
    def top_items():
      if fused:
        return {m: graph_lib.blockwise_topk(
            feat_user[m], feat_item[m], lists, block_size=block, k=k,
            **block_kw) for m in shapes.modalities}
      interactions = constrain_rows(graph_lib.dense_rows(lists, n_items))
      return {m: jax.lax.top_k(constrain_rows(graph_lib.generated_rows(
          feat_user[m], feat_item[m], interactions, block_size=block)),
                               k)[1].astype(jnp.int32)
              for m in shapes.modalities}
    return top_items

  def step(state: TrainState, batch_idx, inputs: StepInputs):
    keys = jax.random.split(state.rng, 10)
    rng, k_sample, k_fwd1, k_gumbel, k_dreal, k_dfake, k_gp, k_gpx, k_fwd2, \
        k_gen = keys
    users, pos, neg = map(constrain, sampler_lib.sample_batch(
        k_sample, inputs.sampler, batch_size=batch_size, n_items=n_items))
    lists = constrain(inputs.sampler.train_lists[users])
    positives = None
    if lowrank and all_users:
      g = inputs.graph
      positives = graph_lib.BatchPositives(g.users, g.items,
                                           g.to_user_weight > 0)
    elif lowrank:
      positives = graph_lib.batch_positives(lists, shapes.batch_positives)
    interactions = None
    if needs_rows or adversarial == "edge_likelihood" or (
        lowrank and not fused):
      interactions = constrain_rows(graph_lib.dense_rows(lists, n_items))
    is_base = modality_graph_is_base(config, shapes, state.step)
    forward = lambda p, key, **rows: model_lib.forward(
        p, inputs.graph, inputs.features, state.modality_graphs, key=key,
        train=True, hp=hp, modality_is_base=is_base, **rows)
    metrics = {}

    def real_rows(out, interactions):
      """The critic's (B, I) "real" rows (§3.5), constants of the D step."""
      model_rows = constrain_rows(graph_lib.generated_rows(
          out.user, out.item, interactions, block_size=block))
      real = losses.gumbel_real_rows(
          key=k_gumbel, interactions=interactions, model_rows=model_rows,
          gumbel_scale=loss_cfg.gumbel_scale, tau=loss_cfg.real_data_tau,
          ui_pre_scale=loss_cfg.ui_pre_scale,
          use_gumbel=loss_cfg.gumbel_transform,
          log_logits=loss_cfg.gumbel_log_logits)
      return constrain_rows(jax.lax.stop_gradient(real))

    # --- Critic (D) step: no-gradient forward, then one Adam step (§4.3.2).
    critic_params, critic_opt_state = state.critic_params, state.critic_opt_state
    critic_stats = state.critic_stats
    if adversarial == "wgan":
      # Only the batch users' final rows are read (`real_rows`).
      out = jax.lax.stop_gradient(forward(state.params, k_fwd1,
                                          user_rows=users))
      d_keys = (k_dreal, k_dfake, k_gp, k_gpx)
      if lowrank:
        def d_loss_fn(cp):
          factor = critic_lib.first_layer_factor(cp)
          if fused:
            z_real = graph_lib.fused_real_rows(
                k_gumbel, out.user, out.item, lists, factor,
                block_size=block, gumbel_scale=loss_cfg.gumbel_scale,
                tau=loss_cfg.real_data_tau,
                ui_pre_scale=loss_cfg.ui_pre_scale,
                use_gumbel=loss_cfg.gumbel_transform,
                log_logits=loss_cfg.gumbel_log_logits, **block_kw)
          else:
            z_real = constrain(real_rows(out, interactions) @ factor)
          h_real = constrain(critic_lib.first_layer_from_projection(
              cp, constrain(z_real)))
          h_fake = first_layer_of_projections(
              cp, projected_fake(out, users, positives, factor))
          return critic_loss_from_hidden(cp, config, critic_stats, h_real,
                                         h_fake, n_mod, d_keys)
      else:
        fake = jnp.concatenate(
            list(gen_rows(out, users, interactions).values()))
        real = real_rows(out, interactions)
        d_loss_fn = lambda cp: critic_loss(cp, config, critic_stats, real,
                                           fake, n_mod, d_keys)
      (d_loss, (critic_stats, d_real, d_fake, gp)), grads = (
          jax.value_and_grad(d_loss_fn, has_aux=True)(critic_params))
      updates, critic_opt_state = critic_tx.update(grads, critic_opt_state,
                                                   critic_params)
      critic_params = optax.apply_updates(critic_params, updates)
      metrics.update(critic=d_loss, d_real=d_real, d_fake=d_fake, gp=gp)

    # --- Recommender step: second forward with a fresh dropout key (§4.3.3).
    # The barrier hands the recommender step the D step's results and the
    # parameters together, which lets XLA order the D step's (U or I) x d
    # temporaries before the recommender's: step scratch at I = 1e6
    # 4.13 -> 3.89 GiB (`benchmarks/scale.py --compile_only`). Same values.
    critic_params, critic_opt_state, critic_stats, rec_params = (
        jax.lax.optimization_barrier((critic_params, critic_opt_state,
                                      critic_stats, state.params)))

    def rec_loss(params):
      out = forward(params, k_fwd2, user_rows=users,
                    item_rows=jnp.concatenate([pos, neg]))
      u, (p, n) = out.user, jnp.split(out.item, 2)
      terms = {
          "bpr": losses.bpr_loss(user_emb=u, pos_emb=p, neg_emb=n),
          "emb_l2": losses.embedding_l2(
              user_emb=u, pos_emb=p, neg_emb=n, decay=loss_cfg.emb_decay,
              batch_size=batch_size),
          "feat_l2": losses.feature_l2(
              user_feats=list(out.feat_user.values()),
              item_feats=list(out.feat_item.values()),
              decay=loss_cfg.feat_decay, n_items=n_items),
      }
      total = terms["bpr"] + terms["emb_l2"] + terms["feat_l2"]
      if loss_cfg.contrastive:
        terms["cl"] = sum(
            losses.infonce(anchor=out.modality_user[m][users], positive=u,
                           tau=loss_cfg.tau) for m in shapes.modalities)
        total = total + loss_cfg.cl_rate * terms["cl"]
      rows = gen_rows(out, users, interactions) if needs_rows else None
      if adversarial == "wgan":
        if lowrank:
          h_gen = first_layer_of_projections(
              critic_params, projected_fake(
                  out, users, positives,
                  critic_lib.first_layer_factor(critic_params)))
        else:
          h_gen = critic_lib.first_layer(
              critic_params, jnp.concatenate(list(rows.values())))
        d_gen, _ = _critic_head(config, critic_params, critic_stats, k_gen)(
            h_gen)
        terms["gen"] = losses.wgan_generator_loss(d_fake=d_gen)
        total = total + loss_cfg.g_rate * terms["gen"]
      elif adversarial == "edge_likelihood":
        terms["gen"] = sum(
            losses.edge_likelihood_loss(
                generated_rows=constrain_rows(
                    out.feat_user[m][users] @ out.feat_item[m].T),
                interactions=interactions) for m in shapes.modalities)
        total = total + loss_cfg.g_rate * terms["gen"]
      terms["loss"] = total
      feats = ({m: out.feat_user[m][users] for m in shapes.modalities},
               out.feat_item)
      return total, (terms, jax.lax.stop_gradient((rows, feats)))

    (_, (terms, (rows, feats))), grads = jax.value_and_grad(
        rec_loss, has_aux=True)(rec_params)
    updates, opt_state = tx.update(grads, state.opt_state, rec_params)
    params = optax.apply_updates(rec_params, updates)
    metrics.update(terms)

    # The top-k refresh reads the second forward's generated rows (§4.4);
    # without whole rows at hand it is computed only where it is used.
    if topk_score == "cosine":
      top = top_items_fn(feats[0], {m: losses.l2_normalize(q)
                                    for m, q in feats[1].items()}, lists)
    else:
      top = None if rows is not None else top_items_fn(*feats, lists)
    if gu.schedule == "reference":
      graphs, buffer = reference_graph_update(
          state.modality_graphs, state.graph_buffer, rows, users, batch_idx,
          k=k, period=gu.T, pairing=gu.pairing, n_users=n_users,
          n_items=n_items, top_items=top)
    else:
      graphs, buffer = persistent_graph_update(
          state.modality_graphs, state.graph_buffer, rows, users, state.step,
          k=k, period=gu.T, n_items=n_items, top_items=top)
    new_state = TrainState(
        step=state.step + 1, rng=rng, params=params, opt_state=opt_state,
        critic_params=critic_params, critic_opt_state=critic_opt_state,
        critic_stats=critic_stats, modality_graphs=graphs,
        graph_buffer=buffer)
    return new_state, metrics

  if not jit:
    return step
  return jit_step(step)


def make_lightgcn_step(config: ml_collections.ConfigDict, shapes: Shapes, *,
                       batch_constraint: Callable | None = None,
                       jit: bool = True) -> Callable:
  """LightGCN: BPR + L2 on the batch's ego embeddings, Adam.

  batch_constraint and jit as in `make_mmssl_step`.
  """
  tx = make_optimizer(config.optim)
  batch_size, n_items = config.train.batch_size, shapes.n_items
  n_layers = config.model.lightgcn_layers
  constrain = batch_constraint or (lambda x: x)

  def step(state: TrainState, batch_idx, inputs: StepInputs):
    del batch_idx
    rng, k_sample = jax.random.split(state.rng)
    users, pos, neg = map(constrain, sampler_lib.sample_batch(
        k_sample, inputs.sampler, batch_size=batch_size, n_items=n_items))

    def loss_fn(params):
      user, item = model_lib.lightgcn_forward(params, inputs.graph, n_layers)
      bpr = losses.bpr_loss(user_emb=user[users], pos_emb=item[pos],
                            neg_emb=item[neg])
      reg = losses.embedding_l2(
          user_emb=params["user_id_embedding"][users],
          pos_emb=params["item_id_embedding"][pos],
          neg_emb=params["item_id_embedding"][neg],
          decay=config.loss.emb_decay, batch_size=batch_size)
      return bpr + reg, {"bpr": bpr, "emb_l2": reg, "loss": bpr + reg}

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state._replace(step=state.step + 1, rng=rng, params=params,
                          opt_state=opt_state), terms

  if not jit:
    return step
  return jit_step(step)


def init_state(config: ml_collections.ConfigDict, shapes: Shapes,
               modality_dims: dict[str, int], key) -> TrainState:
  """Initial train state (parameters with the released initialisations)."""
  k_params, k_critic, k_rng = jax.random.split(key, 3)
  if config.model.name == "lightgcn":
    params = model_lib.init_embeddings(k_params, shapes.n_users,
                                       shapes.n_items, config.model.embed_size)
    return TrainState(jnp.zeros((), jnp.int32), k_rng, params,
                      make_optimizer(config.optim).init(params), None, None,
                      None, {}, None)
  hp = model_lib.ModelHParams.from_config(config.model)
  params = model_lib.init_params(
      k_params, n_users=shapes.n_users, n_items=shapes.n_items,
      modality_dims=modality_dims, hp=hp)
  critic_params = critic_opt_state = critic_stats = None
  if config.loss.adversarial == "wgan":
    critic_params = critic_lib.init_critic(
        k_critic, shapes.n_items, kind=config.critic.get("kind", "dense"),
        rank=config.critic.get("rank", 64),
        hidden=tuple(config.critic.hidden) or None,
        batch_norm=config.critic.batch_norm)
    critic_stats = critic_lib.init_critic_batch_stats(critic_params)
    critic_opt_state = make_critic_optimizer(config.critic).init(critic_params)
  if config.graph_update.schedule == "persistent":
    k = topk_k(config, shapes.n_items)
    cap = shapes.n_users * k
    buffer = state_lib.empty_table(shapes.modalities, shapes.n_users, k)
  else:
    # k = 0 (Baby settings) never appends; a one-slot buffer keeps every
    # state leaf non-empty (orbax cannot save zero-size arrays).
    cap = max(buffer_capacity(config, shapes.n_items), 1)
    buffer = state_lib.empty_buffer(shapes.modalities, cap)
  # Until its first regeneration G^m is the base graph, which the forward
  # reads from the step inputs (`modality_graph_is_base`): the state holds
  # only what a regeneration can produce, not an n_train-edge copy.
  graphs = {m: graph_lib.empty_graph(cap, shapes.n_users, shapes.n_items)
            for m in shapes.modalities}
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=k_rng, params=params,
      opt_state=make_optimizer(config.optim).init(params),
      critic_params=critic_params, critic_opt_state=critic_opt_state,
      critic_stats=critic_stats, modality_graphs=graphs,
      graph_buffer=buffer)
