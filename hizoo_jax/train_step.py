"""A zeroth-order training step with the memory of inference.

:func:`make_train_step` runs one step of any optimizer that contains a
zeroth-order estimator (the aliases, or a chain around ``scale_by_hizoo``,
``scale_by_mezo``, ``scale_by_fzoo``) with the parameters moved in place to
each point the estimator evaluates and z regenerated, never stored. It asks
the estimator for its points (``zo_probe``: a Perturbation, traced only) and
runs one of two loops: the scheme's walk (:mod:`hizoo_jax.scheme_walk`) for
the plain program and for bf16/fp16 parameters, or the compact program's
loop, which also computes the update inside it
(:mod:`hizoo_jax.compact_loop`). Either way the update is the optimizer's own
``update`` fed with the measured losses (``zo_losses``), so the result equals
the plain ``tx.update`` path up to the float rounding of the moves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import _xla
from hizoo_jax import compact_loop
from hizoo_jax import precision
from hizoo_jax import scheme_walk
from hizoo_jax import zo_state

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
    >>> tx = hz.hizoo(learning_rate=1e-3, mu=1e-3)
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
    if perturbation.loop != "compact" or exact:
      # The plain program, or low-precision leaves (their points are exact).
      new_params, new_state = scheme_walk.walk(
          optimizer, opt_state, params, batch, loss_fn, perturbation,
          _perturbation)
    else:
      new_params, new_state = compact_loop.run(
          optimizer, opt_state, params, batch, loss_fn, perturbation,
          bool(store_noise), _perturbation)
    zo = zo_state.find_state(new_state)
    metrics = {name: getattr(zo, name) for name in zo._fields
               if name not in _NOT_METRICS}
    return new_params, new_state, metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else (),
                 compiler_options=_xla.step_compiler_options())
