"""Counter-based U[0, 1) noise for the step's large random draws.

Each training iteration draws one uniform per (batch user, item) for the
Gumbel transform of the "real" rows (docs/reference.md §3.5) and one per
(item, dim) per modality for the feature dropout of both forwards (§2.3 a).
`jax.random`'s threefry costs about 15 ns per value on this project's CPU
(100 ms for one (1024, 6710) TikTok draw, a third of a low-rank-critic step,
and about 15 s per pass at I = 1e6); its `rbg` implementations are no faster
on CPU. Here a value is a keyed hash of its (row, column) position instead,
about 0.4 ns per value:

  h(r, c) = mix(mix(mix(r ^ s0) + (c ^ s1)) ^ s2),  u = (h >> 8) / 2^24,

with (s0, s1, s2) = `jax.random.bits(key, (3,))` and `mix` the "lowbias32"
integer finaliser (a bijection of uint32; C. Wellons, hash-prospector).
Values are independent of the array they sit in: column c of row r is the
same whether a (B, I) array or an item block starting at c0 is drawn
(`col_offset`), so the blockwise generator (`graph.fused_real_rows`) and the
dense real rows see the same noise for one key. Rows and columns may each
reach 2^32. `tests/test_noise.py` checks the moments, a chi-square of the
histogram, lag-1 correlations along both axes and key independence.

Not a cryptographic generator, and not meant for parameter initialisation,
sampling or anything small, which keep `jax.random`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32: xorshift-multiply finaliser, a bijection of uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform(key: jax.Array, shape: tuple[int, ...], *,
            col_offset: jax.Array | int = 0,
            dtype=jnp.float32) -> jax.Array:
  """U[0, 1) noise of `shape`, a multiple of 2^-24, from `key`.

  The value at position (..., c) of a row depends only on the key, the
  row's flat index over the leading axes and c + col_offset.

  Args:
    key: a `jax.random` key.
    shape: output shape (rank >= 1); the last axis is the column axis.
    col_offset: added to the column index (may be traced).
    dtype: floating output dtype.
  """
  seed = jax.random.bits(key, (3,), jnp.uint32)
  n_rows = math.prod(shape[:-1])
  grid = (n_rows, shape[-1])
  rows = jax.lax.broadcasted_iota(jnp.uint32, grid, 0)
  cols = (jax.lax.broadcasted_iota(jnp.uint32, grid, 1) +
          jnp.asarray(col_offset).astype(jnp.uint32))
  h = _mix(_mix(_mix(rows ^ seed[0]) + (cols ^ seed[1])) ^ seed[2])
  u = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
  return u.reshape(shape).astype(dtype)


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout (torch): zero w.p. rate, scale the rest by 1/(1-rate)."""
  keep = uniform(key, x.shape) >= rate
  return jnp.where(keep, x / (1.0 - rate), 0.0)
