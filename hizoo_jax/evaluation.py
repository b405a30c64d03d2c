"""The loss evaluations of one estimator step (the plain ``update`` path)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from hizoo_jax import _checks
from hizoo_jax.core import scheme as schemes


def losses(params, shift, value_fn, extra_args, num_queries, with_center,
            center_when=None):
  """L(theta) (or None) and L(theta +/- mu s z_j) for every query, shape (q,).

  ``center_when`` (a traced bool, or None for always) skips L(theta) on the
  steps that do not probe the curvature (the value is then NaN, unused).
  """
  given = extra_args.get("zo_losses")
  if given is not None:
    if not isinstance(given, (tuple, list)):  # (P,), the scheme's order
      given = schemes.split_losses(
          schemes.central(num_queries, int(with_center)),
          jnp.asarray(given, jnp.float32))
    center, plus, minus = given
    plus = jnp.reshape(jnp.asarray(plus, jnp.float32), (num_queries,))
    minus = jnp.reshape(jnp.asarray(minus, jnp.float32), (num_queries,))
    if with_center:
      center = jnp.asarray(center, jnp.float32)
      if center_when is not None:
        center = jnp.where(center_when, center, jnp.nan)
    return (center if with_center else None), plus, minus
  if value_fn is None:
    raise ValueError(
        "zeroth-order estimators need the loss: call update(updates, state, "
        "params, value_fn=lambda p: loss(p, batch)).")
  kwargs = _checks.value_fn_kwargs(value_fn, extra_args)

  def loss_at(tree, where):
    return _checks.check_loss(value_fn(tree, **kwargs), where)

  center = None
  if with_center and center_when is None:
    center = loss_at(params, "theta")
  elif with_center:
    center = lax.cond(center_when,
                      lambda p: loss_at(p, "theta").astype(jnp.float32),
                      lambda p: jnp.full([], jnp.nan, jnp.float32), params)

  def pair(query):
    return (loss_at(shift(params, 1.0, query), "theta + mu*s*z"),
            loss_at(shift(params, -1.0, query), "theta - mu*s*z"))

  if num_queries == 1:
    plus, minus = pair(0)
    return center, plus[None], minus[None]
  plus, minus = lax.map(pair, jnp.arange(num_queries, dtype=jnp.uint32))
  return center, plus, minus
