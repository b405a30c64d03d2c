"""Statistics and reproducibility of the counter-based noise."""

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


def exact_distribution():
  """The generator's atoms and probabilities, from its definition (float64).

  z = (c + (k + 1/2) / 256 - 1/2 - 12) / sigma with c ~ Binomial(24, 1/2) and
  k uniform on 0..255, independent.
  """
  from math import comb
  coins = np.arange(25)
  p_coins = np.array([comb(24, c) for c in coins]) / 2.0**24
  dither = (np.arange(256) + 0.5) / 256 - 0.5
  values = coins[:, None] + dither[None, :] - 12.0
  probs = p_coins[:, None] * np.full(256, 1 / 256)[None, :]
  sigma = np.sqrt(np.sum(probs * values**2))
  order = np.argsort(values, axis=None)
  return values.reshape(-1)[order] / sigma, probs.reshape(-1)[order]


def test_exact_distribution_is_standard_and_nearly_normal():
  from math import erf
  atoms, probs = exact_distribution()
  assert abs(np.sum(probs * atoms)) < 1e-12
  assert abs(np.sum(probs * atoms**2) - 1) < 1e-12
  assert abs(np.sum(probs * atoms**4) - noise.FOURTH_MOMENT) < 1e-9
  normal_cdf = 0.5 * (1 + np.vectorize(erf)(atoms / np.sqrt(2)))
  assert np.max(np.abs(np.cumsum(probs) - normal_cdf)) < 0.01


def test_moments(sample):
  se = 1 / np.sqrt(N)
  assert abs(sample.mean()) < 5 * se
  assert abs(sample.var() - 1) < 5 * np.sqrt(2) * se
  assert abs(np.mean(sample**3)) < 5 * np.sqrt(15) * se
  assert abs(np.mean(sample**4) - noise.FOURTH_MOMENT) < 5 * np.sqrt(96) * se
  atoms, probs = exact_distribution()
  tail = np.sum(probs[np.abs(atoms) > 3])
  assert abs(np.mean(np.abs(sample) > 3) - tail) < 5 * np.sqrt(tail / N)
  assert np.abs(sample).max() <= np.abs(atoms).max() + 1e-6


def test_distribution_matches_its_definition(sample):
  # Kolmogorov-Smirnov distance against the exact CDF of the generator.
  atoms, probs = exact_distribution()
  xs = sample
  which = np.searchsorted(atoms, xs - 1e-5)  # the atom each value is.
  np.testing.assert_allclose(atoms[which], xs, atol=1e-5)
  empirical = np.cumsum(np.bincount(which, minlength=atoms.size)) / xs.size
  ks = np.max(np.abs(empirical - np.cumsum(probs)))
  assert ks < 1.63 / np.sqrt(xs.size)  # the 1% critical value.


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
