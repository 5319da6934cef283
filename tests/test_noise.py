"""Statistics of `noise.uniform`, the counter-based noise of the large draws.

Each check would catch a broken mix (a constant, a lattice, a row or column
that repeats, keys that collide) while a sound U[0, 1) generator passes with
overwhelming probability at these sample sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import noise

SHAPE = (512, 2048)  # 1,048,576 draws


@pytest.fixture(scope="module", name="draw")
def draw_fixture():
  return np.asarray(noise.uniform(jax.random.key(0), SHAPE), np.float64)


def test_range_and_moments(draw):
  assert draw.min() >= 0.0 and draw.max() < 1.0
  n = draw.size
  # Mean 1/2 (sd 0.2887 / sqrt(n)), variance 1/12, third central moment 0.
  assert abs(draw.mean() - 0.5) < 5 * 0.2887 / np.sqrt(n)
  assert abs(draw.var() - 1 / 12) < 5 * np.sqrt(1 / 180) / np.sqrt(n)
  assert abs(np.mean((draw - 0.5) ** 3)) < 5 * np.sqrt(1 / 448) / np.sqrt(n)


def test_histogram_chi_square(draw):
  bins = 256
  counts = np.bincount((draw * bins).astype(int).ravel(), minlength=bins)
  expected = draw.size / bins
  chi2 = np.sum((counts - expected) ** 2 / expected)
  # 255 degrees of freedom: mean 255, sd 22.6; 6 sd either side.
  assert 255 - 6 * 22.6 < chi2 < 255 + 6 * 22.6


def test_no_lag_one_correlation_along_rows_or_columns(draw):
  z = draw - 0.5
  n = draw.size
  along_cols = np.mean(z[:, 1:] * z[:, :-1]) * 12
  along_rows = np.mean(z[1:] * z[:-1]) * 12
  for corr in (along_cols, along_rows):
    assert abs(corr) < 6 / np.sqrt(n)


def test_keys_are_independent_and_deterministic():
  a = noise.uniform(jax.random.key(1), (64, 256))
  b = noise.uniform(jax.random.key(2), (64, 256))
  np.testing.assert_array_equal(a, noise.uniform(jax.random.key(1), (64, 256)))
  corr = np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]
  assert abs(corr) < 6 / np.sqrt(a.size)
  assert np.mean(np.asarray(a) == np.asarray(b)) < 1e-3


def test_column_offset_selects_the_same_values_as_the_whole_row():
  key = jax.random.key(3)
  whole = noise.uniform(key, (8, 100))
  block = jax.jit(lambda off: noise.uniform(key, (8, 30), col_offset=off))(
      jnp.int32(40))
  np.testing.assert_array_equal(block, whole[:, 40:70])


def test_dropout_rate_and_scale():
  x = jnp.ones((1000, 1000))
  out = np.asarray(noise.dropout(jax.random.key(4), x, 0.31))
  kept = out != 0
  assert abs(kept.mean() - 0.69) < 5 * np.sqrt(0.31 * 0.69 / out.size)
  np.testing.assert_allclose(out[kept], 1 / 0.69, rtol=1e-6)
