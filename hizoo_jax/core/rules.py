"""The curvature rules HiZOO can use, as tables of their mathematics.

A rule says how one leaf's H starts (``init``), how it scales the noise
(``inv_sqrt``: H^{-1/2}) and how one probe moves every leaf's H
(``update``), at which ``granularities`` it may be shared, and how the
optimizer state lays H out (``layout``): "factors", a tuple with one tree
per factor (:mod:`hizoo_jax.core.signed_rule`), or "leaves", one entry per
leaf (:mod:`hizoo_jax.core.paper_rule`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

from hizoo_jax.core import paper_rule
from hizoo_jax.core import signed_rule


class Rule(NamedTuple):
  """A curvature rule (see the module docstring)."""

  granularities: tuple[str, ...]
  default_rate: float
  init: Callable  # (shape, granularity, factored axes, dtype, sharding,
  # stacked) -> one leaf's H.
  init_stats: Callable[[], Any]
  inv_sqrt: Callable  # one leaf's H -> H^{-1/2}, broadcastable to the leaf.
  update: Callable  # (hess, stats, second, leaves, rate, probe)
  # -> (new hess, new stats); hess: per leaf, None where frozen.
  shapes_fit: Callable  # (one leaf's H, leaf shape) -> bool
  layout: str  # "factors" or "leaves"


def _paper_init(shape, granularity, axes, dtype, sharding, stacked):
  del stacked  # the factored axes already exclude a stack of layers.
  return paper_rule.init(
      shape, axes if granularity == "factored" else None, dtype, sharding)


def _paper(reference: bool) -> Rule:
  return Rule(paper_rule.GRANULARITIES, paper_rule.DEFAULT_RATE, _paper_init,
              lambda: None, paper_rule.inv_sqrt,
              functools.partial(paper_rule.update, reference),
              paper_rule.shapes_fit, "leaves")


RULES = {
    "signed": Rule(signed_rule.GRANULARITIES, signed_rule.DEFAULT_RATE,
                   signed_rule.init, signed_rule.init_stats,
                   signed_rule.inv_sqrt, signed_rule.update,
                   signed_rule.shapes_fit, "factors"),
    "paper": _paper(False),
    "reference": _paper(True),
}
