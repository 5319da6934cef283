"""Shared pieces of the config files in `configs/` (configs are code).

Every file in `configs/` builds on `base_config()` (a dataset's on
`dataset_config(name)`) and accepts a big_vision-style argument string, e.g.
`--config=configs/tiktok.py:variant=paper,ablation=wo_cl`,
`configs/tiktok.py:model=lightgcn` or
`configs/tiktok.py:modalities=image+audio`.
Variants and ablations are only bundles of named config switches.

A dataset config reads the folder `--config.data.dir`, else
`$MMSSL_DATA/<name>` when MMSSL_DATA is set, else `data/<name>` under the
working directory (`data_folder_candidates`). The folder holds train.json,
val.json, test.json (or <name>.inter, or trnMat.pkl, valMat.pkl,
tstMat.pkl) and one <modality>_feat.npy per modality (README, "Running on
real data").

Variants: `reference` (the released code, the default) and `paper` (see
`paper()`: each correction of docs/reference.md §8.1 is its own switch).

Ablations (`ablation=` values; `variant=wo_cl` etc. is accepted too):
  full     the model as configured.
  wo_asl   loss.adversarial='none': no critic, no generator loss.
  wo_cl    loss.contrastive=False: no cross-modal contrastive loss.
  wo_gt    loss.gumbel_transform=False: real rows are the L1-normalised
           observed interactions plus the same model-score mixing.
  rp_gae   loss.adversarial='edge_likelihood': the adversarial task replaced
           by the log-likelihood of observed edges under the generated rows;
           no critic.
"""

from __future__ import annotations

import os
import re

import ml_collections

VARIANTS = ("reference", "paper")
ABLATIONS = ("full", "wo_asl", "wo_cl", "wo_gt", "rp_gae")


