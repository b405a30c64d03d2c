"""The published HiZOO curvature rules ("paper", "reference") in the compact
program.

The mathematics is :mod:`hizoo_jax.core.paper_rule`; here each estimate's
draw of z is salted (:meth:`hizoo_jax.noise.Draws.salt`) so that XLA
regenerates z for every consumer instead of storing it, and factored means
use two-output reductions on XLA:CPU (:func:`hizoo_jax._xla.fused_mean`).
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from hizoo_jax import _xla
from hizoo_jax.core import paper_rule


# The state's types and the pure helpers are the core's (one definition for
# both programs).
FactoredHessian = paper_rule.FactoredHessian
factor_sharding = paper_rule._without  # pylint: disable=protected-access
expand = paper_rule.expand


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


def paper_update(reference: bool, hess: list, stats, second, draw, rate,
                 probe):
  """Eq. 8-9 (or the official code's form) on every trainable leaf.

  ``draw`` is a :class:`hizoo_jax.noise.Draws`; ``stats`` is unused (None).
  Returns ``(new hess list, stats)``.
  """
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
