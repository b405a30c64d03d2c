"""The published HiZOO curvature rules ("paper" and "reference").

A leaf's H is either an array of the leaf's shape (the full diagonal) or a
:class:`FactoredHessian` (HiZOO-L): for the two largest axes ``a < b``,
``row`` averages H over axis ``b`` and ``col`` over axis ``a``, and

    H_hat = row[.., :, None] * col[.., None, :] / mean(row over axis a)

is rebuilt elementwise wherever H is needed. One probe updates it by an
exponential moving average towards a per-coordinate estimate (Eq. 8-9):

    paper:     est = H * | mean_j q_j (z_j^2 - 1) |,   H <- H + alpha (est - H)
    reference: est = H * mean_j |q_j| z_j^2,           H <- (1 - alpha) H + alpha est

with ``q_j = (l+ + l- - 2 l0) / (2 mu^2)``; the factored form averages
``est`` over the removed axis first. "reference" is the official code's
form, where ``1 - alpha`` rounds to 1 in float32 for alpha below ~3e-8.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


GRANULARITIES = ("element", "factored")
DEFAULT_RATE = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredHessian:
  """Row and column factors of one leaf's diagonal curvature (HiZOO-L)."""

  row: jax.Array  # leaf shape without axis `col_axis`, hessian dtype.
  col: jax.Array  # leaf shape without axis `row_axis`, hessian dtype.
  row_axis: int = dataclasses.field(metadata=dict(static=True))
  col_axis: int = dataclasses.field(metadata=dict(static=True))


def factored_axes(shape, min_dim_size_to_factor: int
                  ) -> Optional[tuple[int, int]]:
  """The (row, col) axes to factor a leaf over, or None to keep it full.

  The two largest axes (the later one on ties), in increasing order; both
  must have at least ``min_dim_size_to_factor`` entries.
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


def init(shape, axes: Optional[tuple[int, int]], dtype, sharding=None):
  """H_0 = 1, full or factored over ``axes``, placed like the leaf."""
  if axes is None:
    return jnp.ones(shape, dtype, out_sharding=sharding)
  row_axis, col_axis = axes
  return FactoredHessian(
      row=jnp.ones(np.delete(shape, col_axis), dtype,
                   out_sharding=factor_sharding(sharding, len(shape),
                                                col_axis)),
      col=jnp.ones(np.delete(shape, row_axis), dtype,
                   out_sharding=factor_sharding(sharding, len(shape),
                                                row_axis)),
      row_axis=row_axis, col_axis=col_axis)


def shapes_fit(h, shape) -> bool:
  """Whether ``h`` is a curvature entry for a leaf of ``shape``."""
  if isinstance(h, FactoredHessian):
    return (tuple(h.row.shape) == tuple(np.delete(shape, h.col_axis)) and
            tuple(h.col.shape) == tuple(np.delete(shape, h.row_axis)))
  return tuple(jnp.shape(h)) == tuple(shape)


def expand(h) -> jax.Array:
  """H at every coordinate of the leaf (an elementwise expression)."""
  if not isinstance(h, FactoredHessian):
    return h
  row_scale = jnp.mean(h.row, axis=h.row_axis, keepdims=True)
  row = jnp.expand_dims(h.row / row_scale, h.col_axis)
  return row * jnp.expand_dims(h.col, h.row_axis)


def inv_sqrt(h) -> jax.Array:
  """H^{-1/2} of one leaf (float32)."""
  return jax.lax.rsqrt(expand(h).astype(jnp.float32))


def estimate(h, second: jax.Array, zs: list, reference: bool) -> jax.Array:
  """The per-coordinate estimate ``est >= 0`` (module docstring)."""
  if reference:
    total = sum(jnp.abs(second[j]) * jnp.square(z) for j, z in enumerate(zs))
  else:
    total = jnp.abs(sum(second[j] * (jnp.square(z) - 1.0)
                        for j, z in enumerate(zs)))
  return expand(h).astype(jnp.float32) * total / len(zs)


def ema(old: jax.Array, target: jax.Array, rate: jax.Array,
        reference: bool) -> jax.Array:
  """One EMA step of ``old`` towards ``target``.

  ``H + rate (est - H)`` moves both ways while ``rate (est - H)`` is
  representable; the official ``(1 - rate) H + rate est`` does not move in
  float32 for rate below ~3e-8 (``1 - rate`` rounds to 1).
  """
  target, r = target.astype(old.dtype), rate.astype(old.dtype)
  return (1 - r) * old + r * target if reference else old + r * (target - old)


def update(reference: bool, hess: list, stats, second: jax.Array, leaves,
           rate: jax.Array, probe: jax.Array):
  """Eq. 8-9 (or the official code's form) on every trainable leaf.

  ``leaves.estimate_map`` hands each leaf's H and ``draw(after=None)``:
  the leaf's z at every query, drawn afresh for one estimate (after the
  array ``after``, where given), and H as that estimate reads it.

  Returns ``(new hess, stats)``; ``stats`` is unused (None).
  """
  rate = jnp.where(probe, rate, 0.0)

  def new_h(h, draw):
    def est(after=None):
      h_read, zs = draw(after)
      return estimate(h_read, second, zs, reference)
    if not isinstance(h, FactoredHessian):
      return ema(h, est(), rate, reference)
    row = ema(h.row, leaves.mean(est(), h.col_axis), rate, reference)
    # The columns' estimate after the rows': one leaf-sized estimate at a
    # time where a reduction stores its operand.
    col = ema(h.col, leaves.mean(est(after=row), h.row_axis), rate,
              reference)
    return dataclasses.replace(h, row=row, col=col)

  return leaves.estimate_map(new_h, hess), stats
