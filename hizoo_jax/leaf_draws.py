"""Every trainable leaf's z at one query of a step.

z of leaf i at query j is ``noise.gaussian(seeds[j, i], shape_i)``: an
elementwise function of the element's index, recomputed in every fusion that
reads it and never stored (:mod:`hizoo_jax.noise`). The price is one copy of
the generator in the program per leaf and use, and a transformer's biases
and norm scales are most of its leaves (OPT: 10 of 16 per layer) while
holding a sliver of its parameters. So the smallest leaves (together at most
``1 / SMALL_SHARE`` of the trainable elements, each at most ``SMALL_SIZE``)
are drawn by shape: all of one shape as one (n, *shape) array (one
generator copy), stored, and read row by row; what the step computes from
them (the moves, the update) is computed once per group too. Each row is
the leaf's own draw bit for bit; results differ from drawing leaf by leaf
only in float rounding (``docs/performance.md``, "Small leaves drawn
together").
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hizoo_jax import _xla
from hizoo_jax import noise

# Small leaves hold at most this fraction of the trainable elements; their
# stored draws are the step's only temporaries that grow with the model.
SMALL_SHARE = 128
# ... and at most this many elements each: a larger leaf's draw is a pass
# over memory of its own, which its fused draw does not cost.
SMALL_SIZE = 2**16


def small_groups(leaves: Sequence, trainable: Sequence[bool]
                 ) -> list[tuple[int, ...]]:
  """The leaves drawn together: tuples (of two or more) of leaf positions.

  The smallest trainable leaves, together at most ``1 / SMALL_SHARE`` of the
  trainable elements and each at most ``SMALL_SIZE``, grouped by shape;
  leaves sharded over Explicit mesh axes are drawn on their own, sharded
  like the leaf.
  """
  live = [i for i, keep in enumerate(trainable) if keep]
  sizes = {i: int(np.prod(jnp.shape(leaves[i]), dtype=np.int64))
           for i in live}
  budget, used = sum(sizes.values()) // SMALL_SHARE, 0
  by_shape: dict[tuple, list[int]] = {}
  for i in sorted(live, key=lambda i: sizes[i]):
    used += sizes[i]
    if used > budget or sizes[i] > SMALL_SIZE:
      break
    if noise.on_no_explicit_axis(leaves[i]):  # a shared draw fits it
      by_shape.setdefault(tuple(jnp.shape(leaves[i])), []).append(i)
  return [tuple(sorted(g)) for g in by_shape.values() if len(g) > 1]


def pick(values: Sequence, which) -> jax.Array:
  """``values[which]`` for a leaf, or its rows stacked for a group of leaves.

  For the ``fn`` of :class:`LeafDraws` ``values``: per-leaf arrays (such
  as H^{-1/2}) broadcast against z either way.
  """
  if isinstance(which, tuple):
    return jnp.stack([values[i] for i in which])
  return values[which]


class LeafDraws(NamedTuple):
  """The step's z, leaf by leaf (see :func:`leaf_draws`).

  ``at(query)`` gives ``z(i, order=None)``: leaf i's z at ``query`` (an int
  or a traced index). ``order`` salts leaf i's own draw (see
  :func:`hizoo_jax.noise.salt`) so that XLA neither merges it with another
  draw nor stores it; a small leaf reads its group's stored draw instead.

  ``values(fn, queries, order=None)`` gives, per leaf (None where frozen),
  ``fn(zs, which)``: ``zs`` the leaf's z at each of ``queries`` and
  ``which`` its position; ``order(i)`` salts the draws. For a group of small
  leaves ``fn`` runs once, with ``zs`` of shape (n, *shape) and ``which``
  the tuple of their positions, so it must act row by row (read per-leaf
  values with :func:`pick`); the result is stored and each leaf reads its
  row. Leaf by leaf, each small leaf's reader would hold the whole
  expression again.
  """

  at: Callable[..., Callable[..., jax.Array]]
  values: Callable[..., list]


def leaf_draws(seeds: jax.Array, numbers: Sequence[jax.Array],
               leaves: Sequence, trainable: Sequence[bool], zero: jax.Array,
               sample: Callable[..., jax.Array] = noise.gaussian,
               ) -> LeafDraws:
  """Every trainable leaf's draw at every query of one step.

  Args:
    seeds: (q, leaves, 2) uint32, every leaf's seed for every query
      (:func:`hizoo_jax.noise.leaf_seed`).
    numbers: per leaf, its position as a runtime uint32 scalar (read with
      :func:`hizoo_jax._xla.at_leaf`, so same-shaped leaves share kernels).
    leaves: the parameters' leaves (shapes and shardings are read).
    trainable: per leaf, whether it is perturbed.
    zero: a uint32 0 that XLA cannot prove (see :func:`noise.salt`).
    sample: ``sample(seed, shape, sharding=...)``, the draw from a (2,) or
      (n, 2) seed (:func:`hizoo_jax.noise.gaussian`, the default, gives z).

  Returns:
    A :class:`LeafDraws`.
  """
  groups = small_groups(leaves, trainable)
  group_of = {i: g for g, members in enumerate(groups) for i in members}
  rows = np.zeros(len(leaves), np.uint32)  # each leaf's row in its group
  for members in groups:
    rows[list(members)] = np.arange(len(members))

  def row(value, i):
    # At the leaf's number, as data: read at a constant row, every small
    # leaf's kernel would differ and compile on its own.
    return _xla.at_leaf(value, _xla.at_leaf(rows, numbers[i]))

  def draw(query):
    """``z`` (see :class:`LeafDraws`) and ``together(g)``, group g's draw."""
    stored = {}

    def together(g):
      if g not in stored:
        members = np.asarray(groups[g])
        z = sample(seeds[query][members], jnp.shape(leaves[members[0]]))
        # Stored once: else XLA would copy the generator into each reader.
        stored[g] = _xla.computed_once(z, zero)
      return stored[g]

    def z(i, order=None):
      if i in group_of:
        return row(together(group_of[i]), i)
      seed = _xla.at_leaf(seeds, numbers[i], axis=1)[query]
      if order is not None:
        seed = seed ^ noise.salt(zero, order)
      z_i = sample(seed, jnp.shape(leaves[i]),
                   sharding=noise.explicit_sharding(leaves[i]))
      if order is None:
        return z_i
      return _xla.computed_like(z_i, leaves[i], noise.salt(zero, order))

    return z, together

  def values(fn, queries, order=None):
    draws = [draw(j) for j in queries]
    out = [None] * len(leaves)
    for g, members in enumerate(groups):
      value = _xla.computed_once(
          fn([together(g) for _, together in draws], members), zero)
      for i in members:
        out[i] = row(value, i)
    for i, keep in enumerate(trainable):
      if keep and i not in group_of:
        salt = None if order is None else order(i)
        out[i] = fn([z(i, salt) for z, _ in draws], i)
    return out

  return LeafDraws(lambda query: draw(query)[0], values)
