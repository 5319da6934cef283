"""The recommender forward pass, pure over a params pytree.

`forward` is MMSSL's recommender as the released code computes it
(docs/reference.md §2.3, steps a-h); `lightgcn_forward` is the ID branch
alone, our LightGCN baseline. Parameters are plain nested dicts created by the
`init_*` functions with the released initialisations (§2.2).

The released code also creates parameters that never influence an output
(`w_q`, `w_k`, `w_v`, `common_trans`, the trainable feature copies, ...; §2.2).
We leave them out: they cannot change any prediction, and the only thing they
could change (AdamW decay of a parameter that gets no gradient) is invisible.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from mmssl_jax import graph as graph_lib
from mmssl_jax import losses
from mmssl_jax import noise

Array = jax.Array
Params = dict


@dataclasses.dataclass(frozen=True)
class ModelHParams:
  """Static (hashable) model settings; see `configs/` for their meaning."""

  embed_size: int = 64
  id_layers: int = 2
  last_layer_softmax: bool = True
  drop_rate: float = 0.2
  id_cat_rate: float = 0.36
  model_cat_rate: float = 0.55
  head_num: int = 4
  fusion: str = "mean_wsum"
  cold_start: bool = False

  @classmethod
  def from_config(cls, model_config) -> "ModelHParams":
    return cls(
        embed_size=model_config.embed_size,
        id_layers=model_config.id_layers,
        last_layer_softmax=model_config.last_layer_softmax,
        drop_rate=model_config.drop_rate,
        id_cat_rate=model_config.id_cat_rate,
        model_cat_rate=model_config.model_cat_rate,
        head_num=model_config.head_num,
        fusion=model_config.fusion,
        cold_start=bool(model_config.cold_start),
    )


class ForwardOutput(NamedTuple):
  """What one forward pass returns (the released tuple, §2.3 "Returned").

  user, item: final representations u*, i* (U, d), (I, d).
  feat_user, feat_item: per-modality feature-GNN outputs H^m_U, H^m_I.
  modality_user, modality_item: per-modality ID propagation E^m_U, E^m_I
    over the modality graphs.
  """

  user: Array
  item: Array
  feat_user: dict[str, Array]
  feat_item: dict[str, Array]
  modality_user: dict[str, Array]
  modality_item: dict[str, Array]


def _xavier_uniform(key, shape):
  return jax.nn.initializers.xavier_uniform()(key, shape, jnp.float32)


def init_embeddings(key, n_users: int, n_items: int, embed_size: int) -> Params:
  """ID embeddings, xavier-uniform on the (n, d) tables (§2.2)."""
  ku, ki = jax.random.split(key)
  return {
      "user_id_embedding": _xavier_uniform(ku, (n_users, embed_size)),
      "item_id_embedding": _xavier_uniform(ki, (n_items, embed_size)),
  }


def init_params(key, *, n_users: int, n_items: int,
                modality_dims: Mapping[str, int], hp: ModelHParams) -> Params:
  """MMSSL recommender parameters with the released initialisation (§2.2).

  Per modality a Linear d_m -> d (xavier-uniform kernel, PyTorch-default bias
  U(+-1/sqrt(d_m))); ID embeddings; `w_self_attention_cat` (H*d, d), whose
  row blocks sum to the fusion matrix W_sum (§2.4).
  """
  keys = jax.random.split(key, 2 + 2 * len(modality_dims))
  params = init_embeddings(keys[0], n_users, n_items, hp.embed_size)
  if hp.fusion == "mean_wsum":
    params["w_self_attention_cat"] = _xavier_uniform(
        keys[1], (hp.head_num * hp.embed_size, hp.embed_size))
  elif hp.fusion == "attention":
    params["attention"] = {
        name: _xavier_uniform(k, (hp.embed_size, hp.embed_size))
        for name, k in zip(("w_q", "w_k", "w_v", "w_o"),
                           jax.random.split(keys[1], 4))}
  else:
    raise ValueError(f"unknown model.fusion {hp.fusion!r}")
  proj = {}
  for n, (m, dim) in enumerate(modality_dims.items()):
    bound = 1.0 / dim ** 0.5
    proj[m] = {
        "kernel": _xavier_uniform(keys[2 + 2 * n], (dim, hp.embed_size)),
        "bias": jax.random.uniform(keys[3 + 2 * n], (hp.embed_size,),
                                   jnp.float32, -bound, bound),
    }
  params["modality_proj"] = proj
  if hp.cold_start:
    # A key of its own: the released parameters keep their initial values.
    params["cold_encoder"] = init_cold_encoder(
        jax.random.fold_in(key, 1), modality_dims, hp.embed_size)
  return params


def init_cold_encoder(key, modality_dims: Mapping[str, int],
                      embed_size: int) -> Params:
  """The inductive item encoder (`encode_items`): per-modality projections
  and a one-hidden-layer MLP, xavier-uniform kernels, zero biases."""
  keys = jax.random.split(key, len(modality_dims) + 2)
  dense = lambda k, fan_in: {
      "kernel": _xavier_uniform(k, (fan_in, embed_size)),
      "bias": jnp.zeros((embed_size,), jnp.float32)}
  return {"modality": {m: dense(k, dim) for k, (m, dim)
                       in zip(keys, modality_dims.items())},
          "hidden": dense(keys[-2], embed_size),
          "out": dense(keys[-1], embed_size)}


def encode_items(encoder: Params, features: Mapping[str, Array]) -> Array:
  """Item vectors from the items' own features, in the space of i*.

  f(x) = W_o tanh(W_h s + b_h) + b_o with s = sum_m n(x^m W_m + b_m): each
  modality projected and L2-normalised (raw feature scales differ), summed,
  then a small MLP. Trained (`steps.recommender_loss`, term 'cold') to rank a
  batch user's positive above its negative with the user's final vector and
  to match warm items' final vectors i*; it serves items that have no
  training interactions, whose i* carries no signal (their feature view
  H^m_I = A_IU H^m_U is zero).

  Args:
    encoder: `params['cold_encoder']`.
    features: modality -> (N, d_m) raw features of N items.

  Returns:
    (N, d) item vectors.
  """
  s = sum(losses.l2_normalize(x @ encoder["modality"][m]["kernel"]
                              + encoder["modality"][m]["bias"])
          for m, x in features.items())
  h = jnp.tanh(s @ encoder["hidden"]["kernel"] + encoder["hidden"]["bias"])
  return h @ encoder["out"]["kernel"] + encoder["out"]["bias"]


def _dropout(key, x, rate: float, train: bool):
  if not train or rate == 0.0:
    return x
  return noise.dropout(key, x, rate)


def cross_modal_attention(attention: Params, views: Array, head_num: int
                          ) -> tuple[Array, Array]:
  """Multi-head self-attention across the modality views of each node.

  What the paper's Fig. 2 describes and the released code does not compute
  (§2.4, §8.1 item 3): for every node the M views attend to each other,
  softmax(Q K^T / sqrt(d / H)) over the key modality, with queries, keys and
  values from their own projections; heads are concatenated and projected
  by W_o.

  Args:
    attention: {'w_q', 'w_k', 'w_v', 'w_o'}, each (d, d).
    views: (N, M, d) modality views.
    head_num: H, dividing d.

  Returns:
    (outputs (N, M, d), attention weights (N, H, M, M) summing to one over
    the last axis).
  """
  n, m, d = views.shape
  dh = d // head_num
  split = lambda x: x.reshape(n, m, head_num, dh)
  q = split(views @ attention["w_q"])
  k = split(views @ attention["w_k"])
  v = split(views @ attention["w_v"])
  logits = jnp.einsum("nihc,njhc->nhij", q, k) / jnp.sqrt(dh)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("nhij,njhc->nihc", weights, v).reshape(n, m, d)
  return out @ attention["w_o"], weights


def fuse_modalities(params: Params, views: list[Array],
                    hp: ModelHParams) -> Array:
  """Cross-modal fusion of the modality ID views (§2.3 d, §2.4).

  'mean_wsum' (reference): the released "multi-head self-attention" reduces
  exactly to mean_m(E^m) @ W_sum, W_sum the sum of the H row blocks of W_cat
  (§2.4). 'attention' (paper): `cross_modal_attention`, then the mean over
  modalities.
  """
  if hp.fusion == "mean_wsum":
    w_cat = params["w_self_attention_cat"]
    w_sum = w_cat.reshape(hp.head_num, hp.embed_size, hp.embed_size).sum(0)
    # The 1/M goes on W_sum, not on an (N, d) table: XLA:CPU's YNNPACK
    # fusions take a scalar times a table as a materialised table-sized
    # operand (`losses.l2_normalize`, scale).
    return sum(views) @ (w_sum / len(views))
  if hp.fusion == "attention":
    out, _ = cross_modal_attention(params["attention"],
                                   jnp.stack(views, axis=1), hp.head_num)
    return jnp.mean(out, axis=1)
  raise ValueError(f"unknown model.fusion {hp.fusion!r}")


def forward(params: Params, base_graph: graph_lib.BipartiteGraph,
            features: Mapping[str, Array],
            modality_graphs: Mapping[str, graph_lib.BipartiteGraph], *,
            key: Array, train: bool, hp: ModelHParams,
            modality_is_base: Array | bool | None = None,
            user_rows: Array | None = None,
            item_rows: Array | None = None) -> ForwardOutput:
  """MMSSL recommender forward (§2.3 a-h).

  Args:
    params: from `init_params`.
    base_graph: the training graph with one-sided weights (§2.1).
    features: modality name -> raw item features (I, d_m).
    modality_graphs: modality name -> current modality ID graph G^m (§2.1,
      §4.4); fixed-capacity, padding edges have weight 0.
    key: dropout key (ignored when train=False).
    train: dropout on/off.
    hp: static hyper-parameters.
    modality_is_base: a (traced) bool: True adds `base_graph` to every
      modality graph, which G^m equals until its first regeneration (§2.1,
      §4.4) while the state's graphs are still empty, so the state needs no
      n_train-edge copy per modality (`steps.modality_graph_is_base`).
      None: use `modality_graphs` alone.
    user_rows, item_rows: optional index arrays; `user` and `item` of the
      output are then the final representations of those rows only (equal
      to the whole output gathered there), computed without (U, d) / (I, d)
      readouts (`graph.mmssl_id_propagate`). The other fields stay whole.
  """
  user_id = params["user_id_embedding"]
  item_id = params["item_id_embedding"]
  n_users, n_items = user_id.shape[0], item_id.shape[0]
  drop_keys = jax.random.split(key, len(features))
  n = losses.l2_normalize
  feat_user, feat_item, mod_user, mod_item = {}, {}, {}, {}
  for drop_key, (m, feats) in zip(drop_keys, features.items()):
    proj = params["modality_proj"][m]
    x = _dropout(drop_key, feats @ proj["kernel"] + proj["bias"],
                 hp.drop_rate, train)                                   # (a)
    feat_user[m] = graph_lib.to_users(base_graph, x, n_users)          # (b)
    feat_item[m] = graph_lib.to_items(base_graph, feat_user[m], n_items)
  for m in features:                                                   # (c)
    mod_user[m] = graph_lib.to_users(modality_graphs[m], item_id, n_users)
    mod_item[m] = graph_lib.to_items(modality_graphs[m], user_id, n_items)
  if modality_is_base is not None:
    # The state's G^m is all-zero until its first regeneration; the base
    # graph's share is switched by a 0/1 factor, not a lax.cond, whose
    # linearisation would copy the graph's arrays as residuals.
    base = jnp.asarray(modality_is_base, item_id.dtype)
    base_user = base * graph_lib.to_users(base_graph, item_id, n_users)
    base_item = base * graph_lib.to_items(base_graph, user_id, n_items)
    mod_user = {m: v + base_user for m, v in mod_user.items()}
    mod_item = {m: v + base_item for m, v in mod_item.items()}
  fused_user = fuse_modalities(params, list(mod_user.values()), hp)    # (d)
  fused_item = fuse_modalities(params, list(mod_item.values()), hp)
  user_ego = user_id + n(fused_user, scale=hp.id_cat_rate)             # (e)
  item_ego = item_id + n(fused_item, scale=hp.id_cat_rate)
  user, item = graph_lib.mmssl_id_propagate(                           # (f)
      base_graph, user_ego, item_ego, hp.id_layers,
      last_layer_softmax=hp.last_layer_softmax, user_rows=user_rows,
      item_rows=item_rows)
  rows = lambda x, r: x if r is None else x[r]
  for m in features:                                                   # (g)
    user = user + n(rows(feat_user[m], user_rows), scale=hp.model_cat_rate)
    item = item + n(rows(feat_item[m], item_rows), scale=hp.model_cat_rate)
  return ForwardOutput(user, item, feat_user, feat_item, mod_user, mod_item)


def lightgcn_forward(params: Params, graph: graph_lib.BipartiteGraph,
                     n_layers: int) -> tuple[Array, Array]:
  """LightGCN final user/item embeddings (symmetric graph, layer mean)."""
  return graph_lib.lightgcn_propagate(
      graph, params["user_id_embedding"], params["item_id_embedding"],
      n_layers)
