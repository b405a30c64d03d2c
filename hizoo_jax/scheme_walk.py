"""The lean step driven by an estimator's scheme of points, in place.

:func:`walk` runs :func:`hizoo_jax.make_train_step`'s loop from the points
an estimator evaluates, as data (:mod:`hizoo_jax.core.scheme`): for the
plain program's estimators, and for any estimator on bf16/fp16 parameters.
The memory devices are those that help on every backend: the parameters and
state are the loop's carry over donated buffers, each move is an
elementwise fusion written over them, and an optimization barrier keeps XLA
from moving z or H^{-1/2} out of the loop (the step is compiled without
loop-invariant code motion, hizoo_jax._xla.step_compiler_options).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hizoo_jax import _checks
from hizoo_jax import precision
from hizoo_jax import zo_state
from hizoo_jax.core import scheme as schemes


def walk(optimizer, opt_state, params, batch, loss_fn, perturbation, probe):
  """The lean step driven by the estimator's scheme, in place.

  ``probe(optimizer, state, params)`` returns the estimator's
  Perturbation. One loop over the phases of
  :func:`hizoo_jax.core.scheme.walk`: phase k
  evaluates its point (when the step count selects it), then moves the
  parameters to the next point, the last move restoring theta; the update
  follows the loop. Parameters and state are the loop's carry, so every
  move is written over the donated buffers.

  bfloat16 and float16 leaves are never moved: ``+mu, -2 mu, +mu`` does not
  return to the same low-precision value. Each point's low-precision leaves
  are computed afresh from theta (or from the float32 master copy of
  :func:`hizoo_jax.master_weights`) and rounded once: exact points and no
  drift, for one transient low-precision copy of those leaves.

  Returns:
    ``(new params, new opt_state)``.
  """
  scheme = perturbation.scheme
  evaluates, move_table = schemes.walk(scheme)
  move_terms = [jnp.asarray(a) for a in schemes.sparse(move_table)]
  point_terms = [jnp.asarray(a) for a in schemes.sparse(scheme.points)]
  every = np.asarray(scheme.every)
  treedef = jax.tree.structure(params)
  low = [precision.is_low_precision(x) for x in jax.tree.leaves(params)]
  master = (opt_state.master
            if isinstance(opt_state, precision.MasterWeightsState) else None)

  def current(state, theta):
    """The Perturbation traced where it is used: from the loop's state, so
    that H^{-1/2} is computed inside the loop (never hoisted and stored)."""
    return probe(optimizer, state, theta)

  def point(state, theta, p):
    """theta with its low-precision leaves at point p, rounded once."""
    if not any(low):
      return theta
    base = theta if master is None else precision.merge(master, theta)
    fresh = current(state, theta).move(base, *(a[p] for a in point_terms))
    return treedef.unflatten([
        f.astype(t.dtype) if is_low else t for t, f, is_low in zip(
            jax.tree.leaves(theta), jax.tree.leaves(fresh), low)])

  def moved(state, theta, k):
    """theta moved by move k, its low-precision leaves left alone."""
    new = current(state, theta).move(theta, *(a[k] for a in move_terms))
    return treedef.unflatten([t if is_low else n for t, n, is_low in zip(
        jax.tree.leaves(theta), jax.tree.leaves(new), low)])

  def body(k, carry):
    theta, losses, state = carry
    p = jnp.maximum(jnp.asarray(evaluates)[k], 0)
    count = zo_state.find_state(state).count
    evaluate = (jnp.asarray(evaluates)[k] >= 0) & (
        count % jnp.asarray(every)[p] == 0)
    loss = lax.cond(
        evaluate,
        lambda t: _checks.check_loss(loss_fn(point(state, t, p), batch),
                                     "a point of the step").astype(
                                         jnp.float32),
        lambda t: jnp.full([], jnp.nan, jnp.float32), theta)
    # The move waits for the loss, which reads theta before it is moved:
    # (l != l) & (l == l) is False, but XLA cannot prove it. Opaque to XLA:
    # z and H^{-1/2} stay inside the loop, never stored.
    after_loss = ((loss != loss) & (loss == loss)).astype(k.dtype)
    k, state = lax.optimization_barrier((k + after_loss, state))
    losses = losses.at[p].set(jnp.where(evaluate, loss, losses[p]))
    theta = moved(state, theta, k)
    return theta, losses, state

  losses = jnp.full([len(every)], jnp.nan, jnp.float32)
  params, losses, opt_state = lax.fori_loop(
      0, len(evaluates), body, (params, losses, opt_state))
  updates, opt_state = optimizer.update(
      None, opt_state, params, zo_losses=losses,
      value=schemes.value(scheme, losses))
  return optax.apply_updates(params, updates), opt_state
