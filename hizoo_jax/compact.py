"""The compact program: the boundary of :mod:`hizoo_jax.core`, for XLA:CPU.

The estimators of :mod:`hizoo_jax.core.estimators` state the mathematics
once; :data:`PROGRAM` is the second implementation of their boundary (the
first, :data:`hizoo_jax.core.estimators.PLAIN`, trusts XLA). It differs only
in how the program is compiled, each device in a module of its own:

* each leaf's noise is read at the leaf's number, held in the state as data,
  so that same-shaped leaves share their kernels, and the smallest leaves are
  drawn together (:mod:`hizoo_jax.leaf_draws`);
* H is one vector and its sums of z are drawn in one loop
  (:mod:`hizoo_jax.grouped_curvature`, :mod:`hizoo_jax.range_sums`);
* small shared values are stored once (:func:`hizoo_jax._xla.computed_once`);
* inside the lean step, the update is computed on every phase of its loop
  and kept on the last (``zo_final``, :mod:`hizoo_jax.compact_loop`), with H
  carried as one vector (:class:`hizoo_jax.grouped_curvature.Carried`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _xla
from hizoo_jax import fusible
from hizoo_jax import grouped_curvature
from hizoo_jax import leaf_draws
from hizoo_jax import noise
from hizoo_jax import range_sums
from hizoo_jax.core import estimators as core
from hizoo_jax.core import leafwise
from hizoo_jax.core import paper_rule
from hizoo_jax.core import signed_rule
from hizoo_jax.zo_state import Perturbation

class Leaves(NamedTuple):
  """The parameters of one step, leaf by leaf, and the step's noise."""

  values: list  # every leaf of params, in tree order.
  paths: list  # their key paths.
  treedef: Any  # the params' tree structure.
  trainable: list[bool]  # False: masked or frozen; never perturbed.
  numbers: list  # per leaf, its number (a uint32 scalar read from the state).
  zero: jax.Array  # (), uint32: 0, computed from the step count.
  draw: leaf_draws.LeafDraws  # the leaves' z, for moves and the direction.
  draws: noise.Draws  # z per query, for the curvature's sums.
  final: Optional[jax.Array]  # zo_final inside the lean step's loop.

  def flat(self, tree) -> list:
    return self.treedef.flatten_up_to(tree)

  # H as grouped_curvature.Factors: the signed rule's boundary.
  def factor_sums(self, hess, fn) -> dict:
    return grouped_curvature.factor_sums(hess, fn, self)

  def coordinate_sum(self, sums: dict) -> jax.Array:
    return grouped_curvature.coordinate_sum(sums)

  def factor_map(self, fn, hess, sums=None):
    return grouped_curvature.factor_map(fn, hess, sums, self)

  def factor_total(self, hess) -> jax.Array:
    return grouped_curvature.factor_total(hess, self)

  def shared(self, values):
    """``values`` read by every leaf, stored once (_xla.computed_once)."""
    return _xla.computed_once(values, self.zero)

  # H per coordinate: the published rules' boundary.
  def estimate_map(self, fn, hess: list) -> list:
    """As core.leafwise's: each estimate's draw is salted (noise.salt) so that
    XLA regenerates z for it instead of storing it, and a factored leaf's
    first estimate waits for the previous factored leaf's result: where a
    reduction stores its operand (XLA:CPU meshes), one leaf-sized estimate
    is live at a time."""
    new, previous = list(hess), None
    for i, h in enumerate(hess):
      if h is None:
        continue
      factored = isinstance(h, paper_rule.FactoredHessian)
      def draw(after=None, i=i, h=h, first=(previous if factored else None)):
        order = after if after is not None else first
        salt = self.draws.salt(0 if order is None else order)
        # H as this estimate reads it waits for the salt too, so that XLA
        # does not expand every leaf's factored H at once.
        h_read = jax.tree.map(lambda a: jnp.where(salt == 0, a, 1), h)
        return h_read, [self.draws.z(i, j, salt)
                        for j in range(self.draws.seeds.shape[0])]
      new[i] = fn(h, draw)
      previous = new[i].col if factored else previous
    return new

  def mean(self, x: jax.Array, axis: int) -> jax.Array:
    return _xla.fused_mean(x, axis)


class Scales(NamedTuple):
  """s = H^{-1/2} as the compact program reads it."""

  read: Callable  # which -> s of leaf `which` (or a group's, stacked).
  last: Callable  # i -> the array of H that leaf i's factors come from.


