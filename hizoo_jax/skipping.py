"""A chain in which a skipped step moves nothing: :func:`chain`.

The estimators skip a step whose loss (or a scheduled hyperparameter) is not
finite: zero updates, H unchanged, ``skipped`` counted. In a plain
``optax.chain`` the transformations after the estimator still run on those
zeros: Adam's momentum moves the parameters and its count advances, and
decoupled weight decay still shrinks them. :func:`chain` runs the same
transformations and, on a skipped step, keeps their old state and returns
zero updates. The aliases (:func:`hizoo_jax.hizoo`, ...) and
:func:`hizoo_jax.masked_chain` are built on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import zo_state


def chain(estimator, *downstream) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(estimator, *downstream)``, frozen on skipped steps.

  The state is laid out as ``optax.chain``'s: a tuple of the estimator's
  state and each downstream transformation's.

  Args:
    estimator: a zeroth-order estimator (:func:`hizoo_jax.scale_by_hizoo`,
      :func:`hizoo_jax.scale_by_mezo`, ...).
    *downstream: optax transformations applied to its output.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> tx = hz.chain(hz.scale_by_mezo(1e-3), optax.adam(1e-2))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> nan_loss = lambda p: jnp.sum(p["w"]) * jnp.nan
    >>> updates, state = tx.update(None, state, params, value_fn=nan_loss)
    >>> float(jnp.abs(updates["w"]).max()), int(state[1][0].count)
    (0.0, 0)
  """
  tail = optax.chain(*downstream)

  def init_fn(params):
    return (estimator.init(params),) + tuple(tail.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    updates, est_state = estimator.update(updates, state[0], params,
                                          **extra_args)
    extra = {k: v for k, v in extra_args.items() if k != "value_fn"}
    new_updates, tail_state = tail.update(updates, tuple(state[1:]), params,
                                          **extra)
    ok = (zo_state.find_state(est_state).skipped
          == zo_state.find_state(state[0]).skipped)
    new_updates = jax.tree.map(
        lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    tail_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype),
                              tail_state, tuple(state[1:]))
    return new_updates, (est_state,) + tuple(tail_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
