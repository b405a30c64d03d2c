"""What the next step will draw, for tests and custom loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from hizoo_jax.core import paper_rule
from hizoo_jax import noise
from hizoo_jax.zo_state import find_state


def step_noise(state, params, *, query: int = 0):
  """The z that the next ``update`` with ``state`` uses, as a tree like params.

  z depends only on the state's key and step count, the query index and each
  leaf's key path string (``jax.tree_util.keystr``): not on the number of
  leaves, the mask or the device layout. The same model held differently
  (an ``nnx.State``, whose paths end in ``.value``; a Module's pure dict; a
  Linen params dict) has other path strings, so it draws other noise.
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


def curvature_tree(state, params, *, expand: bool = True):
  """The learned diagonal curvature H as a tree shaped like ``params``.

  Reads the estimator state's layout so callers need not: the default
  ``"signed"`` rule keeps a tuple of one (HiZOO-L: two) trees of factors
  whose product is H; ``"paper"`` / ``"reference"`` keep an array or a
  :class:`hizoo_jax.FactoredHessian` per leaf.

  Args:
    state: an estimator state, or any optimizer state that contains one.
    params: the parameters (only the tree structure and shapes are read).
    expand: True: H at every coordinate, an array of the leaf's shape.
      False: as stored: an array broadcastable to the leaf (one value per
      tensor, row, column or element), or for a factored leaf the factors:
      a tuple ``(rows, cols)`` whose product is H (``"signed"``) or the
      ``FactoredHessian`` (``"paper"``, ``"reference"``).

  Returns:
    A tree like ``params``; None on leaves the mask freezes.

  Raises:
    ValueError: the state is MeZO's (it keeps no curvature), or its H does
      not fit ``params``.

  Example:
    >>> import jax.numpy as jnp, hizoo_jax as hz
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    >>> state = hz.hizoo_l(1e-2, min_dim_size_to_factor=2).init(params)
    >>> h = hz.curvature_tree(state, params)
    >>> h["w"].shape, h["b"].shape
    ((4, 3), (3,))
    >>> rows, cols = hz.curvature_tree(state, params, expand=False)["w"]
    >>> rows.shape, cols.shape
    ((4, 1), (1, 3))
  """
  zo_state = find_state(state)
  if zo_state.hessian is None:
    raise ValueError("this estimator (MeZO) keeps no curvature: no H to read.")
  leaves, treedef = jax.tree.flatten(params)
  signed = zo_state.curvature_stats is not None
  try:
    if signed:
      per_leaf = list(zip(*(treedef.flatten_up_to(t)
                            for t in zo_state.hessian)))
    else:
      per_leaf = treedef.flatten_up_to(zo_state.hessian)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "the state's curvature does not have the structure of params: was "
        "it initialised with other params?") from e

  def leaf_h(h, x):
    if isinstance(h, optax.MaskedNode) or (
        signed and isinstance(h[0], optax.MaskedNode)):
      return None
    if signed:
      if not expand:
        return h[0] if len(h) == 1 or h[1] is h[0] else tuple(h)
      product = functools.reduce(jnp.multiply, h)
    else:
      if not expand:
        return h
      product = paper_rule.expand(h)
    return jnp.broadcast_to(product, jnp.shape(x))

  return treedef.unflatten([leaf_h(h, x) for h, x in zip(per_leaf, leaves)])