def leaves_of(params, config: core.Config, state, extra) -> Leaves:
  """The step's :class:`Leaves`: the params checked, the noise ready."""
  values, paths, treedef, trainable = leafwise.checked_leaves(
      params, config.mask)
  try:
    numbers = treedef.flatten_up_to(state.leaf_numbers)
  except (ValueError, TypeError) as e:
    raise ValueError(core.OTHER_STRUCTURE) from e
  zero = (state.count >> 31).astype(jnp.uint32)  # 0; XLA cannot prove it.
  q = config.num_queries
  # Every leaf's seed for every query: (q, leaves, 2), one small vector op.
  seeds = _xla.computed_once(noise.leaf_seeds(
      state.rng_key, state.count, jnp.arange(q, dtype=jnp.uint32)[:, None],
      paths), zero)
  draw = leaf_draws.leaf_draws(seeds, numbers, values, trainable, zero)
  # One draw per query for the rule's sums: a group of small leaves is then
  # drawn once, not once per leaf. The sums are needed only where H moves
  # and, inside the lean step's loop, on its last phase.
  final = extra.get("zo_final")
  active = state.count % config.every == 0
  at_query = [draw.at(j) for j in range(q)]
  draws = noise.Draws(z=lambda i, j, order=None: at_query[j](i, order),
                      zero=zero, seeds=seeds,
                      active=active if final is None else active & final)
  return Leaves(values, paths, treedef, trainable, numbers, zero, draw, draws,
                final)


def hessian(config: core.Config, state_hessian, leaves: Leaves):
  """H as the compact rule computes with it, checked against the params."""
  try:
    hess = config.rule.split(state_hessian, leaves.treedef)
  except (ValueError, TypeError) as e:
    raise ValueError(core.OTHER_STRUCTURE) from e
  core.check_hessian(config.rule, config.rule.per_leaf(hess), leaves)
  return hess


def scales(config: core.Config, hess, leaves: Leaves) -> Scales:
  rule = config.rule
  return Scales(rule.inv_sqrt(hess, leaves.numbers),
                functools.partial(rule.last_array, hess))


def perturb(leaves: Leaves, tree, coeffs, queries, mu, s: Optional[Scales]):
  """``tree + mu s sum_t coeffs[t] z_{queries[t]}``, one term at a time."""
  out = leaves.flat(tree)
  for t in range(len(coeffs)):
    def step(zs, which, t=t):
      delta = (coeffs[t] * mu) * zs[0]
      return delta if s is None else delta * s.read(which)
    for i, delta in enumerate(leaves.draw.values(step, [queries[t]])):
      if delta is not None:
        dtype = jnp.promote_types(out[i].dtype, jnp.float32)
        out[i] = (out[i].astype(dtype) + delta).astype(out[i].dtype)
  return leaves.treedef.unflatten(out)


def combine(leaves: Leaves, coeffs: jax.Array, s: Optional[Scales]):
  """``s sum_j coeffs[j] z_j`` per leaf (zeros where frozen)."""
  coeffs = _xla.computed_once(coeffs.astype(jnp.float32), leaves.zero)

  def direction(zs, which):
    out = sum(coeffs[j] * z for j, z in enumerate(zs))
    return out if s is None else out * s.read(which)

  # Salted after the new H, the draw is never merged with the moves' draws
  # (XLA would store z), unless they share a fusion (zo_final).
  after = None if s is None or leaves.final is not None else s.last
  out = leaves.draw.values(direction, range(coeffs.shape[0]), after)
  return leaves.treedef.unflatten([
      jnp.zeros_like(x) if d is None else d.astype(x.dtype)
      for x, d in zip(leaves.values, out)])


def _carry_state(rule: Rule, state, carried: bool):
  """H as one vector through the lean step's loop (``carried``), or back."""
  return state._replace(hessian=rule.carried_form(
      state.hessian, state.leaf_numbers, carried))


def perturbation(config: core.Config, scheme, leaves: Leaves,
                 move) -> Perturbation:
  """The lean step's Perturbation (:mod:`hizoo_jax.compact_loop`)."""
  del leaves  # all in the move
  rule = config.rule
  # Sums over rows or columns are noise passes of their own, except in the
  # signed rule's loop of sums (hizoo_jax.range_sums).
  light = (rule is None or config.granularity == "tensor"
           or (rule is RULES["signed"] and range_sums.in_one_loop()))
  return Perturbation(
      lambda tree, coeff, query: move(tree, [coeff], [query]),
      scheme.num_queries, bool((scheme.points[0] == 0).all()),
      int(scheme.every[0]), light,
      None if rule is None else functools.partial(_carry_state, rule),
      scheme, move, loop="compact")


