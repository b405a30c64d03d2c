"""H of HiZOO's default rule as the compact program keeps it.

The rule is :func:`hizoo_jax.core.signed_rule.update`, stated once; this
module is the compact program's side of its boundary (the ``factor_*``
members of :class:`hizoo_jax.compact.Leaves`): every leaf's factors are one
vector (:mod:`hizoo_jax.joined_factors`), so the rule is a few vector
operations for the whole model instead of a few kernels per leaf; the sums of
z^2 - 1 over groups are drawn in one loop on one device
(:mod:`hizoo_jax.range_sums`); through the lean step's loop the state holds
H as one vector (:class:`Carried`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hizoo_jax import _xla
from hizoo_jax import joined_factors
from hizoo_jax import range_sums
from hizoo_jax.core import leafwise

class Factors(NamedTuple):
  """H as this rule computes with it (:func:`split`)."""

  per_leaf: list  # per leaf, the tuple of its factors, or None (frozen); a
  # factor held in `vector` is a joined_factors.Slot.
  vector: Optional[jax.Array]  # (n,) float: the joinable factors end to end,
  # by leaf, then factor (joined_factors.joinable); None if there are none.
  carried: bool  # whether the state holds H as Carried.


class Carried(NamedTuple):
  """H in the loop carry of ``hz.make_train_step``: one vector.

  The step writes the new state on its last phase only, a select per state
  leaf; factor by factor, each select was a kernel of its own (HiZOO-L: two
  per leaf). Only the step holds this form: its state is
  :func:`carried_form` on the way into the loop and back.
  """

  vector: Optional[jax.Array]  # (n,) float: as Factors.vector.
  trees: tuple  # the state's trees of factors, those in `vector` as Slots.


def split(hessian, treedef) -> Factors:
  """The state's H (either form) as :class:`Factors`."""
  carried = isinstance(hessian, Carried)
  trees = [treedef.flatten_up_to(t)
           for t in (hessian.trees if carried else hessian)]
  per_leaf = [None if isinstance(fs[0], optax.MaskedNode) else tuple(fs)
              for fs in zip(*trees)]
  if carried:
    return Factors(per_leaf, hessian.vector, True)
  keys = [(i, k) for i, h in enumerate(per_leaf) if h is not None
          for k in range(len(h)) if joined_factors.joinable(h[k])]
  vector = jnp.concatenate([per_leaf[i][k].reshape(-1) for i, k in keys]
                           ) if keys else None
  return Factors(joined_factors.slots(per_leaf, keys), vector, False)


def store(hess: Factors, treedef, numbers: list):
  """The state's H from :class:`Factors`, in the form :func:`split` read.

  ``numbers``: the leaves' numbers (:func:`hizoo_jax._xla.at_leaf`); each
  factor is read out of the vector at its leaf's number, so that
  same-shaped leaves share the kernel.
  """
  if hess.carried:
    return Carried(hess.vector, join(hess.per_leaf, treedef))
  pieces = joined_factors.split_at_numbers(
      hess.vector, joined_factors.in_vector(hess.per_leaf), hess.per_leaf,
      numbers)
  return join([None if h is None else tuple(
      pieces[i, k].astype(f.dtype) if (i, k) in pieces else f
      for k, f in enumerate(h)) for i, h in enumerate(hess.per_leaf)], treedef)


def carried_form(hessian, leaf_numbers, carried: bool):
  """The state's H in the loop carry's form (``carried``) or its own.

  ``leaf_numbers``: the state's tree of leaf numbers.
  """
  treedef = jax.tree.structure(leaf_numbers)
  return store(split(hessian, treedef)._replace(carried=carried), treedef,
               treedef.flatten_up_to(leaf_numbers))


def last_array(hess: Factors, i: int) -> jax.Array:
  """An array of the new H that leaf ``i``'s factors are computed with."""
  first = hess.per_leaf[i][0]
  return hess.vector if isinstance(first, joined_factors.Slot) else first


