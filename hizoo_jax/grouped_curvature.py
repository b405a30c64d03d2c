"""HiZOO's default curvature rule in the compact program.

The mathematics is :mod:`hizoo_jax.core.signed_rule`; this is the same rule
compiled for XLA:CPU (:mod:`hizoo_jax.program`): every leaf's factors are one
vector (:mod:`hizoo_jax.joined_factors`), so the rule is a few vector
operations for the whole model instead of a few kernels per leaf; the sums of
z^2 - 1 over groups are drawn in one loop on one device
(:mod:`hizoo_jax.range_sums`); shared scalars are stored once
(:func:`hizoo_jax._xla.computed_once`); through the lean step's loop the
state holds H as one vector (:class:`Carried`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hizoo_jax import _xla
from hizoo_jax import joined_factors
from hizoo_jax import range_sums
from hizoo_jax.core import signed_rule
# The rule's constants, state types and pure helpers are the core's.
from hizoo_jax.core.signed_rule import (  # pylint: disable=unused-import
    CLIP, DEFAULT_RATE, FLOOR, GRANULARITIES, STATS_RATE, GroupedStats,
    factor_shapes, factor_sharding, init, init_stats, num_factors,
    shapes_fit)

class Factors(NamedTuple):
  """H as this rule computes with it (:func:`split`)."""

  per_leaf: list  # per leaf, the tuple of its factors, or None (frozen); a
  # factor held in `vector` is a joined_factors.Slot.
  vector: Optional[jax.Array]  # (n,) float: the joinable factors end to end,
  # by leaf, then factor (joined_factors.joinable); None if there are none.
  carried: bool  # whether the state holds H as Carried.


class Carried(NamedTuple):
  """H in the loop carry of ``hz.make_train_step``: one vector.

  The step writes the new state on its last phase only, a select per state
  leaf; factor by factor, each select was a kernel of its own (HiZOO-L: two
  per leaf). Only the step holds this form: its state is
  :func:`carried_form` on the way into the loop and back.
  """

  vector: Optional[jax.Array]  # (n,) float: as Factors.vector.
  trees: tuple  # the state's trees of factors, those in `vector` as Slots.


def split(hessian, treedef) -> Factors:
  """The state's H (either form) as :class:`Factors`."""
  carried = isinstance(hessian, Carried)
  trees = [treedef.flatten_up_to(t)
           for t in (hessian.trees if carried else hessian)]
  per_leaf = [None if isinstance(fs[0], optax.MaskedNode) else tuple(fs)
              for fs in zip(*trees)]
  if carried:
    return Factors(per_leaf, hessian.vector, True)
  keys = [(i, k) for i, h in enumerate(per_leaf) if h is not None
          for k in range(len(h)) if joined_factors.joinable(h[k])]
  vector = jnp.concatenate([per_leaf[i][k].reshape(-1) for i, k in keys]
                           ) if keys else None
  return Factors(joined_factors.slots(per_leaf, keys), vector, False)


def store(hess: Factors, treedef, numbers: list):
  """The state's H from :class:`Factors`, in the form :func:`split` read.

  ``numbers``: the leaves' numbers (:func:`hizoo_jax._xla.at_leaf`); each
  factor is read out of the vector at its leaf's number, so that
  same-shaped leaves share the kernel.
  """
  if hess.carried:
    return Carried(hess.vector, join(hess.per_leaf, treedef))
  pieces = joined_factors.split_at_numbers(
      hess.vector, joined_factors.in_vector(hess.per_leaf), hess.per_leaf,
      numbers)
  return join([None if h is None else tuple(
      pieces[i, k].astype(f.dtype) if (i, k) in pieces else f
      for k, f in enumerate(h)) for i, h in enumerate(hess.per_leaf)], treedef)


def carried_form(hessian, leaf_numbers, carried: bool):
  """The state's H in the loop carry's form (``carried``) or its own.

  ``leaf_numbers``: the state's tree of leaf numbers.
  """
  treedef = jax.tree.structure(leaf_numbers)
  return store(split(hessian, treedef)._replace(carried=carried), treedef,
               treedef.flatten_up_to(leaf_numbers))


def last_array(hess: Factors, i: int) -> jax.Array:
  """An array of the new H that leaf ``i``'s factors are computed with."""
  first = hess.per_leaf[i][0]
  return hess.vector if isinstance(first, joined_factors.Slot) else first


