"""Sums of f(z) over groups of many leaves' coordinates, drawn in one loop.

HiZOO's default rule needs, on every probe, ``sum_{i in G} (z_i^2 - 1)`` for
every group G of coordinates that shares one curvature value: a tensor, one
layer of a stacked tensor, a row or a column of a matrix. Drawn leaf by leaf,
every such sum is a fusion with its own copy of the noise generator, so the
program grows by a generator per leaf and factor.

Here every group is a strided range of its leaf's flat (row-major) index,
``base + k * step`` for ``k < length``, and the groups are laid end to end
as the rows of one virtual matrix of ``WIDTH`` columns (each group padded to
whole rows). One while loop draws a block of rows per iteration; each row
finds its group's leaf seed and base index, so every z equals the leaf's own
draw bit for bit, and the program holds one copy of the generator whatever
the number of leaves. Nothing is read from memory but the seeds: the
parameters never enter the loop.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hizoo_jax import _xla
from hizoo_jax import noise

WIDTH = 256  # elements per row; a group wastes less than one row.
BLOCK_ROWS = 1024  # rows per iteration: 2**18 draws.


def in_one_loop() -> bool:
  """Whether :func:`group_sums` draws its groups in one loop here.

  Only on one device: on a mesh each leaf's draw is sharded like the leaf,
  and the loop would draw every leaf on every device.
  """
  return _xla.single_device()


def strided_groups(shape, axes) -> Optional[tuple[int, int, int]]:
  """``(groups, length, inner)`` of a sum over ``axes`` of a ``shape`` leaf.

  The summed axes (those of size > 1) must be consecutive among the axes of
  size > 1: a whole tensor, the layers of a stacked tensor, rows or columns.
  Group ``g = outer * inner + j`` is then the flat indices ``outer * length *
  inner + j + k * inner``, ``k < length``, where ``inner`` is the size of the
  kept axes after the summed ones. None if the summed axes are not
  consecutive.
  """
  sizes = [(a in axes, n) for a, n in enumerate(shape) if n > 1]
  summed = [k for k, (s, _) in enumerate(sizes) if s]
  if summed and summed != list(range(summed[0], summed[-1] + 1)):
    return None
  length = int(np.prod([n for s, n in sizes if s], dtype=np.int64))
  inner = int(np.prod([n for _, n in sizes[summed[-1] + 1:]],
                      dtype=np.int64)) if summed else 1
  return int(np.prod(shape, dtype=np.int64)) // length, length, inner


def range_sums(seeds: jax.Array, requests: Sequence[tuple[int, int, int, int]],
               fn: Callable[[jax.Array], jax.Array],
               active: Optional[jax.Array] = None) -> jax.Array:
  """``sum(fn(z))`` over every group of every request, for every query.

  Args:
    seeds: (q, leaves, 2) uint32, every leaf's seed for every query
      (:func:`hizoo_jax.noise.leaf_seed`).
    requests: static ``(leaf, groups, length, inner)``: the leaf's groups as
      in :func:`strided_groups`.
    fn: an elementwise function of z (float32).
    active: a bool scalar, or None; when False the loop runs no iteration and
      the sums are 0 (for a result that will be discarded).

  Returns:
    (q, total groups) float32: the requests' groups in order.
  """
  leaf, groups, length, inner = (np.asarray(c, np.int64)
                                 for c in zip(*requests))
  per_group = -(-length // WIDTH)  # rows per group
  rows = groups * per_group
  total_rows, total_groups = int(rows.sum()), int(groups.sum())
  block = min(BLOCK_ROWS, total_rows)
  num_blocks = -(-total_rows // block)
  if active is not None:
    num_blocks = jnp.where(active, num_blocks, 0)
  first_row = jnp.asarray(np.cumsum(rows) - rows, jnp.int32)
  first_out = jnp.asarray(np.cumsum(groups) - groups, jnp.int32)
  outer_stride = jnp.asarray(length * inner, jnp.uint32)
  leaf, groups, per_group, inner_i = (jnp.asarray(c, jnp.int32) for c in (
      leaf, groups, per_group, inner))
  last = jnp.asarray(length - 1, jnp.uint32)  # 2**32 fits as last.
  inner = jnp.asarray(inner, jnp.uint32)

  def body(b, acc):
    row = b * block + lax.iota(jnp.int32, block)
    r = jnp.searchsorted(first_row, row, side="right", method="scan") - 1
    local_row = row - first_row[r]
    group = local_row // per_group[r]
    outer = group // inner_i[r]
    base = (outer.astype(jnp.uint32) * outer_stride[r]
            + (group - outer * inner_i[r]).astype(jnp.uint32))
    k = ((local_row - group * per_group[r]).astype(jnp.uint32)[:, None]
         * jnp.uint32(WIDTH)
         + lax.broadcasted_iota(jnp.uint32, (block, WIDTH), 1))
    # Past the last row, r is the last request and group beyond its groups.
    valid = (k <= last[r][:, None]) & (group < groups[r])[:, None]
    seed = seeds[:, leaf[r]]  # (q, block, 2)
    index = base[:, None] + k * inner[r][:, None]
    z = noise.standard(noise.bits_at(seed[..., 0, None], seed[..., 1, None],
                                     index[None]))
    values = jnp.where(valid[None], fn(z), 0.0)
    per_row = _xla.fused_sum(values, (2,))[..., 0]  # (q, block)
    out = jnp.minimum(first_out[r] + group, total_groups - 1)
    return acc.at[:, out].add(per_row)

  acc = jnp.zeros((seeds.shape[0], total_groups), jnp.float32)
  return lax.fori_loop(0, num_blocks, body, acc)


def group_sums(draws: noise.Draws, groups: Sequence[tuple[int, tuple]],
               shapes, fn: Callable[[jax.Array], jax.Array]) -> list:
  """``sum(fn(z))`` over ``axes`` (kept, size 1) of leaf i, for every query.

  Args:
    draws: the step's :class:`hizoo_jax.noise.Draws`.
    groups: ``(leaf, axes)`` pairs.
    shapes: the leaves' shapes.
    fn: an elementwise function of z.

  Returns:
    Per pair, a (q, *kept shape) float32 array.

  Where :func:`in_one_loop`, all pairs whose summed axes are consecutive
  (tensors, stacked layers, rows, columns) share one loop. The others, and
  all pairs on a mesh, are summed leaf by leaf with
  :meth:`hizoo_jax.noise.Draws.ordered_sums`.
  """
  num_queries = draws.seeds.shape[0]
  layout = [strided_groups(shapes[i], axes) if in_one_loop() else None
            for i, axes in groups]
  looped = [(i, *g) for (i, _), g in zip(groups, layout) if g is not None]
  sums = range_sums(draws.seeds, looped, fn, draws.active) if looped else None
  apart = draws.ordered_sums(
      [(i, j, axes) for (i, axes), g in zip(groups, layout) if g is None
       for j in range(num_queries)], fn)
  out, at = [], 0
  for (i, axes), g in zip(groups, layout):
    if g is None:
      out.append(jnp.stack(apart[:num_queries]))
      apart = apart[num_queries:]
      continue
    kept = tuple(1 if a in axes else n for a, n in enumerate(shapes[i]))
    out.append(sums[:, at:at + g[0]].reshape((num_queries,) + kept))
    at += g[0]
  return out
