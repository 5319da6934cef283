"""Shared helpers for the graph/model/sampler/steps/train tests.

Naive dense numpy references written from docs/reference.md
(not from the code under test), config loading, and a cheap way to compile a
train step once (lower optimisation level, for tests that only check that a
configuration builds and runs).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEGREE_EPS = 1e-8  # +1e-8 inside the inverse square root of `csr_norm` (§2.1)


# ----------------------------------------------------------------------------
# Configs


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s get_config(arg), loaded by path as `main` does."""
  path = CONFIG_DIR / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_test_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def config_names() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                if not p.stem.startswith("_"))


# ----------------------------------------------------------------------------
# Calls whose signature is changing in the checkout (pad_graph gained
# n_users/n_items for sorted edge lists), and graph fixtures.


def _takes(fn, n_args):
  return len(inspect.signature(fn).parameters) >= n_args


def pad_graph(graph, capacity, n_users, n_items):
  from mmssl_jax import graph as graph_lib  # pylint: disable=g-import-not-at-top
  if _takes(graph_lib.pad_graph, 4):
    return graph_lib.pad_graph(graph, capacity, n_users, n_items)
  return graph_lib.pad_graph(graph, capacity)


def initial_modality_graphs(base, modalities, capacity, n_users, n_items):
  """G^m = the base graph (§2.1) padded to `capacity` edges, per modality:
  a starting point for the graph-update functions called directly."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmssl_jax import graph as graph_lib  # pylint: disable=g-import-not-at-top
  padded = graph_lib.pad_graph(base, capacity, n_users, n_items)
  return {m: graph_lib.BipartiteGraph(*map(jnp.asarray, padded))
          for m in modalities}


# ----------------------------------------------------------------------------
# Dense numpy references (§2.1, §2.3, §2.4, §4.4)


def dense_counts(users, items, n_users, n_items) -> np.ndarray:
  """R as a dense float64 matrix; duplicate (u, i) entries are summed (csr)."""
  r = np.zeros((n_users, n_items))
  np.add.at(r, (np.asarray(users), np.asarray(items)), 1.0)
  return r


def csr_norm_rows(r: np.ndarray) -> np.ndarray:
  """diag(rowsum + 1e-8)^{-1/2} r: the released `csr_norm(mean_flag=True)`."""
  return (r.sum(1) + DEGREE_EPS)[:, None] ** -0.5 * r


def one_sided_dense(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(A_UI, A_IU) = (D_u^{-1/2} R, D_i^{-1/2} R^T), §2.1."""
  return csr_norm_rows(r), csr_norm_rows(r.T)