def join(per_leaf: list, treedef, masked=optax.MaskedNode(),
         count=None) -> tuple:
  """The state's tuple of factor trees from per-leaf tuples (None: frozen).

  ``count``: how many trees (:func:`num_factors`); None: as many as the
  leaves have. init passes it, so that params without leaves (optax's
  placeholder in ``optax.tree.map_params``) give HiZOO-L's two trees too.
  """
  if count is None:
    count = max((len(h) for h in per_leaf if h is not None), default=1)
  return tuple(treedef.unflatten([masked if h is None else h[k]
                                  for h in per_leaf]) for k in range(count))


def inv_sqrt(hess: Factors, numbers: list):
  """``read(which)``: H^{-1/2} of leaf ``which`` (an int), broadcastable to
  it, or of the same-shaped leaves ``which`` (a tuple), stacked.

  One ``rsqrt`` of all factors as a vector (on a mesh, see
  :func:`hizoo_jax.joined_factors.joinable`): leaf by leaf, each ``rsqrt``
  of a few numbers was a kernel of its own (XLA does not recompute an
  expensive operation in each element of its consumer).
  ``numbers``: the leaves' numbers (:func:`hizoo_jax._xla.at_leaf`).
  """
  return _inv_sqrt_reader(hess.vector,
                          joined_factors.in_vector(hess.per_leaf),
                          hess.per_leaf, numbers)


def _inv_sqrt_reader(vector, joined: list, hess: list, numbers: list):
  """:func:`inv_sqrt`'s ``read`` from the factors ``joined`` laid end to
  end in ``vector``; every other factor is taken from ``hess``."""
  alone = {(i, k): lax.rsqrt(h[k]) for i, h in enumerate(hess)
           if h is not None for k in range(len(h)) if (i, k) not in joined}
  return joined_factors.reader(
      None if vector is None else lax.rsqrt(vector), joined, alone, hess,
      numbers)


