"""Shardings of the optimizer state for parameters laid out on a device mesh.

Zeroth-order optimizers keep state only where the parameters are: the diagonal
curvature H of a leaf lives on the devices that hold the leaf, and the factors
of HiZOO-L follow the leaf's row and column axes. Scalars (step count, losses)
and the PRNG key words are replicated. With these shardings a step needs no
collective on parameter-sized data; only the scalar losses are reduced across
data-parallel devices (inside the user's loss).

Two ways to use a mesh:

* Explicit axes (``jax.make_mesh(..., axis_types=(AxisType.Explicit,) * n)``
  and ``jax.set_mesh``): ``optimizer.init(params)`` already places every state
  leaf like its parameter and ``update`` keeps it there; nothing to do.
* Auto axes with ``jax.jit(in_shardings=..., out_shardings=...)``: pass
  :func:`state_shardings` for the optimizer state.

Example:
  >>> import jax, jax.numpy as jnp, hizoo_jax as hz
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> params = {"w": jnp.ones((4, 8))}
  >>> shardings = {"w": NamedSharding(mesh, P(None, "model"))}
  >>> tx = hz.hizoo_l(1e-3, min_dim_size_to_factor=2)
  >>> state_sh = hz.state_shardings(tx, params, shardings)
  >>> rows, cols = state_sh[0].hessian  # row and column factors of H
  >>> cols["w"].spec
  P(None, 'model')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from hizoo_jax.core import paper_rule
from hizoo_jax.core import signed_rule
from hizoo_jax.zo_state import ZOState


def _full_spec(spec: PartitionSpec, ndim: int, where: str) -> list:
  entries = list(spec)
  if len(entries) > ndim:
    raise ValueError(
        f"the sharding of parameter {where} has spec {spec} with more entries "
        f"than the parameter has axes ({ndim}).")
  return entries + [None] * (ndim - len(entries))


def _as_named(sharding, mesh, where: str) -> NamedSharding:
  if isinstance(sharding, NamedSharding):
    return sharding
  if isinstance(sharding, PartitionSpec):
    if mesh is None:
      raise ValueError(
          f"the sharding of parameter {where} is a PartitionSpec; pass "
          "mesh=... (or give NamedShardings).")
    return NamedSharding(mesh, sharding)
  if sharding is None and mesh is not None:
    return NamedSharding(mesh, PartitionSpec())
  raise TypeError(
      f"the sharding of parameter {where} must be a NamedSharding (or a "
      f"PartitionSpec with mesh=...), got {sharding!r}.")


def _is_array_like(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


class _Assigner:
  """Maps every leaf of an abstract optimizer state to a NamedSharding."""

  def __init__(self, params, shardings, mesh):
    paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.paths = [jax.tree_util.keystr(p) for p, _ in paths_leaves]
    self.shapes = [tuple(x.shape) for _, x in paths_leaves]
    try:
      given = self.treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "shardings must be a tree with the structure of params (one "
          f"sharding per leaf). params: {self.treedef}; shardings: "
          f"{jax.tree_util.tree_structure(shardings)}.") from e
    self.shardings = [_as_named(s, mesh, p) for s, p in zip(given, self.paths)]
    for s, shape, path in zip(self.shardings, self.shapes, self.paths):
      _full_spec(s.spec, len(shape), path)
    self.mesh = self.shardings[0].mesh if self.shardings else mesh
    if self.mesh is None:
      raise ValueError("params has no leaves; pass mesh=... .")
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  def entry(self, i: int, node):
    """The sharding of one parameter-shaped state entry."""
    sharding, shape = self.shardings[i], self.shapes[i]
    if isinstance(node, optax.MaskedNode) or node is None:
      return node
    if isinstance(node, paper_rule.FactoredHessian):
      return dataclasses.replace(
          node,
          row=paper_rule.factor_sharding(sharding, len(shape), node.col_axis),
          col=paper_rule.factor_sharding(sharding, len(shape), node.row_axis))
    if _is_array_like(node) and tuple(node.shape) == shape:
      return sharding
    if _is_array_like(node) and len(node.shape) == len(shape) and all(
        a in (1, n) for a, n in zip(node.shape, shape)):
      # A curvature factor: sharded like the leaf on the axes it keeps.
      return signed_rule.factor_sharding(sharding, shape, node.shape)
    return self.everything_replicated(node)

  def like_leaves(self, tree):
    """Shardings of a tree with one entry per parameter."""
    entries = self.treedef.flatten_up_to(tree)
    return self.treedef.unflatten(
        [self.entry(i, e) for i, e in enumerate(entries)])

  def everything_replicated(self, node):
    return jax.tree.map(lambda _: self.replicated, node)

  def like_params(self, node) -> Optional[list]:
    """The entries of ``node`` per parameter if it is shaped like params."""
    if not self.paths:
      return None
    try:
      entries = self.treedef.flatten_up_to(node)
    except (ValueError, TypeError):
      return None
    for entry, shape in zip(entries, self.shapes):
      if isinstance(entry, (optax.MaskedNode, paper_rule.FactoredHessian)):
        continue
      if entry is None or (_is_array_like(entry) and tuple(entry.shape) == shape):
        continue
      return None
    return entries

  def assign(self, node):
    if isinstance(node, ZOState):
      hessian = node.hessian
      if isinstance(hessian, tuple):  # "signed": trees of factors
        hessian = tuple(self.like_leaves(t) for t in hessian)
      elif hessian is not None:
        hessian = self.like_leaves(hessian)
      return self.everything_replicated(node)._replace(hessian=hessian)
    if node is None or isinstance(node, optax.MaskedNode):
      return node
    entries = self.like_params(node)
    if entries is not None and not _is_array_like(node):
      return self.treedef.unflatten(
          [self.entry(i, e) for i, e in enumerate(entries)])
    if _is_array_like(node):
      if len(self.paths) == 1 and self.treedef.num_nodes == 1:
        return self.entry(0, node)  # params is a single array.
      return self.replicated
    children, treedef = jax.tree_util.tree_flatten(
        node, is_leaf=lambda x: x is not node)
    return treedef.unflatten([self.assign(c) for c in children])


def state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    shardings: Any = None,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> Any:
  """NamedShardings for the whole state of ``optimizer`` on ``params``.

  Rules: an estimator's diagonal H takes its parameter's sharding; a HiZOO-L
  factor takes the parameter's spec without the removed axis (the row factor
  keeps the row axis' mesh axes, the column factor the column axis' ones);
  any other state subtree shaped like params (e.g. Adam's moments downstream)
  takes the parameters' shardings; scalars, keys and everything else are
  replicated. Works through ``optax.chain``, ``optax.masked`` and
  ``optax.inject_hyperparams``. Nothing is computed: the state's shapes come
  from ``jax.eval_shape(optimizer.init, params)``.

  Args:
    optimizer: any optax transformation (a hizoo_jax alias or a chain).
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``.
    shardings: a tree like ``params`` of NamedShardings (or PartitionSpecs
      with ``mesh``). None: read each leaf's ``.sharding`` (arrays or
      ShapeDtypeStructs created with a sharding).
    mesh: the mesh for PartitionSpec shardings and replicated entries.

  Returns:
    A tree like ``optimizer.init(params)`` of NamedShardings (MaskedNode and
    None entries kept), ready for ``jax.jit(out_shardings=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, hizoo_jax as hz
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
    >>> specs = {"w": P("data", None), "b": P()}
    >>> sh = hz.state_shardings(hz.hizoo(1e-3), params, specs, mesh=mesh)
    >>> sh[0].hessian[0]["w"].spec, sh[0].count.spec  # one H per tensor
    (P(None, None), P())
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        "optimizer must be an optax.GradientTransformation, got "
        f"{type(optimizer).__name__}.")
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), params)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assigner = _Assigner(abstract, shardings, mesh)
  state = jax.eval_shape(optimizer.init, abstract)
  return assigner.assign(state)


