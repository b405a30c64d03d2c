"""The state of a zeroth-order estimator and the points it evaluates.

Shared by the estimator (:mod:`hizoo_jax.estimator`) and everything that
reads its state or moves the parameters itself (the lean step, the optax
wrappers, checkpoints, sharding).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax


class ZOState(NamedTuple):
  """State of a zeroth-order estimator (HiZOO, HiZOO-L or MeZO)."""

  zeroth_order = True  # marks an estimator's state (see find_state).

  count: jax.Array  # (), int32: steps taken; selects the next step's noise.
  rng_key: jax.Array  # (k,), uint32: raw words of the run's PRNG key.
  leaf_numbers: Any  # tree like params of (), uint32: each leaf's position
  # among the params' leaves. Read as data, so that same-shaped leaves share
  # their compiled kernels (hizoo_jax._xla.at_leaf).
  hessian: Any  # HiZOO "signed": a tuple of 1 (2 for "factored") trees like
  # params of float32 factors (the leaf's ndim, size 1 on shared axes; H is
  # their product); "paper"/"reference": a tree like params of arrays of the
  # leaf's shape or FactoredHessian; optax.MaskedNode on masked leaves.
  # MeZO: None.
  curvature_stats: Any  # "signed": GroupedStats (float32/int32 scalars);
  # otherwise None.
  loss: jax.Array  # (), float32: last step's L(theta) (MeZO, and HiZOO steps
  # that do not probe the curvature: (l+ + l-) / 2).
  loss_plus: jax.Array  # (), float32: last step's mean L(theta + mu s z).
  loss_minus: jax.Array  # (), float32: last step's mean L(theta - mu s z).
  projected_grad: jax.Array  # (), float32: mean of (l+ - l-) / (2 mu).
  skipped: jax.Array  # (), int32: steps skipped for a non-finite loss.


class Perturbation(NamedTuple):
  """The points one estimator step evaluates, for custom training loops.

  ``shift(params, coeff, query)`` returns ``params + coeff * mu * s * z_query``
  on the trainable leaves (others unchanged); ``coeff`` and ``query`` may be
  traced. The step evaluates, for each query ``j < num_queries``, L at
  ``shift(theta, +1, j)`` and ``shift(theta, -1, j)``, and L(theta) if
  ``evaluates_center`` and ``count % center_every == 0`` (``count``: the
  estimator state's step count); those values can be handed back to
  ``update`` as ``zo_losses`` (a center that was not evaluated: any value).
  ``light_update`` says whether the update is cheap to compute again: no
  noise pass beyond the direction's, except one for the curvature's sums
  (per tensor, or all groups in one loop on one device).
  ``carry_state(state, carried)`` turns the estimator's state into the form
  a loop should carry (``carried``: H as one vector; ``update`` accepts it
  and returns its state in kind) and back; None: carry it as it is.
  ``scheme`` holds the same points as data (:mod:`hizoo_jax.core.scheme`) and
  ``move(params, coeffs, queries)`` makes a point's or a move's terms.
  ``loop`` names the lean step's loop that runs it: "walk"
  (:mod:`hizoo_jax.scheme_walk`) or "compact" (:mod:`hizoo_jax.compact_loop`).
  """

  shift: Optional[Callable[[Any, Any, Any], Any]]
  num_queries: int
  evaluates_center: bool
  center_every: int = 1
  light_update: bool = True
  carry_state: Optional[Callable[[Any, bool], Any]] = None
  # The points as data, and ``move(params, coeffs, queries)``: params + mu s
  # sum_t coeffs[t] z_{queries[t]}.
  scheme: Any = None
  move: Optional[Callable[[Any, Any, Any], Any]] = None
  loop: str = "walk"


class PerturbationProbe:
  """Pass as ``update(..., zo_probe=probe)`` to read the step's Perturbation.

  The estimator then records ``probe.perturbation`` and returns zero updates
  and its unchanged state without calling ``value_fn``. Used (inside one trace)
  by :func:`hizoo_jax.make_train_step`.
  """

  def __init__(self):
    self.perturbation: Optional[Perturbation] = None


def is_estimator_state(node) -> bool:
  """Whether ``node`` is a zeroth-order estimator's state (ZOState, or
  another estimator's NamedTuple marked ``zeroth_order = True``)."""
  return bool(getattr(type(node), "zeroth_order", False))


def find_state(opt_state) -> ZOState:
  """The first estimator state inside an optimizer state (chain, wrappers)."""
  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_estimator_state):
    if is_estimator_state(node):
      return node
  raise ValueError("no zeroth-order estimator state (ZOState) in opt_state.")
