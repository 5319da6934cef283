r"""An independent PyTorch port of the released MMSSL training, for parity checks.

Not part of the package and not a dependency of it: it needs `torch`, `numpy`
and `scipy` in their own environment (the project never installs torch):

  python -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 numpy scipy   # the CPU build
  /tmp/torchenv/bin/python experiments/torch_port.py \
      --data=PATH/tiktok --dataset=tiktok --epochs=1 --seed=2022

It follows docs/reference.md §2-§5 (the released code's forward, losses,
critic, T schedule, sampler and evaluation), written from that description
and a reading of the released code, with no line of it copied. It is
written so that every random draw happens in the same order, on the same
shapes, through the same torch functions as the released code does on CPU
(`nn.Linear`/`nn.Embedding` construction, xavier and kaiming inits, the
`nn.Dropout` calls of the two forwards and of the critic, the Gumbel noise,
the penalty's alpha; Python `random` and `np.random` for the sampler), so
that with the same seed it should replay the released run draw for draw.
Its purpose is the first epoch under randomness (experiments/README.md):
whether the released code's epoch-0 figures are typical of its own seed
distribution, and, with `--init_from`, whether our JAX initialisation moves
them.

Prints one JSON line per epoch (validation and test Recall@20 and NDCG@20 with
the reference NDCG of §5, mean loss terms) and can save the final
embeddings (`--save`) so that `mmssl_jax.evaluation` can re-score them.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

# §6.2, the authors' per-dataset settings; everything else is §6.1.
SETTINGS = {
    "baby": dict(lr=0.00055, G_rate=0.0001, real_data_tau=0.005, T=1, m_topk_rate=0.0001),
    "tiktok": dict(lr=0.00054, G_rate=0.0018, real_data_tau=0.002, T=1, m_topk_rate=0.01),
}
COMMON = dict(embed_size=64, batch_size=1024, D_lr=3e-4, regs=1e-5, feat_reg_decay=1e-5,
              cl_rate=0.03, tau=0.5, G_drop1=0.31, G_drop2=0.5, gp_rate=1.0,
              ui_pre_scale=100.0, log_log_scale=1e-5, drop_rate=0.2, model_cat_rate=0.55,
              id_cat_rate=0.36, head_num=4, n_id_layers=2)


# ---------------------------------------------------------------- data (§1, §4.2)
class Data:
  """The LATTICE-style loader: JSON splits, `exist_users` in key order."""

  def __init__(self, folder):
    self.train_items, self.val_set, self.test_set = {}, {}, {}
    self.exist_users, self.n_train, n_users, n_items = [], 0, 0, 0
    train = json.load(open(os.path.join(folder, "train.json")))
    for uid, items in train.items():
      if not items:
        continue
      uid = int(uid)
      self.exist_users.append(uid)
      self.train_items[uid] = items
      n_items, n_users = max(n_items, max(items)), max(n_users, uid)
      self.n_train += len(items)
    for name, target in (("val.json", self.val_set), ("test.json", self.test_set)):
      for uid, items in json.load(open(os.path.join(folder, name))).items():
        if items:
          target[int(uid)] = items
          n_items = max(n_items, max(items))
    self.n_users, self.n_items = n_users + 1, n_items + 1
    # train_mat: float64 ones at every train pair (the released pickle).
    rows = [u for u in self.exist_users for _ in self.train_items[u]]
    cols = [i for u in self.exist_users for i in self.train_items[u]]
    self.train_mat = sp.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                   shape=(len(train), self.n_items))

  def sample(self, batch_size):
    """§4.2: distinct users (Python random), one positive and one negative each (np.random)."""
    if batch_size <= self.n_users:
      users = random.sample(self.exist_users, batch_size)
    else:
      users = [random.choice(self.exist_users) for _ in range(batch_size)]
    pos, neg = [], []
    for u in users:
      items = self.train_items[u]
      pos.append(items[np.random.randint(low=0, high=len(items), size=1)[0]])
      while True:
        j = np.random.randint(low=0, high=self.n_items, size=1)[0]
        if j not in items:
          neg.append(j)
          break
    return users, pos, neg


def one_sided_norm(mat):
  """§2.1: D_row^{-1/2} M (the released `csr_norm(mean_flag=True)`), as torch sparse f32."""
  rowsum = np.power(np.asarray(mat.sum(1)).flatten() + 1e-8, -0.5)
  rowsum[np.isinf(rowsum)] = 0.0
  coo = (sp.diags(rowsum) * mat).tocoo().astype(np.float32)
  idx = torch.from_numpy(np.vstack((coo.row, coo.col)).astype(np.int64))
  return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data), coo.shape)


# ---------------------------------------------------------------- model (§2)
class Recommender(nn.Module):
  """Parameters of the released model, created in its order (same RNG draws)."""

  def __init__(self, n_users, n_items, feats, c):
    super().__init__()
    d = c["embed_size"]
    self.trans = nn.ModuleList([nn.Linear(f.shape[1], d) for f in feats])
    for lin in self.trans:
      nn.init.xavier_uniform_(lin.weight)
    self.common_trans = nn.Linear(d, d)  # unused by the forward, created for the RNG order
    nn.init.xavier_uniform_(self.common_trans.weight)
    self.user_id = nn.Embedding(n_users, d)
    self.item_id = nn.Embedding(n_items, d)
    nn.init.xavier_uniform_(self.user_id.weight)
    nn.init.xavier_uniform_(self.item_id.weight)
    self.feats = [torch.tensor(f).float() for f in feats]
    self.dropout = nn.Dropout(p=c["drop_rate"])
    xavier = nn.init.xavier_uniform_
    self.w_q = nn.Parameter(xavier(torch.empty(d, d)))
    self.w_k = nn.Parameter(xavier(torch.empty(d, d)))
    self.w_v = nn.Parameter(xavier(torch.empty(d, d)))
    self.w_self_attention_item = nn.Parameter(xavier(torch.empty(d, d)))
    self.w_self_attention_user = nn.Parameter(xavier(torch.empty(d, d)))
    self.w_self_attention_cat = nn.Parameter(xavier(torch.empty(c["head_num"] * d, d)))
    self.c = c


def modality_fusion(model, modality_ids):
  """§2.4: the released "attention", computed literally (it reduces to mean x W_sum)."""
  c = model.c
  heads, d = c["head_num"], c["embed_size"]
  q = torch.stack(modality_ids, 0)
  n_mod, n = q.shape[0], q.shape[1]
  d_h = d // heads
  Q = torch.matmul(q, model.w_q).reshape(n_mod, n, heads, d_h).permute(2, 0, 1, 3)
  K = Q.reshape(n_mod, n, heads, d_h).permute(2, 0, 1, 3)  # the K = Q reshape of §2.4
  att = (Q.unsqueeze(2) * K.unsqueeze(1) / math.sqrt(d_h)).sum(-1).unsqueeze(-1)
  att = F.softmax(att, dim=2)
  z = (att * q.unsqueeze(1)).sum(2)
  z = torch.cat(list(z), -1) @ model.w_self_attention_cat
  return z.mean(0)


def forward(model, ui, iu, modality_graphs):
  """§2: returns u*, i*, per-modality (H_U, H_I), per-modality user ID rows, u*."""
  c = model.c
  projected = [model.dropout(lin(f)) for lin, f in zip(model.trans, model.feats)]
  h_users = [torch.sparse.mm(ui, x) for x in projected]
  h_items = [torch.sparse.mm(iu, h) for h in h_users]
  user_ids = [torch.sparse.mm(g_ui, model.item_id.weight) for g_ui, _ in modality_graphs]
  item_ids = [torch.sparse.mm(g_iu, model.user_id.weight) for _, g_iu in modality_graphs]
  u = model.user_id.weight + c["id_cat_rate"] * F.normalize(modality_fusion(model, user_ids), p=2, dim=1)
  i = model.item_id.weight + c["id_cat_rate"] * F.normalize(modality_fusion(model, item_ids), p=2, dim=1)
  us, its = [u], [i]
  for layer in range(c["n_id_layers"]):
    if layer == c["n_id_layers"] - 1:
      u = F.softmax(torch.mm(ui, i), dim=-1)
      i = F.softmax(torch.mm(iu, u), dim=-1)
    else:
      u = torch.mm(ui, i)
      i = torch.mm(iu, u)
    us.append(u)
    its.append(i)
  u = torch.stack(us).mean(0)
  i = torch.stack(its).mean(0)
  for hu, hi in zip(h_users, h_items):
    u = u + c["model_cat_rate"] * F.normalize(hu, p=2, dim=1)
    i = i + c["model_cat_rate"] * F.normalize(hi, p=2, dim=1)
  return u, i, h_users, h_items, user_ids


class Critic(nn.Module):
  """§3.5: I -> I/4 -> I/8 -> 1, slope-1 LeakyReLU, BatchNorm, dropout, 100 sigmoid."""

  def __init__(self, n_items, c):
    super().__init__()
    self.net = nn.Sequential(
        nn.Linear(n_items, int(n_items / 4)), nn.LeakyReLU(True), nn.BatchNorm1d(int(n_items / 4)),
        nn.Dropout(c["G_drop1"]),
        nn.Linear(int(n_items / 4), int(n_items / 8)), nn.LeakyReLU(True), nn.BatchNorm1d(int(n_items / 8)),
        nn.Dropout(c["G_drop2"]),
        nn.Linear(int(n_items / 8), 1), nn.Sigmoid())

  def forward(self, x):
    return (100 * self.net(x.float())).view(-1)


def critic_init(m):
  if isinstance(m, nn.Linear):
    nn.init.kaiming_normal_(m.weight)
    m.bias.data.fill_(0)


# ---------------------------------------------------------------- losses (§3)
def generated_rows(users, user_emb, item_emb, train_dense, block):
  """§3.4: masked, row-L2-normalised score rows of the batch users, over item blocks."""
  observed = train_dense[users]
  parts = []
  n_items = item_emb.shape[0]
  for start in range(0, n_items, block):
    s = torch.mm(user_emb[users], item_emb[start:start + block].T)
    parts.append(s * (1 - observed[:, start:start + block]))
  return F.normalize(torch.cat(parts, -1), p=2, dim=1)


def infonce(z1, z2, tau, block=1024):
  """§3.6: GRACE-style loss with intra- and inter-view negatives, epsilon inside the log."""
  f = lambda x: torch.exp(x / tau)
  sim = lambda a, b: torch.mm(F.normalize(a), F.normalize(b).t())
  n = z1.shape[0]
  losses = []
  for s in range(0, n, block):
    refl = torch.cat([f(sim(z1[s:s + block], z1[t:t + block])) for t in range(0, n, block)], -1)
    between = torch.cat([f(sim(z1[s:s + block], z2[t:t + block])) for t in range(0, n, block)], -1)
    pos = between[:, s:s + block].diag()
    losses.append(-torch.log(pos / (refl.sum(1) + between.sum(1) - refl[:, s:s + block].diag()) + 1e-8))
  return torch.cat(losses).mean()


def gradient_penalty(critic, real, fake, batch_size):
  """§3.5: per-row interpolation, weight 0.3."""
  alpha = torch.rand(batch_size * 2, 1).expand_as(real)
  x = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_()
  out = critic(x)
  g = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True,
                          retain_graph=True, only_inputs=True)[0]
  return ((g.norm(2, dim=1) - 1) ** 2).mean() * 0.3


# ---------------------------------------------------------------- evaluation (§5)
def evaluate(user_emb, item_emb, users, targets, train_items, k=20):
  """Recall@k and the reference NDCG@k (ideal DCG from the hits in the top 50)."""
  u = user_emb.detach().numpy()
  i = item_emb.detach().numpy()
  discount = 1.0 / np.log2(np.arange(2, k + 2))
  recall, ndcg = [], []
  for start in range(0, len(users), 2048):
    batch = users[start:start + 2048]
    scores = u[batch] @ i.T
    for row, user in enumerate(batch):
      scores[row, train_items.get(user, [])] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :50]  # heapq.nlargest(50) order
    for row, user in enumerate(batch):
      truth = set(targets[user])
      r = np.array([1.0 if j in truth else 0.0 for j in top[row]])
      recall.append(r[:k].sum() / len(truth))
      idcg = (np.sort(r)[::-1][:k] * discount).sum()
      ndcg.append((r[:k] * discount).sum() / idcg if idcg > 0 else 0.0)
  return float(np.mean(recall)), float(np.mean(ndcg))


# ---------------------------------------------------------------- training (§4)
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True)
  p.add_argument("--dataset", default="tiktok", choices=sorted(SETTINGS))
  p.add_argument("--modalities", default="image,audio",
                 help="feature files <name>_feat.npy, in the released order (image, then 'text')")
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--seed", type=int, default=2022)
  p.add_argument("--init_from", default="", help="npz of initial parameters to load (our JAX init)")
  p.add_argument("--init_groups", default="ids,wcat,proj",
                 help="which groups of --init_from to load: ids (user and item ID tables), "
                      "wcat (w_self_attention_cat), proj (the modality projections)")
  p.add_argument("--save_init", default="",
                 help="npz to write the port's own initial parameters to (export_init.py's keys)")
  p.add_argument("--save", default="", help="npz to write the final u*, i* to")
  p.add_argument("--threads", type=int, default=0)
  a = p.parse_args(argv)
  if a.threads:
    torch.set_num_threads(a.threads)
  c = dict(COMMON, **SETTINGS[a.dataset])

  data = Data(a.data)
  feats = []
  for name in a.modalities.split(","):
    path = os.path.join(a.data, f"{name}_feat.npy")
    if not os.path.exists(path):
      sys.exit(f"{path}: missing feature file")
    feats.append(np.load(path))
  np.random.seed(a.seed)
  random.seed(a.seed)
  torch.manual_seed(a.seed)

  train_mat = data.train_mat
  n_users, n_items = train_mat.shape
  train_dense = torch.tensor(train_mat.todense())  # float64, like the released u_ui
  ui, iu = one_sided_norm(train_mat), one_sided_norm(train_mat.T.tocsr())
  model = Recommender(n_users, n_items, feats, c)
  critic = Critic(n_items, c)
  critic.apply(critic_init)
  names = a.modalities.split(",")
  if a.save_init:
    save_init(model, names, a.save_init)
  if a.init_from:
    load_init(model, names, np.load(a.init_from), a.init_groups.split(","))
  opt_critic = torch.optim.Adam(critic.parameters(), lr=c["D_lr"], betas=(0.5, 0.9))
  opt_rec = torch.optim.AdamW(model.parameters(), lr=c["lr"])
  n_mod = len(feats)
  modality_graphs = [(ui, iu)] * n_mod
  k_top = int(n_items * c["m_topk_rate"])
  index = [([], []) for _ in range(n_mod)]
  B = c["batch_size"]
  n_batch = data.n_train // B + 1

  for epoch in range(a.epochs):
    t0 = time.time()
    sums = {}
    for idx in range(n_batch):
      model.train()
      users, pos, neg = data.sample(B)
      # D step (§4.3 step 2)
      with torch.no_grad():
        u_star, i_star, h_u, h_i, _ = forward(model, ui, iu, modality_graphs)
      ui_rows = generated_rows(users, u_star, i_star, train_dense, B).detach()
      fake = torch.cat([generated_rows(users, hu, hi, train_dense, B).detach()
                        for hu, hi in zip(h_u, h_i)], 0)
      loss_fake = critic(fake).mean()
      observed = train_dense[users]
      noise = torch.empty(observed.shape, dtype=torch.float32).uniform_(0, 1)
      # §3.5 as released: only the noise is divided by tau (operator precedence).
      real = F.softmax(observed - c["log_log_scale"] * torch.log(-torch.log(noise + 1e-8) + 1e-8)
                       / c["real_data_tau"], dim=1)
      real = F.normalize(real + ui_rows * c["ui_pre_scale"], dim=1)
      real = torch.cat((real, real), 0)
      loss_real = -critic(real).mean()
      gp = gradient_penalty(critic, real, fake, B)
      loss_d = loss_real + loss_fake + c["gp_rate"] * gp
      opt_critic.zero_grad()
      loss_d.backward()
      opt_critic.step()
      # recommender step (§4.3 step 3)
      u_all, i_all, h_u, h_i, user_ids = forward(model, ui, iu, modality_graphs)
      ue, pe, ne = u_all[users], i_all[pos], i_all[neg]
      bpr = -torch.mean(F.logsigmoid((ue * pe).sum(1) - (ue * ne).sum(1)))
      emb = c["regs"] * (0.5 * (ue ** 2).sum() + 0.5 * (pe ** 2).sum() + 0.5 * (ne ** 2).sum()) / B
      gen = [generated_rows(users, hu, hi, train_dense, B) for hu, hi in zip(h_u, h_i)]
      if idx % c["T"] == 0 and idx != 0:  # §4.4: rebuild from what was gathered, then reset
        new = []
        for xs, ys in index:
          tmp = sp.csr_matrix((np.ones(len(xs)), (xs, ys)), shape=(n_users, n_items))
          new.append((one_sided_norm(tmp), one_sided_norm(tmp.T.tocsr())))
        modality_graphs = new
        index = [([], []) for _ in range(n_mod)]
      else:
        for (xs, ys), rows in zip(index, gen):
          _, top = torch.topk(rows.detach(), k_top, dim=-1)
          xs += torch.tensor(users).repeat(1, k_top).view(-1).tolist()  # the tiled pairing
          ys += top.view(-1).tolist()
      feat = c["feat_reg_decay"] * sum(0.5 * (h ** 2).sum() for h in h_i + h_u) / n_items
      cl = sum(infonce(uid[users], u_all[users], c["tau"]) for uid in user_ids)
      g_loss = -critic(torch.cat(gen, 0)).mean()
      total = bpr + emb + feat + c["cl_rate"] * cl + c["G_rate"] * g_loss
      opt_rec.zero_grad()
      total.backward()
      opt_rec.step()
      for name, v in (("total", total), ("bpr", bpr), ("emb", emb), ("feat", feat), ("cl", cl),
                      ("g", g_loss), ("critic", loss_d), ("gp", gp)):
        sums[name] = sums.get(name, 0.0) + float(v)
    report(model, ui, iu, modality_graphs, data, a, epoch, time.time() - t0, sums, n_batch)
  if a.epochs == 0:  # score the initial parameters (and --save them), e.g. to cross-check §5
    report(model, ui, iu, modality_graphs, data, a, -1, 0.0, {}, n_batch)


def report(model, ui, iu, modality_graphs, data, a, epoch, train_s, sums, n_batch):
  """Scores eval-mode u*, i* (§5), prints the epoch's JSON line, writes --save."""
  model.eval()
  with torch.no_grad():
    u_star, i_star, *_ = forward(model, ui, iu, modality_graphs)
  val = evaluate(u_star, i_star, list(data.val_set), data.val_set, data.train_items)
  test = evaluate(u_star, i_star, list(data.test_set), data.test_set, data.train_items)
  print(json.dumps({"epoch": epoch, "seed": a.seed, "init_from": a.init_from or None,
                    "init_groups": a.init_groups if a.init_from else None,
                    "val_recall@20": round(val[0], 5), "val_ndcg@20": round(val[1], 5),
                    "test_recall@20": round(test[0], 5), "test_ndcg@20": round(test[1], 5),
                    "train_s": round(train_s, 1),
                    **{f"mean_{k}": round(v / n_batch, 6) for k, v in sums.items()}}), flush=True)
  if a.save:
    np.savez(a.save, user=u_star.numpy(), item=i_star.numpy())


