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

from hizoo_jax import _checks
from hizoo_jax import zo_state


def chain(estimator, *downstream, honours_skip: bool = False
          ) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(estimator, *downstream)``, frozen on skipped steps.

  The state is laid out as ``optax.chain``'s: a tuple of the estimator's
  state and each downstream transformation's. The downstream
  transformations also receive ``zo_ok`` (a bool scalar, False on a skipped
  step) among the extra args.

  Args:
    estimator: a zeroth-order estimator (:func:`hizoo_jax.scale_by_hizoo`,
      :func:`hizoo_jax.scale_by_mezo`, ...).
    *downstream: optax transformations applied to its output.
    honours_skip: the downstream transformations move nothing themselves
      when ``zo_ok`` is False (as :func:`add_decayed_weights` before a
      learning rate does): no select per leaf is added (the aliases' tail).

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
    ok = (zo_state.find_state(est_state).skipped
          == zo_state.find_state(state[0]).skipped)
    extra = {k: v for k, v in extra_args.items() if k != "value_fn"}
    new_updates, tail_state = tail.update(updates, tuple(state[1:]), params,
                                          zo_ok=ok, **extra)
    if honours_skip:
      return new_updates, (est_state,) + tuple(tail_state)
    new_updates = jax.tree.map(
        lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    tail_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype),
                              tail_state, tuple(state[1:]))
    return new_updates, (est_state,) + tuple(tail_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)




def add_decayed_weights(weight_decay, mask=None
                        ) -> optax.GradientTransformationExtraArgs:
  """``optax.add_decayed_weights`` that adds nothing where ``zo_ok`` (from
  :func:`chain`) is False, and skips the whole step where a scheduled weight
  decay is not finite or negative.

  A skipped estimator already returns zeros, so with this and a learning
  rate after it a skipped step moves nothing, for the price of one scalar
  (nothing at all for a weight decay of 0). Same state as optax's.
  """
  inner = optax.add_decayed_weights(weight_decay, mask)
  if isinstance(weight_decay, (int, float)) and weight_decay == 0.0:
    # optax's state (checkpoints keep their layout); nothing to add, so the
    # step does not evaluate the mask.
    return optax.GradientTransformationExtraArgs(
        inner.init, lambda updates, state, params=None, **_: (updates, state))

  def update_fn(updates, state, params=None, *, zo_ok=True, **extra_args):
    del extra_args
    _, new_state = inner.update(updates, state, params)  # its count
    count = jax.tree.leaves(state)[0] if callable(weight_decay) else 0
    rate = weight_decay(count) if callable(weight_decay) else weight_decay
    rate = jnp.asarray(rate, jnp.float32)
    if callable(weight_decay):  # an invalid scheduled value: no step at all
      valid = jnp.isfinite(rate) & (rate >= 0)
      updates = jax.tree.map(
          lambda g: g * valid.astype(g.dtype), updates)
      rate = jnp.where(valid, rate, 0.0)
    rate = jnp.where(zo_ok, rate, 0.0)
    flags = jax.tree.map(lambda _: True, params) if mask is None else (
        _checks.full_mask(mask, params))
    out = jax.tree.map(
        lambda g, p, keep: g + (rate * p).astype(g.dtype) if keep else g,
        updates, params, flags)
    return out, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
