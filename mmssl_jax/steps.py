"""The train steps: MMSSL's critic, recommender and modality-graph updates.

One MMSSL iteration (docs/reference.md §4.3) is three pure, jittable pieces,
composed by `train_step` in the released order:

1. `critic_step`: the critic (D) update with Adam, on the batch's generated
   rows and "real" rows from a forward without gradient (§4.3.2, §3.5).
2. `recommender_step`: a second forward with a fresh dropout key and the
   recommender update with AdamW on BPR, the L2 terms, the contrastive loss
   and the generator loss (§4.3.3, §3.7).
3. `modality_graph_step`: the top-k refresh of the modality graphs G^m
   (§4.4, `mmssl_jax.modality_graphs`).

`lightgcn_step` is the LightGCN baseline on the same state and inputs.
Every piece takes a `StepConfig` (static and hashable: jit it with
`static_argnames="cfg"`); `make_step` returns the run's step, jitted once with
the state donated. Shapes are static and the batch index within the epoch is
traced, so a run compiles its step once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmssl_jax import critic as critic_lib
from mmssl_jax import generator
from mmssl_jax import losses
from mmssl_jax import model as model_lib
from mmssl_jax import modality_graphs
from mmssl_jax.parallel import StepSharding
from mmssl_jax.data import sampler as sampler_lib
from mmssl_jax.state import StepInputs, TrainState

ADVERSARIAL = ("wgan", "none", "edge_likelihood")


# ----------------------------------------------------------------------------
# Static settings


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


@dataclasses.dataclass(frozen=True)
class OptimHParams:
  """An Adam-family optimiser: 'adamw' (decoupled decay, as torch) or 'adam'."""

  name: str
  lr: float
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999

  @classmethod
  def recommender(cls, optim: ml_collections.ConfigDict) -> "OptimHParams":
    return cls(optim.name, float(optim.lr), float(optim.weight_decay))

  @classmethod
  def critic(cls, critic: ml_collections.ConfigDict) -> "OptimHParams":
    return cls("adam", float(critic.lr), b1=float(critic.b1),
               b2=float(critic.b2))


def make_optimizer(hp: OptimHParams) -> optax.GradientTransformation:
  if hp.name == "adamw":
    return optax.adamw(hp.lr, b1=hp.b1, b2=hp.b2, eps=1e-8,
                       weight_decay=hp.weight_decay)
  if hp.name == "adam":
    return optax.adam(hp.lr, b1=hp.b1, b2=hp.b2)
  raise ValueError(f"unknown optim.name {hp.name!r}")


@dataclasses.dataclass(frozen=True)
class LossHParams:
  """The recommender's loss settings (`loss.*`; §3 of docs/reference.md)."""

  emb_decay: float
  feat_decay: float
  contrastive: bool
  cl_rate: float
  tau: float
  adversarial: str  # 'wgan', 'none' (w/o ASL), 'edge_likelihood' (r/p GAE)
  g_rate: float
  gumbel_transform: bool
  real_data_tau: float
  ui_pre_scale: float
  gumbel_scale: float
  gumbel_log_logits: bool
  cold_bpr: float
  cold_align: float

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> "LossHParams":
    hp = cls(**{f.name: loss[f.name] for f in dataclasses.fields(cls)})
    if hp.adversarial not in ADVERSARIAL:
      raise ValueError(f"unknown loss.adversarial {hp.adversarial!r}")
    return hp

  def real_rows_kwargs(self) -> dict[str, Any]:
    """The keywords of `losses.gumbel_real_rows` / `fused_real_rows`."""
    return dict(gumbel_scale=self.gumbel_scale, tau=self.real_data_tau,
                ui_pre_scale=self.ui_pre_scale,
                use_gumbel=self.gumbel_transform,
                log_logits=self.gumbel_log_logits)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static a step needs, read once from the run config."""

  model_name: str
  shapes: Shapes
  batch_size: int
  model: model_lib.ModelHParams
  lightgcn_layers: int
  loss: LossHParams
  critic: critic_lib.CriticHParams
  critic_kind: str  # 'dense' or 'lowrank'
  gp_weight: float  # critic.gp_weight * critic.gp_rate
  optim: OptimHParams
  critic_optim: OptimHParams
  graphs: modality_graphs.GraphSchedule
  generator_block: int
  sharding: StepSharding = StepSharding()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, shapes: Shapes,
                  sharding: StepSharding = StepSharding()) -> "StepConfig":
    steps_per_epoch = shapes.n_train // config.train.batch_size + 1
    graphs = modality_graphs.GraphSchedule.from_config(
        config, shapes.n_items, steps_per_epoch)
    if config.model.name == "mmssl":
      graphs.check(shapes.n_items)
    return cls(
        model_name=config.model.name, shapes=shapes,
        batch_size=int(config.train.batch_size),
        model=model_lib.ModelHParams.from_config(config.model),
        lightgcn_layers=int(config.model.lightgcn_layers),
        loss=LossHParams.from_config(config.loss),
        critic=critic_lib.CriticHParams.from_config(config.critic),
        critic_kind=config.critic.kind,
        gp_weight=config.critic.gp_weight * config.critic.gp_rate,
        optim=OptimHParams.recommender(config.optim),
        critic_optim=OptimHParams.critic(config.critic),
        graphs=graphs, generator_block=int(config.train.generator_block),
        sharding=sharding)

  @property
  def lowrank(self) -> bool:
    """The low-rank critic reads a generated row only through its projection
    onto the factor U, which has a Gram form with no (B, I) product
    (`generator.generated_rows_projection`)."""
    return self.loss.adversarial == "wgan" and self.critic_kind == "lowrank"

  @property
  def needs_rows(self) -> bool:
    """The dense critic reads whole generated rows."""
    return self.loss.adversarial == "wgan" and not self.lowrank

  @property
  def fused(self) -> bool:
    """Whether the step runs the blockwise fused generator + critic.

    Selected by train.generator_block > 0 together with
    critic.kind='lowrank': the real rows and the top-k refresh are then
    computed item block by item block (`generator.fused_real_rows`,
    `generator.blockwise_topk`) and no (B, I) array is formed (except for
    the `rp_gae` ablation's edge likelihood, which needs the raw rows).
    With the dense critic, generator_block only splits the score product
    into blocks.
    """
    return self.generator_block > 0 and self.critic_kind == "lowrank"

  @property
  def all_users_positives(self) -> bool:
    """The Gram form subtracts the training positives of the rows it
    projects: those of the batch (at most `shapes.batch_positives`), or, when
    that bound exceeds the whole training set (B >= users, or heavy users),
    those of every user, for all users at once, then the batch's rows."""
    bound = self.shapes.batch_positives or self.batch_size * self.shapes.n_items
    return bound >= self.shapes.n_train


# ----------------------------------------------------------------------------
# The batch and the keys of one step


class StepKeys(NamedTuple):
  """The keys of one MMSSL step, split from the state's key (in this order)."""

  sample: jax.Array
  critic_forward: jax.Array
  gumbel: jax.Array
  d_real: jax.Array
  d_fake: jax.Array
  gp: jax.Array
  gp_alpha: jax.Array
  recommender_forward: jax.Array
  generator: jax.Array

  @classmethod
  def split(cls, rng) -> tuple[jax.Array, "StepKeys"]:
    """(the next state key, this step's keys)."""
    next_rng, *keys = jax.random.split(rng, 10)
    return next_rng, cls(*keys)


class Batch(NamedTuple):
  """A BPR batch and what the step reads of its users' training rows.

  users, pos, neg: (B,) int32 sampled users, positives and negatives.
  lists: (B, L) the users' training items, -1 padded (R).
  positives: R as a flat edge list (low-rank critic), else None.
  interactions: R as dense (B, I) 0/1 rows where a piece needs them, else None.
  """

  users: jax.Array
  pos: jax.Array
  neg: jax.Array
  lists: jax.Array
  positives: generator.BatchPositives | None
  interactions: jax.Array | None


def sample_batch(key, inputs: StepInputs, cfg: StepConfig) -> Batch:
  """Samples a batch (§4.2) and builds the forms of R the step uses."""
  sh, n_items = cfg.sharding, cfg.shapes.n_items
  users, pos, neg = map(sh.batch, sampler_lib.sample_batch(
      key, inputs.sampler, batch_size=cfg.batch_size, n_items=n_items))
  lists = sh.batch(inputs.sampler.train_lists[users])
  positives = None
  if cfg.lowrank and cfg.all_users_positives:
    g = inputs.graph
    positives = generator.BatchPositives(g.users, g.items,
                                         g.to_user_weight > 0)
  elif cfg.lowrank:
    positives = generator.batch_positives(lists, cfg.shapes.batch_positives)
  interactions = None
  if cfg.needs_rows or cfg.loss.adversarial == "edge_likelihood" or (
      cfg.lowrank and not cfg.fused):
    interactions = sh.rows(generator.dense_rows(lists, n_items))
  return Batch(users, pos, neg, lists, positives, interactions)


# ----------------------------------------------------------------------------
# Generated and real rows


def generated_rows(out: model_lib.ForwardOutput, batch: Batch,
                   cfg: StepConfig) -> dict[str, jax.Array]:
  """modality -> (B, I) generated rows S^m of the batch users (§3.4)."""
  return {m: cfg.sharding.rows(generator.generated_rows(
      out.feat_user[m][batch.users], out.feat_item[m], batch.interactions,
      block_size=cfg.generator_block)) for m in cfg.shapes.modalities}


def real_rows(out: model_lib.ForwardOutput, batch: Batch, key,
              cfg: StepConfig) -> jax.Array:
  """The critic's (B, I) "real" rows (§3.5), constants of the D step.

  `out.user` holds the batch users' final rows (`user_rows=batch.users`).
  """
  sh = cfg.sharding
  model_rows = sh.rows(generator.generated_rows(
      out.user, out.item, batch.interactions, block_size=cfg.generator_block))
  real = losses.gumbel_real_rows(
      key=key, interactions=batch.interactions, model_rows=model_rows,
      **cfg.loss.real_rows_kwargs())
  return sh.rows(jax.lax.stop_gradient(real))


def projected_fake_rows(out: model_lib.ForwardOutput, batch: Batch, factor,
                        cfg: StepConfig) -> list[jax.Array]:
  """Per modality n(S^m) F (B, r): the generated rows' projections onto the
  low-rank critic's factor, with no (B, I) array (Gram form)."""
  all_users = cfg.all_users_positives

  def project(m):
    p = out.feat_user[m] if all_users else out.feat_user[m][batch.users]
    z = generator.generated_rows_projection(p, out.feat_item[m],
                                            batch.positives, factor)
    return z[batch.users] if all_users else z
  return [cfg.sharding.batch(project(m)) for m in cfg.shapes.modalities]


def _first_layer_of_projections(critic_params, projections, cfg: StepConfig):
  return cfg.sharding.batch(jnp.concatenate([
      critic_lib.first_layer_from_projection(critic_params, z)
      for z in projections]))


def _top_items_fn(feat_user, feat_item, batch: Batch, cfg: StepConfig):
  """A function computing modality -> (B, k) top-k ids of the generated
  rows (§4.4), called only where the graph update uses them."""
  k, block, sh = cfg.graphs.k, cfg.generator_block, cfg.sharding

  def top_items():
    if cfg.fused:
      return {m: generator.blockwise_topk(
          feat_user[m], feat_item[m], batch.lists, block_size=block, k=k,
          **sh.block_kwargs()) for m in cfg.shapes.modalities}
    interactions = sh.rows(generator.dense_rows(batch.lists,
                                                cfg.shapes.n_items))
    return {m: jax.lax.top_k(sh.rows(generator.generated_rows(
        feat_user[m], feat_item[m], interactions, block_size=block)),
                             k)[1].astype(jnp.int32)
            for m in cfg.shapes.modalities}
  return top_items


# ----------------------------------------------------------------------------
# 1. The critic step


class CriticState(NamedTuple):
  """The critic's parameters, Adam state and BatchNorm running statistics."""

  params: Any
  opt_state: Any
  stats: Any


def _critic_head(critic_params, stats, key, hp: critic_lib.CriticHParams):
  """h -> (scores, stats): the critic after its first layer."""
  return lambda h: critic_lib.critic_head(critic_params, stats, h, key=key,
                                          hp=hp)


def critic_loss_from_hidden(critic_params, critic_stats, h_real, h_fake, keys,
                            *, hp: critic_lib.CriticHParams, gp_weight: float,
                            n_modalities: int):
  """WGAN-GP critic loss (§3.5) from first-layer outputs.

  h_real: (B, h_1) of the B distinct real rows; h_fake: (M*B, h_1) of the
  fake rows of every modality. The released code stacks the real rows M
  times to match the fake rows, which only matters after the first (affine)
  layer, so that layer runs on B rows instead of M*B. The penalty reuses the
  real and fake first-layer outputs (`critic.gradient_penalty_from_hidden`).
  keys: (real dropout, fake dropout, penalty dropout, penalty alpha).
  Returns (loss, (new stats, mean D(real), mean D(fake), penalty)).
  """
  k_real, k_fake, k_gp, k_alpha = keys
  h_real = jnp.tile(h_real, (n_modalities, 1))
  d_real, stats = _critic_head(critic_params, critic_stats, k_real, hp)(h_real)
  d_fake, stats = _critic_head(critic_params, stats, k_fake, hp)(h_fake)
  gp = critic_lib.gradient_penalty_from_hidden(
      lambda h: _critic_head(critic_params, stats, k_gp, hp)(h)[0],
      h_real, h_fake, critic_params["dense_0"], key=k_alpha)
  loss = losses.wgan_critic_loss(d_real=d_real, d_fake=d_fake,
                                 gradient_penalty=gp, gp_weight=gp_weight)
  return loss, (stats, jnp.mean(d_real), jnp.mean(d_fake), gp)


def critic_loss(critic_params, critic_stats, real_rows_, fake_rows, keys, *,
                hp: critic_lib.CriticHParams, gp_weight: float,
                n_modalities: int):
  """`critic_loss_from_hidden` of (B, I) real and (M*B, I) fake rows."""
  return critic_loss_from_hidden(
      critic_params, critic_stats,
      critic_lib.first_layer(critic_params, real_rows_),
      critic_lib.first_layer(critic_params, fake_rows), keys, hp=hp,
      gp_weight=gp_weight, n_modalities=n_modalities)


def _critic_loss_fn(out, batch: Batch, critic_stats, keys: StepKeys,
                    cfg: StepConfig):
  """critic params -> (loss, aux) for the configured critic and generator."""
  d_keys = (keys.d_real, keys.d_fake, keys.gp, keys.gp_alpha)
  kw = dict(hp=cfg.critic, gp_weight=cfg.gp_weight,
            n_modalities=len(cfg.shapes.modalities))
  sh = cfg.sharding
  if not cfg.lowrank:
    fake = jnp.concatenate(list(generated_rows(out, batch, cfg).values()))
    real = real_rows(out, batch, keys.gumbel, cfg)
    return lambda cp: critic_loss(cp, critic_stats, real, fake, d_keys, **kw)

  def loss_fn(cp):
    factor = critic_lib.first_layer_factor(cp)
    if cfg.fused:
      z_real = generator.fused_real_rows(
          keys.gumbel, out.user, out.item, batch.lists, factor,
          block_size=cfg.generator_block, **cfg.loss.real_rows_kwargs(),
          **sh.block_kwargs())
    else:
      z_real = sh.batch(real_rows(out, batch, keys.gumbel, cfg) @ factor)
    h_real = sh.batch(critic_lib.first_layer_from_projection(
        cp, sh.batch(z_real)))
    h_fake = _first_layer_of_projections(
        cp, projected_fake_rows(out, batch, factor, cfg), cfg)
    return critic_loss_from_hidden(cp, critic_stats, h_real, h_fake, d_keys,
                                   **kw)
  return loss_fn


def critic_step(critic: CriticState, out: model_lib.ForwardOutput,
                batch: Batch, keys: StepKeys, cfg: StepConfig
                ) -> tuple[CriticState, dict[str, jax.Array]]:
  """One Adam step of the critic (§4.3.2), WGAN-GP (§3.5).

  Args:
    critic: the critic's state.
    out: the recommender's forward in train mode, without gradient, with
      `user`/`item` read at `user_rows=batch.users` (`model.forward`).
    batch: the step's batch.
    keys: the step's keys (gumbel, d_real, d_fake, gp, gp_alpha are used).
    cfg: static settings; requires loss.adversarial == 'wgan'.

  Returns:
    (the updated critic, {'critic': loss, 'd_real', 'd_fake', 'gp'}).
  """
  loss_fn = _critic_loss_fn(out, batch, critic.stats, keys, cfg)
  (d_loss, (stats, d_real, d_fake, gp)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(critic.params)
  tx = make_optimizer(cfg.critic_optim)
  updates, opt_state = tx.update(grads, critic.opt_state, critic.params)
  params = optax.apply_updates(critic.params, updates)
  metrics = {"critic": d_loss, "d_real": d_real, "d_fake": d_fake, "gp": gp}
  return CriticState(params, opt_state, stats), metrics


# ----------------------------------------------------------------------------
# 2. The recommender step


class Generated(NamedTuple):
  """What the top-k refresh reads of the recommender's forward (constants).

  rows: modality -> (B, I) generated rows, or None where none were formed.
  feat_user: modality -> (B, d) the batch users' feature representations.
  feat_item: modality -> (I, d) the items' feature representations.
  """

  rows: dict[str, jax.Array] | None
  feat_user: dict[str, jax.Array]
  feat_item: dict[str, jax.Array]


def _adversarial_term(out, batch: Batch, critic: CriticState, key,
                      cfg: StepConfig, rows):
  """The generator's loss against the critic (or r/p GAE's edge term)."""
  if cfg.loss.adversarial == "wgan":
    if cfg.lowrank:
      h_gen = _first_layer_of_projections(
          critic.params, projected_fake_rows(
              out, batch, critic_lib.first_layer_factor(critic.params), cfg),
          cfg)
    else:
      h_gen = critic_lib.first_layer(critic.params,
                                     jnp.concatenate(list(rows.values())))
    d_gen, _ = _critic_head(critic.params, critic.stats, key, cfg.critic)(
        h_gen)
    return losses.wgan_generator_loss(d_fake=d_gen)
  return sum(
      losses.edge_likelihood_loss(
          generated_rows=cfg.sharding.rows(
              out.feat_user[m][batch.users] @ out.feat_item[m].T),
          interactions=batch.interactions) for m in cfg.shapes.modalities)


def _inductive_term(params, out, batch: Batch, inputs: StepInputs,
                    cfg: StepConfig):
  """The inductive item encoder's loss (`model.encode_items`):
  `loss.cold_bpr` times the BPR loss of the encoded positive and negative
  items against the batch users' final vectors, plus `loss.cold_align` times
  the squared distance of the encoded positives to their final vectors.
  u* and i* are constants here, so the rest of the recommender trains
  exactly as without the encoder."""
  items = jnp.concatenate([batch.pos, batch.neg])
  encoded = model_lib.encode_items(
      params["cold_encoder"], {m: x[items] for m, x in inputs.features.items()})
  pos, neg = jnp.split(encoded, 2)
  user = jax.lax.stop_gradient(out.user)
  return (cfg.loss.cold_bpr * losses.bpr_loss(user_emb=user, pos_emb=pos,
                                               neg_emb=neg)
          + cfg.loss.cold_align * losses.alignment_loss(
              predicted=pos, target=jnp.split(out.item, 2)[0]))


def recommender_loss(params, critic: CriticState, batch: Batch,
                     inputs: StepInputs, graphs, is_base, key_forward,
                     key_generator, cfg: StepConfig):
  """The recommender's total loss (§3.7) and (terms, Generated)."""
  loss_hp, users = cfg.loss, batch.users
  out = model_lib.forward(
      params, inputs.graph, inputs.features, graphs, key=key_forward,
      train=True, hp=cfg.model, modality_is_base=is_base, user_rows=users,
      item_rows=jnp.concatenate([batch.pos, batch.neg]))
  u, (p, n) = out.user, jnp.split(out.item, 2)
  terms = {
      "bpr": losses.bpr_loss(user_emb=u, pos_emb=p, neg_emb=n),
      "emb_l2": losses.embedding_l2(
          user_emb=u, pos_emb=p, neg_emb=n, decay=loss_hp.emb_decay,
          batch_size=cfg.batch_size),
      "feat_l2": losses.feature_l2(
          user_feats=list(out.feat_user.values()),
          item_feats=list(out.feat_item.values()),
          decay=loss_hp.feat_decay, n_items=cfg.shapes.n_items),
  }
  total = terms["bpr"] + terms["emb_l2"] + terms["feat_l2"]
  if loss_hp.contrastive:
    terms["cl"] = sum(
        losses.infonce(anchor=out.modality_user[m][users], positive=u,
                       tau=loss_hp.tau) for m in cfg.shapes.modalities)
    total = total + loss_hp.cl_rate * terms["cl"]
  rows = generated_rows(out, batch, cfg) if cfg.needs_rows else None
  if loss_hp.adversarial != "none":
    terms["gen"] = _adversarial_term(out, batch, critic, key_generator, cfg,
                                     rows)
    total = total + loss_hp.g_rate * terms["gen"]
  if cfg.model.cold_start:
    terms["cold"] = _inductive_term(params, out, batch, inputs, cfg)
    total = total + terms["cold"]
  terms["loss"] = total
  generated = Generated(rows, {m: out.feat_user[m][users]
                               for m in cfg.shapes.modalities}, out.feat_item)
  return total, (terms, jax.lax.stop_gradient(generated))


def recommender_step(params, opt_state, critic: CriticState, batch: Batch,
                     inputs: StepInputs, graphs, is_base, keys: StepKeys,
                     cfg: StepConfig):
  """One AdamW step of the recommender (§4.3.3).

  Args:
    params, opt_state: the recommender's parameters and optimiser state.
    critic: the critic after this step's update (its scores drive the
      generator loss; no gradient reaches it).
    batch: the step's batch.
    inputs: the run's step inputs.
    graphs: modality -> G^m; is_base: whether G^m is still the base graph
      (`modality_graphs.is_base`).
    keys: the step's keys (recommender_forward, generator are used).
    cfg: static settings.

  Returns:
    (params, opt_state, loss terms {'bpr', 'emb_l2', 'feat_l2', ['cl'],
    ['gen'], 'loss'}, `Generated` for the modality-graph step).
  """
  (_, (terms, generated)), grads = jax.value_and_grad(
      recommender_loss, has_aux=True)(
          params, critic, batch, inputs, graphs, is_base,
          keys.recommender_forward, keys.generator, cfg)
  tx = make_optimizer(cfg.optim)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, terms, generated


# ----------------------------------------------------------------------------
# 3. The modality-graph step


def modality_graph_step(graphs, buffer, generated: Generated, batch: Batch,
                        batch_idx, step, cfg: StepConfig):
  """The top-k refresh of the modality graphs (§4.4); returns (graphs,
  buffer).

  The refresh ranks the recommender forward's generated rows: by the dot
  product P_b . Q_i as released, or by P_b . Q_i / |Q_i| with
  graph_update.topk_score='cosine'. Without whole rows at hand (low-rank
  critic) the top-k is computed only where the schedule uses it.
  """
  if cfg.graphs.topk_score == "cosine":
    top = _top_items_fn(generated.feat_user,
                        {m: losses.l2_normalize(q)
                         for m, q in generated.feat_item.items()}, batch, cfg)
  elif generated.rows is not None:
    top = modality_graphs.top_items_of_rows(generated.rows, cfg.graphs.k)
  else:
    top = _top_items_fn(generated.feat_user, generated.feat_item, batch, cfg)
  return modality_graphs.update(
      cfg.graphs, graphs, buffer, top, batch.users, batch_idx, step,
      n_users=cfg.shapes.n_users, n_items=cfg.shapes.n_items)


# ----------------------------------------------------------------------------
# The whole step


def train_step(state: TrainState, batch_idx, inputs: StepInputs,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One MMSSL iteration (§4.3): sample, critic step, recommender step,
  modality-graph step. Returns the new state and the loss terms."""
  rng, keys = StepKeys.split(state.rng)
  batch = sample_batch(keys.sample, inputs, cfg)
  is_base = modality_graphs.is_base(cfg.graphs, state.step)
  critic = CriticState(state.critic_params, state.critic_opt_state,
                       state.critic_stats)
  metrics = {}
  if cfg.loss.adversarial == "wgan":
    # Only the batch users' final rows are read (`real_rows`).
    out = jax.lax.stop_gradient(model_lib.forward(
        state.params, inputs.graph, inputs.features, state.modality_graphs,
        key=keys.critic_forward, train=True, hp=cfg.model,
        modality_is_base=is_base, user_rows=batch.users))
    critic, metrics = critic_step(critic, out, batch, keys, cfg)
  # The barrier hands the recommender step the D step's results and the
  # parameters together, which lets XLA order the D step's (U or I) x d
  # temporaries before the recommender's (docs/results.md, scale). Same
  # values.
  critic, rec_params = jax.lax.optimization_barrier((critic, state.params))
  params, opt_state, terms, generated = recommender_step(
      rec_params, state.opt_state, critic, batch, inputs,
      state.modality_graphs, is_base, keys, cfg)
  metrics.update(terms)
  graphs, buffer = modality_graph_step(
      state.modality_graphs, state.graph_buffer, generated, batch, batch_idx,
      state.step, cfg)
  new_state = TrainState(
      step=state.step + 1, rng=rng, params=params, opt_state=opt_state,
      critic_params=critic.params, critic_opt_state=critic.opt_state,
      critic_stats=critic.stats, modality_graphs=graphs, graph_buffer=buffer)
  return new_state, metrics


def lightgcn_step(state: TrainState, batch_idx, inputs: StepInputs,
                  cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """LightGCN: BPR + L2 on the batch's ego embeddings, Adam."""
  del batch_idx
  rng, k_sample = jax.random.split(state.rng)
  users, pos, neg = map(cfg.sharding.batch, sampler_lib.sample_batch(
      k_sample, inputs.sampler, batch_size=cfg.batch_size,
      n_items=cfg.shapes.n_items))

  def loss_fn(params):
    user, item = model_lib.lightgcn_forward(params, inputs.graph,
                                            cfg.lightgcn_layers)
    bpr = losses.bpr_loss(user_emb=user[users], pos_emb=item[pos],
                          neg_emb=item[neg])
    reg = losses.embedding_l2(
        user_emb=params["user_id_embedding"][users],
        pos_emb=params["item_id_embedding"][pos],
        neg_emb=params["item_id_embedding"][neg],
        decay=cfg.loss.emb_decay, batch_size=cfg.batch_size)
    return bpr + reg, {"bpr": bpr, "emb_l2": reg, "loss": bpr + reg}

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  tx = make_optimizer(cfg.optim)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state._replace(step=state.step + 1, rng=rng, params=params,
                        opt_state=opt_state), terms


def step_compiler_options() -> dict[str, str] | None:
  """XLA options of the train step: the memory-optimised scheduler on CPU.

  XLA:CPU's default scheduler orders a program for concurrency and starts
  many (U or I) x d temporaries (zero cotangents, optimiser-moment copies)
  long before they are used, so they are all alive across the backward
  pass. The memory-optimised one about halves the step's scratch at the
  same speed (docs/results.md, scale). Other backends keep their defaults.
  """
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def make_step(cfg: StepConfig, **shardings) -> Callable:
  """The run's step, `step(state, batch_idx, inputs) -> (state, metrics)`:
  `train_step` or `lightgcn_step` under one `jax.jit`, the state donated,
  with `step_compiler_options`.

  shardings: `in_shardings` / `out_shardings` on a mesh
  (`parallel.step_shardings`); none for one device.
  """
  fn = train_step if cfg.model_name == "mmssl" else lightgcn_step

  def step(state, batch_idx, inputs):
    return fn(state, batch_idx, inputs, cfg)
  return jax.jit(step, donate_argnums=0,
                 compiler_options=step_compiler_options(), **shardings)


# ----------------------------------------------------------------------------
# The initial state


def init_state(config: ml_collections.ConfigDict, cfg: StepConfig,
               modality_dims: dict[str, int], key) -> TrainState:
  """Initial train state (parameters with the released initialisations)."""
  k_params, k_critic, k_rng = jax.random.split(key, 3)
  shapes = cfg.shapes
  if cfg.model_name == "lightgcn":
    params = model_lib.init_embeddings(k_params, shapes.n_users,
                                       shapes.n_items, cfg.model.embed_size)
    return TrainState(jnp.zeros((), jnp.int32), k_rng, params,
                      make_optimizer(cfg.optim).init(params), None, None,
                      None, {}, None)
  params = model_lib.init_params(
      k_params, n_users=shapes.n_users, n_items=shapes.n_items,
      modality_dims=modality_dims, hp=cfg.model)
  critic_params = critic_opt_state = critic_stats = None
  if cfg.loss.adversarial == "wgan":
    critic_params = critic_lib.init_critic(
        k_critic, shapes.n_items, kind=cfg.critic_kind,
        rank=config.critic.rank, hidden=tuple(config.critic.hidden) or None,
        batch_norm=cfg.critic.batch_norm)
    critic_stats = critic_lib.init_critic_batch_stats(critic_params)
    critic_opt_state = make_optimizer(cfg.critic_optim).init(critic_params)
  graphs, buffer = modality_graphs.init_graphs(
      cfg.graphs, shapes.modalities, shapes.n_users, shapes.n_items,
      cfg.batch_size)
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=k_rng, params=params,
      opt_state=make_optimizer(cfg.optim).init(params),
      critic_params=critic_params, critic_opt_state=critic_opt_state,
      critic_stats=critic_stats, modality_graphs=graphs,
      graph_buffer=buffer)
