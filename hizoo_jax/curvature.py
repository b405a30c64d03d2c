"""The published HiZOO curvature rules ("paper" and "reference"), full or factored.

A leaf's curvature is either

* an array of the leaf's shape (the full diagonal), or
* a :class:`FactoredHessian` (HiZOO-L): for the two largest axes ``a < b`` of
  the leaf, ``row`` averages H over axis ``b`` and ``col`` over axis ``a``, and

      H_hat = row[.., :, None] * col[.., None, :] / mean(row over axis a)

  is rebuilt elementwise wherever H is needed (rank one per slice, positive).

Both are updated by an exponential moving average (EMA) of a per-coordinate
estimate ``est >= 0`` computed on the fly (:func:`estimate_abs`,
:func:`ema_step`); the factored form averages ``est`` over the removed axis
first, so the full-size estimate is never stored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from hizoo_jax import _xla


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


def factor_sharding(sharding, ndim: int, axis: int):
  """A leaf's NamedSharding (or None) for the leaf without ``axis``."""
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
                   out_sharding=factor_sharding(sharding, len(shape), col_axis)),
      col=jnp.ones(np.delete(shape, row_axis), dtype,
                   out_sharding=factor_sharding(sharding, len(shape), row_axis)),
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
      row=step(h.row, _xla.fused_mean(estimate, h.col_axis)),
      col=step(h.col, _xla.fused_mean(estimate, h.row_axis)),
  )


def updated_array(h):
  """The array of a new H that the update's draw of z waits for."""
  return h.col if isinstance(h, FactoredHessian) else h


def paper_update(reference: bool, hess: list, stats, second, draw, shapes,
                 rate, probe):
  """Eq. 8-9 (or the official code's form) on every trainable leaf.

  ``draw`` is a :class:`hizoo_jax.noise.Draws`; ``stats`` is unused (None).
  Returns ``(new hess list, stats)``.
  """
  del shapes
  rate = jnp.where(probe, rate, 0.0)
  new, previous = list(hess), None
  for i, h in enumerate(hess):
    if h is None:
      continue
    new[i] = ema_step(h, second, lambda j, salt, i=i: draw.z(i, j, salt),
                      second.shape[0], rate, reference, previous, draw.salt)
    if isinstance(h, FactoredHessian):
      previous = new[i].col
  return new, stats


def ema_step(h, second, z_of_query, num_queries, rate, reference, after,
             salt_of):
  """H after one EMA step; z is drawn afresh for every consumer.

  Each draw is salted with a different zero (``salt_of`` consumer 0 or of
  an array, :meth:`hizoo_jax.noise.Draws.salt`), so none is shared with ``shift``'s draw or
  the update's. The full H's draw must not
  read H itself: its update would then not be elementwise, and XLA would
  not write it in place. Where a reduction stores its operand (XLA:CPU
  with more than one device, see :func:`fused_mean`), the factored form's
  row and column means are computed one after the other (and after the
  previous factored leaf, ``after``): one leaf-sized temporary at a time.
  """
  def estimate_after(order):
    salt = salt_of(order)
    # H as read by this estimate also waits for ``order``, so that XLA does
    # not expand every leaf's factored H at once.
    h_read = jax.tree.map(lambda a: jnp.where(salt == 0, a, 1), h)
    return estimate_abs(h_read, second,
                        lambda query: z_of_query(query, salt), num_queries,
                        reference)

  if not isinstance(h, FactoredHessian):
    return ema(h, estimate_after(0), rate, reference)
  rows = ema(h, estimate_after(0 if after is None else after), rate,
             reference)
  cols = ema(h, estimate_after(rows.row), rate, reference)
  return dataclasses.replace(rows, col=cols.col)


def estimate_abs(h, second, z_of_query, num_queries, reference):
  """Per-coordinate curvature estimate |h| averaged over queries (>= 0).

  paper:     H * | mean_j D_j / (2 mu^2) * (z_j^2 - 1) |
  reference: H * mean_j |D_j| / (2 mu^2) * z_j^2
  with ``second[j] = D_j / (2 mu^2)`` and H the current estimate.
  """
  if reference:
    terms = [jnp.abs(second[j]) * jnp.square(z_of_query(j))
             for j in range(num_queries)]
    total = sum(terms)
  else:
    terms = [second[j] * (jnp.square(z_of_query(j)) - 1.0)
             for j in range(num_queries)]
    total = jnp.abs(sum(terms))
  return expand(h).astype(jnp.float32) * total / num_queries