def base_config() -> ml_collections.ConfigDict:
  """The released code's HEAD defaults (docs/reference.md §6.1)."""
  c = ml_collections.ConfigDict()
  c.seed = 2022
  c.variant = "reference"  # or 'paper' (`paper()` sets its switches)
  c.ablation = "full"  # one of ABLATIONS (`apply_ablation` sets its switch)

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"  # 'folder' or 'synthetic'
  c.data.name = ""  # a dataset config's name: the default folder's name
  # "" = $MMSSL_DATA/<name> if MMSSL_DATA is set, else data/<name>
  # (`data_folder_candidates`).
  c.data.dir = ""
  c.data.format = "auto"  # 'auto', 'mmssl', 'mmrec' or 'pickle'
  # () = every *_feat.npy in the folder, sorted; on the command line
  # --config.data.modalities=image,text (`modality_names`).
  c.data.modalities = ()
  # New items (`data/cold_start.py`): a seeded random fraction of the items
  # held out of training; their interactions become validation (half of
  # them) or test (the other half) targets. 0 = off.
  c.data.cold_items = 0.0
  c.data.cold_seed = 0
  c.data.synthetic = synthetic_config()

  c.model = ml_collections.ConfigDict()
  c.model.name = "mmssl"  # 'mmssl' or 'lightgcn'
  c.model.embed_size = 64
  c.model.id_layers = 2  # len(weight_size) in the released code
  c.model.last_layer_softmax = True  # softmax over dims on the last ID layer
  c.model.drop_rate = 0.2
  c.model.id_cat_rate = 0.36
  c.model.model_cat_rate = 0.55
  c.model.head_num = 4
  c.model.fusion = "mean_wsum"  # what the released attention computes (§2.4)
  # An inductive item encoder: items without training interactions get
  # vectors from their own features (`model.encode_items`). Off in both
  # variants; the recommender's other parameters train as without it.
  c.model.cold_start = False
  c.model.lightgcn_layers = 3  # LightGCN baseline only

  c.critic = ml_collections.ConfigDict()
  # 'dense': the released I -> I/4 -> I/8 -> 1 (§3.5, 0.28 I^2 parameters);
  # 'lowrank': first layer W_0 = U V (I x r, r x h_1), cost linear in I.
  c.critic.kind = "dense"
  c.critic.rank = 64  # r of the low-rank first layer (kind='lowrank' only)
  # Hidden widths; () = (I // 4, I // 8) for 'dense', (256, 128) for 'lowrank'.
  c.critic.hidden = ()
  c.critic.negative_slope = 1.0  # LeakyReLU(True): the identity (§3.5)
  c.critic.batch_norm = True
  c.critic.dropout = (0.31, 0.5)  # G_drop1, G_drop2
  c.critic.output_scale = 100.0  # 100 * sigmoid
  c.critic.sigmoid_output = True
  c.critic.train_mode = True  # released: batch stats + dropout in every call
  c.critic.lr = 3e-4  # D_lr
  c.critic.b1 = 0.5
  c.critic.b2 = 0.9
  c.critic.gp_weight = 0.3  # hard-coded LAMBDA in the released code
  c.critic.gp_rate = 1.0

  c.loss = ml_collections.ConfigDict()
  c.loss.emb_decay = 1e-5  # regs[0]
  c.loss.feat_decay = 1e-5  # feat_reg_decay
  c.loss.contrastive = True  # False = wo_cl
  c.loss.cl_rate = 0.03
  c.loss.tau = 0.5
  # 'wgan', 'none' (wo_asl) or 'edge_likelihood' (rp_gae)
  c.loss.adversarial = "wgan"
  c.loss.g_rate = 1e-4  # G_rate
  c.loss.gumbel_transform = True  # False = wo_gt
  c.loss.real_data_tau = 0.005
  c.loss.ui_pre_scale = 100.0
  c.loss.gumbel_scale = 1e-5  # log_log_scale
  c.loss.gumbel_log_logits = False  # True: Gumbel-softmax of log(R/|R|)
  # model.cold_start: weights of the inductive encoder's BPR and alignment
  # terms (`steps._inductive_term`).
  c.loss.cold_bpr = 1.0
  c.loss.cold_align = 1.0

  c.graph_update = ml_collections.ConfigDict()
  c.graph_update.schedule = "reference"  # rebuild every T, dropping the batch
  c.graph_update.T = 1
  c.graph_update.m_topk_rate = 1e-4  # k = floor(I * m_topk_rate)
  c.graph_update.pairing = "tiled"  # released repeat() bug: users[p mod B]
  # Which score ranks the top-k refresh: "dot", the generated rows P_b.Q_i
  # as released (§3.4, §4.4); "cosine", P_b.Q_i / |Q_i|, which removes the
  # item norm, and with it the sqrt(degree) growth of the one-sided feature
  # hop H_I = D_I^{-1/2} A^T H_U (§2.3 b), from the ranking.
  c.graph_update.topk_score = "dot"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # 'adamw' (released, decoupled decay) or 'adam'
  c.optim.lr = 5.5e-4
  c.optim.weight_decay = 0.01  # PyTorch AdamW default, implicit in the code

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 1024
  c.train.epochs = 1000
  # Item block of the generated rows; 0 = one product. With
  # critic.kind='lowrank', > 0 also fuses generator and critic blockwise
  # (`steps.uses_fused_generator`): no B x I array is formed.
  c.train.generator_block = 0
  # Devices on the 'data' mesh axis (batch users; `parallel.py`):
  # 1 = unsharded (the default single-device path), 0 = all devices.
  c.train.data_parallel = 1
  # Devices on the 'item' mesh axis (`parallel.py`): the
  # item embeddings and their optimiser moments, the raw features, the
  # critic's I-sized first-layer factor and the generated rows' item axis are
  # split over it. 1 = off. The mesh is (data_parallel, item_parallel);
  # n_items must be a multiple of item_parallel (no padding: a ConfigError
  # names both numbers), and so must train.generator_block when > 0.
  c.train.item_parallel = 1
  c.train.checkpoint_keep = 3  # last N checkpoints kept, plus the best one
  c.train.nan_check_every_steps = 1  # NaN guard: test loss terms every N steps
  # GPU only: main sets XLA_FLAGS=--xla_gpu_deterministic_ops=true (slower
  # scatter-adds, bit-reproducible runs). CPU runs are deterministic anyway.
  c.train.deterministic = False
  c.train.tensorboard = False  # per-epoch TensorBoard scalars (tensorboardX)

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (10, 20, 50)
  c.eval.every_epochs = 1
  c.eval.patience = 7  # stop on the 8th non-improving evaluation
  c.eval.metric = "recall@20"
  c.eval.block_users = 1024
  c.eval.exclude_val_in_test = False  # the reference excludes train only
  return c


def dataset_config(name: str) -> ml_collections.ConfigDict:
  """`base_config()` for the dataset folder called `name` (configs/*.py)."""
  c = base_config()
  c.data.name = name
  return c


def data_folder_candidates(data_config: ml_collections.ConfigDict
                           ) -> list[str]:
  """The folders a config's dataset may be in, in the order they are tried.

  `data.dir` when set; else, for a dataset config, `$MMSSL_DATA/<name>`
  when the MMSSL_DATA environment variable is set, then `data/<name>`
  under the working directory.
  """
  if data_config.dir:
    return [data_config.dir]
  if not data_config.name:
    return []
  out = []
  if os.environ.get("MMSSL_DATA"):
    out.append(os.path.join(os.environ["MMSSL_DATA"], data_config.name))
  out.append(os.path.join("data", data_config.name))
  return out


