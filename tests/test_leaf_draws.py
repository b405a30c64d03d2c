"""Small leaves of one shape drawn together (hizoo_jax.leaf_draws)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax import _xla
from hizoo_jax import leaf_draws
from hizoo_jax import noise
from test_program import distinct_kernels, instructions


def model():
  """A matrix (4096 entries), three biases of 8 and a scale of 4.

  The budget of small leaves is 4124 // 128 = 32 entries: the scale and the
  three biases (28). The biases share a shape and are drawn together; the
  scale is alone of its shape and drawn on its own.
  """
  rng = np.random.default_rng(0)
  params = {
      "w": jnp.asarray(rng.normal(size=(8, 512)) / 20, jnp.float32),
      "b": [jnp.asarray(rng.normal(size=(8,)) / 3, jnp.float32)
            for _ in range(3)],
      "s": jnp.ones((4,), jnp.float32),
  }

  def loss(p, x):
    h = x @ p["w"].reshape(64, 64)
    for b in p["b"]:
      h = jnp.tanh(h.reshape(-1, 8) + b).reshape(h.shape)
    return jnp.mean((h.reshape(-1, 4) * p["s"] - 0.5) ** 2)

  x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
  return params, loss, x


def test_small_groups_take_the_smallest_leaves_within_the_budget():
  params, _, _ = model()
  leaves = jax.tree.leaves(params)  # b0, b1, b2, s, w
  assert leaf_draws.small_groups(leaves, [True] * 5) == [(0, 1, 2)]
  # A frozen bias neither counts nor joins; two biases still share a draw.
  assert leaf_draws.small_groups(leaves, [True, False, True, True, True]) == [
      (0, 2)]
  # Without the matrix the budget (28 // 128) holds no leaf.
  assert leaf_draws.small_groups(leaves, [True] * 4 + [False]) == []


@pytest.mark.parametrize("jit", [False, True])
def test_grouped_rows_equal_each_leafs_own_draw(jit):
  params, _, _ = model()
  leaves = jax.tree.leaves(params)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  words = noise.key_words(7)
  hashes = np.array([noise.path_hash(p) for p in paths], np.uint32)

  def draws(count):
    seeds = noise.leaf_seed(words, count, jnp.arange(2, dtype=jnp.uint32)[
        :, None], hashes)
    numbers = [jnp.uint32(i) for i in range(len(leaves))]
    draw = leaf_draws.leaf_draws(seeds, numbers, leaves, [True] * 5,
                                 jnp.uint32(0))
    return [[draw.at(j)(i) for i in range(5)] for j in range(2)]

  got = (jax.jit(draws) if jit else draws)(jnp.int32(3))
  for j in range(2):
    for i, path in enumerate(paths):
      seed = noise.leaf_seed(words, 3, j, noise.path_hash(path))
      np.testing.assert_array_equal(
          np.asarray(got[j][i]), np.asarray(noise.gaussian(
              seed, leaves[i].shape)))


OPTIMIZERS = {
    "mezo": lambda: hz.mezo(0.05, mu=0.05, key=3),
    "mezo_q2": lambda: hz.mezo(0.05, mu=0.05, num_queries=2, key=3),
    "hizoo": lambda: hz.hizoo(0.05, mu=0.05, hessian_smooth=0.5, key=3),
    "hizoo_l": lambda: hz.hizoo_l(0.05, mu=0.05, hessian_smooth=0.5,
                                  min_dim_size_to_factor=4, key=3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lean_step_with_grouped_leaves_matches_plain_update(name,
                                                            monkeypatch):
  monkeypatch.setattr(_xla, "single_device", lambda: True)
  params, loss, x = model()
  tx = OPTIMIZERS[name]()

  @jax.jit
  def plain(p, s):
    updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, x))
    return optax.apply_updates(p, updates), s

  lean = hz.make_train_step(tx, loss)
  p_ref, s_ref = params, tx.init(params)
  p_new, s_new = jax.tree.map(jnp.copy, (p_ref, s_ref))
  for _ in range(3):
    p_ref, s_ref = plain(p_ref, s_ref)
    p_new, s_new, _ = lean(p_new, s_new, x)
  for a, e in zip(jax.tree.leaves(p_new), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=2e-5)
  for a, e in zip(jax.tree.leaves(hz.find_state(s_new).hessian),
                  jax.tree.leaves(hz.find_state(s_ref).hessian)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4)
  # The biases moved, each by its own noise.
  moved = [np.asarray(b) - np.asarray(b0)
           for b, b0 in zip(p_new["b"], params["b"])]
  assert all(np.any(d != 0) for d in moved)
  assert not np.allclose(moved[0], moved[1])


@pytest.mark.parametrize("name", ["mezo", "hizoo", "hizoo_l"])
def test_small_leaves_of_one_shape_share_one_generator(name, monkeypatch):
  """Per extra small leaf the step grows by a read of its row, not by a copy
  of the noise generator (hizoo_jax.leaf_draws): compared with the same
  step with every leaf drawn on its own. The leaves read their rows at
  their numbers, so their kernels are alike: read at constant rows, each
  was compiled on its own (at the 350M decoder, 150 MiB more resident after
  the compile). HiZOO-L's sums come out as one array: cut per leaf, each
  slice was a kernel of its own (100M decoder: 100-150 MiB more at the
  compile's peak)."""
  monkeypatch.setattr(_xla, "single_device", lambda: True)

  def mlp(n):  # 8 matrices of 64 x 64 and n biases of 16.
    params = {"w": [jnp.eye(64) for _ in range(8)],
              "b": [jnp.zeros((16,)) for _ in range(n)]}

    def loss(p, x):
      for w in p["w"]:
        x = jnp.tanh(x @ w)
      for b in p["b"]:
        x = x + jnp.tile(b, 4)
      return jnp.mean(x ** 2)
    return params, loss, jnp.ones((2, 64))

  def growth():
    counts, kernels = [], []
    for n in (4, 16):  # 16 biases: 256 entries of the 32768 // 128 budget.
      params, loss, x = mlp(n)
      tx = OPTIMIZERS[name]()
      compiled = hz.make_train_step(tx, loss).lower(
          params, tx.init(params), x).compile()
      counts.append(instructions(compiled))
      kernels.append(distinct_kernels(compiled, wrapped=True))
    return (counts[1] - counts[0]) / 12, kernels

  together, kernels = growth()
  monkeypatch.setattr(leaf_draws, "SMALL_SHARE", 2**62)  # no leaf is small
  apart, _ = growth()
  assert together < 0.6 * apart, (together, apart)
  assert kernels[1] <= kernels[0] + 2, kernels
