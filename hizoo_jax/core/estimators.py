"""MeZO and HiZOO as Optax transformations, written as the papers state them.

One step of either evaluates the loss at the points of its scheme
(:mod:`hizoo_jax.core.scheme`), from the step's noise z (drawn per leaf and
never stored, :mod:`hizoo_jax.core.leafwise`), and returns a gradient-like
tree for downstream transformations:

    MeZO:   l_pm = L(theta +/- mu z),               g = (l+ - l-) / (2 mu),
            returns g z
    HiZOO:  s = H^{-1/2},  l0 = L(theta),  l_pm = L(theta +/- mu s z),
            q = ((l+ - l0) + (l- - l0)) / (2 mu^2),  H <- rule(H, q, z),
            returns g z H_new^{-1/2}

averaged over ``num_queries`` draws of z. A non-finite loss or hyperparameter
skips the step: zero updates, H unchanged, counted in ``skipped``.

The estimators reach the leaves through a :class:`Program`: :data:`PLAIN`
here, or :data:`hizoo_jax.compact.PROGRAM`, the same mathematics compiled
for XLA:CPU (:mod:`hizoo_jax.program` chooses).
The public constructors with their options are
:func:`hizoo_jax.scale_by_mezo` and :func:`hizoo_jax.scale_by_hizoo`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import noise
from hizoo_jax.core import leafwise
from hizoo_jax.core import paper_rule
from hizoo_jax.core import rules
from hizoo_jax.core import scheme as schemes
from hizoo_jax.zo_state import Perturbation, ZOState


OTHER_STRUCTURE = ("params do not have the structure the optimizer state "
                   "was initialised with.")


class Config(NamedTuple):
  """An estimator's validated options (see :func:`hizoo_jax.scale_by_hizoo`)."""

  mu: Any  # float or schedule of the step count.
  num_queries: int
  mask: Any
  key: Any
  rule: Optional[rules.Rule] = None  # None: MeZO.
  rate: Any = None  # hessian_smooth: float or schedule.
  granularity: Optional[str] = None
  min_dim: int = 128
  every: int = 1  # curvature_every
  hessian_dtype: Any = jnp.float32  # or "param"
  stacked: Any = None


def at_step(value, count) -> jax.Array:
  """A float or a schedule's value at ``count``, as float32."""
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def new_state(words, hessian=None, stats=None, leaf_numbers=None) -> ZOState:
  def zero():  # a distinct buffer per field, so the state can be donated.
    return jnp.zeros([], jnp.float32)
  return ZOState(count=jnp.zeros([], jnp.int32), rng_key=words,
                 leaf_numbers=leaf_numbers, hessian=hessian,
                 curvature_stats=stats,
                 loss=zero(), loss_plus=zero(), loss_minus=zero(),
                 projected_grad=zero(), skipped=jnp.zeros([], jnp.int32))


def plain_perturbation(config, scheme, leaves, move) -> Perturbation:
  """The lean step's Perturbation: the scheme's points as data, walked with
  ``move`` (:mod:`hizoo_jax.scheme_walk`)."""
  del config, leaves  # all in the scheme and the move
  return Perturbation(
      shift=lambda tree, coeff, query: move(tree, [coeff], [query]),
      num_queries=scheme.num_queries,
      evaluates_center=bool((scheme.points[0] == 0).all()),
      center_every=int(scheme.every[0]), light_update=False,
      scheme=scheme, move=move)


def probe_or_losses(scheme, leaves, params, move, value_fn, extra, count,
                    perturbation: Callable = plain_perturbation,
                    config=None):
  """The (P,) losses of the step, or the Perturbation for the lean step.

  ``move(tree, coeffs, queries)`` returns ``tree + mu s sum_t coeffs[t]
  z_{queries[t]}`` (a point's or a move's terms, :func:`schemes.sparse`). Inside
  :func:`hizoo_jax.make_train_step` (``zo_probe``), the step's Perturbation
  (``perturbation(config, scheme, leaves, move)``) is recorded and None
  returned; losses it measured come as ``zo_losses``.
  """
  probe = extra.get("zo_probe")
  if probe is not None:
    probe.perturbation = perturbation(config, scheme, leaves, move)
    return None
  given = extra.get("zo_losses")
  if given is not None:
    return schemes.given_losses(scheme, given)
  if value_fn is None:
    raise ValueError(
        "zeroth-order estimators need the loss: call update(updates, state, "
        "params, value_fn=lambda p: loss(p, batch)).")
  kwargs = _checks.value_fn_kwargs(value_fn, extra)

  def loss_at(coeffs, queries):
    point = params if coeffs is None else move(params, coeffs, queries)
    return _checks.check_loss(value_fn(point, **kwargs), "a point of the step")
  return schemes.losses(scheme, loss_at, count)


