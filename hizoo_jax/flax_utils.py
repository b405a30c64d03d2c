"""Flax helpers: zeroth-order steps for NNX modules and Linen TrainStates.

The estimators need the loss as a function of the trainable parameters
(``value_fn``), not gradients. These helpers build that function from a loss
of the *model* (NNX) or of the params (Linen) and run one optimizer step.
Flax is imported lazily, so importing this module never requires it.

NNX::

  optimizer = nnx.Optimizer(model, hz.hizoo(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    return hz.nnx_zo_step(optimizer, model, loss_fn, x, y).loss

Linen (``flax.training.train_state.TrainState``)::

  state = TrainState.create(apply_fn=net.apply, params=params,
                            tx=hz.hizoo(1e-3))
  state, zo = jax.jit(hz.linen_zo_step, static_argnums=1)(
      state, loss_fn, batch)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import zo_state


def _reduce_float32(loss):
  """A per-example loss averaged in float32; a scalar passes through.

  The estimators divide ``l+ - l-`` by ``2 mu``: a mean taken in bfloat16
  (8 bits) rounds that difference to 0, so the reduction happens here.
  """
  loss = jnp.asarray(loss)
  if loss.ndim and jnp.issubdtype(loss.dtype, jnp.floating):
    return jnp.mean(loss.astype(jnp.float32))
  return loss


def nnx_value_fn(model, loss_fn: Callable, *args, wrt=None, **kwargs):
  """``value_fn(params_state)`` for an NNX model and ``loss_fn(model, ...)``.

  ``params_state`` is the pure ``nnx.State`` of the ``wrt`` variables (what
  ``nnx.Optimizer.update`` passes to the transformation as params); each
  call rebuilds a fresh copy of the model from it and from the model's other
  state *as it is now*, then returns ``loss_fn(copy, *args, **kwargs)``.
  So every evaluation sees the same batch statistics and the same RNG
  counts (dropout draws the same masks at theta + mu z and theta - mu z),
  and what ``loss_fn`` changes in the copy is discarded: ``model`` is never
  modified. ``loss_fn`` may return per-example losses (any shape, any float
  dtype): they are averaged in float32, so a bfloat16 model still resolves
  the small loss differences of a ZO step.

  Args:
    model: an ``nnx.Module``.
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``.
    *args: passed to ``loss_fn``.
    wrt: the filter of the trainable variables (default ``nnx.Param``).
    **kwargs: passed to ``loss_fn``.

  Returns:
    A function of the parameter state returning the loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from hizoo_jax.flax_utils import nnx_value_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> f = nnx_value_fn(model, lambda m, x: jnp.sum(m(x)), jnp.zeros((1, 2)))
    >>> f(nnx.state(model, nnx.Param))
    Array(0., dtype=float32)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  wrt = nnx.Param if wrt is None else wrt
  graphdef, _, rest = nnx.split(model, wrt, ...)
  # Pure arrays, not the model's Variable objects: nnx.merge would reuse
  # those, and the loss's updates would then land in the model itself.
  rest = nnx.as_pure(rest)

  def value_fn(params):
    copy = nnx.merge(graphdef, nnx.as_pure(params), rest)
    return _reduce_float32(loss_fn(copy, *args, **kwargs))

  return value_fn


def _updates_at_theta(model, wrt, loss_fn, *args, **kwargs):
  """The non-``wrt`` state one evaluation of the loss at theta leaves, or
  None if the loss changes nothing (checked by tracing it abstractly)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, params, rest = nnx.split(model, wrt, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def evaluate(params, rest):
    copy = nnx.merge(graphdef, params, rest)
    loss_fn(copy, *args, **kwargs)
    new_rest = nnx.as_pure(nnx.split(copy, wrt, ...)[2])
    changed = [a is not b for a, b in zip(jax.tree.leaves(new_rest),
                                          jax.tree.leaves(rest))]
    return new_rest, changed

  changed = []

  def probe(params, rest):
    new_rest, flags = evaluate(params, rest)
    changed.extend(flags)
    return new_rest

  jax.eval_shape(probe, params, rest)
  if not any(changed):
    return None
  # Under jit, XLA drops the forward pass if only RNG counts are kept.
  return evaluate(params, rest)[0]


def nnx_zo_step(optimizer, model, loss_fn: Callable, *args, **kwargs):
  """One zeroth-order step of an ``nnx.Optimizer`` on ``model`` in place.

  Like ``optimizer.update(model, model, value_fn=...)`` (the ``grads`` slot
  is ignored by the estimators, so nothing is differentiated), with the
  model's other state handled once per step:

  * every evaluation of the step (L(theta), L(theta +/- mu z)) runs on a
    copy of the model with the state it had before the step, so dropout
    draws the same masks in all of them and BatchNorm normalises with the
    same statistics; what the loss changes in those copies is discarded;
  * if the loss changes the model's state (BatchNorm running statistics,
    RNG counts), those changes are then kept once, as one evaluation at
    theta (the parameters before the step) makes them: the RNG streams move
    on once per step, and running statistics are never taken at a perturbed
    point. This costs one more forward pass when batch statistics are kept
    (none under jit when only RNG counts change).

  Works eagerly and under ``nnx.jit``.

  Args:
    optimizer: ``nnx.Optimizer(model, tx, wrt=...)`` with ``tx`` one of
      :func:`hizoo_jax.hizoo`, :func:`hizoo_jax.hizoo_l`,
      :func:`hizoo_jax.mezo` (or a chain containing an estimator).
    model: the model the optimizer was created for; updated in place.
    loss_fn: ``loss_fn(model, *args, **kwargs)``, a scalar or per-example
      losses (averaged in float32); lower is better, need not be
      differentiable.
    *args: passed to ``loss_fn``, e.g. a batch.
    **kwargs: passed to ``loss_fn``.

  Returns:
    The step's :class:`hizoo_jax.ZOState` (``.loss`` is L(theta) for HiZOO,
    the mean of L(theta +/- mu z) for MeZO; also ``.projected_grad``,
    ``.skipped``).

  Example:
    >>> import jax, jax.numpy as jnp, hizoo_jax as hz
    >>> from flax import nnx
    >>> from hizoo_jax.flax_utils import nnx_zo_step
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, hz.hizoo(0.1, hessian_smooth=1e-2),
    ...                     wrt=nnx.Param)
    >>> x, y = jnp.ones((4, 2)), jnp.ones((4, 1))
    >>> loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> zo = nnx_zo_step(opt, model, loss, x, y)
    >>> int(opt.step[...])
    1
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  value_fn = nnx_value_fn(model, loss_fn, *args, wrt=optimizer.wrt, **kwargs)
  kept = _updates_at_theta(model, optimizer.wrt, loss_fn, *args, **kwargs)
  optimizer.update(model, model, value_fn=value_fn)
  if kept is not None:
    nnx.update(model, kept)
  return zo_state.find_state(nnx.as_pure(optimizer.opt_state))


