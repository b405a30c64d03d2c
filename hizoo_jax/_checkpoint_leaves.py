"""How checkpoint leaves are stored: arrays, typed PRNG keys, scalars.

A typed key is stored as its key data (uint32, the impl's words last) and
described as ``key<impl>``; a Python or NumPy scalar as a 0-d NumPy array,
restored as the target's type. 64-bit types that jax would narrow (without
``jax_enable_x64``) are read back as NumPy, unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hizoo_jax import zo_state

SCALARS = (bool, int, float, complex, np.generic)
KEY_WORDS = {"key<fry>": 2, "key<rbg>": 4, "key<urbg>": 4}  # data words


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def describe(tree) -> list[list]:
  """[path, shape, dtype] of every leaf of ``tree`` (keys: ``key<impl>``)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      x = np.asarray(x)
    dtype = str(x.dtype) if _is_key(x) else str(np.dtype(x.dtype))
    out.append([jax.tree_util.keystr(path), list(x.shape), dtype])
  return out


def encode(x):
  """What is stored for a leaf: key data for typed keys, NumPy for scalars."""
  if _is_key(x):
    return jax.random.key_data(x)
  if isinstance(x, SCALARS):
    return np.asarray(x)
  return x


def flat(tree) -> dict[str, Any]:
  """``{"0": leaf, ...}``; orbax refuses empty items, so () gets a marker."""
  out = {str(i): encode(x)
         for i, x in enumerate(jax.tree_util.tree_leaves(tree))}
  return out or {"empty": np.zeros((), np.int8)}


def _abstract_leaf(x):
  """The orbax read target of a target leaf."""
  if isinstance(x, SCALARS):
    return np.zeros((), np.asarray(x).dtype)  # read back as NumPy
  if not _is_key(x) and host_only(x.dtype):
    return np.zeros(x.shape, x.dtype)
  if _is_key(x):  # its key data, on one device; decode() places the key.
    x = jax.eval_shape(jax.random.key_data, x)
  sharding = getattr(x, "sharding", None) or (
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def host_only(dtype) -> bool:
  """64-bit types without jax_enable_x64: jax would narrow them on read."""
  return jax.dtypes.canonicalize_dtype(dtype) != np.dtype(dtype)


def abstract_flat(tree) -> dict[str, Any]:
  out = {str(i): _abstract_leaf(x)
         for i, x in enumerate(jax.tree_util.tree_leaves(tree))}
  return out or {"empty": jax.ShapeDtypeStruct(
      (), np.int8, sharding=jax.sharding.SingleDeviceSharding(
          jax.devices()[0]))}


def decode(target, stored):
  """A stored leaf as the target's kind (typed key, Python scalar...)."""
  if isinstance(target, SCALARS):
    value = np.asarray(stored)
    return (value.astype(target.dtype)[()] if isinstance(target, np.generic)
            else type(target)(value.item()))
  if _is_key(target):
    impl = (jax.random.key_impl(target) if isinstance(target, jax.Array)
            else target.dtype._impl)  # pylint: disable=protected-access
    key = jax.random.wrap_key_data(stored, impl=impl)
    sharding = getattr(target, "sharding", None)
    return key if sharding is None else jax.device_put(key, sharding)
  return stored


def toggle_leaf_numbers(opt_state, params, like=None):
  """``opt_state`` with each estimator state's ``leaf_numbers`` switched
  between None (the plain program's) and a tree of leaf numbers (the compact
  program's; as ``like``'s, if given), so that a checkpoint of either
  program restores into the other; None if it holds no estimator state."""
  treedef = jax.tree.structure(params)
  numbers = treedef.unflatten(
      [np.uint32(i) for i in range(treedef.num_leaves)])
  found = []

  def toggle(node, target):
    if not isinstance(node, zo_state.ZOState):
      return node
    found.append(node)
    want_none = (node.leaf_numbers is not None if target is None
                 else target.leaf_numbers is None)
    if want_none:
      return node._replace(leaf_numbers=None)
    leaf_numbers = numbers if target is None else target.leaf_numbers
    return node._replace(leaf_numbers=leaf_numbers)

  is_state = lambda x: isinstance(x, zo_state.ZOState)  # noqa: E731
  if like is None:
    out = jax.tree.map(lambda n: toggle(n, None), opt_state, is_leaf=is_state)
  else:
    out = jax.tree.map(toggle, opt_state, like, is_leaf=is_state)
  return out if found else None
