"""A zeroth-order training step with the memory of inference.

:func:`make_train_step` runs one step of any optimizer that starts with a
zeroth-order estimator (:func:`hizoo_jax.hizoo`, :func:`hizoo_jax.hizoo_l`,
:func:`hizoo_jax.mezo`, or a chain around ``scale_by_hizoo`` /
``scale_by_mezo``) in the order of the PyTorch originals: perturb the
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

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hizoo_jax import _checks
from hizoo_jax import _xla
from hizoo_jax import precision
from hizoo_jax import zo_state
from hizoo_jax.core import scheme as schemes

Params = Any
Batch = Any
Metrics = dict[str, jax.Array]

# Fields of an estimator's state that are not reported as metrics.
_NOT_METRICS = ("count", "rng_key", "leaf_numbers", "hessian",
                "curvature_stats")

_NEEDS_ESTIMATOR = (
    "make_train_step needs an optimizer that contains a zeroth-order "
    "estimator (hz.hizoo, hz.hizoo_l, hz.mezo or a chain with "
    "hz.scale_by_hizoo / hz.scale_by_mezo); {why}. For first-order "
    "optimizers use jax.grad.")


# Wrappers that branch on the updates: the estimator inside them cannot hand
# its evaluation points (traced in a branch) to the step.
_BRANCHING = (optax.ApplyIfFiniteState, optax.MultiStepsState)


def _inside_branching_wrapper(node) -> bool:
  """Whether the estimator state sits inside a state of _BRANCHING."""
  def holds_estimator(tree):
    return any(map(zo_state.is_estimator_state, jax.tree.leaves(
        tree, is_leaf=zo_state.is_estimator_state)))
  if isinstance(node, _BRANCHING):
    return holds_estimator(node)
  if isinstance(node, (tuple, list)):
    return any(_inside_branching_wrapper(x) for x in node)
  if isinstance(node, dict):
    return any(_inside_branching_wrapper(x) for x in node.values())
  return False


def _perturbation(optimizer, opt_state, params) -> zo_state.Perturbation:
  """The Perturbation of the step (the probe's other outputs are dead code)."""
  try:  # Before update: a first-order optimizer would fail on updates=None.
    zo_state.find_state(opt_state)
  except ValueError:
    raise ValueError(_NEEDS_ESTIMATOR.format(
        why="its state holds no hz.ZOState")) from None
  if _inside_branching_wrapper(opt_state):
    raise ValueError(
        "make_train_step moves the parameters itself and cannot run the "
        "zeroth-order estimator inside an optax wrapper that branches on its "
        "updates (optax.apply_if_finite, optax.MultiSteps). Put the wrapper "
        "downstream, e.g. optax.chain(hz.scale_by_hizoo(...), "
        "optax.apply_if_finite(optax.sgd(lr), 3)), or step with the plain "
        "tx.update (docs/api.md, optax wrappers).")
  probe = zo_state.PerturbationProbe()
  optimizer.update(None, opt_state, params, zo_probe=probe,
                   value=jnp.zeros([], jnp.float32))  # dead code
  if probe.perturbation is None:
    raise ValueError(_NEEDS_ESTIMATOR.format(
        why="this one never asked for the loss"))
  return probe.perturbation


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


def _moves(num_queries):
  """The parameter moves of one step, as (coeffs, queries) tables.

  Move ``m`` adds ``sum_t coeffs[m, t] * mu s z_{queries[m, t]}``. The moves
  are ``+z_0, -2 z_0, +z_0 + z_1, -2 z_1, ..., +z_{q-1}``: out to each query's
  plus side, across to its minus side, and back (merged with the way out to
  the next query). One term per move when q = 1, two otherwise.
  """
  if num_queries == 1:
    return (np.array([[1.0], [-2.0], [1.0]], np.float32),
            np.zeros((3, 1), np.int32))
  coeffs, queries = [], []
  for j in range(num_queries):
    coeffs += [[1.0 if j else 0.0, 1.0], [0.0, -2.0]]
    queries += [[max(j - 1, 0), j], [j, j]]
  coeffs.append([1.0, 0.0])
  queries.append([num_queries - 1, num_queries - 1])
  return np.array(coeffs, np.float32), np.array(queries, np.int32)


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
  """Whether the update can be the loop's last move (see :func:`_run`).

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


def _run(optimizer, opt_state, params, batch, loss_fn, perturbation,
         store_noise):
  """Evaluates, moves and updates in place.

  ``2 q + 1`` phases, the iterations of one loop: phase k evaluates L
  (HiZOO: L(theta) at phase 0; MeZO: nothing at phase 0), then makes move k
  of :func:`_moves`; the last move restores theta. When the optimizer keeps
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
  coeff_table, query_table = _moves(num_queries)
  num_phases = 2 * num_queries + 1
  update_in_loop = _update_in_loop(perturbation, opt_state, params)

  def loss_at(theta, where):
    return _checks.check_loss(loss_fn(theta, batch), where)

  deltas = None
  if store_noise:
    deltas = _stored_deltas(perturbation.shift, params, num_queries)

  def move(theta, state, m):
    coeffs, queries = _xla.computed_once(
        (jnp.asarray(coeff_table)[m], jnp.asarray(query_table)[m]),
        (jnp.asarray(m) >> 31).astype(jnp.uint32))
    terms = [(coeffs[t], queries[t]) for t in range(coeff_table.shape[1])]
    if deltas is not None:
      return _add_stored(theta, deltas, terms)
    shift = _perturbation(optimizer, state, theta).shift
    for coeff, query in terms:
      # One query: a constant, so that XLA merges the draw with the update's.
      theta = shift(theta, coeff, query if num_queries > 1 else 0)
    return theta

  def losses_of(losses):
    return (losses[0] if center_first else None), losses[1::2], losses[2::2]

  def skip(theta):
    del theta
    return jnp.zeros([], jnp.float32)

  def body(k, carry):
    theta, losses, state = carry
    if center_first and perturbation.center_every > 1:
      # L(theta) only on the steps that probe the curvature.
      count = zo_state.find_state(state).count
      evaluate = (k > 0) | (count % perturbation.center_every == 0)
      loss = lax.cond(evaluate, lambda t: loss_at(t, "a point of the step"),
                      skip, theta)
    elif center_first:
      loss = loss_at(theta, "a point of the step")
    else:  # MeZO: phase 0 only moves out.
      loss = lax.cond(k == 0, skip,
                      lambda t: loss_at(t, "theta +/- mu*s*z"), theta)
    # The move waits for the loss, which reads theta before it is moved:
    # (l != l) & (l == l) is False, but XLA cannot prove it. Opaque to XLA:
    # z and H^{-1/2} stay inside the loop, never stored.
    after_loss = ((loss != loss) & (loss == loss)).astype(k.dtype)
    k, state = lax.optimization_barrier((k + after_loss, state))
    losses = losses.at[k].set(loss)
    theta = move(theta, state, k)
    if update_in_loop:
      # Stored, not recomputed in every leaf's fusion.
      last = _xla.computed_once(k == num_phases - 1,
                                (k >> 31).astype(jnp.uint32))
      updates, new_state = optimizer.update(
          None, state, theta, zo_losses=losses_of(losses), zo_final=last,
          value=_value(losses_of(losses)))
      theta = jax.tree.map(lambda n, r: jnp.where(last, n, r),
                           optax.apply_updates(theta, updates), theta)
      state = jax.tree.map(
          lambda n, o: jnp.where(last, n, o).astype(o.dtype), new_state, state)
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


def _walk(optimizer, opt_state, params, batch, loss_fn, perturbation):
  """The lean step driven by the estimator's scheme, in place.

  One loop over the phases of :func:`hizoo_jax.core.scheme.walk`: phase k
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
    return _moving(_perturbation(optimizer, state, theta))

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


def _moving(perturbation: zo_state.Perturbation) -> zo_state.Perturbation:
  """``perturbation`` with a ``move`` (the compact program's gives
  ``shift``, a query at a time) and a scheme, for :func:`_walk`."""
  if perturbation.move is not None:
    return perturbation

  def move(tree, coeffs, queries):
    for t in range(coeffs.shape[0]):
      tree = perturbation.shift(tree, coeffs[t], queries[t])
    return tree

  center = perturbation.center_every if perturbation.evaluates_center else 0
  return perturbation._replace(
      move=move, scheme=schemes.central(perturbation.num_queries, center))


def make_train_step(
    optimizer: optax.GradientTransformationExtraArgs,
    loss_fn: Callable[[Params, Batch], jax.Array],
    *,
    store_noise: bool = False,
    donate: bool = True,
) -> Callable[[Params, Any, Batch], tuple[Params, Any, Metrics]]:
  """A jitted zeroth-order step that needs the memory of inference.

  The step evaluates ``loss_fn`` at the points the optimizer's estimator asks
  for (HiZOO: theta, theta + mu s z, theta - mu s z; MeZO: the two sides),
  moving the parameters in place between evaluations, then restores them and
  applies the optimizer's update in the same pass. Peak memory is that of
  ``loss_fn`` plus the optimizer state (H for HiZOO, Adam's moments in a chain
  with ``optax.scale_by_adam``); see ``docs/performance.md``.

  Args:
    optimizer: an optax transformation containing one zeroth-order estimator
      (an alias such as :func:`hizoo_jax.hizoo` or a chain starting with
      :func:`hizoo_jax.scale_by_hizoo` / :func:`hizoo_jax.scale_by_mezo`).
    loss_fn: ``loss_fn(params, batch)`` returning a float scalar.
    store_noise: compute ``mu * s * z`` once per step and keep it (one float32
      copy of the trainable parameters per query) instead of regenerating z
      for each of the three moves. For accelerators with memory to spare;
      the update still regenerates z.
    donate: donate ``params`` and ``opt_state`` (needed for the in-place
      schedule; the caller must not reuse the arrays it passed).

  Returns:
    ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, a
    ``jax.jit`` function. ``metrics`` holds ``loss`` (L(theta); MeZO: the
    mean of the two sides), ``loss_plus``, ``loss_minus`` (means over
    queries), ``projected_grad`` (mean of (l+ - l-) / (2 mu)) and
    ``skipped`` (steps skipped so far for a non-finite loss).

  Raises:
    ValueError: (when traced) if the optimizer has no zeroth-order estimator,
      or ``loss_fn`` does not return a scalar.
    TypeError: (when traced) if ``loss_fn`` returns a non-float value.

  Example:
    >>> import jax.numpy as jnp, hizoo_jax as hz
    >>> params = {"w": jnp.ones((2, 3))}
    >>> loss_fn = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
    >>> tx = hz.hizoo(learning_rate=1e-3, mu=1e-3, hessian_smooth=1e-6)
    >>> step = hz.make_train_step(tx, loss_fn)
    >>> params, state, metrics = step(params, tx.init(params), jnp.ones((4, 2)))
    >>> sorted(metrics)
    ['loss', 'loss_minus', 'loss_plus', 'projected_grad', 'skipped']
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
  if not hasattr(optimizer, "update") or not hasattr(optimizer, "init"):
    raise TypeError(
        "optimizer must be an optax GradientTransformation, got "
        f"{optimizer!r}.")

  def step(params, opt_state, batch):
    _checks.check_params(params)
    perturbation = _perturbation(optimizer, opt_state, params)
    exact = any(map(precision.is_low_precision, jax.tree.leaves(params)))
    if perturbation.move is not None or exact:
      # The plain program, or low-precision leaves (their points are exact).
      new_params, new_state = _walk(
          optimizer, opt_state, params, batch, loss_fn,
          _moving(perturbation))
    else:
      new_params, new_state = _run(
          optimizer, opt_state, params, batch, loss_fn, perturbation,
          bool(store_noise))
    zo = zo_state.find_state(new_state)
    metrics = {name: getattr(zo, name) for name in zo._fields
               if name not in _NOT_METRICS}
    return new_params, new_state, metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else (),
                 compiler_options=_xla.step_compiler_options())