class Program(NamedTuple):
  """How the estimators reach the leaves: one side of the boundary.

  The estimators below state the mathematics; a program maps it over the
  leaves. :data:`PLAIN` is :mod:`hizoo_jax.core.leafwise` (``jax.tree.map``
  style, trusting XLA); :mod:`hizoo_jax.compact` shapes the XLA:CPU program.
  ``H`` and ``s`` are in the program's own form; only its own members read
  them.
  """

  leaves_of: Callable  # (params, config, state, extra) -> the step's leaves
  # and noise (the boundary's Leaves).
  hessian: Callable  # (config, state.hessian, leaves) -> H, checked.
  store: Callable  # (config, H, leaves) -> state.hessian.
  scales: Callable  # (config, H, leaves) -> s = H^{-1/2}.
  perturb: Callable  # (leaves, tree, coeffs, queries, mu, s) -> tree + mu
  # s sum_t coeffs[t] z_{queries[t]} on the trainable leaves.
  combine: Callable  # (leaves, coeffs (q,), s) -> s sum_j coeffs[j] z_j, a
  # tree like params (zeros on frozen leaves).
  perturbation: Callable  # (config, scheme, leaves, move) -> the lean
  # step's Perturbation.
  leaf_numbers: Callable  # (treedef, number of leaves) -> state.leaf_numbers.


def _plain_leaves(params, config, state, extra):
  del extra  # the plain program draws the same way in every context
  return leafwise.leaves_of(params, config.mask, state.rng_key, state.count,
                            config.num_queries)


def _plain_scales(config, hess, leaves):
  del leaves
  return [None if h is None else config.rule.inv_sqrt(h) for h in hess]


PLAIN = Program(
    leaves_of=_plain_leaves,
    hessian=lambda config, hessian, leaves: _from_state(
        config.rule, hessian, leaves),
    store=lambda config, hess, leaves: _to_state(config, hess,
                                                 leaves.treedef),
    scales=_plain_scales, perturb=leafwise.perturb, combine=leafwise.combine,
    perturbation=plain_perturbation,
    leaf_numbers=lambda treedef, n: None)


def mezo_transform(config: Config, program: Program = PLAIN
                   ) -> optax.GradientTransformationExtraArgs:
  """MeZO's estimator from validated options."""
  scheme = schemes.central(config.num_queries)

  def init_fn(params):
    values, _, treedef, _ = leafwise.checked_leaves(params, config.mask)
    return new_state(noise.key_words(config.key), leaf_numbers=(
        program.leaf_numbers(treedef, len(values))))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra):
    del updates  # zeroth order: the incoming updates are not used.
    leaves = program.leaves_of(params, config, state, extra)
    mu, valid = _checks.step_hyperparams(
        at_step(config.mu, state.count), None, state.count)
    move = lambda tree, c, q: program.perturb(leaves, tree, c, q, mu, None)
    losses = probe_or_losses(scheme, leaves, params, move, value_fn, extra,
                             state.count, program.perturbation, config)
    if losses is None:
      return jax.tree.map(jnp.zeros_like, params), state
    _, plus, minus = schemes.split_losses(scheme, losses)
    g = (plus - minus) / (2 * mu)  # (q,); finite losses may overflow it
    finite = jnp.all(jnp.isfinite(g)) & valid
    direction = program.combine(
        leaves, jnp.where(finite, g, 0.0) / config.num_queries, None)
    side = (jnp.mean(plus) + jnp.mean(minus)) / 2
    return direction, stepped(state, finite, side, plus, minus, g)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stepped(state, finite, loss, plus, minus, g, **changes) -> ZOState:
  """The state after a step: counts, last losses, ``changes`` (H, stats)."""
  return state._replace(
      count=optax.safe_increment(state.count),
      loss=loss.astype(jnp.float32),
      loss_plus=jnp.mean(plus).astype(jnp.float32),
      loss_minus=jnp.mean(minus).astype(jnp.float32),
      projected_grad=jnp.mean(g).astype(jnp.float32),
      skipped=state.skipped + (~finite).astype(jnp.int32), **changes)