def join(per_leaf: list, treedef, masked=optax.MaskedNode(),
         count=None) -> tuple:
  """The state's tuple of factor trees from per-leaf tuples (None: frozen).

  ``count``: how many trees (:func:`hizoo_jax.core.signed_rule.num_factors`);
  None: as many as the leaves have. init passes it, so that params without
  leaves (optax's placeholder in ``optax.tree.map_params``) give HiZOO-L's
  two trees too.
  """
  if count is None:
    count = max((len(h) for h in per_leaf if h is not None), default=1)
  return tuple(treedef.unflatten([masked if h is None else h[k]
                                  for h in per_leaf]) for k in range(count))


def inv_sqrt(hess: Factors, numbers: list):
  """``read(which)``: H^{-1/2} of leaf ``which`` (an int), broadcastable to
  it, or of the same-shaped leaves ``which`` (a tuple), stacked.

  One ``rsqrt`` of all factors as a vector (on a mesh, see
  :func:`hizoo_jax.joined_factors.joinable`): leaf by leaf, each ``rsqrt``
  of a few numbers was a kernel of its own (XLA does not recompute an
  expensive operation in each element of its consumer).
  ``numbers``: the leaves' numbers (:func:`hizoo_jax._xla.at_leaf`).
  """
  return _inv_sqrt_reader(hess.vector,
                          joined_factors.in_vector(hess.per_leaf),
                          hess.per_leaf, numbers)


def _inv_sqrt_reader(vector, joined: list, hess: list, numbers: list):
  """:func:`inv_sqrt`'s ``read`` from the factors ``joined`` laid end to
  end in ``vector``; every other factor is taken from ``hess``."""
  alone = {(i, k): lax.rsqrt(h[k]) for i, h in enumerate(hess)
           if h is not None for k in range(len(h)) if (i, k) not in joined}
  return joined_factors.reader(
      None if vector is None else lax.rsqrt(vector), joined, alone, hess,
      numbers)


def _shapes(leaves) -> list:
  return [jnp.shape(x) for x in leaves.values]


def _per_entry(values, joined: list, hess: list) -> np.ndarray:
  """A value per factor of ``joined``, repeated for each of its entries."""
  return np.repeat(np.asarray(values, np.float32),
                   [hess[i][k].size for i, k in joined])


def _joined_info(joined: list, hess: list, shapes) -> leafwise.FactorInfo:
  """:class:`FactorInfo` of the joined factors, per entry of the vector."""
  infos = [leafwise.factor_info(hess[i][k].shape, shapes[i], k, len(hess[i]))
           for i, k in joined]
  return leafwise.FactorInfo(
      n=_per_entry([f.n for f in infos], joined, hess),
      num=_per_entry([f.num for f in infos], joined, hess),
      first=_per_entry([f.first for f in infos], joined, hess) > 0)


def _apart(hess: list) -> list:
  """The (leaf, factor) pairs not in the vector (on a mesh)."""
  return [(i, k) for i, h in enumerate(hess) if h is not None
          for k, f in enumerate(h) if not isinstance(f, joined_factors.Slot)]


def factor_sums(factors: Factors, fn, leaves) -> dict:
  """:meth:`hizoo_jax.core.leafwise.Leaves.factor_sums`, drawn in one loop
  on one device (:mod:`hizoo_jax.range_sums`)."""
  hess, shapes = factors.per_leaf, _shapes(leaves)
  live = [i for i, h in enumerate(hess) if h is not None]
  # HiZOO-L's second per-tensor factor of a non-matrix leaf has the same
  # groups as its first: same sums. In one loop they are drawn again (a few
  # rows), so that the sums come out in the vector's order, one array: the
  # copies made a slice kernel per leaf and a concatenation.
  one_loop = range_sums.in_one_loop()
  own = [(i, k) for i in live for k, f in enumerate(hess[i])
         if one_loop or not (k and f.shape == hess[i][0].shape)]
  sums = dict(zip(own, range_sums.group_sums(
      leaves.draws, [(i, leafwise.shared_axes(hess[i][k].shape, shapes[i]))
                     for i, k in own], shapes, fn)))
  for i in live:
    for k in range(1, len(hess[i])):
      sums.setdefault((i, k), sums[i, 0])
  return sums