def symmetric_dense(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(A_UI, A_IU) with A_UI = D_u^{-1/2} R D_i^{-1/2} and A_IU = A_UI^T."""
  du = (r.sum(1) + DEGREE_EPS) ** -0.5
  di = (r.sum(0) + DEGREE_EPS) ** -0.5
  a = du[:, None] * r * di[None, :]
  return a, a.T


def l2n(x: np.ndarray) -> np.ndarray:
  """F.normalize: x / max(||x||_2, 1e-12) row-wise."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def mmssl_id_gcn(a_ui, a_iu, u0, i0, n_layers=2, last_softmax=True):
  """§2.3 (f): sequential layers, softmax over dims on the last, mean of all."""
  us, is_ = [u0], [i0]
  for layer in range(n_layers):
    last = last_softmax and layer == n_layers - 1
    u = a_ui @ is_[-1]
    if last:
      u = softmax(u, -1)
    i = a_iu @ u
    if last:
      i = softmax(i, -1)
    us.append(u)
    is_.append(i)
  return np.mean(us, 0), np.mean(is_, 0)


def released_attention(views, w_q, w_cat, head_num):
  """LITERAL port of the released `multi_head_self_attention` (§2.4).

  views: list of the 2 modality embeddings (N, d). Returns (Z, K, Q) with
  Z the (2, N, d) output before the modality mean, and the permuted Q and K
  (H, 2, N, d/H) so that the K scramble can be checked.
  """
  q = np.stack(views)                                   # (2, N, d)
  v = np.stack(views)
  beh, n, d = q.shape
  d_h = d // head_num
  qq = q @ w_q                                          # Q = q . w_q
  qq = qq.reshape(beh, n, head_num, d_h).transpose(2, 0, 1, 3)  # (H, 2, N, dh)
  # Bug 1: K is built from the already permuted Q (row-major reshape).
  kk = qq.reshape(beh, n, head_num, d_h).transpose(2, 0, 1, 3)
  q5 = qq[:, :, None]                                   # (H, 2, 1, N, dh)
  k5 = kk[:, None]                                      # (H, 1, 2, N, dh)
  v4 = v[:, None]                                       # (2, 1, N, d)
  att = (q5 * k5) / np.sqrt(d_h)
  att = att.sum(-1)[..., None]                          # (H, 2, 2, N, 1)
  att = softmax(att, axis=2)                            # over key modality j
  z = (att * v4).sum(2)                                 # (H, 2, N, d); bug 2
  z = np.concatenate(list(z), -1)                       # (2, N, H*d)
  return z @ w_cat, kk, qq


def mmssl_forward_dense(params, r, features, modality_r, *, head_num,
                        id_layers=2, id_cat_rate=0.36, model_cat_rate=0.55,
                        w_q=None):
  """Dense numpy port of §2.3 a-h in eval mode (no dropout).

  params: the model's params pytree (numpy-converted). r: (U, I) train matrix.
  features: modality -> (I, d_m). modality_r: modality -> (G_UI, G_IU) dense.
  The fusion uses the literal attention port (random w_q unless given).
  Returns a dict with the same fields as `model.ForwardOutput` plus u0, i0.
  """
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  a_ui, a_iu = one_sided_dense(r)
  e_u, e_i = p["user_id_embedding"], p["item_id_embedding"]
  d = e_u.shape[1]
  if w_q is None:
    w_q = np.random.default_rng(0).normal(size=(d, d))
  feat_user, feat_item, mod_user, mod_item = {}, {}, {}, {}
  for m, f in features.items():
    proj = p["modality_proj"][m]
    x = np.asarray(f, np.float64) @ proj["kernel"] + proj["bias"]      # (a)
    feat_user[m] = a_ui @ x                                            # (b)
    feat_item[m] = a_iu @ feat_user[m]
    g_ui, g_iu = modality_r[m]
    mod_user[m] = g_ui @ e_i                                           # (c)
    mod_item[m] = g_iu @ e_u
  z_u, _, _ = released_attention(list(mod_user.values()), w_q,
                                 p["w_self_attention_cat"], head_num)  # (d)
  z_i, _, _ = released_attention(list(mod_item.values()), w_q,
                                 p["w_self_attention_cat"], head_num)
  u0 = e_u + id_cat_rate * l2n(z_u.mean(0))                            # (e)
  i0 = e_i + id_cat_rate * l2n(z_i.mean(0))
  u, i = mmssl_id_gcn(a_ui, a_iu, u0, i0, id_layers)                   # (f)
  for m in features:                                                   # (g)
    u = u + model_cat_rate * l2n(feat_user[m])
    i = i + model_cat_rate * l2n(feat_item[m])
  return dict(user=u, item=i, feat_user=feat_user, feat_item=feat_item,
              modality_user=mod_user, modality_item=mod_item, u0=u0, i0=i0)


def dense_from_graph_edges(users, items, weights, n_rows, n_cols,
                           by_user=True) -> np.ndarray:
  """Dense matrix of an edge list (summing duplicates); rows are users if
  by_user else items."""
  out = np.zeros((n_rows, n_cols))
  rows, cols = (users, items) if by_user else (items, users)
  np.add.at(out, (np.asarray(rows), np.asarray(cols)), np.asarray(weights))
  return out


# ----------------------------------------------------------------------------
# Cheap compilation (the whole session: conftest.py)


# XLA options that cut the CPU compile time of the MMSSL step about 3x
# (backend optimisation level 0, no fusion emitters); same HLO, same results
# up to float rounding (tests/test_steps.py compares both).
# conftest.py adds them to XLA_FLAGS for every program of the test session,
# child processes included.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_cpu_use_fusion_emitters": False}
# XLA's own CPU defaults for the same two options (compiling with these gives
# the optimised HLO of compiling with no options in a clean environment);
# compiler_options override XLA_FLAGS.
DEFAULT_COMPILE_OPTIONS = {"xla_backend_optimization_level": 2,
                           "xla_cpu_use_fusion_emitters": True}
FAST_XLA_FLAGS = " ".join(f"--{k}={str(v).lower()}"
                          for k, v in FAST_COMPILE_OPTIONS.items())


def state_arrays(state) -> dict[str, np.ndarray]:
  """Host copies of a train state's leaves, keyed by their path in (params,
  critic params, critic stats, modality graphs, graph buffer, recommender
  optimiser state, critic optimiser state): "[0]...", ..., "[6]..."."""
  host = jax.device_get((state.params, state.critic_params,
                         state.critic_stats, state.modality_graphs,
                         state.graph_buffer, state.opt_state,
                         state.critic_opt_state))
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(host)}


def tree_all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x))))
             for x in jax.tree.leaves(tree))


def without_compilation_cache(env: dict[str, str]) -> dict[str, str]:
  """`env` without the session's persistent compilation cache (conftest.py).

  For processes joined by jax.distributed: with jax 0.10.2, CPU processes
  hung in their first step when the executables came from the cache
  (observed, cause not investigated)."""
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


# ----------------------------------------------------------------------------
# Simulated multi-device workers (tests/test_parallel.py, test_item_sharding.py)


def device_env(device_count: int) -> dict[str, str]:
  """Environment of a subprocess with `device_count` simulated CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={device_count}"
                      f" {env.get('XLA_FLAGS', '')}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
  return env


def run_device_worker(test_file: str, out: Path, device_count: int
                      ) -> dict[str, np.ndarray]:
  """Runs `python test_file worker out` on `device_count` simulated devices
  (the file's `worker_main`) and returns the .npz it saves (strings as str)."""
  proc = subprocess.run(
      [sys.executable, test_file, "worker", str(out)],
      env=device_env(device_count), cwd=REPO_ROOT, capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as data:
    return {k: v[()] if v.dtype.kind == "U" else v for k, v in data.items()}


def worker_main(worker) -> None:
  """The `__main__` of a worker file: `worker(out_path)` for `worker OUT`."""
  if len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(sys.argv[2])
  else:
    sys.exit(f"usage: {sys.argv[0]} worker OUT.npz")


# ----------------------------------------------------------------------------
# One-line errors of the command-line tools


def last_error_line(stderr: str, *fragments: str) -> str:
  """The last stderr line, which must be `error: ...` holding `fragments`,
  with no traceback anywhere."""
  assert "Traceback" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, last
  return last


def one_error_line(stderr: str) -> str:
  """The only `error:` line of stderr, which must also be its last line."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
  return errors[0]

