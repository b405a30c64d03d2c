"""bfloat16 / float16 parameters: updates that do not round away.

A zeroth-order step moves each weight by ``lr * g * z``, often far less than
half the spacing of bfloat16 numbers near the weight (up to ``2**-8 |w|``): rounded
to the nearest, ``w + update`` is ``w`` again, and nothing learns. Two
remedies, as wrappers around a whole optimizer (estimator included):

* :func:`master_weights` keeps a float32 copy of the low-precision leaves in
  the state, steps it, and returns the updates that make the parameters its
  rounding. Through ``tx.update`` the loss is evaluated at the float32 copy;
  in :func:`hizoo_jax.make_train_step` at each point computed from the copy
  and rounded once to the parameter dtype. Costs 4 bytes per low-precision
  parameter.
* :func:`stochastic_rounding` rounds ``w + update`` up or down at random with
  the probabilities that make it exact on average. No extra memory; the
  random bits come from the estimator's key and step count.

:func:`warn_on_rounding` (already at the end of :func:`hizoo_jax.hizoo`,
``hizoo_l`` and ``mezo``) warns once when most updates of low-precision
leaves round away. Measurements in ``docs/api.md``.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hizoo_jax import _checks
from hizoo_jax import _xla
from hizoo_jax import leaf_draws
from hizoo_jax import noise
from hizoo_jax import zo_state

# Salt for the rounding noise's query index: unlike any num_queries in use,
# so the rounding bits are independent of every z of the step.
_ROUNDING_QUERY = 0x5EED
# warn_on_rounding counts a sample: each leaf it counts is a fusion with its
# own copy of the update's noise generator (the count cannot share the
# update's fusion; counting every leaf doubled the step's program for bf16
# parameters), and XLA stores that leaf's update. The leading entries of a
# few of the smallest trainable matrices tell whether the weights' steps
# round away, for the temporaries of a small matrix.
_SAMPLE_LEAVES = 4
_SAMPLE_SIZE = 4096


def is_low_precision(x) -> bool:
  """True for floating leaves narrower than float32 (bfloat16, float16)."""
  dtype = jnp.result_type(x)
  return bool(jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4)


# Depth of stochastic_rounding updates being traced: their inner optimizer's
# warn_on_rounding would report steps that the rounding then keeps.
_HANDLED = [0]


@contextlib.contextmanager
def _rounding_handled():
  _HANDLED[0] += 1
  try:
    yield
  finally:
    _HANDLED[0] -= 1


class MasterWeightsState(NamedTuple):
  """float32 copies of the low-precision leaves, and the inner state."""

  master: Any  # float32 like params; optax.MaskedNode() for other leaves.
  inner_state: Any


def merge(master, params):
  """params with the master copy in place of its low-precision leaves."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      x if isinstance(m, optax.MaskedNode) else m
      for x, m in zip(leaves, treedef.flatten_up_to(master))])