def _sums(draw, hess: list, live: list, shapes, num_queries: int):
  """``(sums, norm_sq)``: per (leaf, factor), the group sums of z^2 - 1,
  shape (q, *factor shape); and (q,) sum(z^2) over every coordinate."""
  dim = float(sum(np.prod(shapes[i]) for i in live))
  # HiZOO-L's second per-tensor factor of a non-matrix leaf has the same
  # groups as its first: same sums. In one loop they are drawn again (a few
  # rows), so that the sums come out in the vector's order, one array: the
  # copies made a slice kernel per leaf and a concatenation.
  one_loop = range_sums.in_one_loop()
  own = [(i, k) for i in live for k, f in enumerate(hess[i])
         if one_loop or not (k and f.shape == hess[i][0].shape)]
  sums = dict(zip(own, range_sums.group_sums(
      draw, [(i, joined_factors.shared_axes(hess[i][k].shape, shapes[i]))
             for i, k in own],
      shapes, lambda z: jnp.square(z) - 1.0)))
  for i in live:
    for k in range(1, len(hess[i])):
      sums.setdefault((i, k), sums[i, 0])
  # Each leaf's first factor's groups cover every coordinate. Drawn in one
  # loop, one sum of them all (leaf by leaf, a kernel per leaf).
  if one_loop:
    first = np.concatenate([np.full(sums[i, k].size // num_queries, k == 0)
                            for i, k in own])
    return sums, dim + jnp.sum(jnp.where(first, jnp.concatenate(
        [sums[key].reshape(num_queries, -1) for key in own], axis=1), 0.0),
                                 axis=1)
  # On a mesh, leaf by leaf, each sharded like its leaf; summed over the
  # factor's axes, not reshaped to (q, -1): on an Explicit mesh a reshape
  # that merges a sharded axis is a type error.
  return sums, dim + sum(
      jnp.sum(sums[i, 0], axis=tuple(range(1, sums[i, 0].ndim)))
      for i in live)


def _log_step(residual, rate, num_queries: int):
  """``moved(h, z2, n, num)``: factors ``h`` after one log step, from their
  groups' sums ``z2`` of z^2 - 1, coordinates per group ``n`` and the leaf's
  number of factors ``num`` (the module docstring of the core rule)."""
  y, safe_lam, safe_v, usable = residual

  def moved(h, z2, n, num):
    y_b = jnp.reshape(y, (num_queries,) + (1,) * h.ndim)
    rho = jnp.mean(z2 * y_b, axis=0) / (n * safe_lam)
    gain = rate / num * jnp.minimum(1.0, n / (2.0 * safe_v))
    step = jnp.where(usable, jnp.clip(gain * rho, -CLIP, CLIP), 0.0)
    return (h * jnp.exp(step)).astype(h.dtype)
  return moved


def update(factors: Factors, stats: GroupedStats, second: jax.Array,
           leaves, rate: jax.Array, probe: jax.Array):
  """The new factors and statistics after one step (see the module docstring).

  Args:
    factors: H (:func:`split`).
    stats: the running statistics.
    second: (q,) float32, ``q`` of each query.
    leaves: the step's :class:`hizoo_jax.compact.Leaves`; its ``draws`` give
      z of leaf i and query j afresh, and on one device the sums of z^2 draw
      from their seeds in one loop (:mod:`hizoo_jax.range_sums`).
    rate: the largest gain of log H per step.
    probe: bool, whether this step measured the curvature (else nothing moves).

  Returns:
    ``(new factors, new stats)``.
  """
  hess, draw, numbers = factors.per_leaf, leaves.draws, leaves.numbers
  shapes = [jnp.shape(x) for x in leaves.values]
  num_queries = second.shape[0]
  live = [i for i, h in enumerate(hess) if h is not None]
  if not live:  # nothing is trained: nothing to learn
    return factors, stats
  dim = float(sum(np.prod(shapes[i]) for i in live))
  sums, norm_sq = _sums(draw, hess, live, shapes, num_queries)
  residual = _xla.computed_once(
      signed_rule.residual(stats, second, norm_sq, dim, probe), draw.zero)
  moved = _log_step(residual, rate, num_queries)
  usable = residual[3]

  # The factors as one vector: the rule is a few vector operations, where
  # factor by factor it was a few dozen instructions and several tiny
  # kernels per leaf. On a mesh, factors sharded over mesh axes go factor
  # by factor (joined_factors.joinable).
  joined = joined_factors.in_vector(hess)
  apart = [(i, k) for i in live for k, f in enumerate(hess[i])
           if not isinstance(f, joined_factors.Slot)]
  def per_entry(values):  # a value per factor of `joined`, per entry
    return np.repeat(np.asarray(values, np.float32),
                     [hess[i][k].size for i, k in joined])
  def coords(i, k):  # coordinates per group
    return np.float32(np.prod(shapes[i]) / hess[i][k].size)

  new, h = {}, None
  if joined:
    n = per_entry([coords(i, k) for i, k in joined])
    num = per_entry([len(hess[i]) for i, k in joined])
    h = moved(factors.vector,
              jnp.concatenate([sums[key].reshape(num_queries, -1)
                               for key in joined], axis=1), n, num)
    # Stored: the totals below read it in slices, which would otherwise
    # each recompute the concatenations.
    h = _xla.computed_once(h, draw.zero)
    # The joined factors of leaves with a factor apart, for their totals.
    new.update(joined_factors.split_at_numbers(
        h, joined, hess, numbers, only={i for i, _ in apart}))
  for i, k in apart:
    new[i, k] = moved(hess[i][k], sums[i, k], coords(i, k), len(hess[i]))
  # sum_i H_i over all coordinates: a group of a one-factor leaf stands for
  # its n coordinates; a factored leaf's total comes from its factors.
  total = sum(joined_factors.factored_total(new[i, 0], new[i, 1], shapes[i])
              for i in live if len(hess[i]) == 2
              and ((i, 0) in apart or (i, 1) in apart))
  if joined:
    total += jnp.sum(jnp.where(num == 1, h * n, 0.0))
    total += joined_factors.joined_factored_total(h, joined, hess, shapes)
  total += sum(jnp.sum(new[i, 0] * coords(i, 0)) for i, k in apart
               if len(hess[i]) == 1)
  mean_h = _xla.computed_once(jnp.where(usable, total / dim, 1.0), draw.zero)

  # Mean 1 (the first factor carries it), and no factor below FLOOR.
  def normalised(h, first, num):
    return jnp.maximum(jnp.where(first, h / mean_h, h), FLOOR ** (1 / num))
  if joined:
    first = per_entry([k == 0 for _, k in joined]) > 0
    h = _xla.computed_once(normalised(h, first, num).astype(
        factors.vector.dtype), draw.zero)  # read by all
  for i, k in apart:
    new[i, k] = normalised(new[i, k], k == 0, len(hess[i]))
  new_hess = [None if hess[i] is None else tuple(
      f if isinstance(f, joined_factors.Slot) else new[i, k].astype(f.dtype)
      for k, f in enumerate(hess[i])) for i in range(len(hess))]
  # The new vector's pieces for the state are read in store (or, in the
  # step's loop, the vector is the state).
  new_stats = signed_rule.next_stats(stats, second, *residual[:2], dim, probe)
  return Factors(new_hess, h, factors.carried), new_stats
