"""Int seeds of any size: no aliasing, no overflow, small seeds unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hizoo_jax as hz
from hizoo_jax import noise


@pytest.mark.parametrize("seed", [0, 1, 5, 2**31 - 1, 2**31, 2**32 - 1, -1,
                                  -2**31])
def test_small_seeds_keep_the_words_of_jax_random_key(seed):
  expected = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
  np.testing.assert_array_equal(noise.key_words(seed), expected)
  np.testing.assert_array_equal(noise.key_words(np.int64(seed)), expected)


def test_large_seeds_neither_alias_nor_overflow():
  seeds = [2**32, 2**32 + 5, 2**33, 2**63, 2**64, 2**64 + 5, 2**200,
           -2**31 - 1, -2**32, -2**64]
  words = {s: tuple(np.asarray(noise.key_words(s)).tolist()) for s in seeds}
  small = {tuple(np.asarray(noise.key_words(s)).tolist())
           for s in (0, 5, 1, 2**31, 2**32 - 1, -1)}
  assert len(set(words.values())) == len(seeds)  # no two alike
  assert not set(words.values()) & small  # none like a small seed
  # Deterministic, and np.uint64 seeds take the same path as ints.
  assert tuple(np.asarray(noise.key_words(2**64 + 5)).tolist()) == words[
      2**64 + 5]
  assert tuple(np.asarray(noise.key_words(np.uint64(2**63))).tolist()) == (
      words[2**63])


def test_optimizer_seeded_above_2_32_draws_its_own_noise():
  params = {"w": jnp.zeros(64)}

  def first_noise(seed):
    tx = hz.mezo(1e-3, key=seed)
    return np.asarray(hz.step_noise(tx.init(params), params)["w"])

  base = first_noise(5)
  assert not np.array_equal(first_noise(2**32 + 5), base)
  assert not np.array_equal(first_noise(2**64), first_noise(0))
  np.testing.assert_array_equal(first_noise(2**64), first_noise(2**64))
