"""HiZOO's default curvature rule: signed, baselined, grouped, in log space.

One probe of the curvature yields, per query, the scalar

    q = (l+ + l- - 2 l0) / (2 mu^2)  ~  1/2 sum_i lambda_i z_i^2,
    lambda_i = A_ii / H_i

(A the loss Hessian, H the current estimate). H is shared within groups G of
coordinates (a tensor, a row, a column, row x column factors, or an element)
and moved by

    b      = running mean of q                        (baseline)
    lam    = 2 b / d                                  (mean of lambda)
    y      = q - b * (sum_i z_i^2) / d                (q minus its prediction)
    rho_G  = mean_{i in G}(z_i^2 - 1) * y / lam       E[rho_G] ~ lam_G/lam - 1
    v      = running mean of (y / lam)^2              (noise of the residual)
    log H_G += clip(rate / K * min(1, n_G / (2 v)) * rho_G, +-CLIP)
    H      /= mean_i H_i                              (mean 1 over all leaves)
    H       = max(H, FLOOR)

with K the number of factors of the leaf (HiZOO-L: rows and columns) and n_G
the coordinates of the group. The fixed point is H proportional to the group
means of diag(A); the mean-1 normalisation keeps the learning rate's MeZO
meaning. ``docs/algorithm.md`` derives it.

Each leaf's H is a tuple of factors (arrays of the leaf's ndim, size 1 on the
axes they are shared over); H is their broadcast product.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hizoo_jax.core import leafwise

GRANULARITIES = ("tensor", "row", "column", "factored", "element")
DEFAULT_RATE = 0.05
STATS_RATE = 0.1  # the running means b and v forget at this rate.
CLIP = 0.5  # at most a factor e^0.5 per factor and step.
# H relative to its mean never drops below this: a tensor with no curvature
# (a LoRA factor multiplied by zeros) would otherwise get an unbounded step.
FLOOR = 1e-4


class GroupedStats(NamedTuple):
  """Running statistics of the probes, shared by all leaves."""

  baseline: jax.Array  # (), float32: running mean b of q.
  spread: jax.Array  # (), float32: running mean v of (y / lam)^2.
  probes: jax.Array  # (), int32: curvature probes taken.


def num_factors(granularity: str) -> int:
  """How many factors a leaf's H has (HiZOO-L: rows and columns)."""
  return 2 if granularity == "factored" else 1


def factor_shapes(shape, granularity: str,
                  factored_axes: Optional[tuple[int, int]],
                  stacked: bool = False) -> list[tuple]:
  """The factor shapes of a leaf of ``shape`` at ``granularity``.

  ``factored_axes`` are the leaf's (row, col) axes, or None for a leaf that
  is not a matrix (one value per tensor). A ``stacked`` leaf holds one tensor
  per entry of its leading axis (scanned layers), each with its own factors.
  """
  shape = tuple(shape)
  if granularity == "element":
    return [shape]
  if granularity == "tensor" or factored_axes is None:
    lead = 1 if stacked else 0
    per_tensor = shape[:lead] + (1,) * (len(shape) - lead)
    return [per_tensor] * num_factors(granularity)
  row_axis, col_axis = factored_axes
  rows = tuple(1 if a == col_axis else n for a, n in enumerate(shape))
  cols = tuple(1 if a == row_axis else n for a, n in enumerate(shape))
  return {"row": [rows], "column": [cols], "factored": [rows, cols]}[granularity]


def factor_sharding(sharding, leaf_shape, factor_shape):
  """A leaf's NamedSharding (or None) for a factor: axes of size 1 unsharded."""
  if sharding is None:
    return None
  spec = list(sharding.spec) + [None] * (len(leaf_shape) - len(sharding.spec))
  spec = [s if f == n else None
          for s, f, n in zip(spec, factor_shape, leaf_shape)]
  return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec))


def init(shape, granularity, factored_axes, dtype, sharding=None,
         stacked=False) -> tuple:
  """H_0 = 1 as a tuple of factors of ``shape`` (see :func:`factor_shapes`)."""
  return tuple(
      jnp.ones(f, dtype, out_sharding=factor_sharding(sharding, shape, f))
      for f in factor_shapes(shape, granularity, factored_axes, stacked))


def init_stats() -> GroupedStats:
  return GroupedStats(baseline=jnp.zeros([], jnp.float32),
                      spread=jnp.zeros([], jnp.float32),
                      probes=jnp.zeros([], jnp.int32))


def shared_axes(factor_shape, leaf_shape) -> tuple[int, ...]:
  """The axes a factor is shared over (size 1 in it, not in the leaf)."""
  return tuple(a for a, (f, n) in enumerate(zip(factor_shape, leaf_shape))
               if f == 1 and n != 1)


def shapes_fit(h: tuple, shape) -> bool:
  """Whether the factors broadcast to a leaf of ``shape``."""
  return all(len(f.shape) == len(shape) and all(
      a in (1, n) for a, n in zip(f.shape, shape)) for f in h)


