"""Training learns the planted signal, and early stopping stops.

Planted data: `mmssl_jax/data/synthetic.py` draws each user's items with
probability proportional to exp(3 <p_u, q_i> / 2 - 0.5 log rank_i) from
planted 4-factor tastes and a popularity skew, and gives every item two noisy
views of its factors (image: noise 0.5, text: noise 1.0, as configs/test.py).
On 400 users x 200 items the reference variant, the paper variant and
LightGCN each train 10 epochs with `train.train_and_evaluate`; their test
Recall@20 at the best validation epoch is compared with item popularity and
with uniformly random scores, both ranked by `mmssl_jax.evaluation` on the
run's own test split (train items excluded), and with the model's own
untrained state: MMSSL's propagated features already make a content
recommender before any step (test Recall@20 0.52 at init), so beating
popularity alone would not show that training works.

Measured (2 cores, jax 0.10.2, XLA's fast test options of conftest.py):

  python -m pytest -q -n 0 tests/test_training_quality.py

  test Recall@20     trained  untrained  / popularity  / random
  reference          0.661    0.525      2.03x         5.8x
  paper              0.703    0.515      2.16x         6.2x
  LightGCN           0.619    0.147      1.90x         5.5x
  popularity         0.325
  random (seed 0)    0.113   (expected K / candidates: 0.105)

Asserted, with headroom: >= 1.5x popularity, >= 3x random, >= 1.15x the
untrained model (measured >= 1.26x).
"""

import json
import logging
import math

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmssl_jax import evaluation
from mmssl_jax import run as run_lib
from mmssl_jax import train
from mmssl_jax import workdir as workdir_lib

K = 20
MIN_OVER_POPULARITY = 1.5
MIN_OVER_RANDOM = 3.0
MIN_OVER_UNTRAINED = 1.15


def planted_config(arg=None):
  """configs/test.py on a larger planted dataset (30 steps per epoch; about
  1 s per MMSSL epoch on 2 cores)."""
  c = helpers.load_config("test", arg)
  s = c.data.synthetic
  s.n_users, s.n_items, s.n_factors, s.mean_interactions = 400, 200, 4, 12
  s.modality_dims = {"image": 16, "text": 8}
  s.modality_noise = {"image": 0.5, "text": 1.0}
  c.model.embed_size = 32
  c.train.batch_size = 128
  c.train.epochs = 10
  c.eval.patience = 100  # all 10 epochs; the best validation epoch counts
  c.eval.ks = (10, K)
  c.eval.block_users = 256
  return c


@pytest.fixture(scope="module", name="baselines")
def baselines_fixture():
  """Popularity and random Recall@K on the planted data's test split."""
  config = planted_config()
  ds = run_lib.load_dataset(config.data)
  run = run_lib.Run(config, ds)
  ks = tuple(config.eval.ks)
  degree = np.bincount(ds.train.items, minlength=ds.n_items)
  popularity = evaluation.evaluate(
      jnp.ones((ds.n_users, 1)),
      jnp.asarray(degree[:, None], jnp.float32), run.test_set, ks=ks)
  # Uniform scores, independent for every (user, item): u_b . i = X[i, b].
  scores = np.random.default_rng(0).random((ds.n_items, ds.n_users))
  random = evaluation.evaluate(jnp.eye(ds.n_users),
                               jnp.asarray(scores, jnp.float32),
                               run.test_set, ks=ks)
  # A random ranking finds each target in the top K with probability
  # K / (number of candidates): the mean over the evaluated users.
  n_train = np.bincount(ds.train.users, minlength=ds.n_users)
  test_users = np.unique(ds.test.users)
  expected = float(np.mean(K / (ds.n_items - n_train[test_users])))
  standard_error = math.sqrt(expected * (1 - expected) / len(ds.test))
  return dict(ds=ds, popularity=popularity[f"recall@{K}"],
              random=random[f"recall@{K}"], expected_random=expected,
              random_standard_error=standard_error)


def test_baselines_are_what_they_claim(baselines):
  """Random scores give K / candidates up to sampling noise (within 3
  binomial standard errors over the 584 test items, 0.013; measured 0.113
  against 0.105); popularity beats random."""
  assert abs(baselines["random"] - baselines["expected_random"]) < (
      3 * baselines["random_standard_error"])
  assert baselines["popularity"] > 2 * baselines["random"]


@pytest.mark.parametrize("arg", [None, "variant=paper", "model=lightgcn"],
                         ids=["reference", "paper", "lightgcn"])
def test_trained_model_beats_popularity_random_and_its_untrained_self(
    arg, baselines, tmp_path):
  config = planted_config(arg)
  run = run_lib.Run(config, baselines["ds"])
  untrained = run.evaluate(run.init_state(), "test")[f"recall@{K}"]
  result = train.train_and_evaluate(config, str(tmp_path))
  trained = result["test"][f"recall@{K}"]
  assert result["epochs"] == config.train.epochs
  popularity, random = baselines["popularity"], baselines["random"]
  print(f"{arg or 'reference'}: test recall@{K} {trained:.4f} (untrained "
        f"{untrained:.4f}, popularity {popularity:.4f}, random {random:.4f})")
  assert trained >= MIN_OVER_POPULARITY * popularity
  assert trained >= MIN_OVER_RANDOM * max(random,
                                          baselines["expected_random"])
  assert trained >= MIN_OVER_UNTRAINED * untrained


# ----------------------------------------------------------------------------
# Early stopping


@pytest.mark.parametrize("patience", [0, 1])
def test_early_stopping_stops_after_patience_plus_one_bad_evaluations(
    patience, tmp_path, caplog):
  """configs/test.py with a learning rate of 0: the recommender never moves,
  so validation Recall@20 is the same at every epoch and never beats
  epoch 0's (the best must be strictly greater). Training must stop after
  patience + 1 non-improving evaluations, i.e. after patience + 2 epochs of
  the 10 allowed, with epoch 0 as the best and the test split evaluated only
  there."""
  config = helpers.load_config("test")
  config.optim.lr = 0.0
  config.eval.patience = patience
  config.train.epochs = 10
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / workdir_lib.METRICS_FILE, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  epochs = [r for r in records if not r.get("final")]
  finals = [r for r in records if r.get("final")]
  n_epochs = patience + 2
  assert [r["epoch"] for r in epochs] == list(range(n_epochs))
  assert len(finals) == 1 and records[-1] is finals[0]
  assert finals[0]["best_epoch"] == 0 and finals[0]["epochs"] == n_epochs
  assert result["best_epoch"] == 0 and result["epochs"] == n_epochs
  val = [r["val/recall@20"] for r in epochs]
  assert val == [val[0]] * n_epochs  # lr 0: nothing to improve
  assert 0 < val[0] < 1
  # The test split is evaluated at the (only) best epoch, never after.
  assert "test/recall@20" in epochs[0]
  assert not any("test/recall@20" in r for r in epochs[1:])
  assert result["test"]["recall@20"] == epochs[0]["test/recall@20"]
  assert any(f"did not improve for {patience + 1} evaluations" in m
             for m in caplog.messages), caplog.messages
  # Nothing ran past the stop: the last checkpoint is the end of epoch
  # n - 1.
  steps_per_epoch = run_lib.steps_per_epoch(
      config, len(run_lib.load_dataset(config.data).train))
  saved = [int(p.name) for p in (tmp_path / workdir_lib.CHECKPOINT_DIR)
           .iterdir() if p.name.isdigit()]
  assert max(saved) == n_epochs * steps_per_epoch
