"""MeZO and HiZOO in the compact program (:mod:`hizoo_jax.program`).

The mathematics is :mod:`hizoo_jax.core.estimators`'s, step for step: the
losses at theta and ``theta +/- mu s z``, ``g = (l+ - l-) / (2 mu)``, the
curvature rule's update of H from ``q``, and the direction ``g z H^{-1/2}``.
What differs is how it is compiled for XLA:CPU, each device in its own
module: the leaves' noise read at leaf numbers held as data, so that
same-shaped leaves share kernels, and small leaves drawn together
(:mod:`hizoo_jax.leaf_draws`); H as one vector and the curvature's sums in one
loop (:mod:`hizoo_jax.grouped_curvature`); small values stored once
(:func:`hizoo_jax._xla.computed_once`); inside the lean step, the update
computed on every phase of its loop and kept on the last (``zo_final``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import _xla
from hizoo_jax import evaluation
from hizoo_jax import leaf_draws
from hizoo_jax import noise
from hizoo_jax import range_sums
from hizoo_jax import rules
from hizoo_jax.core import estimators as core
from hizoo_jax.core import paper_rule
from hizoo_jax.zo_state import Perturbation, ZOState

_OTHER_STRUCTURE = (
    "params do not have the structure the optimizer state was initialised "
    "with.")


def _flatten(config: core.Config, params):
  """Leaves, paths, treedef and the trainable flag of every leaf."""
  _checks.check_params(params)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [p for p, _ in paths_leaves]
  leaves = [x for _, x in paths_leaves]
  trainable = _checks.trainable_leaves(config.mask, params, treedef, paths)
  _checks.check_leaf_dtypes(leaves, paths, trainable)
  return leaves, paths, treedef, trainable


def _init(config: core.Config, rule: Optional[rules.Rule], params) -> ZOState:
  """The state: core's, with H in the rule's form and the leaf numbers."""
  leaves, paths, treedef, trainable = _flatten(config, params)
  hessian = stats = None
  if rule is not None:
    layers = _checks.stacked_leaves(config.stacked, params, treedef, paths)
    hessian = rule.join([
        _init_leaf(config, rule, x, layer) if keep else None
        for x, keep, layer in zip(leaves, trainable, layers)
    ], treedef, config.granularity)
    stats = rule.init_stats()
  numbers = treedef.unflatten(
      [jnp.asarray(i, jnp.uint32) for i in range(len(leaves))])
  return core.new_state(noise.key_words(config.key), hessian,
                        stats)._replace(leaf_numbers=numbers)


def _init_leaf(config: core.Config, rule: rules.Rule, x, layered: bool):
  """H_0 of one trainable leaf (as core.estimators._init_leaf)."""
  shape = jnp.shape(x)
  inner = shape[1:] if layered else shape  # layers are never factored over
  axes = paper_rule.factored_axes(inner, config.min_dim)
  if axes is not None and layered:
    axes = (axes[0] + 1, axes[1] + 1)
  dtype = (jnp.result_type(x) if isinstance(config.hessian_dtype, str)
           else config.hessian_dtype)
  return rule.init(shape, config.granularity, axes, dtype,
                   noise.explicit_sharding(x), layered)


def _hessian(rule: Optional[rules.Rule], state, treedef, leaves, paths,
             trainable):
  """H as the rule computes with it, checked against the params."""
  if rule is None:
    return None
  try:
    hess = rule.split(state.hessian, treedef)
  except (ValueError, TypeError) as e:
    raise ValueError(_OTHER_STRUCTURE) from e
  for h, x, path, keep in zip(rule.per_leaf(hess), leaves, paths, trainable):
    where = jax.tree_util.keystr(path)
    if keep != (h is not None):
      raise ValueError(
          f"parameter {where} is {'trainable' if keep else 'masked'} but its "
          "curvature state says otherwise; was the state initialised with "
          "another mask?")
    if keep and not rule.shapes_fit(h, jnp.shape(x)):
      raise ValueError(
          f"parameter {where} has shape {jnp.shape(x)} but its curvature "
          f"state has shapes {[jnp.shape(a) for a in jax.tree.leaves(h)]}; "
          "was the state initialised with other params or another estimator?")
  return hess


def _leaf_numbers(state, treedef) -> list:
  try:
    return treedef.flatten_up_to(state.leaf_numbers)
  except (ValueError, TypeError) as e:
    raise ValueError(_OTHER_STRUCTURE) from e


def _carry_state(rule: rules.Rule, state, carried: bool):
  """Perturbation.carry_state: H as one vector through the lean step's loop."""
  return state._replace(hessian=rule.carried_form(
      state.hessian, state.leaf_numbers, carried))


def _step_draws(config: core.Config, state, paths, numbers, leaves, trainable,
                active):
  """``(zero, draw, draws)``: the step's noise, leaf by leaf
  (:class:`leaf_draws.LeafDraws`), and per query for the rule's sums
  (:class:`noise.Draws`, whose sums run only where ``active``)."""
  zero = (state.count >> 31).astype(jnp.uint32)  # 0; XLA cannot prove it.
  q = config.num_queries
  # Every leaf's seed for every query: (q, leaves, 2), one small vector op.
  seeds = _xla.computed_once(noise.leaf_seeds(
      state.rng_key, state.count, jnp.arange(q, dtype=jnp.uint32)[:, None],
      paths), zero)
  draw = leaf_draws.leaf_draws(seeds, numbers, leaves, trainable, zero)
  # One draw per query for the rule's sums: a group of small leaves is then
  # drawn once, not once per leaf.
  at_query = [draw.at(j) for j in range(q)]
  draws = noise.Draws(z=lambda i, j, order=None: at_query[j](i, order),
                      zero=zero, seeds=seeds, active=active)
  return zero, draw, draws


