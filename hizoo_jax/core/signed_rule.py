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


def update(hess, stats: GroupedStats, second: jax.Array, leaves, rate: jax.Array,
           probe: jax.Array):
  """The new factors and statistics after one step (module docstring).

  Args:
    hess: H as the program keeps it (:mod:`hizoo_jax.core.leafwise`: per
      leaf, its tuple of factors, None where frozen).
    stats: the running statistics.
    second: (q,) float32, ``q`` of each query.
    leaves: the step's leaves and noise; its ``factor_*`` methods map the
      rule over every factor of every leaf.
    rate: the largest gain of log H per step.
    probe: bool, whether this step measured the curvature.

  Returns:
    ``(new hess, new stats)``.
  """
  if not any(leaves.trainable):  # nothing is trained: nothing to learn
    return hess, stats
  dim = float(sum(np.prod(jnp.shape(x)) for x, keep in zip(
      leaves.values, leaves.trainable) if keep))
  sums = leaves.factor_sums(hess, lambda z: jnp.square(z) - 1.0)
  norm_sq = dim + leaves.coordinate_sum(sums)  # (q,): sum_i z_i^2
  y, safe_lam, safe_v, usable = leaves.shared(
      residual(stats, second, norm_sq, dim, probe))

  def log_step(h, z2, group):  # log H_G += clip(gain * rho_G)
    y_b = jnp.reshape(y, (-1,) + (1,) * h.ndim)
    rho = jnp.mean(z2 * y_b, axis=0) / (group.n * safe_lam)
    gain = rate / group.num * jnp.minimum(1.0, group.n / (2.0 * safe_v))
    return h * jnp.exp(jnp.where(usable, jnp.clip(gain * rho, -CLIP, CLIP),
                                 0.0))
  new = leaves.factor_map(log_step, hess, sums)

  mean_h = leaves.shared(
      jnp.where(usable, leaves.factor_total(new) / dim, 1.0))
  def normalised(h, _, group):  # mean 1 (the first factor carries it)
    return jnp.maximum(jnp.where(group.first, h / mean_h, h),
                       FLOOR ** (1 / group.num))
  new = leaves.factor_map(normalised, new)
  return new, next_stats(stats, second, y, safe_lam, dim, probe)
