"""The diagonal curvature estimate H of HiZOO, full or factored (HiZOO-L).

A leaf's curvature is either

* an array of the leaf's shape (the full diagonal), or
* a :class:`FactoredHessian` (HiZOO-L): for the two largest axes ``a < b`` of
  the leaf, ``row`` averages H over axis ``b`` and ``col`` over axis ``a``, and

      H_hat = row[.., :, None] * col[.., None, :] / mean(row over axis a)

  is rebuilt elementwise wherever H is needed (rank one per slice, positive).

Both are updated by an exponential moving average (EMA) of a per-coordinate
estimate ``est >= 0`` computed on the fly; the factored form averages ``est``
over the removed axis first, so the full-size estimate is never stored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredHessian:
  """Row and column factors of one leaf's diagonal curvature (HiZOO-L)."""

  row: jax.Array  # leaf shape without axis `col_axis`, hessian dtype.
  col: jax.Array  # leaf shape without axis `row_axis`, hessian dtype.
  row_axis: int = dataclasses.field(metadata=dict(static=True))
  col_axis: int = dataclasses.field(metadata=dict(static=True))


def factored_axes(shape, min_dim_size_to_factor: int) -> Optional[tuple[int, int]]:
  """The (row, col) axes to factor a leaf over, or None to keep it full.

  The two largest axes are chosen (the later one on ties) and returned in
  increasing order; both must have at least ``min_dim_size_to_factor`` entries.
  """
  if len(shape) < 2:
    return None
  by_size = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
  first, second = by_size[-1], by_size[-2]
  if shape[second] < min_dim_size_to_factor:
    return None
  return min(first, second), max(first, second)


def _drop_axis(sharding, ndim: int, axis: int):
  """An explicit ``sharding`` of a leaf, for the leaf without ``axis``."""
  if sharding is None:
    return None
  entries = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
  del entries[axis]
  return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*entries))


def init(shape, axes: Optional[tuple[int, int]], dtype,
         sharding=None) -> jax.Array | FactoredHessian:
  """H_0 = 1, full or factored over ``axes``.

  ``sharding`` (the leaf's sharding over Explicit mesh axes, or None) places
  H like the leaf, and each factor like the leaf without the removed axis.
  """
  if axes is None:
    return jnp.ones(shape, dtype, out_sharding=sharding)
  row_axis, col_axis = axes
  return FactoredHessian(
      row=jnp.ones(np.delete(shape, col_axis), dtype,
                   out_sharding=_drop_axis(sharding, len(shape), col_axis)),
      col=jnp.ones(np.delete(shape, row_axis), dtype,
                   out_sharding=_drop_axis(sharding, len(shape), row_axis)),
      row_axis=row_axis,
      col_axis=col_axis,
  )


def expected_shapes(h, shape) -> tuple[tuple[int, ...], ...]:
  """The shapes a curvature entry must have for a leaf of ``shape``."""
  if isinstance(h, FactoredHessian):
    return (tuple(np.delete(shape, h.col_axis)), tuple(np.delete(shape, h.row_axis)))
  return (tuple(shape),)


def actual_shapes(h) -> tuple[tuple[int, ...], ...]:
  if isinstance(h, FactoredHessian):
    return (tuple(h.row.shape), tuple(h.col.shape))
  return (tuple(jnp.shape(h)),)


def expand(h) -> jax.Array:
  """H at every coordinate of the leaf (an elementwise expression)."""
  if not isinstance(h, FactoredHessian):
    return h
  row_scale = jnp.mean(h.row, axis=h.row_axis, keepdims=True)
  row = jnp.expand_dims(h.row / row_scale, h.col_axis)
  col = jnp.expand_dims(h.col, h.row_axis)
  return row * col


def ema(h, estimate: jax.Array, rate: jax.Array, reference: bool = False):
  """One EMA step of H towards ``estimate`` (same shape as the leaf).

  ``reference=False`` computes ``H + rate * (estimate - H)``; in float32 this
  lets H move both ways while ``rate * (estimate - H)`` is representable.
  ``reference=True`` computes the official code's ``(1 - rate) * H + rate *
  estimate``, where ``1 - rate`` rounds to 1 for rate below ~3e-8 in float32.
  """
  def step(old, target):
    target = target.astype(old.dtype)
    rate_ = rate.astype(old.dtype)
    if reference:
      return (1 - rate_) * old + rate_ * target
    return old + rate_ * (target - old)

  if not isinstance(h, FactoredHessian):
    return step(h, estimate)
  return dataclasses.replace(
      h,
      row=step(h.row, jnp.mean(estimate, axis=h.col_axis)),
      col=step(h.col, jnp.mean(estimate, axis=h.row_axis)),
  )