def coordinate_sum(sums: dict) -> jax.Array:
  """:meth:`hizoo_jax.core.leafwise.Leaves.coordinate_sum`: in one loop,
  one sum of all the loop's sums (leaf by leaf, a kernel per leaf)."""
  if not range_sums.in_one_loop():  # on a mesh: each sharded like its leaf
    return sum(jnp.sum(s, axis=tuple(range(1, s.ndim)))
               for (_, k), s in sums.items() if k == 0)
  q = next(iter(sums.values())).shape[0]
  first = np.concatenate([np.full(s.size // q, k == 0)
                          for (_, k), s in sums.items()])
  return jnp.sum(jnp.where(first, jnp.concatenate(
      [s.reshape(q, -1) for s in sums.values()], axis=1), 0.0), axis=1)


def factor_map(fn, factors: Factors, sums, leaves) -> Factors:
  """:meth:`hizoo_jax.core.leafwise.Leaves.factor_map` on the joined vector
  at once (a few vector operations for the whole model, where factor by
  factor it was a few dozen instructions and several tiny kernels per
  leaf), and factor by factor on the others (on a mesh)."""
  hess, shapes = factors.per_leaf, _shapes(leaves)
  joined = joined_factors.in_vector(hess)
  vector = None
  if joined:
    s = None if sums is None else jnp.concatenate(
        [sums[key].reshape(sums[key].shape[0], -1) for key in joined], axis=1)
    # Stored: every leaf reads it, in slices that would otherwise each
    # recompute it.
    vector = _xla.computed_once(fn(factors.vector, s, _joined_info(
        joined, hess, shapes)).astype(factors.vector.dtype), leaves.zero)
  new = {(i, k): fn(hess[i][k], None if sums is None else sums[i, k],
                    leafwise.factor_info(hess[i][k].shape, shapes[i], k,
                                         len(hess[i]))).astype(hess[i][k].dtype)
         for i, k in _apart(hess)}
  return Factors([None if h is None else tuple(
      f if isinstance(f, joined_factors.Slot) else new[i, k]
      for k, f in enumerate(h)) for i, h in enumerate(hess)],
                 vector, factors.carried)


def factor_total(factors: Factors, leaves) -> jax.Array:
  """:meth:`hizoo_jax.core.leafwise.Leaves.factor_total`: a group of a
  one-factor leaf stands for its n coordinates; a factored leaf's total
  comes from its factors."""
  hess, vector, shapes = factors.per_leaf, factors.vector, _shapes(leaves)
  joined, apart = joined_factors.in_vector(hess), _apart(hess)
  # The joined factors of leaves with a factor apart, for their totals.
  pieces = joined_factors.split_at_numbers(
      vector, joined, hess, leaves.numbers, only={i for i, _ in apart})
  def factor(i, k):
    return pieces[i, k] if (i, k) in pieces else hess[i][k]
  total = sum(leafwise.factored_total((factor(i, 0), factor(i, 1)),
                                      shapes[i])
              for i in sorted({i for i, _ in apart}) if len(hess[i]) == 2)
  if joined:
    info = _joined_info(joined, hess, shapes)
    total += jnp.sum(jnp.where(info.num == 1, vector * info.n, 0.0))
    total += joined_factors.joined_factored_total(vector, joined, hess,
                                                  shapes)
  total += sum(jnp.sum(hess[i][0] * leafwise.factor_info(
      hess[i][0].shape, shapes[i], 0, 1).n) for i, k in apart
               if len(hess[i]) == 1)
  return total
