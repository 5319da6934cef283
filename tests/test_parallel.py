"""Tests for mmssl_jax.parallel: data-parallel steps on a device mesh.

The sharded runs need several devices, which a JAX process fixes when it
starts, so they run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (this file, run as a
script, is the worker). One step of configs/test.py on a 1-device mesh and
on a 4- and an 8-device 'data' mesh gives the same loss terms, parameters
and evaluation metrics to float tolerance for the same seed; so does the
low-rank fused critic. The multi-host path (jax.distributed, 2 processes x 2
CPU devices on 127.0.0.1, launch/local_multiprocess.sh) is tested in
tests/test_multihost.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import helpers

REPO = helpers.REPO_ROOT
DEVICES = 8
# (case, config argument, overrides, mesh sizes, evaluate)
CASES = (
    ("reference", None, {}, (1, 4, 8), True),
    # critic.lr = 0: see test_data_mesh_step_with_lowrank_fused_critic.
    ("lowrank_fused", "variant=paper",
     {"critic.kind": "lowrank", "critic.rank": 8, "critic.lr": 0.0,
      "train.generator_block": 32}, (1, 8), False),
)


def _worker(out_path: str) -> None:
  """Runs every case on every mesh size; saves one .npz of the results."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
  from mmssl_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from mmssl_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == DEVICES, jax.devices()
  out = {}
  for case, arg, overrides, meshes, evaluate in CASES:
    config = helpers.load_config("test", arg)
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
    ds = synthetic.make_synthetic(config.data.synthetic)
    for n in meshes:
      run = run_lib.Run(config, ds, parallel.make_mesh(n_devices=n))
      state = run.init_state()
      assert all(g.user_indptr is None  # segment_sum, no CSR custom calls
                 for g in state.modality_graphs.values())
      state, terms = run.step(state, jnp.int32(0), run.inputs)
      prefix = f"{case}/{n}/"
      assert len(terms["loss"].sharding.device_set) == n
      for k, v in terms.items():
        out[prefix + "terms/" + k] = np.asarray(v)
      for key, leaf in helpers.state_arrays(state).items():
        out[prefix + "state" + key] = leaf
      if evaluate:
        for k, v in run.evaluate(state, "val").items():
          out[prefix + "val/" + k] = np.asarray(v)
  np.savez(out_path, **out)


@pytest.fixture(scope="module", name="results")
def results_fixture(tmp_path_factory):
  return helpers.run_device_worker(
      __file__, tmp_path_factory.mktemp("parallel") / "results.npz", DEVICES)


def _part(results, case, n, kind):
  prefix = f"{case}/{n}/{kind}"
  return {k[len(prefix):]: v for k, v in results.items()
          if k.startswith(prefix)}


# State parts as saved by the worker: [0] params, [1] critic params,
# [2] critic stats, [3] modality graphs, [4] graph buffer, [5] recommender
# optimiser state, [6] critic optimiser state (Adam mu = (1 - b1) * grad).


def _noise_bias(key: str) -> bool:
  """Critic biases feeding a train-mode BatchNorm (reference critic).

  Their true gradient is exactly zero (BatchNorm removes any shift); the
  computed one is rounding noise whose sign depends on the summation order,
  and Adam's first update maps it to +-lr. Their params are checked to
  |diff| <= 2 lr, their optimiser moments not at all.
  """
  return key.startswith(("[1]", "[6]")) and key.endswith(
      ("['dense_0']['bias']", "['dense_1']['bias']"))


def _compare_states(a, b, *, critic_lr=0.0, batch_norm_critic=False):
  """Floats to rtol 1e-5 with atol 1e-5 of the leaf's largest entry (tiny
  Adam moments), integers exactly."""
  assert a.keys() == b.keys()
  for key in a:
    x, y = a[key], b[key]
    if batch_norm_critic and _noise_bias(key):
      if key.startswith("[1]"):
        np.testing.assert_array_less(np.abs(x - y), 2 * critic_lr)
    elif np.issubdtype(x.dtype, np.floating):
      atol = 1e-5 * float(np.max(np.abs(x), initial=0.0))
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=atol, err_msg=key)
    else:
      np.testing.assert_array_equal(y, x, err_msg=key)


@pytest.mark.parametrize("n", [4, 8])
def test_data_mesh_step_equals_one_device_step(results, n):
  one = _part(results, "reference", 1, "terms/")
  many = _part(results, "reference", n, "terms/")
  assert one.keys() == many.keys() and "critic" in one and "gen" in one
  for k in one:
    np.testing.assert_allclose(many[k], one[k], rtol=1e-5, err_msg=k)
  _compare_states(_part(results, "reference", 1, "state"),
                  _part(results, "reference", n, "state"),
                  critic_lr=helpers.load_config("test").critic.lr,
                  batch_norm_critic=True)
  val_one = _part(results, "reference", 1, "val/")
  val_many = _part(results, "reference", n, "val/")
  assert val_one.keys() == val_many.keys() and "recall@20" in val_one
  for k in val_one:
    np.testing.assert_allclose(val_many[k], val_one[k], rtol=1e-5, err_msg=k)


def test_data_mesh_step_with_lowrank_fused_critic(results):
  """Paper variant, low-rank critic, blockwise fused generator (scans over
  item blocks with the batch split over 'data').

  Some critic gradient entries of this small problem are ~1e-8, at Adam's
  eps, where the first Adam update (lr * g / (|g| + 1e-8)) turns float
  rounding into differences of order lr; the critic learning rate is 0 so
  that the generator loss (computed with the updated critic) compares
  tightly, and the critic's gradients are compared through Adam's first
  moment (state [6], mu = (1 - b1) g)."""
  one = _part(results, "lowrank_fused", 1, "terms/")
  many = _part(results, "lowrank_fused", 8, "terms/")
  assert "gen" in one and "critic" in one
  for k in one:
    np.testing.assert_allclose(many[k], one[k], rtol=1e-5, err_msg=k)
  state = _part(results, "lowrank_fused", 1, "state")
  assert any(k.startswith("[6][0].mu['dense_0']['u']") for k in state)
  _compare_states(state, _part(results, "lowrank_fused", 8, "state"))


def test_make_mesh_and_batch_check():
  import jax  # pylint: disable=g-import-not-at-top
  from mmssl_jax import parallel  # pylint: disable=g-import-not-at-top
  config = helpers.load_config("test")
  mesh = parallel.make_mesh(config)  # data_parallel = item_parallel = 1
  assert mesh.shape == {"data": 1, "item": 1}
  assert parallel.make_mesh(n_devices=0).size == jax.device_count()
  with pytest.raises(ValueError, match="data_parallel"):
    parallel.make_mesh(n_devices=jax.device_count() + 1)
  config.train.batch_size = 31
  with pytest.raises(ValueError, match="multiple"):
    parallel.check_batch(config, types.SimpleNamespace(shape={"data": 2}))
  parallel.check_batch(config, mesh)


if __name__ == "__main__":
  helpers.worker_main(_worker)
