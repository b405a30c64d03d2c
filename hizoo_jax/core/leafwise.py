"""The boundary between the mathematics and the program: leaves and their noise.

The estimators state their update for one leaf at a time: ``theta + c mu s z``,
``sum_j g_j z_j s``, sums of ``z^2 - 1`` over a group of coordinates. This
module is how they reach the leaves: it flattens the parameters, finds the
trainable leaves and draws each leaf's z from the counter-based generator
(:mod:`hizoo_jax.noise`), never storing it. This is the *plain* program:
``jax.tree.map``-style loops over leaves that trust XLA to fuse each leaf's
draw into what reads it, as an Optax engineer would write them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hizoo_jax import _checks
from hizoo_jax import noise

Sample = Callable[..., jax.Array]  # (seed (2,), shape, sharding=) -> array


class Leaves(NamedTuple):
  """The parameters of one step, leaf by leaf, and the step's noise."""

  values: list  # every leaf of params, in tree order.
  paths: list  # their key paths (z depends on the path string).
  treedef: Any  # the params' tree structure.
  trainable: list[bool]  # False: masked or frozen; never perturbed.
  seeds: jax.Array  # (q, leaves, 2) uint32: leaf i's seed at query j.
  sample: Sample  # the noise: noise.gaussian, or another of the generator.
  zero: jax.Array  # (), uint32: 0, computed from the step count.

  def z(self, i: int, j, use: int = 0) -> jax.Array:
    """Leaf i's noise at query j (float32), regenerated at every call.

    Each ``use`` (a consumer: the moves, the direction, the curvature's
    sums) salts the seed with a zero XLA cannot prove: the same z drawn
    twice would otherwise be merged by XLA and stored, a parameter-sized
    buffer, instead of regenerated in each consumer.
    """
    x = self.values[i]
    seed = self.seeds[j, i] ^ (self.zero * jnp.uint32(use + 1))
    return self.sample(seed, jnp.shape(x),
                       sharding=noise.explicit_sharding(x))

  def live(self) -> list[int]:
    return [i for i, keep in enumerate(self.trainable) if keep]

  def tree(self, per_leaf: Sequence, fill: Callable = jnp.zeros_like):
    """A tree like params from per-leaf values; ``fill(leaf)`` where None."""
    return self.treedef.unflatten([
        fill(x) if v is None else v for x, v in zip(self.values, per_leaf)])

  def flat(self, tree) -> list:
    """``tree`` (like params, or a prefix-compatible tree) leaf by leaf."""
    return self.treedef.flatten_up_to(tree)

  # H kept as factors per leaf (hizoo_jax.core.signed_rule): ``hess`` is a
  # list with, per leaf, a tuple of factors (None: frozen).

  def factor_sums(self, hess: list, fn: Callable) -> dict:
    """``{(i, k): sum of fn(z_j)}`` over each group of factor k of leaf i,
    shape (q, *factor shape)."""
    return {(i, k): group_sums(self, fn, i, shared_axes(f.shape, jnp.shape(
        self.values[i])), factor=k)
            for i, h in enumerate(hess) if h is not None
            for k, f in enumerate(h)}

  def coordinate_sum(self, sums: dict) -> jax.Array:
    """(q,): the sums of :meth:`factor_sums` over every coordinate (each
    leaf's first factor's groups cover it once)."""
    # Summed over the factor's axes, not reshaped: on an Explicit mesh a
    # reshape that merges a sharded axis is a type error.
    return sum(jnp.sum(s, axis=tuple(range(1, s.ndim)))
               for (_, k), s in sums.items() if k == 0)

  def factor_map(self, fn: Callable, hess: list, sums=None) -> list:
    """``fn(factor, its sums or None, FactorInfo)`` on every factor, in the
    factor's dtype."""
    return [None if h is None else tuple(
        fn(f, None if sums is None else sums[i, k],
           factor_info(f.shape, jnp.shape(self.values[i]), k, len(h))
           ).astype(f.dtype) for k, f in enumerate(h))
            for i, h in enumerate(hess)]

  def factor_total(self, hess: list) -> jax.Array:
    """sum_i H_i over all trainable coordinates."""
    return sum(factored_total(h, jnp.shape(x))
               for h, x in zip(hess, self.values) if h is not None)

  def shared(self, values):
    """``values`` read by every leaf (the compact program stores them)."""
    return values

  # H per coordinate (hizoo_jax.core.paper_rule).

  def estimate_map(self, fn: Callable, hess: list) -> list:
    """``fn(h, draw)`` on every trainable leaf's H (None elsewhere).

    ``draw(after=None)`` gives ``(h, zs)``: the leaf's z at every query,
    drawn for one consumer of its own (``after`` is for the compact
    program's ordering)."""
    def one(i, h):
      uses = itertools.count(ESTIMATE)  # a consumer of its own per draw
      def draw(after=None):
        del after  # XLA orders the plain program
        use = next(uses)
        return h, [self.z(i, j, use) for j in range(self.seeds.shape[0])]
      return fn(h, draw)
    return [None if h is None else one(i, h) for i, h in enumerate(hess)]

  def mean(self, x: jax.Array, axis: int) -> jax.Array:
    return jnp.mean(x, axis=axis)


class FactorInfo(NamedTuple):
  """What a factor's groups are (scalars; per entry in a joined vector)."""

  n: Any  # float32: the coordinates each group of the factor covers.
  num: Any  # the number of factors of its leaf (HiZOO-L: 2).
  first: Any  # bool: whether it is its leaf's first factor.