def master_weights(inner) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on float32 master copies of bf16/fp16 parameters.

  The inner optimizer (an alias such as :func:`hizoo_jax.hizoo`, or a chain
  starting with an estimator) sees float32 parameters, so ``value_fn`` is
  evaluated at float32 points (a model that computes in bfloat16 casts them
  itself). The returned updates take each low-precision parameter to its
  float32 master rounded to nearest: ``optax.apply_updates(params, updates)``
  then holds exactly that rounding (when the step is small against the
  weight). Other leaves pass through unchanged. The master copy is the
  truth: changes made to the parameters outside the optimizer are lost.

  Args:
    inner: the zeroth-order optimizer to wrap.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``MasterWeightsState(master, inner_state)``. Works in
    :func:`hizoo_jax.make_train_step`: each point of the step is computed
    from the master copy and rounded once to the parameter dtype.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.full(4, 1.5, jnp.bfloat16)}
    >>> loss = lambda p: jnp.sum((p["w"].astype(jnp.float32) - 1.6) ** 2)
    >>> tx = hz.master_weights(hz.mezo(1e-2))
    >>> state = tx.init(params)
    >>> state.master["w"].dtype
    dtype('float32')
    >>> for _ in range(20):
    ...   updates, state = tx.update(None, state, params, value_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.all(params["w"] > 1.5))
    True
  """

  def init_fn(params):
    master = jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32) if is_low_precision(x)
        else optax.MaskedNode(), params)
    return MasterWeightsState(master, inner.init(merge(master, params)))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("master_weights needs params: update(updates, state, "
                       "params, value_fn=...).")
    # In hz.make_train_step (zo_probe, zo_losses) the inner estimator moves
    # the master copy: the step evaluates each point's rounding to the
    # parameter dtype, computed from the master.
    full = merge(state.master, params)
    inner_updates, inner_state = inner.update(
        updates, state.inner_state, full, **extra_args)
    leaves, treedef = jax.tree.flatten(params)
    new_master, out = [], []
    for x, m, u in zip(leaves, treedef.flatten_up_to(state.master),
                       treedef.flatten_up_to(inner_updates)):
      if isinstance(m, optax.MaskedNode):
        new_master.append(m)
        out.append(u)
        continue
      m = m + u.astype(jnp.float32)
      new_master.append(m)
      # The step from x to m's rounding: exact in x's dtype while it is a
      # few units in the last place of x (Sterbenz).
      target = m.astype(x.dtype).astype(jnp.float32)
      out.append((target - x.astype(jnp.float32)).astype(x.dtype))
    return treedef.unflatten(out), MasterWeightsState(
        treedef.unflatten(new_master), inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def round_stochastic(x: jax.Array, dtype, u: jax.Array) -> jax.Array:
  """float32 ``x`` to ``dtype``, up or down so that the mean is ``x``.

  Args:
    x: float32 values.
    dtype: a narrower float dtype (bfloat16, float16).
    u: uniform samples on (0, 1) shaped like ``x``.

  Returns:
    ``x`` rounded to one of its two neighbours in ``dtype``: the far one with
    probability ``|x - near| / |far - near|``.
  """
  near = x.astype(dtype)
  gap = x - near.astype(jnp.float32)
  far = jnp.nextafter(near, jnp.where(gap > 0, jnp.inf, -jnp.inf).astype(dtype))
  spacing = jnp.abs(far.astype(jnp.float32) - near.astype(jnp.float32))
  return jnp.where(u * spacing < jnp.abs(gap), far, near)


def _uniform(seed, shape, sharding=None):
  return noise.uniform(noise.random_bits(seed, shape, sharding))


def stochastic_rounding(inner) -> optax.GradientTransformationExtraArgs:
  """Applies ``inner``'s updates to bf16/fp16 leaves with stochastic rounding.

  For each low-precision leaf the returned update takes ``w`` to
  ``round_stochastic(w + u)`` (computed in float32), whose expectation is
  ``w + u``: a step far below the spacing of the dtype still moves the
  weight, with the right probability. The random bits are drawn from the
  estimator's key and step count (independent of every z of the step). No
  state beyond ``inner``'s; works with :func:`hizoo_jax.make_train_step`.

  Args:
    inner: a zeroth-order optimizer (alias or chain with an estimator).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.full(64, 1.5, jnp.bfloat16)}
    >>> loss = lambda p: jnp.sum((p["w"].astype(jnp.float32) - 1.6) ** 2)
    >>> tx = hz.stochastic_rounding(hz.mezo(1e-2, mu=1e-2))
    >>> state = tx.init(params)
    >>> for _ in range(20):
    ...   updates, state = tx.update(None, state, params, value_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.mean(params["w"].astype(jnp.float32)) > 1.5)
    True
  """

  def update_fn(updates, state, params=None, **extra_args):
    with _rounding_handled():
      inner_updates, new_state = inner.update(updates, state, params,
                                              **extra_args)
    if params is None or extra_args.get("zo_probe") is not None:
      return inner_updates, new_state
    zo = zo_state.find_state(new_state)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    zero = (zo.count >> 31).astype(jnp.uint32)  # 0; XLA cannot prove it.
    seeds = _xla.computed_once(
        noise.leaf_seeds(zo.rng_key, zo.count, _ROUNDING_QUERY,
                         [p for p, _ in paths_leaves]), zero)
    # Read at the leaves' numbers: same-shaped leaves share a kernel. (The
    # estimator saw these params and checked that its numbers fit them.)
    leaves = [x for _, x in paths_leaves]
    low = [is_low_precision(x) for x in leaves]
    numbers = getattr(zo, "leaf_numbers", None)  # None: the plain program
    numbers = ([zero + jnp.uint32(i) for i in range(len(leaves))]
               if numbers is None else treedef.flatten_up_to(numbers))
    uniform = leaf_draws.leaf_draws(
        seeds[None], numbers, leaves, low, zero, sample=_uniform).at(0)
    out = []
    for i, (x, u) in enumerate(zip(leaves, treedef.flatten_up_to(
        inner_updates))):
      if not low[i]:
        out.append(u)
        continue
      x32 = x.astype(jnp.float32)
      new = round_stochastic(x32 + u.astype(jnp.float32), x.dtype, uniform(i))
      out.append((new.astype(jnp.float32) - x32).astype(x.dtype))
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _report_rounding(lost, moved, final=True) -> None:
  """Host side of :func:`warn_on_rounding`."""
  if bool(final) and int(moved) and int(lost) * 2 > int(moved):
    _checks.warn_once(
        "rounded",
        f"{int(lost)} of {int(moved)} non-zero updates of bfloat16/float16 "
        "parameters round away (w + update == w in the parameter dtype): "
        "those weights do not learn. Wrap the optimizer in "
        "hz.master_weights(...) or hz.stochastic_rounding(...), or keep the "
        "parameters in float32 (see docs/api.md, Low precision).")


def _leading_block(shape, size: int) -> tuple:
  """Index of the leading entries of an array of ``shape``: about ``size``
  of them (at least one, whole rows of the axes that fit)."""
  index = []
  for axis, n in enumerate(shape):
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    take = max(1, min(n, -(-size // inner)))
    index.append(slice(0, take))
    if take > 1 or inner <= size:
      break
  return tuple(index)


def _rounding_sample(pairs: list) -> list:
  """The (param, update) pairs the rounding check counts: the leading
  entries of the smallest matrices (of the smallest leaves if none is a
  matrix; whole leaves where Explicit mesh axes shard them: slicing those
  may need a collective)."""
  matrices = [i for i, (x, _) in enumerate(pairs) if jnp.ndim(x) >= 2]
  chosen = sorted(matrices or range(len(pairs)),
                  key=lambda i: jnp.size(pairs[i][0]))[:_SAMPLE_LEAVES]
  sample = []
  for i in sorted(chosen):
    x, u = pairs[i]
    if jnp.ndim(x) and noise.on_no_explicit_axis(x):
      index = _leading_block(jnp.shape(x), _SAMPLE_SIZE)
      x, u = x[index], u[index]
    sample.append((x, u))
  return sample


def warn_on_rounding(inner=None, mask=None
                     ) -> optax.GradientTransformationExtraArgs:
  """``inner`` (default: identity), warning once when updates round away.

  Put it last in a chain. For low-precision parameters it counts, in a
  sample of the updates, the non-zero ones for which ``w + update`` rounds
  back to ``w``; if that is more than half of them, a ``RuntimeWarning`` is
  issued (once per process, from a ``jax.debug.callback``). The sample: the
  first ~4096 entries of each of the 4 smallest trainable low-precision
  matrices (leaves, if none is a matrix). Counting every leaf drew each
  update's noise again, leaf by leaf, and XLA stores each counted leaf's
  update. float32 parameters add no computation.

  Args:
    inner: the transformation whose updates are checked (its state is kept
      as is, so wrapping adds no state).
    mask: the trainable leaves (a tree of bools, a prefix of params or a
      callable, as in the aliases); the sample is taken among them. None:
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.
  """
  inner = optax.identity() if inner is None else inner
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    if (params is None or extra_args.get("zo_probe") is not None
        or _HANDLED[0]):
      return updates, state
    trainable = (jax.tree.map(lambda _: True, params) if mask is None
                 else _checks.full_mask(mask, params))
    pairs = [(x, u) for x, u, keep in zip(
        jax.tree.leaves(params), jax.tree.leaves(updates),
        jax.tree.leaves(trainable)) if keep and is_low_precision(x)]
    if pairs:
      lost = moved = jnp.zeros([], jnp.int32)
      for x, u in _rounding_sample(pairs):
        step = u.astype(jnp.float32) != 0
        same = (x.astype(jnp.float32) + u.astype(jnp.float32)).astype(
            x.dtype) == x
        moved_x, lost_x = _xla.fused_counts(step, step & same)
        moved += moved_x
        lost += lost_x
      final = extra_args.get("zo_final", True)
      jax.debug.callback(_report_rounding, lost, moved, final)
    return updates, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def reset_warnings() -> None:
  """Lets the once-per-process warnings of this module fire again (tests)."""
  _checks.WARNED.clear()


__all__ = ["MasterWeightsState", "master_weights", "round_stochastic",
           "stochastic_rounding", "warn_on_rounding", "is_low_precision",
           "reset_warnings"]
