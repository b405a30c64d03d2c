"""The lean step's loop in the compact program (hizoo_jax.program).

:func:`run` is :func:`hizoo_jax.make_train_step`'s loop for the compact
program's estimators, in the order of the PyTorch originals: perturb the
parameters in place, evaluate, move to the other side, evaluate, restore and
update in place, with z regenerated from the key each time and never stored.

How it stays in place under XLA, whose programs are functional (details and
measurements in ``docs/performance.md``):

* Parameters and optimizer state are donated, so the new values may reuse
  their buffers.
* The evaluation phases are the iterations of a ``lax.fori_loop`` whose carry
  is the parameter tree (and the optimizer state). A while loop's carry lives
  in one buffer, aliased to the donated input, and each move
  ``theta + c * mu * s * z`` is an elementwise fusion written over it.
* The step is compiled without while-loop-invariant code motion, and the
  state passes through ``lax.optimization_barrier`` with the loop index, so
  XLA does not hoist the parts of ``z`` or ``H^{-1/2}`` that do not change
  between phases out of the loop (it would store them).
* The update is the loop's last move. Every phase computes the optimizer's
  update of the point it moved to from the losses so far (zo_final tells the
  optimizer which phase counts) and keeps it on the last phase only, so the
  moves, the restore and the update are one expression of z per leaf: one
  copy of the noise generator in the program, not one per use. Optimizers
  that keep parameter-sized state (Adam's moments, a per-element H) update
  after the loop instead, since XLA would copy that state to feed the loop;
  so do HiZOO-L and the row or column curvatures on a mesh, whose sums
  would be repeated on every phase.
* Through the loop the estimator's curvature state is one vector
  (``Perturbation.carry_state``): written on the last phase, each factor of
  H was a select kernel of its own, two per leaf for HiZOO-L.

The update itself is the optimizer's own ``update`` fed with the measured
losses (``zo_losses``), so the result equals the plain ``tx.update`` path up to
the float rounding of the ``+mu, -2 mu, +mu`` round trip.
"""


from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from hizoo_jax import _checks
from hizoo_jax import _xla
from hizoo_jax import zo_state
from hizoo_jax.core import scheme as schemes


def _stored_deltas(shift, params, num_queries):
  """``mu * s * z_j`` for every query, stacked (store_noise mode).

  Returns a list with one entry per leaf: None where the shift leaves the leaf
  unchanged (masked or frozen), else a float32 array of shape (q, *leaf).
  """
  zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
  flat_zeros = jax.tree_util.tree_leaves(zeros)
  per_query = [jax.tree_util.tree_leaves(shift(zeros, 1.0, j))
               for j in range(num_queries)]
  deltas = []
  for i, zero in enumerate(flat_zeros):
    if per_query[0][i] is zero:
      deltas.append(None)
    else:
      deltas.append(jnp.stack([leaves[i] for leaves in per_query]))
  return deltas


def _add_stored(theta, deltas, terms):
  """``theta + sum_k coeff_k * delta[query_k]`` on the perturbed leaves."""
  leaves, treedef = jax.tree_util.tree_flatten(theta)
  out = []
  for x, delta in zip(leaves, deltas):
    if delta is None:
      out.append(x)
      continue
    total = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    for coeff, query in terms:
      total = total + coeff * delta[query]
    out.append(total.astype(x.dtype))
  return treedef.unflatten(out)


def _carried(opt_state, perturbation, carried: bool):
  """``opt_state`` with its estimator state in the loop carry's form
  (``carried``) or back in its own (Perturbation.carry_state)."""
  if perturbation.carry_state is None:
    return opt_state
  return jax.tree.map(
      lambda node: (perturbation.carry_state(node, carried)
                    if isinstance(node, zo_state.ZOState) else node),
      opt_state, is_leaf=lambda x: isinstance(x, zo_state.ZOState))


def _update_in_loop(perturbation, opt_state, params) -> bool:
  """Whether the update can be the loop's last move (see :func:`run`).

  Not when the optimizer keeps a state as large as a parameter (Adam's
  moments, a per-element H): written on the last phase only, such a state is
  copied by XLA to feed the loop, a copy of the parameters. Not when the
  estimator's update is heavy (HiZOO-L's row and column sums leaf by leaf,
  on a mesh: repeated on every phase they cost more noise passes and
  compile time than the update's own draw saves).
  """
  shapes = {jnp.shape(x) for x in jax.tree.leaves(params) if jnp.size(x) > 1}
  return perturbation.light_update and not any(
      jnp.shape(x) in shapes for x in jax.tree.leaves(opt_state))


def _value(losses) -> jax.Array:
  """The step's loss for transformations that read ``value`` (such as
  ``optax.contrib.reduce_on_plateau``): L(theta) where it was evaluated,
  else the mean of the perturbed points'."""
  center, plus, minus = losses
  sides = (jnp.mean(plus) + jnp.mean(minus)) / 2
  if center is None:
    return sides
  return jnp.where(jnp.isnan(center), sides, center)


