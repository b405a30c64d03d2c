"""The curvature rules HiZOO can use: how H is stored, read and updated.

Each rule is data (:class:`Rule`, a table of functions) that the estimator
calls without knowing which rule it holds; a new rule is a new entry in
:data:`RULES`. ``"signed"`` is :mod:`hizoo_jax.grouped_curvature`;
``"paper"`` and ``"reference"`` are the published rules of
:mod:`hizoo_jax.curvature`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import optax

from hizoo_jax import curvature
from hizoo_jax import fusible
from hizoo_jax import grouped_curvature
from hizoo_jax import leaf_draws
from hizoo_jax.core import paper_rule
from hizoo_jax.core import signed_rule


class Rule(NamedTuple):
  """A curvature rule: how H is stored, read and updated."""

  granularities: tuple[str, ...]
  default_rate: float
  init: Callable  # (shape, granularity, factored axes, dtype, sharding,
  # stacked)
  init_stats: Callable[[], Any]
  # (hess, the leaves' numbers: hizoo_jax._xla.at_leaf) -> read(which):
  # H^{-1/2} of leaf `which` broadcastable to it, or of a tuple of
  # same-shaped leaves stacked (hizoo_jax.leaf_draws).
  inv_sqrt: Callable[[Any, list], Callable]
  update: Callable  # (hess, stats, second, leaves: hizoo_jax.compact.Leaves,
  # rate, probe) -> (new hess, new stats)
  last_array: Callable[[Any, int], jax.Array]  # (hess, leaf): what the
  # update's z of that leaf waits for.
  shapes_fit: Callable[[Any, tuple], bool]  # (a leaf's H, leaf shape)
  split: Callable  # (state.hessian, treedef) -> hess: H as the rule
  # computes with it.
  per_leaf: Callable[[Any], list]  # hess -> per leaf (None: frozen)
  store: Callable  # (hess, treedef, numbers) -> state.hessian, in the form
  # split read.
  join: Callable  # (per leaf, treedef, granularity) -> state.hessian
  # (init); the number of trees follows the granularity, not the leaves.
  carried_form: Callable  # (state.hessian, state.leaf_numbers, carried)
  # -> the form hz.make_train_step's loop carries (carried) or the state's.
  layout: str  # the state's form of H, as hizoo_jax.core.rules.Rule.layout.


def _paper_init(shape, granularity, axes, dtype, sharding, stacked):
  del stacked  # Per element, or factored over axes that exclude the layers.
  return curvature.init(
      shape, axes if granularity == "factored" else None, dtype, sharding)


def _paper_split(hessian, treedef):
  return [None if isinstance(h, optax.MaskedNode) else h
          for h in treedef.flatten_up_to(hessian)]


def _paper_join(per_leaf, treedef, granularity=None):
  del granularity  # One tree, whatever the granularity.
  return treedef.unflatten(
      [optax.MaskedNode() if h is None else h for h in per_leaf])


def _paper_inv_sqrt(hess, numbers):
  del numbers  # H is an array per leaf: nothing is read from a shared vector.
  roots = [None if h is None else fusible.rsqrt(curvature.expand(h))
           for h in hess]
  return functools.partial(leaf_draws.pick, roots)


def _paper_update(reference, hess, stats, second, leaves, rate, probe):
  return curvature.paper_update(reference, hess, stats, second, leaves.draws,
                                None, rate, probe)


def _paper_store(hess, treedef, numbers):
  del numbers  # H is an array per leaf.
  return _paper_join(hess, treedef)


def _paper_rule(reference):
  return Rule(
      granularities=("element", "factored"),
      default_rate=1e-6,
      init=_paper_init,
      init_stats=lambda: None,
      inv_sqrt=_paper_inv_sqrt,
      update=functools.partial(_paper_update, reference),
      last_array=lambda hess, i: curvature.updated_array(hess[i]),
      shapes_fit=paper_rule.shapes_fit,
      split=_paper_split,
      per_leaf=lambda hess: hess,
      store=_paper_store,
      join=_paper_join,
      carried_form=lambda hessian, numbers, carried: hessian,
      layout="leaves")


RULES = {
    "signed": Rule(
        granularities=grouped_curvature.GRANULARITIES,
        default_rate=grouped_curvature.DEFAULT_RATE,
        init=grouped_curvature.init,
        init_stats=grouped_curvature.init_stats,
        inv_sqrt=grouped_curvature.inv_sqrt,
        update=signed_rule.update,  # the core's, on compact.Leaves
        last_array=grouped_curvature.last_array,
        shapes_fit=grouped_curvature.shapes_fit,
        split=grouped_curvature.split,
        per_leaf=lambda hess: hess.per_leaf,
        store=grouped_curvature.store,
        join=lambda per_leaf, treedef, granularity: grouped_curvature.join(
            per_leaf, treedef,
            count=grouped_curvature.num_factors(granularity)),
        carried_form=grouped_curvature.carried_form,
        layout="factors"),
    "paper": _paper_rule(False),
    "reference": _paper_rule(True),
}
