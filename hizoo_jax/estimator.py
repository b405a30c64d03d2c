"""HiZOO, HiZOO-L and MeZO: the public constructors, and the compact program.

:func:`scale_by_hizoo` and :func:`scale_by_mezo` check their options and
build the estimator of the program :mod:`hizoo_jax.program` chooses: the
plain one of :mod:`hizoo_jax.core.estimators` (the mathematics as written),
or the compact one below (``_zo_estimator``), the same mathematics with the
devices that shape its XLA:CPU program (shared kernels, small leaves drawn
together, the curvature's sums in one loop, H as one vector, stored values).
Each step evaluates the loss at theta and at ``theta +/- mu * s * z`` (z of
mean 0 and variance 1, nearly normal, regenerated and never stored:
:mod:`hizoo_jax.noise`); MeZO uses ``s = 1``, HiZOO ``s = H^{-1/2}``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import _xla
from hizoo_jax import curvature
from hizoo_jax import evaluation
from hizoo_jax import leaf_draws
from hizoo_jax import rules
from hizoo_jax import noise
from hizoo_jax import range_sums
from hizoo_jax import program as _program
from hizoo_jax.core import estimators as core
from hizoo_jax.core import rules as core_rules
from hizoo_jax.zo_state import Perturbation, ZOState

ScalarOrSchedule = float | jax.Array | optax.Schedule
_OTHER_STRUCTURE = (
    "params do not have the structure the optimizer state was initialised "
    "with.")


def _at_step(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  value = value(count) if callable(value) else value
  return jnp.asarray(value, jnp.float32)


def _zo_estimator(
    *,
    mu: ScalarOrSchedule,
    hessian_smooth: Optional[ScalarOrSchedule],
    estimator: Optional[str],
    granularity: Optional[str],
    min_dim_size_to_factor: int,
    curvature_every: int,
    num_queries: int,
    mask,
    key,
    hessian_dtype,
    stacked=None,
    program=None,
) -> optax.GradientTransformationExtraArgs:
  """HiZOO when ``estimator`` is given, MeZO when it is None."""
  with_curvature = estimator is not None
  rule = None
  if with_curvature:
    if estimator not in rules.RULES:
      raise ValueError(
          f"estimator must be one of {sorted(rules.RULES)}, got {estimator!r}.")
    rule = rules.RULES[estimator]
    if hessian_smooth is None:
      hessian_smooth = rule.default_rate
    if granularity is None:
      granularity = rule.granularities[0]
    if granularity not in rule.granularities:
      raise ValueError(
          f"estimator {estimator!r} keeps curvature per one of "
          f"{rule.granularities}, got curvature={granularity!r}.")
  _checks.check_hyperparams(mu, hessian_smooth if with_curvature else None)
  _checks.check_key(key)
  num_queries = _checks.static_int(num_queries, "num_queries", 1)
  every = _checks.static_int(curvature_every, "curvature_every", 1)
  min_dim = _checks.static_int(
      min_dim_size_to_factor, "min_dim_size_to_factor", 1)
  param_dtype_h = isinstance(hessian_dtype, str) and hessian_dtype == "param"
  if param_dtype_h and estimator != "reference":
    raise ValueError(
        'hessian_dtype="param" (H in the parameter dtype, as the official '
        'code keeps it) is only offered with estimator="reference".')
  if with_curvature and not param_dtype_h and not jnp.issubdtype(
      hessian_dtype, jnp.floating):
    raise TypeError(f"hessian_dtype must be a float dtype, got {hessian_dtype}.")
  if _program.resolve(program) == "plain":
    config = core.Config(
        mu=mu, num_queries=num_queries, mask=mask, key=key,
        rule=core_rules.RULES[estimator] if with_curvature else None,
        rate=hessian_smooth, granularity=granularity, min_dim=min_dim,
        every=every, hessian_dtype=hessian_dtype, stacked=stacked)
    return (core.hizoo_transform(config) if with_curvature
            else core.mezo_transform(config))

  def flatten(params):
    """Leaves, paths, treedef and the trainable flag of every leaf."""
    _checks.check_params(params)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [p for p, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]
    trainable = _checks.trainable_leaves(mask, params, treedef, paths)
    _checks.check_leaf_dtypes(leaves, paths, trainable)
    return leaves, paths, treedef, trainable

  def matrix_axes(shape, layers: bool):
    """The (row, col) axes to factor over; a stacked leaf's layers never."""
    if not layers:
      return curvature.factored_axes(shape, min_dim)
    axes = curvature.factored_axes(shape[1:], min_dim)
    return None if axes is None else (axes[0] + 1, axes[1] + 1)

  def init_fn(params):
    leaves, paths, treedef, trainable = flatten(params)
    hessian = stats = None
    if with_curvature:
      layers = _checks.stacked_leaves(stacked, params, treedef, paths)
      hessian = rule.join([
          rule.init(
              jnp.shape(x), granularity,
              matrix_axes(jnp.shape(x), layer),
              jnp.result_type(x) if param_dtype_h else hessian_dtype,
              noise.explicit_sharding(x), layer,
          ) if keep else None
          for x, keep, layer in zip(leaves, trainable, layers)
      ], treedef, granularity)
      stats = rule.init_stats()
    def zero():  # A distinct buffer per field, so the state can be donated.
      return jnp.zeros([], jnp.float32)

    return ZOState(
        count=jnp.zeros([], jnp.int32),
        rng_key=noise.key_words(key),
        leaf_numbers=treedef.unflatten(
            [jnp.asarray(i, jnp.uint32) for i in range(len(leaves))]),
        hessian=hessian,
        curvature_stats=stats,
        loss=zero(), loss_plus=zero(), loss_minus=zero(),
        projected_grad=zero(),
        skipped=jnp.zeros([], jnp.int32),
    )

  def curvature_leaves(state, treedef, leaves, paths, trainable):
    if not with_curvature:
      return [None] * len(leaves)
    try:
      hess = rule.split(state.hessian, treedef)
    except (ValueError, TypeError) as e:
      raise ValueError(_OTHER_STRUCTURE) from e
    for h, x, path, keep in zip(rule.per_leaf(hess), leaves, paths,
                                trainable):
      if keep != (h is not None):
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} is "
            f"{'trainable' if keep else 'masked'} but its curvature state "
            "says otherwise; was the state initialised with another mask?")
      if keep and not rule.shapes_fit(h, jnp.shape(x)):
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(x)}"
            f" but its curvature state has shapes "
            f"{[jnp.shape(a) for a in jax.tree.leaves(h)]}; was the state "
            "initialised with other params or another estimator?")
    return hess

  def carry_state(state, carried):  # Perturbation.carry_state
    return state._replace(hessian=rule.carried_form(
        state.hessian, state.leaf_numbers, carried))

  def leaf_numbers(state, treedef):
    try:
      return treedef.flatten_up_to(state.leaf_numbers)
    except (ValueError, TypeError) as e:
      raise ValueError(_OTHER_STRUCTURE) from e

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates  # Zeroth order: the incoming updates are not used.
    leaves, paths, treedef, trainable = flatten(params)
    numbers = leaf_numbers(state, treedef)
    hess = curvature_leaves(state, treedef, leaves, paths, trainable)
    mu_t = _at_step(mu, state.count)
    probe = (state.count % every) == 0
    mu_t, valid = _checks.step_hyperparams(
        mu_t, hessian_smooth if with_curvature else None, state.count)

    # Every leaf's seed for every query: (q, leaves, 2), one small vector op.
    zero = (state.count >> 31).astype(jnp.uint32)  # 0; XLA cannot prove it.
    seeds = _xla.computed_once(noise.leaf_seeds(
        state.rng_key, state.count,
        jnp.arange(num_queries, dtype=jnp.uint32)[:, None], paths), zero)

    draw = leaf_draws.leaf_draws(seeds, numbers, leaves, trainable, zero)
    # Inside hz.make_train_step's loop this update runs on every phase and
    # is kept on the last (zo_final): its draws then share the moves' fusion.
    final = extra_args.get("zo_final")
    # The curvature's sums of z are needed only where H moves and the result
    # is kept.
    # One draw per query for the rule's sums (queries are ints there): a
    # group of small leaves is then drawn once, not once per leaf.
    at_query = [draw.at(j) for j in range(num_queries)]
    draws = noise.Draws(z=lambda i, j, order=None: at_query[j](i, order),
                        zero=zero, seeds=seeds,
                        active=probe if final is None else probe & final)

    @functools.cache
    def scale():  # H^{-1/2}, traced only if a shift is taken.
      return rule.inv_sqrt(hess, numbers)

    def shift(tree, coeff, query):
      def step(zs, which):
        out = (coeff * mu_t) * zs[0]
        if with_curvature:
          out = out * scale()(which)
        return out
      out = treedef.flatten_up_to(tree)
      for i, delta in enumerate(draw.values(step, [query])):
        if delta is not None:
          dtype = jnp.promote_types(out[i].dtype, jnp.float32)
          out[i] = (out[i].astype(dtype) + delta).astype(out[i].dtype)
      return treedef.unflatten(out)

    zo_probe = extra_args.get("zo_probe")
    if zo_probe is not None:
      # Sums over rows or columns are noise passes of their own, except in
      # the signed rule's loop of sums (one device; hizoo_jax.range_sums).
      light = (not with_curvature or granularity == "tensor"
               or (estimator == "signed" and range_sums.in_one_loop()))
      zo_probe.perturbation = Perturbation(
          shift, num_queries, with_curvature, every, light,
          carry_state if with_curvature else None)
      return jax.tree.map(jnp.zeros_like, params), state

    center, plus, minus = evaluation.losses(
        params, shift, value_fn, extra_args, num_queries,
        with_curvature, probe if every > 1 else None)
    grad = (plus - minus) / (2 * mu_t)  # (q,); finite losses may overflow it
    finite = jnp.all(jnp.isfinite(grad))
    finite &= valid  # A schedule or injected value out of range: skip.
    if with_curvature:
      finite &= jnp.all(jnp.isfinite(
          ((plus - center) + (minus - center)) / (2 * mu_t**2))) | ~probe
    grad_used = _xla.computed_once(
        jnp.where(finite, grad, 0.0).astype(jnp.float32), zero)

    new_hess, new_stats = hess, None
    if with_curvature:
      measured = finite & probe
      rate = _at_step(hessian_smooth, state.count)
      # (l+ - l0) + (l- - l0): each difference is exact in float32 when the
      # losses are within a factor 2, unlike l+ + l- - 2 l0.
      second = jnp.where(measured, (plus - center) + (minus - center), 0.0)
      second = (second / (2 * mu_t**2)).astype(jnp.float32)  # (q,)
      new_hess, new_stats, new_scale = rule.update(
          hess, state.curvature_stats, second, draws,
          [jnp.shape(x) for x in leaves], rate, measured, numbers)

    def direction(zs, which):
      out = sum(grad_used[j] * zs[j] for j in range(num_queries))
      out = out / num_queries
      if with_curvature:
        out = out * new_scale(which)
      return out

    # Salted after the new H, the draw is never merged with the moves'
    # draws (XLA would store z), unless they share a fusion (zo_final).
    after = None
    if with_curvature and final is None:
      after = lambda i: rule.last_array(new_hess, i)
    directions = draw.values(direction, range(num_queries), after)
    out = [jnp.zeros_like(x) if d is None else d.astype(x.dtype)
           for x, d in zip(leaves, directions)]

    plus_mean, minus_mean = jnp.mean(plus), jnp.mean(minus)
    side_mean = (plus_mean + minus_mean) / 2
    if with_curvature:
      loss = jnp.where(probe, center, side_mean)
    else:
      loss = side_mean
    new_state = ZOState(
        count=optax.safe_increment(state.count),
        rng_key=state.rng_key,
        leaf_numbers=state.leaf_numbers,
        hessian=(rule.store(new_hess, treedef, numbers) if with_curvature
                 else None),
        curvature_stats=new_stats,
        loss=loss.astype(jnp.float32),
        loss_plus=plus_mean.astype(jnp.float32),
        loss_minus=minus_mean.astype(jnp.float32),
        projected_grad=jnp.mean(grad).astype(jnp.float32),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_hizoo(
    mu: ScalarOrSchedule,
    hessian_smooth: Optional[ScalarOrSchedule] = None,
    *,
    estimator: str = "signed",
    curvature: Optional[str] = None,
    factored: bool = False,
    min_dim_size_to_factor: Optional[int] = None,
    curvature_every: Optional[int] = None,
    num_queries: Optional[int] = None,
    mask=None,
    key=0,
    hessian_dtype=None,
    stacked=None,
    program: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HiZOO's Hessian-informed zeroth-order gradient estimate.

  With ``s = H^{-1/2}`` elementwise and z (mean 0, variance 1, nearly normal)
  drawn from the state's key,
  one step computes

  .. math::
    l_0 = L(\theta),\quad l_\pm = L(\theta \pm \mu s z),\quad
    q = \frac{l_+ + l_- - 2 l_0}{2\mu^2},\quad g = \frac{l_+ - l_-}{2\mu}

  updates H from ``q`` and z, and returns ``g * z * H^{-1/2}`` with the new H
  (downstream transformations scale it, e.g. by ``-learning_rate``).

  * ``estimator="signed"`` (default): H is shared within groups of
    coordinates (``curvature``), moved in log space by the signed, baselined
    estimate ``mean_G(z^2 - 1) (q - b sum(z^2) / d)`` and kept at mean 1
    (:mod:`hizoo_jax.core.signed_rule`). On quadratics with known curvature
    it learns diag(A) per group (correlation 0.98-0.999); on MiniLM
    fine-tuning H stays at 1 and HiZOO equals MeZO per forward pass
    (``docs/results.md``). The learning rate keeps MeZO's meaning.
  * ``estimator="paper"``: Eq. 8-9 of the paper, ``h = q H (z^2 - 1)``,
    ``H <- H + alpha (|h| - H)`` per coordinate (``curvature="element"``) or
    as row/column means (``"factored"``).
  * ``estimator="reference"``: the official code, ``h = |q| H z^2``, ``H <-
    (1 - alpha) H + alpha h``; with ``hessian_dtype="param"`` H is kept in
    the parameter dtype, as there (fp16: H never moves).

  With ``num_queries = q`` the estimates are averaged over q independent z
  (l_0 shared). A non-finite l_0, l+ or l- leaves H unchanged, returns zero
  updates and counts the step in ``skipped``. Three loss evaluations on the
  steps that probe the curvature (every ``curvature_every``-th), two on the
  others.

  Args:
    mu: perturbation scale (float or schedule of the step count), > 0.
    hessian_smooth: the rate at which H moves, in [0, 1] (float or schedule);
      None: 0.05 for "signed" (the largest log-step gain), 1e-6 (the EMA rate
      alpha) for "paper" and "reference".
    estimator: ``"signed"``, ``"paper"`` or ``"reference"`` (above).
    curvature: what shares one curvature value: ``"tensor"`` (default of
      "signed"), ``"row"`` or ``"column"`` of each matrix, ``"factored"``
      (row times column, HiZOO-L) or ``"element"`` (default of "paper" and
      "reference", which offer "element" and "factored" only). Leaves that
      are not matrices with two axes of at least ``min_dim_size_to_factor``
      entries keep one value per tensor ("signed") or per element.
    factored: shorthand for ``curvature="factored"`` (HiZOO-L).
    min_dim_size_to_factor: see ``curvature`` (None: 128).
    curvature_every: probe the curvature (evaluate L(theta) and move H) on
      every k-th step only; the other steps cost two evaluations (None: 1).
    num_queries: independent perturbations averaged in one step (None: 1).
    mask: tree of bools like params (or a prefix of it), or a callable
      returning one; False leaves are never perturbed nor updated and have no
      curvature state.
    key: int seed, typed PRNG key or raw key data for the noise.
    hessian_dtype: dtype of H (None: float32, whatever the parameter dtype);
      "param" (estimator "reference" only) keeps it in each parameter's
      dtype.
    stacked: tree of bools like params (or a prefix of it, or a callable
      returning one); True marks a leaf whose leading axis stacks layers
      (``nnx.scan``, ``nn.scan``, ``lax.scan`` over stacked weights): each
      layer then keeps its own curvature, as separate leaves would, and is
      never factored over its layer axis. None: no leaf is stacked.
    program: ``"plain"``, ``"compact"`` or ``"auto"`` (None): how the
      mathematics is compiled (:mod:`hizoo_jax.program`); same numbers.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state,
    params, *, value_fn, **extra_args)`` ignores ``updates`` and calls
    ``value_fn(params, **named_extra_args)``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones(3)}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(hz.scale_by_hizoo(1e-3), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
  """
  if factored:
    if curvature not in (None, "factored"):
      raise ValueError(
          f"factored=True asks for curvature='factored', got {curvature!r}.")
    curvature = "factored"
  return _zo_estimator(
      mu=mu, hessian_smooth=hessian_smooth, estimator=estimator,
      granularity=curvature,
      # None defaults keep these static under optax.inject_hyperparams.
      min_dim_size_to_factor=(
          128 if min_dim_size_to_factor is None else min_dim_size_to_factor),
      curvature_every=1 if curvature_every is None else curvature_every,
      num_queries=1 if num_queries is None else num_queries,
      mask=mask, key=key,
      hessian_dtype=jnp.float32 if hessian_dtype is None else hessian_dtype,
      stacked=stacked, program=program)


def scale_by_mezo(
    mu: ScalarOrSchedule,
    *,
    num_queries: Optional[int] = None,
    mask=None,
    key=0,
    program: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MeZO's two-point zeroth-order gradient estimate (ZO-SGD direction).

  .. math::
    g = \frac{L(\theta + \mu z) - L(\theta - \mu z)}{2\mu},
    \qquad \text{returns } g z

  averaged over ``num_queries`` independent z. Two loss evaluations a step;
  non-finite losses give zero updates and count in ``skipped``.

  Args:
    mu: perturbation scale (float or schedule), > 0.
    num_queries: independent perturbations averaged in one step (None: 1).
    mask: tree of bools like params or a prefix of it (or a callable); False
      leaves are frozen.
    key: int seed, typed PRNG key or raw key data for the noise.
    program: ``"plain"``, ``"compact"`` or ``"auto"`` (None), see
      :mod:`hizoo_jax.program`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` needs
    ``value_fn``).

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(hz.scale_by_mezo(1e-3), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     None, state, params, value_fn=lambda p: jnp.sum(p["w"] ** 2))
  """
  return _zo_estimator(
      mu=mu, hessian_smooth=None, estimator=None, granularity=None,
      min_dim_size_to_factor=1, curvature_every=1,
      num_queries=1 if num_queries is None else num_queries,  # see hizoo
      mask=mask, key=key, hessian_dtype=jnp.float32, program=program)