def modality_names(value) -> tuple[str, ...]:
  """`data.modalities` as a tuple of names; () means every modality.

  Accepts a tuple or list of names, each of which may itself hold names
  separated by commas or '+' (`--config.data.modalities=image,text` gives
  ('image,text',), `configs/tiktok.py:modalities=image+audio`).
  """
  if isinstance(value, str):
    value = (value,)
  names = [name.strip() for item in value
           for name in re.split(r"[,+]", str(item))]
  return tuple(name for name in names if name)


def synthetic_config() -> ml_collections.ConfigDict:
  """Parameters of the embedded synthetic dataset (`data/synthetic.py`)."""
  s = ml_collections.ConfigDict()
  s.seed = 0
  s.n_users = 1200
  s.n_items = 800
  s.n_factors = 16
  s.mean_interactions = 16
  s.popularity_skew = 0.5
  s.taste_scale = 3.0
  s.modality_dims = {"image": 64, "text": 48, "noise": 16}
  s.modality_noise = {"image": 0.5, "text": 1.0, "noise": -1.0}  # <0: pure noise
  return s


def lightgcn(c: ml_collections.ConfigDict) -> None:
  """Turns `c` into the LightGCN baseline (BPR + L2 on ego embeddings, Adam)."""
  c.model.name = "lightgcn"
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.loss.emb_decay = 1e-4


def paper(c: ml_collections.ConfigDict) -> None:
  """The paper variant: each correction of §8.1 as its own switch.

  The Gumbel temperature and the model-score mixing (`loss.real_data_tau`
  0.5, `loss.ui_pre_scale` 1.0) are among the four best of a 3 x 3
  validation sweep on TikTok (README "Choosing the paper variant's Gumbel
  settings"), which tie at the same validation Recall@20. The contrastive
  weight `loss.cl_rate` 0.001 is the best non-zero weight of a validation
  sweep on TikTok (0.001-0.1; README "Choosing the paper variant's
  contrastive weight"): once the persistent graphs make the contrastive
  loss active, the released 0.03 costs validation Recall@20 (0.0695
  against 0.0806), and turning the loss off (`ablation=wo_cl`) ties with
  0.001 within validation noise.
  """
  c.variant = "paper"
  c.model.fusion = "attention"  # real cross-modal attention (§8.1 item 3)
  c.graph_update.schedule = "persistent"  # per-user top-k graphs (items 1, 2)
  # The Baby settings' m_topk_rate = 1e-4 gives k = 0 (no modality graph at
  # all, §6.2); the paper's modality-aware graphs need k >= 1, so the paper
  # variant uses at least TikTok's rate (k = 1% of the items).
  c.graph_update.m_topk_rate = max(c.graph_update.m_topk_rate, 0.01)
  c.critic.negative_slope = 0.2  # a real nonlinearity (item 4)
  c.critic.batch_norm = False
  c.critic.sigmoid_output = False  # unbounded WGAN critic
  c.critic.train_mode = False  # no dropout, no batch statistics
  c.critic.dropout = (0.0, 0.0)
  c.loss.gumbel_log_logits = True  # a real Gumbel-softmax sample (item 5)
  c.loss.gumbel_scale = 1.0
  c.loss.real_data_tau = 0.5
  c.loss.ui_pre_scale = 1.0
  c.loss.cl_rate = 0.001  # by validation; the released 0.03 is too strong here


def apply_ablation(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets the switch of one ablation of the paper's Table (§7.2)."""
  if name not in ABLATIONS:
    raise ValueError(f"ablation={name!r}: expected one of {ABLATIONS}")
  c.ablation = name
  if name == "wo_asl":
    c.loss.adversarial = "none"
  elif name == "wo_cl":
    c.loss.contrastive = False
  elif name == "wo_gt":
    c.loss.gumbel_transform = False
  elif name == "rp_gae":
    c.loss.adversarial = "edge_likelihood"


def apply_arg(c: ml_collections.ConfigDict, arg: str | None):
  """Applies a `key=value,key=value` config argument.

  Keys: `variant` ('reference' or 'paper'; an ablation name is accepted as a
  shorthand for `ablation=`), `ablation` (one of ABLATIONS), `model`
  ('mmssl' or 'lightgcn') and `modalities` (names joined by '+').
  """
  if not arg:
    return c
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value")
    if key == "variant" and value in VARIANTS:
      if value == "paper":
        paper(c)
    elif key in ("variant", "ablation"):
      apply_ablation(c, value)
    elif key == "modalities":
      c.data.modalities = modality_names(value)
    elif key == "model":
      if value == "lightgcn":
        lightgcn(c)
      elif value != "mmssl":
        raise ValueError(f"model={value!r}: expected 'mmssl' or 'lightgcn'")
    else:
      raise ValueError(f"unknown config argument key {key!r} "
                       "(expected variant=, ablation=, model= or modalities=)")
  return c
