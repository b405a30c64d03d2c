"""The cheap-op rsqrt against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hizoo_jax import fusible


def _ulps(got, exact):
  """|got - exact| in float32 ulps of the exact value."""
  spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
  return np.abs(np.asarray(got, np.float64) - exact) / spacing


@pytest.fixture(scope="module")
def normals():
  """Positive normal float32 numbers spread over every exponent."""
  rng = np.random.default_rng(0)
  return np.exp(rng.uniform(np.log(2.0**-126), np.log(3e38), 200_000)
                ).astype(np.float32)


def test_rsqrt_within_three_ulps_and_special_values(normals):
  exact = 1 / np.sqrt(normals.astype(np.float64))
  assert _ulps(fusible.rsqrt(normals), exact).max() <= 3
  special = jnp.float32([0.0, np.inf, -1.0, np.nan])
  np.testing.assert_array_equal(fusible.rsqrt(special),
                                lax.rsqrt(special))


def test_no_expensive_instruction_left():
  """The point of the module: nothing XLA refuses to duplicate."""
  def f(x):
    return fusible.rsqrt(x)
  hlo = jax.jit(f).lower(jnp.full((8,), 0.5, jnp.float32)).as_text(
      dialect="hlo")
  for op in (" log(", " log-plus-one(", " sqrt(", " rsqrt(",
             " exponential(", " divide(", " erf-inv(", " power("):
    assert op not in hlo, op
