"""Every leaf's curvature factors laid end to end as one vector.

HiZOO's default rule keeps a few numbers per leaf (a tensor's H, its rows'
or its columns'). Leaf by leaf, each of its few operations on them was a
kernel of its own; joined into one vector they are a few vector operations
for the whole model. This module joins the factors (a factor held in the
vector is a :class:`Slot`), reads them back (a leaf's piece at its number,
or a group of same-shaped leaves' pieces in one gather) and sums H over all
coordinates from factored leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hizoo_jax import _xla
from hizoo_jax import noise


class Slot:
  """A factor that lives in the joined vector: only its shape and dtype.

  A pytree with no leaves, so that a tree holding slots (the loop carry's
  form of H, :class:`hizoo_jax.grouped_curvature.Carried`) carries, selects
  and donates the vector alone.
  """

  def __init__(self, shape, dtype):
    self.shape = tuple(shape)
    self.dtype = jnp.dtype(dtype)
    self.size = int(np.prod(self.shape, dtype=np.int64))

  def __eq__(self, other):
    return (isinstance(other, Slot) and self.shape == other.shape
            and self.dtype == other.dtype)

  def __hash__(self):
    return hash((self.shape, self.dtype))

  def __repr__(self):
    return f"Slot({self.shape}, {self.dtype})"


jax.tree_util.register_pytree_node(
    Slot, lambda s: ((), (s.shape, s.dtype)), lambda aux, _: Slot(*aux))


def slots(per_leaf: list, keys) -> list:
  """``per_leaf`` (per leaf a tuple of factors, or None) with the factors
  ``keys`` ((leaf, factor) pairs) as Slots."""
  keys = set(keys)
  return [None if h is None else tuple(
      Slot(f.shape, f.dtype) if (i, k) in keys else f
      for k, f in enumerate(h)) for i, h in enumerate(per_leaf)]


def in_vector(per_leaf: list) -> list:
  """The (leaf, factor) pairs of ``per_leaf`` held in the vector (Slots),
  in its order."""
  return [(i, k) for i, h in enumerate(per_leaf) if h is not None
          for k, f in enumerate(h) if isinstance(f, Slot)]


def joinable(f: jax.Array) -> bool:
  """Whether the factor ``f`` may join a concatenation with the others.

  On a mesh only a factor on no mesh axis may: a concatenation takes one
  sharding, and would gather the others (a collective per factor). Under
  Explicit axes the sharding is known; otherwise only a single number is
  surely replicated.
  """
  if _xla.single_device():
    return True
  sharding = noise.explicit_sharding(f)
  if sharding is None:
    return f.size == 1
  return all(s is None for s in sharding.spec)


def starts_of(keys: list, hess: list) -> np.ndarray:
  """(leaves, factors) uint32: where each factor of ``keys`` ((leaf, factor)
  pairs, in order) starts when they are laid end to end."""
  starts = np.zeros((len(hess), max(len(hess[i]) for i, _ in keys)), np.uint32)
  starts[tuple(zip(*keys))] = np.cumsum([0] + [hess[i][k].size
                                               for i, k in keys])[:-1]
  return starts


def split_at_numbers(vector: jax.Array, keys: list, hess: list,
                     numbers: list, only=None) -> dict:
  """``vector`` cut into the factors ``keys`` ((leaf, factor) pairs, in
  order) of ``hess``, each read at its leaf's number (_xla.leaf_piece);
  only the leaves ``only`` (a set; None: all)."""
  if not keys:
    return {}
  starts = starts_of(keys, hess)
  return {(i, k): _xla.leaf_piece(vector, starts[:, k], numbers[i],
                                  hess[i][k].shape)
          for i, k in keys if only is None or i in only}


def reader(vector, keys: list, alone: dict, hess: list, numbers: list):
  """``read(which)``: the product of a leaf's factors, or of a tuple of
  same-shaped leaves' factors stacked (rows in the order of ``which``).

  The factors ``keys`` are read from ``vector`` (laid end to end): a leaf's
  at its number (_xla.leaf_piece), a tuple's with one gather. Where each
  leaf's piece was read on its own and stacked, every piece was a kernel of
  its own. The other factors are in ``alone``, by (leaf, factor).
  """
  starts = starts_of(keys, hess) if keys else None
  in_vector = set(keys)

  def factor(i, k):
    if (i, k) in in_vector:
      return _xla.leaf_piece(vector, starts[:, k], numbers[i],
                             hess[i][k].shape)
    return alone[i, k]

  def stacked(rows, k):
    shape = hess[rows[0]][k].shape
    if all((i, k) in in_vector for i in rows):
      # Positions for numbers: a tuple's factors are read together, once.
      index = starts[list(rows), k][:, None] + np.arange(
          int(np.prod(shape)), dtype=np.uint32)
      return vector[index].reshape((len(rows),) + shape)
    return jnp.stack([factor(i, k) for i in rows])

  def read(which):
    if isinstance(which, tuple):
      parts = [stacked(which, k) for k in range(len(hess[which[0]]))]
    else:
      parts = [factor(which, k) for k in range(len(hess[which]))]
    out = parts[0]
    for part in parts[1:]:
      out = out * part
    return out

  return read


def joined_factored_total(h: jax.Array, joined: list, hess: list,
                           shapes) -> jax.Array:
  """:func:`hizoo_jax.core.leafwise.factored_total` of the two-factor leaves
  in ``joined``, summed.

  ``h`` holds the factors ``joined`` end to end. A block is one position
  along the axes both factors vary along (a layer of a stacked leaf); its
  total is (sum of its rows) x (sum of its columns) x the number of entries
  neither factor varies along. One segment sum for all blocks: leaf by
  leaf, the totals fused into one kernel of a few instructions per leaf.
  """
  where = {key: f for f, key in enumerate(joined)}
  ids = [np.full(hess[i][k].size, -1, np.int32) for i, k in joined]
  shared = []
  for i in sorted({i for i, _ in joined}):
    if len(hess[i]) != 2 or (i, 1) not in where or (i, 0) not in where:
      continue
    factors = [hess[i][0].shape, hess[i][1].shape]
    both = [a for a, (r, c) in enumerate(zip(*factors)) if r == c != 1]
    for k, f in enumerate(factors):  # each entry's block: index along `both`
      block = 0  # a 0-d leaf's factors are one block
      if both:
        index = np.indices(f).reshape(len(f), -1)
        block = np.ravel_multi_index([index[a] for a in both],
                                     [f[a] for a in both])
      ids[where[i, k]][:] = 2 * (len(shared) + block) + k
    count = np.prod([n for r, c, n in zip(*factors, shapes[i]) if r == c == 1])
    shared += [count] * int(np.prod([factors[0][a] for a in both]))
  if not shared:
    return jnp.zeros([], h.dtype)
  ids = np.concatenate(ids)
  sums = jax.ops.segment_sum(h, np.where(ids < 0, 2 * len(shared), ids),
                             2 * len(shared) + 1)[:-1].reshape(-1, 2)
  return jnp.sum(np.asarray(shared, np.float32) * sums[:, 0] * sums[:, 1])
