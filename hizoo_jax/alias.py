"""Ready-to-use optimizers: estimator, decoupled weight decay, learning rate.

Each alias is ``hz.chain(estimator, add_decayed_weights,
scale_by_learning_rate)`` (:func:`hizoo_jax.chain`: a skipped step moves
nothing), so its state is a tuple whose first entry is the estimator's
:class:`~hizoo_jax.estimator.ZOState`. The learning-rate step is wrapped in
:func:`hizoo_jax.precision.warn_on_rounding` (same state; for bf16/fp16
parameters it warns once when the steps round away). Options that shape the computation
(``num_queries``, ``min_dim_size_to_factor``, ``hessian_dtype``) default to None
so that ``optax.inject_hyperparams`` leaves them static.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import estimator as _estimator
from hizoo_jax import precision
from hizoo_jax import skipping
from hizoo_jax.core import fzoo as core_fzoo
from hizoo_jax.estimator import ScalarOrSchedule


def _decay_mask(weight_decay_mask, trainable_mask):
  """Decay only trainable leaves with ndim >= 2 (not biases or norm scales)."""
  if weight_decay_mask is not None:
    return weight_decay_mask

  def mask_fn(params):
    allowed = trainable_mask
    if allowed is None:
      allowed = jax.tree.map(lambda _: True, params)
    else:  # A tree, a prefix of params (as in optax.masked) or a callable.
      allowed = _checks.full_mask(allowed, params)
    return jax.tree.map(
        lambda x, keep: bool(keep) and jnp.ndim(x) >= 2
        and jnp.issubdtype(jnp.result_type(x), jnp.floating),
        params, allowed)

  return mask_fn


def _checked(value, name):
  """``value``, checked if static (a schedule is checked at every step)."""
  _checks.check_number(value, name)
  return value


def _guarded(value, name):
  """``value`` checked if static; a schedule's invalid values become 0.

  A schedule may reach NaN or a negative value long after construction: the
  step then does not move by that term (with a NaN learning rate, not at
  all) instead of writing NaN into the parameters.
  """
  _checks.check_number(value, name)
  if not callable(value):
    return value

  def schedule(count):
    v = jnp.asarray(value(count), jnp.float32)
    return jnp.where(jnp.isfinite(v) & (v >= 0), v, 0.0)
  return schedule


def _tail(learning_rate, weight_decay, weight_decay_mask, mask):
  return (
      # Adds nothing on a skipped step (the estimator's zeros stay zeros).
      skipping.add_decayed_weights(
          _checked(weight_decay, "weight_decay"),
          mask=_decay_mask(weight_decay_mask, mask)),
      # Same state as scale_by_learning_rate; warns if bf16 steps round away.
      precision.warn_on_rounding(
          optax.scale_by_learning_rate(
              _guarded(learning_rate, "learning_rate")), mask),
  )


def hizoo(
    learning_rate: ScalarOrSchedule,
    mu: ScalarOrSchedule = 1e-3,
    hessian_smooth: Optional[ScalarOrSchedule] = None,
    weight_decay: ScalarOrSchedule = 0.0,
    key=0,
    *,
    estimator: str = "signed",
    curvature: Optional[str] = None,
    factored: bool = False,
    min_dim_size_to_factor: Optional[int] = None,
    curvature_every: Optional[int] = None,
    num_queries: Optional[int] = None,
    mask=None,
    hessian_dtype=None,
    weight_decay_mask=None,
    stacked=None,
    program: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HiZOO: Hessian-informed zeroth-order optimizer (arXiv 2402.15173).

  .. math::
    \theta \leftarrow \theta - \eta\,(g\, z\, H^{-1/2} + \lambda \theta)

  with g, z and H as in :func:`hizoo_jax.scale_by_hizoo`; weight decay
  lambda is decoupled and by default spares leaves with ndim < 2.

  Args:
    learning_rate: eta, a float or an optax schedule.
    mu: perturbation scale (float or schedule).
    hessian_smooth: rate at which H moves, in [0, 1] (float or schedule);
      None: the estimator's default (see ``scale_by_hizoo``).
    weight_decay: lambda (float or schedule).
    key: seed or PRNG key for the noise.
    estimator: ``"signed"`` (learned grouped curvature, default),
      ``"paper"`` or ``"reference"`` (see ``scale_by_hizoo``).
    curvature: ``"tensor"``, ``"row"``, ``"column"``, ``"factored"`` or
      ``"element"`` (None: the estimator's default).
    factored: keep H factored (HiZOO-L); see also :func:`hizoo_l`.
    min_dim_size_to_factor: smallest factored axis (None: 128).
    curvature_every: probe the curvature every k-th step (None: 1).
    num_queries: perturbations averaged per step (None: 1).
    mask: tree of bools or callable; False leaves are frozen.
    hessian_dtype: dtype of H (None: float32).
    weight_decay_mask: override of the default decay mask.
    stacked: tree of bools or callable; True marks leaves whose leading axis
      stacks layers (each layer keeps its own curvature).
    program: ``"plain"``, ``"compact"`` or ``"auto"`` (None): how the
      estimator is compiled (:mod:`hizoo_jax.program`); same numbers.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``value_fn``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones((2, 2))}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = hz.hizoo(learning_rate=1e-2, mu=1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
  """
  return skipping.chain(
      _estimator.scale_by_hizoo(
          mu, hessian_smooth, estimator=estimator, curvature=curvature,
          factored=factored,
          min_dim_size_to_factor=(
              128 if min_dim_size_to_factor is None else min_dim_size_to_factor),
          curvature_every=1 if curvature_every is None else curvature_every,
          num_queries=1 if num_queries is None else num_queries,
          mask=mask, key=key,
          hessian_dtype=jnp.float32 if hessian_dtype is None else hessian_dtype,
          stacked=stacked, program=program),
      *_tail(learning_rate, weight_decay, weight_decay_mask, mask),
      honours_skip=True)


