r"""Initial feature-L2 term of many projection draws: torch's against ours.

  /tmp/torchenv/bin/python experiments/init_feat_l2.py \
      --data=PATH/tiktok --seeds=0-99

Needs torch and mmssl_jax in one environment (`pip install -e .` into the
torch venv). The epoch-0 result on TikTok follows the initial draw
(experiments/README.md, torch_port.py), and it orders with the epoch's
feature-L2 term. This
asks whether the two libraries' projection draws differ in distribution on
that statistic, not only in their marginals.

For each seed s it draws the projections exactly as each implementation does
at seed s: the torch port's `Recommender` after `torch.manual_seed(s)` (the
released order: `trans` first, xavier-uniform weight, default bias), and our
`model.init_params` under the params key of `jax.random.key(s)` (as
`steps.init_state`). It then evaluates, without dropout, the §3.3 term
L_feat = decay/2 * sum_m (|A_UI X_m W_m + b_m|_F^2 ... propagated) / I at
the initial parameters (the first iteration's value; the logged epoch mean
also includes the training drift). Prints one JSON object: per-library
mean, std, quantiles and the seeds' values, plus a two-sample
Kolmogorov-Smirnov test.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
import scipy.sparse as sp
import scipy.stats
import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_port  # noqa: E402
from mmssl_jax import model as model_lib  # noqa: E402


def seeds_arg(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
  return out


def propagators(train_mat):
  """The one-sided graphs of §2.1 as float64 scipy matrices."""
  def norm(m):
    d = np.power(np.asarray(m.sum(1)).flatten() + 1e-8, -0.5)
    d[np.isinf(d)] = 0.0
    return sp.diags(d) @ m
  return norm(train_mat).tocsr(), norm(train_mat.T.tocsr()).tocsr()


def feat_l2(projs, feats, ui, iu, decay, n_items):
  """§3.3 at train=False: H_U = A_UI (X W + b), H_I = A_IU H_U."""
  sq = 0.0
  for (kernel, bias), x in zip(projs, feats):
    h_user = ui @ (x @ kernel + bias)
    h_item = iu @ h_user
    sq += float(np.sum(h_user ** 2) + np.sum(h_item ** 2))
  return decay * 0.5 * sq / n_items


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True)
  p.add_argument("--modalities", default="image,audio", help="the released order")
  p.add_argument("--seeds", default="0-99", help="e.g. 0-99 or 1,7,2022")
  a = p.parse_args(argv)
  data = torch_port.Data(a.data)
  names = a.modalities.split(",")
  feats = []
  for name in names:
    path = os.path.join(a.data, f"{name}_feat.npy")
    if not os.path.exists(path):
      sys.exit(f"{path}: missing feature file")
    feats.append(np.load(path).astype(np.float64))
  ui, iu = propagators(data.train_mat)
  n_users, n_items = data.train_mat.shape
  c = dict(torch_port.COMMON, **torch_port.SETTINGS["tiktok"])
  hp = model_lib.ModelHParams(embed_size=c["embed_size"])
  dims = {n: f.shape[1] for n, f in zip(names, feats)}
  # Our init draws modalities in the dataset's (sorted) order; match by name.
  jax_order = sorted(names)
  values = {"torch": [], "jax": []}
  seeds = seeds_arg(a.seeds)
  for s in seeds:
    torch.manual_seed(s)
    rec = torch_port.Recommender(n_users, n_items, feats, c)
    values["torch"].append(feat_l2(
        [(lin.weight.detach().numpy().T.astype(np.float64),
          lin.bias.detach().numpy().astype(np.float64)) for lin in rec.trans],
        feats, ui, iu, c["feat_reg_decay"], n_items))
    k_params = jax.random.split(jax.random.key(s), 3)[0]
    params = model_lib.init_params(k_params, n_users=n_users, n_items=n_items,
                                   modality_dims={m: dims[m] for m in jax_order}, hp=hp)
    proj = params["modality_proj"]
    values["jax"].append(feat_l2(
        [(np.asarray(proj[m]["kernel"], np.float64), np.asarray(proj[m]["bias"], np.float64))
         for m in names], feats, ui, iu, c["feat_reg_decay"], n_items))
  out = {"data": a.data, "modalities": names, "seeds": a.seeds, "n": len(seeds)}
  for lib, v in values.items():
    v = np.asarray(v)
    out[lib] = {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)), 4),
                "q05_q50_q95": [round(float(q), 4) for q in np.quantile(v, [.05, .5, .95])],
                "by_seed": {str(s): round(float(x), 4) for s, x in zip(seeds, v)}}
  ks = scipy.stats.ks_2samp(values["torch"], values["jax"])
  out["ks_statistic"], out["ks_pvalue"] = round(float(ks.statistic), 4), round(float(ks.pvalue), 4)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
