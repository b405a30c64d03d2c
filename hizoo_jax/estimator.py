"""HiZOO, HiZOO-L and MeZO: the public constructors.

:func:`scale_by_hizoo` and :func:`scale_by_mezo` check their options and
build the estimators of :mod:`hizoo_jax.core.estimators` (the mathematics,
stated once) on the program :mod:`hizoo_jax.program` chooses: plain, or
compact (:mod:`hizoo_jax.compact`: the devices that shape the XLA:CPU
program, shared kernels, small leaves drawn together, the curvature's sums in
one loop, H as one vector, stored values).
Each step evaluates the loss at theta and at ``theta +/- mu * s * z`` (z of
mean 0 and variance 1, nearly normal, regenerated and never stored:
:mod:`hizoo_jax.noise`); MeZO uses ``s = 1``, HiZOO ``s = H^{-1/2}``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import compact
from hizoo_jax import program as _program
from hizoo_jax.core import estimators as core
from hizoo_jax.core import rules as core_rules

ScalarOrSchedule = float | jax.Array | optax.Schedule


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
  """HiZOO when ``estimator`` is given, MeZO when it is None: the options
  checked once, then the estimator of the program :mod:`hizoo_jax.program`
  chooses."""
  with_curvature = estimator is not None
  if with_curvature:
    if estimator not in core_rules.RULES:
      raise ValueError(f"estimator must be one of {sorted(core_rules.RULES)}, "
                       f"got {estimator!r}.")
    rule = core_rules.RULES[estimator]
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
  param_dtype_h = isinstance(hessian_dtype, str) and hessian_dtype == "param"
  if param_dtype_h and estimator != "reference":
    raise ValueError(
        'hessian_dtype="param" (H in the parameter dtype, as the official '
        'code keeps it) is only offered with estimator="reference".')
  if with_curvature and not param_dtype_h and not jnp.issubdtype(
      hessian_dtype, jnp.floating):
    raise TypeError(f"hessian_dtype must be a float dtype, got {hessian_dtype}.")
  compact_program = _program.resolve(program) == "compact"
  table = compact.RULES if compact_program else core_rules.RULES
  config = core.Config(
      mu=mu, mask=mask, key=key,
      num_queries=_checks.static_int(num_queries, "num_queries", 1),
      rule=table[estimator] if with_curvature else None,
      rate=hessian_smooth, granularity=granularity,
      min_dim=_checks.static_int(
          min_dim_size_to_factor, "min_dim_size_to_factor", 1),
      every=_checks.static_int(curvature_every, "curvature_every", 1),
      hessian_dtype=hessian_dtype, stacked=stacked)
  implementation = compact.PROGRAM if compact_program else core.PLAIN
  return (core.hizoo_transform(config, implementation) if with_curvature
          else core.mezo_transform(config, implementation))


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