def leaf_numbers(treedef, count: int):
  """Each leaf's position, as state: read as data, so that same-shaped leaves
  share kernels (XLA folds a constant into each kernel)."""
  return treedef.unflatten([jnp.asarray(i, jnp.uint32) for i in range(count)])


PROGRAM = core.Program(
    leaves_of=leaves_of, hessian=hessian,
    store=lambda config, hess, leaves: config.rule.store(
        hess, leaves.treedef, leaves.numbers),
    scales=scales, perturb=perturb, combine=combine,
    perturbation=perturbation, leaf_numbers=leaf_numbers)


class Rule(NamedTuple):
  """A curvature rule in the compact program: the core's members (init,
  update, shapes_fit, layout: :class:`hizoo_jax.core.rules.Rule`), and how
  this program holds H."""

  init: Callable  # (shape, granularity, factored axes, dtype, sharding,
  # stacked) -> one leaf's H_0.
  init_stats: Callable[[], Any]
  update: Callable  # (hess, stats, second, leaves: Leaves, rate, probe)
  # -> (new hess, new stats)
  shapes_fit: Callable[[Any, tuple], bool]  # (a leaf's H, leaf shape)
  layout: str  # the state's form of H (hizoo_jax.core.rules.Rule.layout).
  split: Callable  # (state.hessian, treedef) -> hess: H as the rule
  # computes with it.
  per_leaf: Callable[[Any], list]  # hess -> per leaf (None: frozen)
  store: Callable  # (hess, treedef, numbers) -> state.hessian, in the form
  # split read.
  # (hess, the leaves' numbers) -> read(which): H^{-1/2} of leaf `which`
  # broadcastable to it, or of a tuple of same-shaped leaves stacked.
  inv_sqrt: Callable[[Any, list], Callable]
  last_array: Callable[[Any, int], jax.Array]  # (hess, leaf): what the
  # update's z of that leaf waits for.
  carried_form: Callable  # (state.hessian, state.leaf_numbers, carried)
  # -> the form hz.make_train_step's loop carries (carried) or the state's.


def _paper_init(shape, granularity, axes, dtype, sharding, stacked):
  del stacked  # per element, or factored over axes that exclude the layers.
  return paper_rule.init(
      shape, axes if granularity == "factored" else None, dtype, sharding)


def _paper_inv_sqrt(hess, numbers):
  del numbers  # H is an array per leaf: nothing is read from a shared vector.
  roots = [None if h is None else fusible.rsqrt(paper_rule.expand(h))
           for h in hess]
  return functools.partial(leaf_draws.pick, roots)


def _paper_rule(reference: bool) -> Rule:
  masked = optax.MaskedNode()
  return Rule(
      init=_paper_init, init_stats=lambda: None,
      update=functools.partial(paper_rule.update, reference),
      shapes_fit=paper_rule.shapes_fit, layout="leaves",
      split=lambda hessian, treedef: [
          None if isinstance(h, optax.MaskedNode) else h
          for h in treedef.flatten_up_to(hessian)],
      per_leaf=lambda hess: hess,
      store=lambda hess, treedef, numbers: treedef.unflatten(
          [masked if h is None else h for h in hess]),
      inv_sqrt=_paper_inv_sqrt,
      last_array=lambda hess, i: (
          hess[i].col if isinstance(hess[i], paper_rule.FactoredHessian)
          else hess[i]),
      carried_form=lambda hessian, numbers, carried: hessian)


# The core's rules, with H as this program holds it: "signed" on
# grouped_curvature's joined vector, "paper" and "reference" per leaf.
RULES = {
    "signed": Rule(
        init=signed_rule.init, init_stats=signed_rule.init_stats,
        update=signed_rule.update, shapes_fit=signed_rule.shapes_fit,
        layout="factors", split=grouped_curvature.split,
        per_leaf=lambda hess: hess.per_leaf, store=grouped_curvature.store,
        inv_sqrt=grouped_curvature.inv_sqrt,
        last_array=grouped_curvature.last_array,
        carried_form=grouped_curvature.carried_form),
    "paper": _paper_rule(False),
    "reference": _paper_rule(True),
}