def hizoo_transform(config: Config, program: Program = PLAIN
                    ) -> optax.GradientTransformationExtraArgs:
  """HiZOO's estimator from validated options."""
  rule, q = config.rule, config.num_queries
  scheme = schemes.central(q, center_every=config.every)

  def init_fn(params):
    values, paths, treedef, trainable = leafwise.checked_leaves(
        params, config.mask)
    layers = _checks.stacked_leaves(config.stacked, params, treedef, paths)
    hess = [_init_leaf(config, x, layer) if keep else None
            for x, keep, layer in zip(values, trainable, layers)]
    return new_state(noise.key_words(config.key),
                     _to_state(config, hess, treedef), rule.init_stats(),
                     program.leaf_numbers(treedef, len(values)))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra):
    del updates  # zeroth order: the incoming updates are not used.
    leaves = program.leaves_of(params, config, state, extra)
    hess = program.hessian(config, state.hessian, leaves)
    mu, valid = _checks.step_hyperparams(
        at_step(config.mu, state.count), config.rate, state.count)
    scales = program.scales(config, hess, leaves)  # s = H^{-1/2}
    move = lambda tree, c, q: program.perturb(leaves, tree, c, q, mu, scales)
    losses = probe_or_losses(scheme, leaves, params, move, value_fn, extra,
                             state.count, program.perturbation, config)
    if losses is None:
      return jax.tree.map(jnp.zeros_like, params), state
    center, plus, minus = schemes.split_losses(scheme, losses)
    probe = state.count % config.every == 0
    g = (plus - minus) / (2 * mu)  # (q,); finite losses may overflow it
    # (l+ - l0) + (l- - l0): exact in float32 where l+ + l- - 2 l0 is not.
    second = ((plus - center) + (minus - center)) / (2 * mu**2)  # (q,)
    finite = jnp.all(jnp.isfinite(g)) & valid
    finite &= jnp.all(jnp.isfinite(second)) | ~probe

    measured = finite & probe
    new_hess, stats = rule.update(
        hess, state.curvature_stats, jnp.where(measured, second, 0.0), leaves,
        at_step(config.rate, state.count), measured)
    direction = program.combine(leaves, jnp.where(finite, g, 0.0) / q,
                                program.scales(config, new_hess, leaves))
    loss = jnp.where(probe, center, (jnp.mean(plus) + jnp.mean(minus)) / 2)
    return direction, stepped(
        state, finite, loss, plus, minus, g, curvature_stats=stats,
        hessian=program.store(config, new_hess, leaves))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _init_leaf(config: Config, x, layered: bool):
  """H_0 of one trainable leaf."""
  shape = jnp.shape(x)
  inner = shape[1:] if layered else shape  # a stack of layers is never
  axes = paper_rule.factored_axes(inner, config.min_dim)  # factored over
  if axes is not None and layered:
    axes = (axes[0] + 1, axes[1] + 1)
  param_dtype = isinstance(config.hessian_dtype, str)
  dtype = jnp.result_type(x) if param_dtype else config.hessian_dtype
  return config.rule.init(shape, config.granularity, axes, dtype,
                          noise.explicit_sharding(x), layered)


def _to_state(config: Config, hess: list, treedef):
  """The state's H from per-leaf values (see :class:`rules.Rule` layout).

  "factors": one tree per factor, as many as the granularity has even for
  params without leaves (``optax.tree.map_params``'s placeholder).
  """
  masked = optax.MaskedNode()
  if config.rule.layout == "leaves":
    return treedef.unflatten([masked if h is None else h for h in hess])
  count = 2 if config.granularity == "factored" else 1
  return tuple(treedef.unflatten([masked if h is None else h[k] for h in hess])
               for k in range(count))


def _from_state(rule: rules.Rule, hessian, leaves: leafwise.Leaves) -> list:
  """Per-leaf H from the state's, checked against the params."""
  try:
    if rule.layout == "leaves":
      per_leaf = leaves.flat(hessian)
    else:
      per_leaf = [tuple(fs) for fs in zip(*map(leaves.flat, hessian))]
  except (ValueError, TypeError) as e:
    raise ValueError(OTHER_STRUCTURE) from e
  per_leaf = [None if isinstance(h[0] if isinstance(h, tuple) and h else h,
                                 optax.MaskedNode) else h for h in per_leaf]
  check_hessian(rule, per_leaf, leaves)
  return per_leaf


def check_hessian(rule, per_leaf: list, leaves) -> None:
  """Raises where a leaf's H (None: frozen) does not fit the params."""
  for h, x, path, keep in zip(per_leaf, leaves.values, leaves.paths,
                              leaves.trainable):
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