def _skip(theta):
  del theta  # NaN: no loss (read as such by _value)
  return jnp.full([], jnp.nan, jnp.float32)


def _phase_loss(k, theta, state, perturbation, loss_at):
  """Phase k's loss: L(theta) at phase 0 where the estimator evaluates it
  (on the steps that probe the curvature), nothing at MeZO's phase 0, and
  the perturbed point at every other phase."""
  if perturbation.evaluates_center and perturbation.center_every > 1:
    count = zo_state.find_state(state).count
    evaluate = (k > 0) | (count % perturbation.center_every == 0)
    return lax.cond(evaluate, lambda t: loss_at(t, "a point of the step"),
                    _skip, theta)
  if perturbation.evaluates_center:
    return loss_at(theta, "a point of the step")
  return lax.cond(k == 0, _skip, lambda t: loss_at(t, "theta +/- mu*s*z"),
                  theta)


def _update_on_last(optimizer, theta, state, losses, k, num_phases):
  """The optimizer's update of the restored point ``theta`` from ``losses``,
  applied (to theta and to the state) on the last phase only."""
  # Stored, not recomputed in every leaf's fusion.
  last = _xla.computed_once(k == num_phases - 1,
                            (k >> 31).astype(jnp.uint32))
  updates, new_state = optimizer.update(
      None, state, theta, zo_losses=losses, zo_final=last,
      value=_value(losses))
  theta = jax.tree.map(lambda n, r: jnp.where(last, n, r),
                       optax.apply_updates(theta, updates), theta)
  state = jax.tree.map(
      lambda n, o: jnp.where(last, n, o).astype(o.dtype), new_state, state)
  return theta, state


def run(optimizer, opt_state, params, batch, loss_fn, perturbation,
        store_noise, probe):
  """Evaluates, moves and updates in place.

  ``2 q + 1`` phases, the iterations of one loop: phase k evaluates L
  (HiZOO: L(theta) at phase 0; MeZO: nothing at phase 0), then makes move k
  of the scheme's walk (:func:`hizoo_jax.core.scheme.walk`); the last move
  restores theta. When the optimizer keeps
  no parameter-sized state, every phase also computes the optimizer's update
  of the restored point from the losses so far and applies it on the last
  phase only: the restore, the update and the moves are then one expression
  of z, and each leaf's noise appears once in the program (the update's
  results on the other phases are discarded). Otherwise the update follows
  the loop. The loop carry holds the parameters and the optimizer state, so
  every write goes over the donated buffers.

  Returns:
    ``(new params, new opt_state)``.
  """
  num_queries = perturbation.num_queries
  center_first = perturbation.evaluates_center
  # Out to each query's plus side, across to its minus side, and on to the
  # next query's plus side; the last move restores theta.
  coeff_table, query_table = schemes.sparse(
      schemes.walk(perturbation.scheme)[1])
  num_phases = coeff_table.shape[0]
  update_in_loop = _update_in_loop(perturbation, opt_state, params)

  deltas = None
  if store_noise:
    deltas = _stored_deltas(perturbation.shift, params, num_queries)

  def move(theta, state, m):
    coeffs, queries = _xla.computed_once(
        (jnp.asarray(coeff_table)[m], jnp.asarray(query_table)[m]),
        (jnp.asarray(m) >> 31).astype(jnp.uint32))
    if num_queries == 1:  # a constant: XLA merges the draw with the update's
      queries = [0] * coeff_table.shape[1]
    if deltas is not None:
      return _add_stored(theta, deltas, list(zip(coeffs, queries)))
    return probe(optimizer, state, theta).move(theta, coeffs, queries)

  def losses_of(losses):
    return (losses[0] if center_first else None), losses[1::2], losses[2::2]

  def body(k, carry):
    theta, losses, state = carry
    loss = _phase_loss(k, theta, state, perturbation,
                       lambda t, where: _checks.check_loss(loss_fn(t, batch),
                                                           where))
    # The move waits for the loss, which reads theta before it is moved:
    # (l != l) & (l == l) is False, but XLA cannot prove it. Opaque to XLA:
    # z and H^{-1/2} stay inside the loop, never stored.
    after_loss = ((loss != loss) & (loss == loss)).astype(k.dtype)
    k, state = lax.optimization_barrier((k + after_loss, state))
    losses = losses.at[k].set(loss)
    theta = move(theta, state, k)
    if update_in_loop:
      theta, state = _update_on_last(optimizer, theta, state,
                                     losses_of(losses), k, num_phases)
    return theta, losses, state

  losses = jnp.zeros([num_phases], jnp.float32)
  if update_in_loop:  # Written on the last phase: H as one vector, one select.
    opt_state = _carried(opt_state, perturbation, True)
  params, losses, opt_state = lax.fori_loop(
      0, num_phases, body, (params, losses, opt_state))
  if update_in_loop:
    opt_state = _carried(opt_state, perturbation, False)
  else:
    updates, opt_state = optimizer.update(
        None, opt_state, params, zo_losses=losses_of(losses),
        value=_value(losses_of(losses)))
    params = optax.apply_updates(params, updates)
  return params, opt_state
