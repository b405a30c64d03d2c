"""HiZOO, HiZOO-L and MeZO as Optax gradient transformations.

Each step evaluates the loss at theta and at ``theta +/- mu * s * z`` (z a
fresh standard normal, never stored: see :mod:`hizoo_jax.noise`) and returns a
gradient-like tree for downstream transformations; no backward pass is taken.
MeZO uses ``s = 1``; HiZOO uses ``s = H^{-1/2}`` and updates the diagonal
curvature estimate ``H`` kept in the state (:mod:`hizoo_jax.curvature`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from hizoo_jax import _checks
from hizoo_jax import curvature
from hizoo_jax import fusible
from hizoo_jax import noise

ScalarOrSchedule = float | jax.Array | optax.Schedule


class ZOState(NamedTuple):
  """State of a zeroth-order estimator (HiZOO, HiZOO-L or MeZO)."""

  count: jax.Array  # (), int32: steps taken; selects the next step's noise.
  rng_key: jax.Array  # (k,), uint32: raw words of the run's PRNG key.
  hessian: Any  # HiZOO: tree like params of float arrays (leaf shape),
  # curvature.FactoredHessian or optax.MaskedNode (masked leaves); MeZO: None.
  loss: jax.Array  # (), float32: last step's L(theta) (MeZO: (l+ + l-) / 2).
  loss_plus: jax.Array  # (), float32: last step's mean L(theta + mu s z).
  loss_minus: jax.Array  # (), float32: last step's mean L(theta - mu s z).
  projected_grad: jax.Array  # (), float32: mean of (l+ - l-) / (2 mu).
  skipped: jax.Array  # (), int32: steps skipped for a non-finite loss.


class Perturbation(NamedTuple):
  """The points one estimator step evaluates, for custom training loops.

  ``shift(params, coeff, query)`` returns ``params + coeff * mu * s * z_query``
  on the trainable leaves (others unchanged); ``coeff`` and ``query`` may be
  traced. The step evaluates L(theta) if ``evaluates_center`` and, for each
  query ``j < num_queries``, L at ``shift(theta, +1, j)`` and ``shift(theta,
  -1, j)``; those values can be handed back to ``update`` as ``zo_losses``.
  """

  shift: Callable[[Any, Any, Any], Any]
  num_queries: int
  evaluates_center: bool


class PerturbationProbe:
  """Pass as ``update(..., zo_probe=probe)`` to read the step's Perturbation.

  The estimator then records ``probe.perturbation`` and returns zero updates
  and its unchanged state without calling ``value_fn``. Used (inside one trace)
  by :func:`hizoo_jax.make_train_step`.
  """

  def __init__(self):
    self.perturbation: Optional[Perturbation] = None


def _at_step(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  value = value(count) if callable(value) else value
  return jnp.asarray(value, jnp.float32)


def _zo_estimator(
    *,
    mu: ScalarOrSchedule,
    hessian_smooth: Optional[ScalarOrSchedule],
    estimator: str,
    factored: bool,
    min_dim_size_to_factor: int,
    num_queries: int,
    mask,
    key,
    hessian_dtype,
) -> optax.GradientTransformationExtraArgs:
  """HiZOO when ``hessian_smooth`` is given, MeZO when it is None."""
  with_curvature = hessian_smooth is not None
  _checks.check_hyperparams(mu, hessian_smooth)
  _checks.check_key(key)
  if estimator not in ("paper", "reference"):
    raise ValueError(
        f"estimator must be 'paper' or 'reference', got {estimator!r}.")
  num_queries = _checks.static_int(num_queries, "num_queries", 1)
  min_dim = _checks.static_int(
      min_dim_size_to_factor, "min_dim_size_to_factor", 1)
  if with_curvature and not jnp.issubdtype(hessian_dtype, jnp.floating):
    raise TypeError(f"hessian_dtype must be a float dtype, got {hessian_dtype}.")
  reference = estimator == "reference"

  def flatten(params):
    """Leaves, paths, treedef and the trainable flag of every leaf."""
    _checks.check_params(params)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [p for p, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]
    trainable = _checks.trainable_leaves(mask, params, treedef, paths)
    _checks.check_leaf_dtypes(leaves, paths, trainable)
    return leaves, paths, treedef, trainable

  def init_fn(params):
    leaves, _, treedef, trainable = flatten(params)
    hessian = None
    if with_curvature:
      hessian = treedef.unflatten([
          curvature.init(
              jnp.shape(x),
              curvature.factored_axes(jnp.shape(x), min_dim) if factored else None,
              hessian_dtype,
              noise.explicit_sharding(x),
          ) if keep else optax.MaskedNode()
          for x, keep in zip(leaves, trainable)
      ])
    def zero():  # A distinct buffer per field, so the state can be donated.
      return jnp.zeros([], jnp.float32)

    return ZOState(
        count=jnp.zeros([], jnp.int32),
        rng_key=noise.key_words(key),
        hessian=hessian,
        loss=zero(), loss_plus=zero(), loss_minus=zero(),
        projected_grad=zero(),
        skipped=jnp.zeros([], jnp.int32),
    )

  def curvature_leaves(state, treedef, leaves, paths, trainable):
    if not with_curvature:
      return [None] * len(leaves)
    try:
      hess = treedef.flatten_up_to(state.hessian)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "params do not have the structure the optimizer state was "
          "initialised with.") from e
    for h, x, path, keep in zip(hess, leaves, paths, trainable):
      if keep and curvature.actual_shapes(h) != curvature.expected_shapes(
          h, jnp.shape(x)):
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(x)}"
            f" but its curvature state has shapes {curvature.actual_shapes(h)}"
            "; was the state initialised with other params?")
    return hess

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates  # Zeroth order: the incoming updates are not used.
    leaves, paths, treedef, trainable = flatten(params)
    hess = curvature_leaves(state, treedef, leaves, paths, trainable)
    hashes = [noise.path_hash(p) for p in paths]
    mu_t = _at_step(mu, state.count)
    mu_t, valid = _checks.step_hyperparams(mu_t, hessian_smooth, state.count)

    def z(i, query, after=None):
      seed = noise.leaf_seed(state.rng_key, state.count, query, hashes[i])
      if after is not None:
        seed = seed ^ (noise.zero_after(after) if jnp.ndim(after) else after)
      return noise.gaussian(seed, jnp.shape(leaves[i]),
                            sharding=noise.explicit_sharding(leaves[i]))

    def shift(tree, coeff, query):
      out = treedef.flatten_up_to(tree)
      for i, keep in enumerate(trainable):
        if keep:
          step = (coeff * mu_t) * z(i, query)
          if with_curvature:
            step = step * fusible.rsqrt(curvature.expand(hess[i]))
          dtype = jnp.promote_types(out[i].dtype, jnp.float32)
          out[i] = (out[i].astype(dtype) + step).astype(out[i].dtype)
      return treedef.unflatten(out)

    probe = extra_args.get("zo_probe")
    if probe is not None:
      probe.perturbation = Perturbation(shift, num_queries, with_curvature)
      return jax.tree.map(jnp.zeros_like, params), state

    center, plus, minus = _losses(
        params, shift, value_fn, extra_args, num_queries, with_curvature)
    finite = jnp.all(jnp.isfinite(plus)) & jnp.all(jnp.isfinite(minus))
    finite &= valid  # A schedule or injected value out of range: skip.
    if with_curvature:
      finite &= jnp.isfinite(center)
    grad = (plus - minus) / (2 * mu_t)  # (q,)
    grad_used = jnp.where(finite, grad, 0.0).astype(jnp.float32)

    new_hess = hess
    if with_curvature:
      rate = jnp.where(finite, _at_step(hessian_smooth, state.count), 0.0)
      # (l+ - l0) + (l- - l0): each difference is exact in float32 when the
      # losses are within a factor 2, unlike l+ + l- - 2 l0.
      second = jnp.where(finite, (plus - center) + (minus - center), 0.0)
      second = (second / (2 * mu_t**2)).astype(jnp.float32)  # (q,)
      new_hess = list(hess)
      previous = None
      for i, keep in enumerate(trainable):
        if keep:
          new_hess[i] = curvature.ema_step(
              hess[i], second, functools.partial(z, i), num_queries, rate,
              reference, previous, (state.count >> 31).astype(jnp.uint32))
          if isinstance(hess[i], curvature.FactoredHessian):
            previous = new_hess[i].col

    out = []
    for i, (x, keep) in enumerate(zip(leaves, trainable)):
      if not keep:
        out.append(jnp.zeros_like(x))
        continue
      after = None
      if with_curvature:
        after = curvature.updated_array(new_hess[i])
      direction = sum(grad_used[j] * z(i, j, after)
                      for j in range(num_queries))
      direction = direction / num_queries
      if with_curvature:
        direction = direction * fusible.rsqrt(curvature.expand(new_hess[i]))
      out.append(direction.astype(x.dtype))

    plus_mean, minus_mean = jnp.mean(plus), jnp.mean(minus)
    new_state = ZOState(
        count=optax.safe_increment(state.count),
        rng_key=state.rng_key,
        hessian=treedef.unflatten(new_hess) if with_curvature else None,
        loss=(center if with_curvature else (plus_mean + minus_mean) / 2
              ).astype(jnp.float32),
        loss_plus=plus_mean.astype(jnp.float32),
        loss_minus=minus_mean.astype(jnp.float32),
        projected_grad=jnp.mean(grad).astype(jnp.float32),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _losses(params, shift, value_fn, extra_args, num_queries, with_center):
  """L(theta) (or None) and L(theta +/- mu s z_j) for every query, shape (q,)."""
  given = extra_args.get("zo_losses")
  if given is not None:
    center, plus, minus = given
    plus = jnp.reshape(jnp.asarray(plus, jnp.float32), (num_queries,))
    minus = jnp.reshape(jnp.asarray(minus, jnp.float32), (num_queries,))
    return (jnp.asarray(center, jnp.float32) if with_center else None), plus, minus
  if value_fn is None:
    raise ValueError(
        "zeroth-order estimators need the loss: call update(updates, state, "
        "params, value_fn=lambda p: loss(p, batch)).")
  kwargs = _checks.value_fn_kwargs(value_fn, extra_args)

  def loss_at(tree, where):
    return _checks.check_loss(value_fn(tree, **kwargs), where)

  center = loss_at(params, "theta") if with_center else None

  def pair(query):
    return (loss_at(shift(params, 1.0, query), "theta + mu*s*z"),
            loss_at(shift(params, -1.0, query), "theta - mu*s*z"))

  if num_queries == 1:
    plus, minus = pair(0)
    return center, plus[None], minus[None]
  plus, minus = lax.map(pair, jnp.arange(num_queries, dtype=jnp.uint32))
  return center, plus, minus


def scale_by_hizoo(
    mu: ScalarOrSchedule,
    hessian_smooth: ScalarOrSchedule,
    *,
    estimator: str = "paper",
    factored: bool = False,
    min_dim_size_to_factor: Optional[int] = None,
    num_queries: Optional[int] = None,
    mask=None,
    key=0,
    hessian_dtype=None,
) -> optax.GradientTransformationExtraArgs:
  r"""HiZOO's Hessian-informed zeroth-order gradient estimate.

  With ``s = H^{-1/2}`` elementwise and z ~ N(0, I) drawn from the state's key,
  one step computes

  .. math::
    l_0 = L(\theta),\quad l_\pm = L(\theta \pm \mu s z),\quad
    D = l_+ + l_- - 2 l_0,\quad g = (l_+ - l_-) / (2\mu)

    h = \frac{D}{2\mu^2} H (z^2 - 1),\qquad
    H \leftarrow H + \alpha (|h| - H)

  and returns ``g * z * H^{-1/2}`` with the new H (downstream transformations
  scale it, e.g. by ``-learning_rate``). ``h`` is unbiased for the diagonal of
  the loss Hessian before the absolute value. With ``num_queries = q`` the
  estimates ``h`` and ``g z`` are averaged over q independent z (l_0 shared).
  A non-finite l_0, l+ or l- leaves H unchanged, returns zero updates and
  counts the step in ``skipped``. Three loss evaluations a step.

  Args:
    mu: perturbation scale (float or schedule of the step count), > 0.
    hessian_smooth: EMA rate alpha of H in [0, 1] (float or schedule).
    estimator: ``"paper"`` (Eq. 8-9 above) or ``"reference"``: the official
      code's ``h = |D| / (2 mu^2) * H * z^2`` and ``H <- (1 - alpha) H +
      alpha h``, for comparisons.
    factored: HiZOO-L: keep row/column factors of H for every leaf with
      ndim >= 2 whose two largest axes have >= ``min_dim_size_to_factor``
      entries (see :mod:`hizoo_jax.curvature`), a full diagonal for the rest.
    min_dim_size_to_factor: see ``factored`` (None: 128).
    num_queries: independent perturbations averaged in one step (None: 1).
    mask: tree of bools like params (or a prefix of it), or a callable
      returning one; False leaves are never perturbed nor updated and have no
      curvature state.
    key: int seed, typed PRNG key or raw key data for the noise.
    hessian_dtype: dtype of H (None: float32, whatever the parameter dtype).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state,
    params, *, value_fn, **extra_args)`` ignores ``updates`` and calls
    ``value_fn(params, **named_extra_args)``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones(3)}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = optax.chain(hz.scale_by_hizoo(1e-3, 1e-2), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
  """
  return _zo_estimator(
      mu=mu, hessian_smooth=hessian_smooth, estimator=estimator,
      factored=factored,
      # None defaults keep these static under optax.inject_hyperparams.
      min_dim_size_to_factor=(
          128 if min_dim_size_to_factor is None else min_dim_size_to_factor),
      num_queries=1 if num_queries is None else num_queries,
      mask=mask, key=key,
      hessian_dtype=jnp.float32 if hessian_dtype is None else hessian_dtype)


def scale_by_mezo(
    mu: ScalarOrSchedule,
    *,
    num_queries: Optional[int] = None,
    mask=None,
    key=0,
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
      mu=mu, hessian_smooth=None, estimator="paper", factored=False,
      min_dim_size_to_factor=1,
      num_queries=1 if num_queries is None else num_queries,  # see hizoo
      mask=mask, key=key, hessian_dtype=jnp.float32)


def find_state(opt_state) -> ZOState:
  """The first estimator state inside an optimizer state (chain, wrappers)."""
  for node in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ZOState)):
    if isinstance(node, ZOState):
      return node
  raise ValueError("no zeroth-order estimator state (ZOState) in opt_state.")


def step_noise(state, params, *, query: int = 0):
  """The z that the next ``update`` with ``state`` uses, as a tree like params.

  z depends only on the state's key and step count, the query index and each
  leaf's path: not on the number of leaves, the mask or the device layout.
  Non-float leaves get None; masked leaves get the z they would use.

  Args:
    state: an estimator state, or any optimizer state that contains one.
    params: the parameters (only paths, shapes and dtypes are read).
    query: which of the ``num_queries`` perturbations.

  Returns:
    A tree like params of float32 arrays.
  """
  zo_state = find_state(state)

  def leaf_noise(path, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return None
    seed = noise.leaf_seed(zo_state.rng_key, zo_state.count, query,
                           noise.path_hash(path))
    return noise.gaussian(seed, jnp.shape(x),
                          sharding=noise.explicit_sharding(x))

  return jax.tree_util.tree_map_with_path(leaf_noise, params)