def linen_zo_step(state, loss_fn: Callable, *args, **kwargs):
  """One zeroth-order step of a Linen ``TrainState``-like state.

  ``TrainState.apply_gradients`` does not forward extra arguments to the
  transformation, so this does its work with ``value_fn``: it calls
  ``state.tx.update(None, state.opt_state, state.params, value_fn=...)``,
  applies the updates and increments ``state.step``.

  A Linen loss is a pure function of ``(params, *args)``, so every
  evaluation of the step sees the same model state and, if ``args`` holds a
  dropout key (``rngs={"dropout": key}``), the same dropout masks: pass a
  key folded with the step (``jax.random.fold_in(key, state.step)``) so
  that steps differ. Updated batch statistics (``mutable=["batch_stats"]``)
  cannot come back through the optimizer: compute them at theta yourself
  (one ``apply_fn`` call with the step's batch) and store them in the state.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or any dataclass with
      ``params``, ``opt_state``, ``tx``, ``step`` and ``replace``) whose
      ``tx`` is a zeroth-order optimizer.
    loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar or per-example
      losses (averaged in float32); use ``state.apply_fn`` inside it.
    *args: passed to ``loss_fn``.
    **kwargs: passed to ``loss_fn``.

  Returns:
    ``(new_state, zo_state)``: the updated state and the step's
    :class:`hizoo_jax.ZOState`. Jit it with ``static_argnums=1`` (the loss).

  Example:
    >>> import jax, jax.numpy as jnp, hizoo_jax as hz
    >>> import flax.linen as nn
    >>> from flax.training.train_state import TrainState
    >>> from hizoo_jax.flax_utils import linen_zo_step
    >>> net = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.ones((4, 1))
    >>> state = TrainState.create(
    ...     apply_fn=net.apply, params=net.init(jax.random.key(0), x),
    ...     tx=hz.mezo(0.05))
    >>> def loss(params, x, y):
    ...   return jnp.mean((state.apply_fn(params, x) - y) ** 2)
    >>> state, zo = jax.jit(linen_zo_step, static_argnums=1)(state, loss, x, y)
    >>> int(state.step)
    1
  """
  def value_fn(params):
    return _reduce_float32(loss_fn(params, *args, **kwargs))

  updates, opt_state = state.tx.update(
      None, state.opt_state, state.params, value_fn=value_fn)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  return new_state, zo_state.find_state(opt_state)


def cast_floating(tree: Any, dtype=jnp.bfloat16) -> Any:
  """Cast the floating leaves of a tree (e.g. HF Flax params) to ``dtype``.

  The estimators keep their curvature in float32 whatever the parameter
  dtype, so bf16 parameters train with an fp32 Hessian estimate. The steps
  themselves are usually too small for bf16 weights and round away: wrap the
  optimizer in :func:`hizoo_jax.master_weights` (see docs/api.md).

  Args:
    tree: a parameter tree.
    dtype: the target float dtype.

  Returns:
    A tree like ``tree`` (integer leaves unchanged).

  Example:
    >>> import jax.numpy as jnp
    >>> from hizoo_jax.flax_utils import cast_floating
    >>> cast_floating({"w": jnp.ones(2), "i": jnp.arange(2)})["w"].dtype
    dtype(bfloat16)
  """
  return jax.tree.map(
      lambda x: jnp.asarray(x).astype(dtype)
      if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)
