"""The cheap-op log, rsqrt and normal quantile against float64 NumPy/SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy.special import ndtri

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


def test_log_within_two_ulps(normals):
  exact = np.log(normals.astype(np.float64))
  away_from_one = np.abs(exact) > 1e-3  # Near 1, compare absolutely.
  got = np.asarray(fusible.log(normals))
  assert _ulps(got, exact)[away_from_one].max() <= 2
  assert np.abs(got - exact)[~away_from_one].max() < 1e-9
  # Both sides of the mantissa split at sqrt(1/2), and powers of two.
  edges = np.float32([0.70710677, 0.7071068, 1.0, 2.0, 0.5, 2.0**-126])
  np.testing.assert_allclose(fusible.log(edges),
                             np.log(edges.astype(np.float64)), rtol=2e-7,
                             atol=0)


def test_rsqrt_within_three_ulps_and_special_values(normals):
  exact = 1 / np.sqrt(normals.astype(np.float64))
  assert _ulps(fusible.rsqrt(normals), exact).max() <= 3
  special = jnp.float32([0.0, np.inf, -1.0, np.nan])
  np.testing.assert_array_equal(fusible.rsqrt(special),
                                lax.rsqrt(special))


def test_normal_quantile_on_every_uniform_the_generator_makes():
  k = np.arange(2**23, dtype=np.float64)
  u = ((k + 0.5) * 2.0**-23).astype(np.float32)  # noise.gaussian's grid.
  exact = ndtri(u.astype(np.float64))
  got = np.asarray(fusible.normal_from_uniform(u), np.float64)
  # Measured 1.2e-6; lax.erf_inv in float32 is off by up to 2.2e-5 here.
  assert np.abs(got - exact).max() < 5e-6
  assert got[0] == -got[-1]  # Symmetric, and the tails are cut at 5.3.
  assert 5.29 < got[-1] < 5.3
  assert np.all(np.diff(got) >= 0)  # Monotone, so no branch seam.


def test_no_expensive_instruction_left():
  """The point of the module: nothing XLA refuses to duplicate."""
  def f(x):
    return (fusible.normal_from_uniform(x), fusible.rsqrt(x),
            fusible.log(x))
  hlo = jax.jit(f).lower(jnp.full((8,), 0.5, jnp.float32)).as_text(
      dialect="hlo")
  for op in (" log(", " log-plus-one(", " sqrt(", " rsqrt(",
             " exponential(", " divide(", " erf-inv(", " power("):
    assert op not in hlo, op