def _shift(treedef, draw, mu, scale):
  """``shift(tree, coeff, query)``: ``tree + coeff mu s z_query``; ``scale()``
  gives H^{-1/2}'s reader (None: s = 1)."""
  def shift(tree, coeff, query):
    def step(zs, which):
      out = (coeff * mu) * zs[0]
      return out if scale is None else out * scale()(which)
    out = treedef.flatten_up_to(tree)
    for i, delta in enumerate(draw.values(step, [query])):
      if delta is not None:
        dtype = jnp.promote_types(out[i].dtype, jnp.float32)
        out[i] = (out[i].astype(dtype) + delta).astype(out[i].dtype)
    return treedef.unflatten(out)
  return shift


def _directions(draw, grad_used, leaves, new_scale, after):
  """``g z H^{-1/2}`` per leaf, averaged over queries (zeros where frozen)."""
  q = grad_used.shape[0]

  def direction(zs, which):
    out = sum(grad_used[j] * zs[j] for j in range(q)) / q
    return out if new_scale is None else out * new_scale(which)

  out = draw.values(direction, range(q), after)
  return [jnp.zeros_like(x) if d is None else d.astype(x.dtype)
          for x, d in zip(leaves, out)]


def transform(config: core.Config, rule: Optional[rules.Rule]
              ) -> optax.GradientTransformationExtraArgs:
  """HiZOO with the compact ``rule`` (:data:`hizoo_jax.rules.RULES`), or MeZO
  when it is None, from validated options."""
  every, q = config.every, config.num_queries
  signed = rule is rules.RULES["signed"]
  # Sums over rows or columns are noise passes of their own, except in the
  # signed rule's loop of sums (hizoo_jax.range_sums).
  light = (rule is None or config.granularity == "tensor"
           or (signed and range_sums.in_one_loop()))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra):
    del updates  # zeroth order: the incoming updates are not used.
    leaves, paths, treedef, trainable = _flatten(config, params)
    numbers = _leaf_numbers(state, treedef)
    hess = _hessian(rule, state, treedef, leaves, paths, trainable)
    probe = (state.count % every) == 0
    mu, valid = _checks.step_hyperparams(
        core.at_step(config.mu, state.count),
        config.rate if rule else None, state.count)
    # Inside hz.make_train_step's loop this update runs on every phase and
    # is kept on the last (zo_final): its draws then share the moves' fusion.
    final = extra.get("zo_final")
    zero, draw, draws = _step_draws(
        config, state, paths, numbers, leaves, trainable,
        probe if final is None else probe & final)
    scale = (functools.cache(lambda: rule.inv_sqrt(hess, numbers))
             if rule else None)  # traced only if a shift is taken
    shift = _shift(treedef, draw, mu, scale)
    if extra.get("zo_probe") is not None:
      extra["zo_probe"].perturbation = Perturbation(
          shift, q, rule is not None, every, light,
          functools.partial(_carry_state, rule) if rule else None)
      return jax.tree.map(jnp.zeros_like, params), state

    center, plus, minus = evaluation.losses(
        params, shift, value_fn, extra, q, rule is not None,
        probe if every > 1 else None)
    grad = (plus - minus) / (2 * mu)  # (q,); finite losses may overflow it
    finite = jnp.all(jnp.isfinite(grad)) & valid
    if rule is None:
      direction = _directions(draw, _xla.computed_once(
          jnp.where(finite, grad, 0.0).astype(jnp.float32), zero),
                              leaves, None, None)
      return treedef.unflatten(direction), core.stepped(
          state, finite, (jnp.mean(plus) + jnp.mean(minus)) / 2, plus, minus,
          grad)
    # (l+ - l0) + (l- - l0): exact in float32 where l+ + l- - 2 l0 is not.
    second = ((plus - center) + (minus - center)) / (2 * mu**2)  # (q,)
    finite &= jnp.all(jnp.isfinite(second)) | ~probe
    grad_used = _xla.computed_once(
        jnp.where(finite, grad, 0.0).astype(jnp.float32), zero)
    measured = finite & probe
    new_hess, stats, new_scale = rule.update(
        hess, state.curvature_stats,
        jnp.where(measured, second, 0.0).astype(jnp.float32), draws,
        [jnp.shape(x) for x in leaves], core.at_step(config.rate, state.count),
        measured, numbers)
    # Salted after the new H, the draw is never merged with the moves'
    # draws (XLA would store z), unless they share a fusion (zo_final).
    after = (None if final is not None
             else lambda i: rule.last_array(new_hess, i))
    direction = _directions(draw, grad_used, leaves, new_scale, after)
    loss = jnp.where(probe, center, (jnp.mean(plus) + jnp.mean(minus)) / 2)
    return treedef.unflatten(direction), core.stepped(
        state, finite, loss, plus, minus, grad, curvature_stats=stats,
        hessian=rule.store(new_hess, treedef, numbers))

  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, config, rule), update_fn)
