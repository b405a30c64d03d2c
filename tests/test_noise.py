"""Statistics and reproducibility of the counter-based Gaussian noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hizoo_jax import noise

N = 1 << 20  # Samples per statistic: standard error of the mean ~ 1e-3.


def draw(key=0, count=0, query=0, path="['w']", shape=(N,)):
  words = noise.key_words(key)
  seed = noise.leaf_seed(words, count, query, noise.path_hash(
      (jax.tree_util.DictKey(path),)))
  return np.asarray(noise.gaussian(seed, shape), np.float64)


@pytest.fixture(scope="module")
def sample():
  return draw()


def test_moments(sample):
  se = 1 / np.sqrt(N)
  assert abs(sample.mean()) < 5 * se
  assert abs(sample.var() - 1) < 5 * np.sqrt(2) * se
  assert abs(np.mean(sample**3)) < 5 * np.sqrt(15) * se
  assert abs(np.mean(sample**4) - 3) < 5 * np.sqrt(96) * se
  # Tails: P(|z| > 3) = 0.0027; truncated at about 5.3 sigma by design.
  assert abs(np.mean(np.abs(sample) > 3) - 0.0027) < 5 * np.sqrt(0.0027 / N)
  assert np.abs(sample).max() < 5.5


def test_distribution_matches_normal_cdf(sample):
  # Kolmogorov-Smirnov distance against the standard normal CDF.
  from math import erf
  xs = np.sort(sample[:: 16])
  cdf = 0.5 * (1 + np.vectorize(erf)(xs / np.sqrt(2)))
  n = xs.size
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  assert ks < 1.6 / np.sqrt(n)  # 1% critical value is 1.63 / sqrt(n).


def _corr(a, b):
  return np.corrcoef(a, b)[0, 1]


@pytest.mark.parametrize("other", [
    dict(count=1), dict(query=1), dict(path="['v']"), dict(key=1)])
def test_independent_across_steps_queries_leaves_and_keys(sample, other):
  z = draw(**other)
  bound = 5 / np.sqrt(N)
  assert abs(_corr(sample, z)) < bound
  assert abs(_corr(sample**2, z**2)) < bound  # Not only uncorrelated.
  assert np.mean(sample == z) < 1e-3


def test_neighbours_are_independent(sample):
  bound = 5 / np.sqrt(N)
  for lag in (1, 2, 1024):
    assert abs(_corr(sample[:-lag], sample[lag:])) < bound
    assert abs(_corr(sample[:-lag] ** 2, sample[lag:] ** 2)) < bound


def test_reproducible_and_layout_free():
  a = draw(shape=(64, 32))
  np.testing.assert_array_equal(a, draw(shape=(64, 32)))
  # An element's value depends on its row-major position only.
  np.testing.assert_array_equal(a.reshape(-1), draw(shape=(2048,)))
  words = noise.key_words(0)
  seed = noise.leaf_seed(words, 0, 0, 7)
  jitted = jax.jit(lambda s: noise.gaussian(s, (64, 32)))(seed)
  np.testing.assert_array_equal(jitted, noise.gaussian(seed, (64, 32)))


def test_typed_and_int_keys_agree():
  assert np.array_equal(noise.key_words(3),
                        noise.key_words(jax.random.key(3)))


def test_bfloat16_output():
  words = noise.key_words(0)
  z = noise.gaussian(noise.leaf_seed(words, 0, 0, 1), (4096,), jnp.bfloat16)
  assert z.dtype == jnp.bfloat16
  assert abs(float(jnp.mean(z.astype(jnp.float32)))) < 0.1


def test_fused_into_its_consumer():
  """Structural: x + c * z compiles without a temporary for z."""
  x = jnp.zeros((512, 512), jnp.float32)
  seed = noise.leaf_seed(noise.key_words(0), 0, 0, 1)

  def perturb(x, seed):
    return x + 1e-3 * noise.gaussian(seed, x.shape)

  compiled = jax.jit(perturb, donate_argnums=0).lower(x, seed).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 512 * 512