def abstract_state(optimizer, params, shardings=None, *, mesh=None) -> Any:
  """ShapeDtypeStructs (with shardings) of ``optimizer.init(params)``.

  The restore target for :func:`hizoo_jax.restore_checkpoint` on a mesh.

  Args:
    optimizer: any optax transformation.
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``.
    shardings: as in :func:`state_shardings`.
    mesh: as in :func:`state_shardings`.

  Returns:
    A tree like the optimizer state of ``jax.ShapeDtypeStruct`` leaves.

  Example:
    >>> import jax, jax.numpy as jnp, hizoo_jax as hz
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jnp.ones((8, 4))}
    >>> target = hz.abstract_state(hz.mezo(1e-3), params, mesh=mesh,
    ...                            shardings={"w": jax.P()})
    >>> target[0].count.shape
    ()
  """
  target = jax.eval_shape(
      optimizer.init,
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  sharding = state_shardings(optimizer, params, shardings, mesh=mesh)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      target, sharding)


def init_sharded(optimizer, params, shardings=None, *, mesh=None) -> Any:
  """``optimizer.init(params)`` created directly with its shardings.

  Each device allocates only its shards (nothing is built on one device and
  then split), as large runs need.

  Args:
    optimizer: any optax transformation.
    params: the parameters (arrays or ShapeDtypeStructs).
    shardings: as in :func:`state_shardings`.
    mesh: as in :func:`state_shardings`.

  Returns:
    The optimizer state, each leaf placed by :func:`state_shardings`.

  Example:
    >>> import jax, jax.numpy as jnp, hizoo_jax as hz
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jnp.ones((8, 4))}
    >>> state = hz.init_sharded(hz.hizoo(1e-3), params, {"w": jax.P("data")},
    ...                         mesh=mesh)
  """
  out = state_shardings(optimizer, params, shardings, mesh=mesh)
  return jax.jit(optimizer.init, out_shardings=out)(params)