def inv_sqrt(h: tuple) -> jax.Array:
  """H^{-1/2} of one leaf, broadcastable to it."""
  out = jax.lax.rsqrt(h[0])
  for f in h[1:]:
    out = out * jax.lax.rsqrt(f)
  return out


def total(h: tuple, shape) -> jax.Array:
  """sum_i H_i over a leaf (without forming a leaf-sized product)."""
  if len(h) == 1:
    return jnp.sum(h[0]) * (np.prod(shape) / h[0].size)
  rows, cols = h
  both = np.prod([n for r, c, n in zip(rows.shape, cols.shape, shape)
                  if r == c == 1])
  return jnp.sum(
      jnp.sum(rows, axis=shared_axes(cols.shape, shape), keepdims=True)
      * jnp.sum(cols, axis=shared_axes(rows.shape, shape), keepdims=True)
  ) * both


def residual(stats: GroupedStats, second: jax.Array, norm_sq: jax.Array,
             dim: float, probe: jax.Array):
  """``(y, safe_lam, safe_v, usable)``: q minus its prediction from the
  baseline, the mean of lambda and the noise v (1 where not yet known), and
  whether this probe may move H (module docstring)."""
  b, v, t = stats
  lam = 2.0 * b / dim
  y = second - b * norm_sq / dim  # (q,)
  usable = probe & (t >= 2) & (lam > 0) & jnp.isfinite(v) & (v > 0)
  return (y, jnp.where(lam > 0, lam, 1.0), jnp.where(v > 0, v, 1.0), usable)


def next_stats(stats: GroupedStats, second: jax.Array, y: jax.Array,
               safe_lam: jax.Array, dim: float, probe: jax.Array
               ) -> GroupedStats:
  """The running means b and v after a probe (plain averages for the first
  1 / STATS_RATE probes); unchanged where ``probe`` is False."""
  b, v, t = stats
  lam = 2.0 * b / dim
  b_new = b + jnp.maximum(STATS_RATE, 1.0 / (t + 1)) * (jnp.mean(second) - b)
  spread = jnp.mean(jnp.square(y / safe_lam))
  v_rate = jnp.maximum(STATS_RATE, 1.0 / jnp.maximum(t, 1))
  v_new = jnp.where((t >= 1) & (lam > 0), v + v_rate * (spread - v), v)
  return GroupedStats(
      baseline=jnp.where(probe, b_new, b).astype(jnp.float32),
      spread=jnp.where(probe, v_new, v).astype(jnp.float32),
      probes=t + probe.astype(jnp.int32))


def update(hess: list, stats: GroupedStats, second: jax.Array,
           leaves: leafwise.Leaves, rate: jax.Array, probe: jax.Array):
  """The new factors and statistics after one step (module docstring).

  Args:
    hess: per leaf, its tuple of factors (None: frozen).
    stats: the running statistics.
    second: (q,) float32, ``q`` of each query.
    leaves: the step's leaves and noise.
    rate: the largest gain of log H per step.
    probe: bool, whether this step measured the curvature.

  Returns:
    ``(new hess, new stats)``.
  """
  live = [i for i, h in enumerate(hess) if h is not None]
  if not live:  # nothing is trained: nothing to learn
    return hess, stats
  shapes = [jnp.shape(x) for x in leaves.values]
  dim = float(sum(np.prod(shapes[i]) for i in live))
  sums = {(i, k): leafwise.group_sums(  # (q, *factor shape)
      leaves, lambda z: jnp.square(z) - 1.0, i,
      shared_axes(f.shape, shapes[i]), factor=k)
          for i in live for k, f in enumerate(hess[i])}
  # Summed over the factor's axes, not reshaped: on an Explicit mesh a
  # reshape that merges a sharded axis is a type error.
  norm_sq = dim + sum(
      jnp.sum(sums[i, 0], axis=tuple(range(1, sums[i, 0].ndim)))
      for i in live)

  y, safe_lam, safe_v, usable = residual(stats, second, norm_sq, dim, probe)

  new = []
  for i, h in enumerate(hess):
    if h is None:
      new.append(None)
      continue
    factors = []
    for k, f in enumerate(h):
      n = np.float32(np.prod(shapes[i]) / f.size)  # coordinates per group
      y_b = jnp.reshape(y, (-1,) + (1,) * f.ndim)
      rho = jnp.mean(sums[i, k] * y_b, axis=0) / (n * safe_lam)
      gain = rate / len(h) * jnp.minimum(1.0, n / (2.0 * safe_v))
      step = jnp.where(usable, jnp.clip(gain * rho, -CLIP, CLIP), 0.0)
      factors.append(f * jnp.exp(step))
    new.append(factors)

  mean_h = jnp.where(
      usable, sum(total(new[i], shapes[i]) for i in live) / dim, 1.0)
  for i in live:  # mean 1 (the first factor carries it), none below FLOOR
    floor = FLOOR ** (1 / len(new[i]))
    new[i] = tuple(
        jnp.maximum(f / mean_h if k == 0 else f, floor).astype(hess[i][k].dtype)
        for k, f in enumerate(new[i]))

  return new, next_stats(stats, second, y, safe_lam, dim, probe)
