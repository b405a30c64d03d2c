"""Sums of f(z) over index ranges of many leaves, drawn in one loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from hizoo_jax import noise
from hizoo_jax import range_sums

SHAPES = [(5, 7), (13,), (3, 4, 6), (1,)]


def seeds(num_queries=2):
  words = noise.key_words(3)
  hashes = np.arange(len(SHAPES), dtype=np.uint32) * 7919 + 11
  return noise.leaf_seed(
      words, 4, jnp.arange(num_queries, dtype=jnp.uint32)[:, None], hashes)


@pytest.fixture(autouse=True)
def small_rows(monkeypatch):
  # Rows of 4 elements, 3 rows an iteration: ranges straddle rows and
  # iterations, and the last iteration is partly past the last row.
  monkeypatch.setattr(range_sums, "WIDTH", 4)
  monkeypatch.setattr(range_sums, "BLOCK_ROWS", 3)


def test_sums_equal_the_leaves_own_draws():
  s = seeds()
  # Whole tensors, stacked layers, rows and columns of a matrix, the columns
  # of stacked matrices: (leaf, axes summed).
  pairs = [(0, (0, 1)), (1, (0,)), (2, (1, 2)), (3, (0,)), (0, (1,)),
           (0, (0,)), (2, (2,)), (2, (1,))]
  requests = [(i, *range_sums.strided_groups(SHAPES[i], axes))
              for i, axes in pairs]
  fn = lambda z: jnp.square(z) - 1.0
  got = np.asarray(range_sums.range_sums(s, requests, fn))
  for j in range(2):
    z = [np.asarray(noise.gaussian(s[j, i], shape), np.float64)
         for i, shape in enumerate(SHAPES)]
    want = np.concatenate([np.sum(z[i] ** 2 - 1, axis=axes).reshape(-1)
                           for i, axes in pairs])
    assert got.shape == (2, want.size)
    np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-4)


def test_inactive_sums_are_zero():
  request = [(0, 1, 35, 1)]
  got = range_sums.range_sums(seeds(), request, jnp.square,
                              active=jnp.asarray(False))
  np.testing.assert_array_equal(np.asarray(got), 0.0)
  on = range_sums.range_sums(seeds(), request, jnp.square,
                             active=jnp.asarray(True))
  assert np.all(np.asarray(on) > 0)


@pytest.mark.parametrize("shape, axes, want", [
    ((5, 7), (0, 1), (1, 35, 1)),  # a whole tensor
    ((3, 4, 6), (1, 2), (3, 24, 1)),  # the layers of a stacked tensor
    ((3, 1, 6), (2,), (3, 6, 1)),  # size-1 axes do not matter
    ((5, 7), (1,), (5, 7, 1)),  # rows
    ((5, 7), (0,), (7, 5, 7)),  # columns
    ((3, 4, 6), (1,), (18, 4, 6)),  # columns of stacked matrices
    ((3, 4, 6), (0, 2), None),  # not consecutive
])
def test_strided_groups(shape, axes, want):
  assert range_sums.strided_groups(shape, axes) == want