def hizoo_l(
    learning_rate: ScalarOrSchedule,
    mu: ScalarOrSchedule = 1e-3,
    hessian_smooth: Optional[ScalarOrSchedule] = None,
    weight_decay: ScalarOrSchedule = 0.0,
    key=0,
    *,
    estimator: str = "signed",
    min_dim_size_to_factor: Optional[int] = None,
    curvature_every: Optional[int] = None,
    num_queries: Optional[int] = None,
    mask=None,
    hessian_dtype=None,
    weight_decay_mask=None,
    stacked=None,
    program: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """HiZOO-L: :func:`hizoo` with row/column factored curvature.

  Matrices whose two largest axes have at least ``min_dim_size_to_factor``
  (default 128) entries keep ``m + n`` curvature numbers instead of ``m * n``.
  Arguments as in :func:`hizoo`.

  Example:
    >>> import jax.numpy as jnp, hizoo_jax as hz
    >>> tx = hz.hizoo_l(1e-2, min_dim_size_to_factor=2)
    >>> state = tx.init({"w": jnp.ones((4, 3))})
    >>> rows, cols = state[0].hessian  # trees of row and column factors
    >>> rows["w"].shape, cols["w"].shape
    ((4, 1), (1, 3))
  """
  return hizoo(
      learning_rate, mu, hessian_smooth, weight_decay, key,
      estimator=estimator, factored=True,
      min_dim_size_to_factor=min_dim_size_to_factor,
      curvature_every=curvature_every, num_queries=num_queries,
      mask=mask, hessian_dtype=hessian_dtype,
      weight_decay_mask=weight_decay_mask, stacked=stacked, program=program)


def mezo(
    learning_rate: ScalarOrSchedule,
    mu: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.0,
    key=0,
    *,
    num_queries: Optional[int] = None,
    mask=None,
    weight_decay_mask=None,
    program: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MeZO (ZO-SGD, arXiv 2305.17333): the two-evaluation baseline.

  .. math::
    \theta \leftarrow \theta - \eta\,(g z + \lambda \theta),\quad
    g = \frac{L(\theta + \mu z) - L(\theta - \mu z)}{2 \mu}

  Args:
    learning_rate: eta (float or schedule).
    mu: perturbation scale (float or schedule).
    weight_decay: lambda (float or schedule), decoupled, ndim >= 2 leaves.
    key: seed or PRNG key for the noise.
    num_queries: perturbations averaged per step (None: 1).
    mask: tree of bools or callable; False leaves are frozen.
    weight_decay_mask: override of the default decay mask.
    program: how the estimator is compiled (:mod:`hizoo_jax.program`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, hizoo_jax as hz
    >>> tx = hz.mezo(learning_rate=1e-2)
    >>> params = {"w": jnp.ones(3)}
    >>> updates, state = tx.update(
    ...     None, tx.init(params), params, value_fn=lambda p: p["w"] @ p["w"])
  """
  return skipping.chain(
      _estimator.scale_by_mezo(
          mu, num_queries=1 if num_queries is None else num_queries,
          mask=mask, key=key, program=program),
      *_tail(learning_rate, weight_decay, weight_decay_mask, mask),
      honours_skip=True)


def fzoo(
    learning_rate: ScalarOrSchedule,
    eps: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.0,
    key=0,
    *,
    num_probes: Optional[int] = None,
    noise: str = "rademacher",
    normalize: bool = True,
    mask=None,
    weight_decay_mask=None,
) -> optax.GradientTransformationExtraArgs:
  r"""FZOO (arXiv 2506.09034): normalized SGD from N one-sided probes.

  .. math::
    \theta \leftarrow \theta - \eta\,\Big(\sum_{i=1}^N
    \frac{L(\theta + \epsilon u_i) - L(\theta)}{N \sigma} u_i
    + \lambda \theta\Big)

  with sigma the population std of the N probe losses
  (:func:`hizoo_jax.scale_by_fzoo`); weight decay lambda is decoupled and by
  default spares leaves with ndim < 2. The direction estimates g / |g|, so
  eta is the step's size and not on MeZO's scale.

  Args:
    learning_rate: eta, a float or an optax schedule.
    eps: probe scale (float or schedule).
    weight_decay: lambda (float or schedule).
    key: seed or PRNG key for the noise.
    num_probes: N (N + 1 forward passes a step; None: 8).
    noise: ``"rademacher"`` or ``"gaussian"``.
    normalize: False gives one-sided ZO-SGD with N queries (an ablation).
    mask: tree of bools or callable; False leaves are frozen.
    weight_decay_mask: override of the default decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``value_fn``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones(3)}
    >>> tx = hz.fzoo(learning_rate=1e-2, eps=1e-3)
    >>> updates, state = tx.update(None, tx.init(params), params,
    ...                            value_fn=lambda p: p["w"] @ p["w"])
    >>> params = optax.apply_updates(params, updates)
  """
  return skipping.chain(
      core_fzoo.scale_by_fzoo(
          eps, num_probes=8 if num_probes is None else num_probes,
          noise=noise, normalize=normalize, mask=mask, key=key),
      *_tail(learning_rate, weight_decay, weight_decay_mask, mask),
      honours_skip=True)
