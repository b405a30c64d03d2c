"""Frozen leaves without downstream state: :func:`masked_chain`.

``mask=`` keeps the estimator away from frozen leaves, but the
transformations chained after it (``optax.scale_by_adam``, ``optax.trace``,
...) still build their state from the full params: Adam keeps two moments
for every frozen weight, and an integer leaf's moment turns from int32 into
float32 after the first step (a recompilation, and a checkpoint whose dtypes
no longer match ``tx.init(params)``). ``optax.masked`` cannot wrap the
estimator itself, because it hides the frozen leaves' values and the loss
needs all of them. :func:`masked_chain` runs the estimator on the full params
and only the downstream part on the trainable leaves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import skipping
from hizoo_jax import zo_state


class MaskedTailState(NamedTuple):
  """State of the downstream chain, with ``optax.MaskedNode`` for frozen leaves."""

  inner_state: Any


def _hide(tree, flags):
  """``tree`` with ``optax.MaskedNode()`` in place of its frozen leaves."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([
      x if keep else optax.MaskedNode()
      for x, keep in zip(leaves, treedef.flatten_up_to(flags))])


def _flags(mask, tree):
  """A full tree of Python bools like ``tree``."""
  return jax.tree.map(bool, _checks.full_mask(mask, tree))


def _check_estimator_mask(estimator, params, flags) -> None:
  """Raises unless ``estimator`` perturbs exactly the trainable float leaves.

  Traced abstractly (``jax.eval_shape``): nothing is computed. The estimator's
  probe gives its ``shift``; a leaf that ``shift`` returns unchanged (the same
  object) is one the estimator leaves alone.
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  moved = []

  not_an_estimator = ValueError(
      "masked_chain's first argument must be a zeroth-order estimator "
      "(hz.scale_by_hizoo, hz.scale_by_mezo or an alias).")

  def probe(params):
    state = estimator.init(params)
    try:  # A first-order transformation would fail on updates=None.
      zo_state.find_state(state)
    except ValueError:
      raise not_an_estimator from None
    found = zo_state.PerturbationProbe()
    estimator.update(None, state, params, zo_probe=found)
    if found.perturbation is None:
      raise not_an_estimator
    zeros = jax.tree.map(jnp.zeros_like, params)
    shifted = found.perturbation.shift(zeros, 1.0, 0)
    moved.extend(a is not b for a, b in zip(
        jax.tree.leaves(zeros), jax.tree.leaves(shifted)))
    return jnp.zeros([])

  jax.eval_shape(probe, params)
  for (path, x), keep, is_moved in zip(
      paths_leaves, treedef.flatten_up_to(flags), moved):
    floating = jnp.issubdtype(jnp.result_type(x), jnp.floating)
    if floating and keep != is_moved:
      what = "perturbs" if is_moved else "does not perturb"
      raise ValueError(
          f"the estimator {what} {jax.tree_util.keystr(path)}, which mask "
          f"{'freezes' if not keep else 'trains'}: build the estimator with "
          "the same mask, e.g. hz.masked_chain(hz.scale_by_hizoo(mu, alpha, "
          "mask=m), optax.scale_by_adam(), ..., mask=m).")


def masked_chain(estimator, *downstream, mask) -> (
    optax.GradientTransformationExtraArgs):
  """``optax.chain(estimator, *downstream)`` with no downstream state for frozen leaves.

  The estimator sees the full params (the loss needs them) and must be built
  with the same ``mask`` (checked at ``init``). The downstream
  transformations see only the trainable leaves, as in ``optax.masked``;
  frozen leaves get zero updates of their own dtype, so integer leaves stay
  integer and the state's dtypes never change.

  Args:
    estimator: :func:`hizoo_jax.scale_by_hizoo`, :func:`hizoo_jax.scale_by_mezo`
      (or an alias) built with ``mask=mask``.
    *downstream: optax transformations applied to the estimator's output,
      e.g. ``optax.scale_by_adam(), optax.scale_by_learning_rate(1e-4)``.
    mask: a tree of bools like params or a prefix of it (``{"base": False,
      "lora": True}``), or a callable returning one; False freezes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``(estimator_state, MaskedTailState(downstream_state))``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"base": {"w": jnp.ones((4, 4))}, "lora": jnp.zeros(4)}
    >>> mask = {"base": False, "lora": True}
    >>> tx = hz.masked_chain(hz.scale_by_mezo(1e-3, mask=mask),
    ...                      optax.scale_by_adam(),
    ...                      optax.scale_by_learning_rate(1e-2), mask=mask)
    >>> state = tx.init(params)
    >>> adam = state[1].inner_state[0]
    >>> adam.mu["base"], adam.mu["lora"].shape
    ({'w': MaskedNode()}, (4,))
    >>> updates, state = tx.update(
    ...     None, state, params, value_fn=lambda p: jnp.sum(p["lora"] ** 2))
    >>> float(jnp.abs(updates["base"]["w"]).max())
    0.0
  """
  if mask is None:
    raise ValueError("masked_chain needs a mask (use optax.chain without one).")
  tail = optax.chain(*downstream) if downstream else optax.identity()

  def tail_init(params):
    return MaskedTailState(tail.init(_hide(params, _flags(mask, params))))

  def tail_update(updates, state, params=None, **extra_args):
    del extra_args  # value_fn and friends belong to the estimator only.
    flags = _flags(mask, updates if params is None else params)
    hidden_params = None if params is None else _hide(params, flags)
    inner, inner_state = tail.update(
        _hide(updates, flags), state.inner_state, hidden_params)
    leaves, treedef = jax.tree.flatten(updates)
    out = [new if keep else jnp.zeros_like(old) for old, new, keep in zip(
        leaves, treedef.flatten_up_to(inner), treedef.flatten_up_to(flags))]
    return treedef.unflatten(out), MaskedTailState(inner_state)

  chained = skipping.chain(  # a skipped step moves nothing downstream
      estimator, optax.GradientTransformationExtraArgs(tail_init, tail_update))

  def init_fn(params):
    _checks.check_params(params)
    _check_estimator_mask(estimator, params, _flags(mask, params))
    return chained.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, chained.update)