def save_init(model, names, path):
  """Writes the port's initial parameters with `export_init.py`'s keys (JAX layout)."""
  out = {"user_id": model.user_id.weight, "item_id": model.item_id.weight,
         "w_self_attention_cat": model.w_self_attention_cat}
  for name, lin in zip(names, model.trans):
    out[f"trans_{name}_kernel"] = lin.weight.T  # torch (d, d_m) -> (d_m, d)
    out[f"trans_{name}_bias"] = lin.bias
  np.savez(path, **{k: v.detach().numpy() for k, v in out.items()})


def load_init(model, names, z, groups):
  """Overwrites the port's parameters in `groups` with an exported init.

  Projections are matched by modality name, so the port keeps the released
  modality order (and its dropout draws) whatever order the init was written in.
  """
  unknown = set(groups) - {"ids", "wcat", "proj"}
  if unknown:
    sys.exit(f"--init_groups: unknown group(s) {sorted(unknown)}")
  with torch.no_grad():
    if "ids" in groups:
      model.user_id.weight.copy_(torch.from_numpy(z["user_id"]))
      model.item_id.weight.copy_(torch.from_numpy(z["item_id"]))
    if "wcat" in groups:
      model.w_self_attention_cat.copy_(torch.from_numpy(z["w_self_attention_cat"]))
    if "proj" in groups:
      for name, lin in zip(names, model.trans):
        lin.weight.copy_(torch.from_numpy(z[f"trans_{name}_kernel"]).T)
        lin.bias.copy_(torch.from_numpy(z[f"trans_{name}_bias"]))


if __name__ == "__main__":
  main()