def factor_info(factor_shape, leaf_shape, k: int, num: int) -> FactorInfo:
  n = np.float32(np.prod(leaf_shape) / np.prod(factor_shape))
  return FactorInfo(n, num, k == 0)


def shared_axes(factor_shape, leaf_shape) -> tuple[int, ...]:
  """The axes a factor is shared over (size 1 in it, not in the leaf)."""
  return tuple(a for a, (f, n) in enumerate(zip(factor_shape, leaf_shape))
               if f == 1 and n != 1)


def factored_total(h: tuple, shape) -> jax.Array:
  """sum_i H_i over a leaf whose H is the product of the factors ``h``
  (without forming a leaf-sized product)."""
  if len(h) == 1:
    return jnp.sum(h[0]) * (np.prod(shape) / h[0].size)
  rows, cols = h
  both = np.prod([n for r, c, n in zip(rows.shape, cols.shape, shape)
                  if r == c == 1])
  return jnp.sum(
      jnp.sum(rows, axis=shared_axes(cols.shape, shape), keepdims=True)
      * jnp.sum(cols, axis=shared_axes(rows.shape, shape), keepdims=True)
  ) * both


def checked_leaves(params, mask):
  """``(values, paths, treedef, trainable)`` of ``params``, checked: a tree
  of arrays whose trainable leaves (``mask``, None: all float leaves) are
  floats."""
  _checks.check_params(params)
  pairs, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths, values = [p for p, _ in pairs], [x for _, x in pairs]
  trainable = _checks.trainable_leaves(mask, params, treedef, paths)
  _checks.check_leaf_dtypes(values, paths, trainable)
  return values, paths, treedef, trainable


def leaves_of(params, mask, words: jax.Array, count: jax.Array,
              num_queries: int, sample: Sample = noise.gaussian) -> Leaves:
  """The :class:`Leaves` of ``params`` at step ``count``.

  Args:
    params: the parameter tree.
    mask: bool tree (or prefix, or callable) of the trainable leaves; None:
      all float leaves.
    words: the run's key as uint32 words (:func:`hizoo_jax.noise.key_words`).
    count: the step count (selects the step's noise).
    num_queries: independent draws of z per step.
    sample: the distribution of z, from the generator's seeds.
  """
  values, paths, treedef, trainable = checked_leaves(params, mask)
  seeds = noise.leaf_seeds(
      words, count, jnp.arange(num_queries, dtype=jnp.uint32)[:, None], paths)
  zero = (jnp.asarray(count) >> 31).astype(jnp.uint32)  # count >= 0
  return Leaves(values, paths, treedef, trainable, seeds, sample, zero)


# Consumers of z (Leaves.z's ``use``).
MOVE, DIRECTION, SUMS, ESTIMATE = range(4)


def noise_map(leaves: Leaves, fn: Callable, queries: Sequence[int],
              *per_leaf: Sequence, use: int) -> list:
  """``fn(zs, *values)`` on every trainable leaf (None on the others).

  ``zs`` is the leaf's z at each of ``queries``; ``per_leaf`` are lists with
  one value per leaf (such as its H^{-1/2}); ``use`` names the consumer.
  """
  return [fn([leaves.z(i, j, use) for j in queries],
             *(v[i] for v in per_leaf))
          if keep else None for i, keep in enumerate(leaves.trainable)]


def perturb(leaves: Leaves, params, coeffs, queries, mu: jax.Array,
            scales: Optional[Sequence] = None):
  """``theta + mu * s * sum_t coeffs[t] z_{queries[t]}`` on trainable leaves.

  ``coeffs`` and ``queries`` (T,) are the point's terms
  (:func:`hizoo_jax.core.scheme.sparse`) and may be traced; ``scales``
  gives each leaf's s (None: 1). The sum is formed in float32 (or wider),
  then cast to the leaf's dtype.
  """
  scales = scales if scales is not None else [None] * len(leaves.values)

  def shift(zs, x, s):
    delta = sum(coeffs[t] * z for t, z in enumerate(zs)) * mu
    delta = delta if s is None else delta * s
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(wide) + delta).astype(x.dtype)

  flat = leaves.flat(params)
  moved = noise_map(leaves, shift, [queries[t] for t in range(len(coeffs))],
                    flat, scales, use=MOVE)
  return leaves.treedef.unflatten(
      [x if m is None else m for x, m in zip(flat, moved)])


def combine(leaves: Leaves, coeffs: jax.Array,
            scales: Optional[Sequence] = None):
  """``s * sum_j coeffs[j] z_j`` per leaf, as a tree like params (zeros on
  frozen leaves, in each leaf's dtype)."""
  scales = scales if scales is not None else [None] * len(leaves.values)

  def direction(zs, s):
    out = sum(coeffs[j] * zs[j] for j in range(len(zs)))
    return out if s is None else out * s

  out = noise_map(leaves, direction, range(leaves.seeds.shape[0]), scales,
                  use=DIRECTION)
  return leaves.tree([None if d is None else d.astype(x.dtype)
                      for x, d in zip(leaves.values, out)])


def group_sums(leaves: Leaves, fn: Callable, i: int, axes: tuple[int, ...],
               factor: int = 0) -> jax.Array:
  """``sum fn(z_j)`` of leaf i over ``axes`` (kept, size 1), every query:
  shape (q, *kept shape). Each ``factor`` of a leaf is a consumer of its
  own."""
  use = SUMS if factor == 0 else ESTIMATE + factor  # all distinct
  return jnp.stack([jnp.sum(fn(leaves.z(i, j, use)), axis=axes,
                            keepdims=True)
                    for j in range(leaves.seeds.shape[0])])
