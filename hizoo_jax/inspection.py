"""What the next step will draw, for tests and custom loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hizoo_jax import noise
from hizoo_jax.zo_state import find_state


def step_noise(state, params, *, query: int = 0):
  """The z that the next ``update`` with ``state`` uses, as a tree like params.

  z depends only on the state's key and step count, the query index and each
  leaf's path: not on the number of leaves, the mask or the device layout.
  Non-float leaves get None; masked leaves get the z they would use.

  Args:
    state: an estimator state, or any optimizer state that contains one.
    params: the parameters (only paths, shapes and dtypes are read).
    query: which of the ``num_queries`` perturbations.

  Returns:
    A tree like params of float32 arrays.
  """
  zo_state = find_state(state)

  def leaf_noise(path, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return None
    seed = noise.leaf_seed(zo_state.rng_key, zo_state.count, query,
                           noise.path_hash(path))
    return noise.gaussian(seed, jnp.shape(x),
                          sharding=noise.explicit_sharding(x))

  return jax.tree_util.tree_map_with_path(leaf_noise, params)
