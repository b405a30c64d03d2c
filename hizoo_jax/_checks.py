"""Argument checks shared by the estimators: clear errors for bad inputs."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Extra args that belong to the estimators' own protocol, never to value_fn.
PROTOCOL_ARGS = ("value_fn", "zo_losses", "zo_probe", "zo_final")

# Tags of the warnings already given: each is given once per process.
WARNED: set[str] = set()


def warn_once(tag: str, message: str) -> None:
  if tag not in WARNED:
    WARNED.add(tag)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def concrete_float(x) -> float | None:
  """``float(x)`` for a concrete number, None for a schedule or a tracer."""
  if callable(x):
    return None
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def static_int(x, name: str, minimum: int) -> int:
  """An int hyperparameter that shapes the computation (cannot be traced)."""
  try:
    value = int(x)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerIntegerConversionError) as e:
    raise TypeError(
        f"{name} must be a Python int known at trace time, got {x!r}. With "
        f"optax.inject_hyperparams, pass static_args=({name!r},).") from e
  if value < minimum or value != x:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}.")
  return value


# mu^2 below this underflows float32: the curvature's q = D / (2 mu^2) is NaN.
_MU_MIN = float(np.sqrt(np.finfo(np.float32).tiny))


def check_number(value, name: str, minimum: float = 0.0) -> None:
  """A float hyperparameter or schedule: finite and >= ``minimum`` if static."""
  if isinstance(value, (str, bytes)) or not (
      callable(value) or isinstance(value, (int, float, np.number, jax.Array,
                                            np.ndarray))):
    raise TypeError(
        f"{name} must be a float or an optax schedule (a callable of the step "
        f"count), got {value!r} ({type(value).__name__}).")
  if not callable(value) and np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
  number = concrete_float(value)
  if number is not None and not minimum <= number < float("inf"):
    raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}.")


def check_hyperparams(mu, hessian_smooth=None, name: str = "mu") -> None:
  """The perturbation scale (``name``) and the rate H moves at, if static."""
  check_number(mu, name)
  mu_value = concrete_float(mu)
  if mu_value is not None and not _MU_MIN <= mu_value < float("inf"):
    raise ValueError(
        f"{name} (the perturbation scale) must be finite and >= "
        f"{_MU_MIN:.1e} (2 {name}^2 must not underflow float32), got {mu!r}.")
  if hessian_smooth is not None:
    rate = concrete_float(hessian_smooth)
    if rate is not None and not 0.0 <= rate <= 1.0:
      raise ValueError(
          f"hessian_smooth must lie in [0, 1], got {hessian_smooth!r}.")


def step_hyperparams(mu_t, hessian_smooth, count):
  """``(mu, valid)`` for one step: schedules and injected values, traced.

  A schedule may reach ``mu = 0`` or a rate outside [0, 1] long after the
  static checks ran, so every step checks its own values. An invalid step is
  skipped (the caller folds ``valid`` into its finite flag); ``mu`` is then
  replaced by 1 so that no division by it makes NaN that could leak into H.
  """
  if jnp.shape(mu_t) != ():
    raise ValueError(
        f"mu must be a scalar at every step; the schedule gave shape "
        f"{jnp.shape(mu_t)}.")
  valid = jnp.isfinite(mu_t) & (mu_t >= _MU_MIN)
  if hessian_smooth is not None:
    rate = hessian_smooth(count) if callable(hessian_smooth) else hessian_smooth
    rate = jnp.asarray(rate, jnp.float32)
    if rate.shape != ():
      raise ValueError(
          f"hessian_smooth must be a scalar; the schedule gave shape "
          f"{rate.shape}.")
    valid &= (rate >= 0) & (rate <= 1)  # False for NaN too.
  return jnp.where(valid, mu_t, jnp.ones_like(mu_t)), valid


def check_key(key) -> None:
  """An int seed, a typed PRNG key, or integer raw key data (1-d)."""
  if isinstance(key, (bool, np.bool_)):
    ok = False
  elif isinstance(key, (int, np.integer)):
    ok = True
  elif isinstance(key, (jax.Array, np.ndarray)):
    dtype = key.dtype
    ok = (jnp.issubdtype(dtype, jax.dtypes.prng_key) or (
        jnp.issubdtype(dtype, jnp.integer) and key.ndim <= 1
        and key.size > 0))
  else:
    ok = False
  if not ok:
    raise TypeError(
        "key must be an int seed, a typed PRNG key (jax.random.key(0)) or "
        f"1-d integer raw key data, got {key!r} "
        f"({type(key).__name__}).")


def _is_leaf(node) -> bool:
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(node))


def _lookup(tree, path):
  """The mask entry for a params leaf at ``path``: the first leaf on the way."""
  node = tree
  for key in path:
    if _is_leaf(node):
      return node
    if isinstance(key, jax.tree_util.DictKey):
      node = node[key.key]
    elif isinstance(key, jax.tree_util.SequenceKey):
      node = node[key.idx]
    elif isinstance(key, jax.tree_util.GetAttrKey):
      node = getattr(node, key.name)
    else:
      raise KeyError(key)
  if not _is_leaf(node):
    raise KeyError(path)
  return node


def full_mask(mask, params):
  """``mask`` (a tree, a prefix of params, or a callable) as a full tree.

  As with ``optax.masked``, a mask leaf may stand for a whole subtree of
  params: ``{"encoder": False, "head": True}`` freezes every leaf under
  ``encoder``. Plain dicts and lists may also stand for other containers
  with the same keys (an ``nnx.State``). Returns a tree like ``params``.
  """
  tree = mask(params) if callable(mask) else mask
  if isinstance(tree, (jax.Array, np.ndarray)) and tree.ndim == 0:
    # Not a Python bool: what optax.inject_hyperparams makes of a callable
    # mask, which it takes for a schedule of the step count.
    raise ValueError(
        f"mask must be a tree of Python bools, got an array {tree!r}. With "
        "optax.inject_hyperparams, a callable mask is taken for a schedule: "
        "pass static_args=('mask',).")
  try:  # The node types of params, or a prefix of them.
    return jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
  except (ValueError, TypeError):
    pass
  try:  # Matched by keys along each leaf's path.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _lookup(tree, path), params)
  except (KeyError, IndexError, AttributeError, TypeError) as e:
    raise ValueError(
        "mask must be a tree of bools with the structure of params or a "
        "prefix of it (or a callable returning one). params: "
        f"{jax.tree_util.tree_structure(params)}; mask: "
        f"{jax.tree_util.tree_structure(tree)}.") from e


def _leaf_flags(tree, params, treedef, paths, name) -> list[bool]:
  """``tree`` (a mask-like tree, prefix or callable) as one bool per leaf."""
  out = []
  for path, flag in zip(paths, treedef.flatten_up_to(full_mask(tree, params))):
    try:
      out.append(bool(flag))
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
      raise ValueError(
          f"{name} entry at {jax.tree_util.keystr(path)} must be a Python "
          f"bool known at trace time, got {flag!r}.") from e
  return out


def trainable_leaves(mask, params, treedef, paths) -> list[bool]:
  """One bool per leaf of ``params``: False where ``mask`` leaves it out,
  and for leaves with no elements (nothing to perturb)."""
  sizes = [np.size(x) for x in treedef.flatten_up_to(params)]
  if mask is None:
    return [n > 0 for n in sizes]
  out = [keep and n > 0 for keep, n in zip(
      _leaf_flags(mask, params, treedef, paths, "mask"), sizes)]
  if out and not any(out):
    raise ValueError(
        "mask freezes every parameter: the estimator would train nothing. "
        "(optax.inject_hyperparams takes a callable mask for a schedule of "
        "the step count, which can give this: pass static_args=('mask',).)")
  return out


def stacked_leaves(stacked, params, treedef, paths) -> list[bool]:
  """One bool per leaf: True where ``stacked`` marks a leading layer axis."""
  if stacked is None:
    return [False] * len(paths)
  flags = _leaf_flags(stacked, params, treedef, paths, "stacked")
  for path, flag, x in zip(paths, flags, treedef.flatten_up_to(params)):
    if flag and jnp.ndim(x) < 1:
      raise ValueError(
          f"parameter {jax.tree_util.keystr(path)} is marked stacked but is "
          "a scalar: a stacked leaf has a leading axis of layers.")
  return flags


def check_leaf_dtypes(leaves, paths, trainable) -> None:
  for leaf, path, keep in zip(leaves, paths, trainable):
    if keep and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"parameter {jax.tree_util.keystr(path)} has dtype "
          f"{jnp.result_type(leaf)}: zeroth-order perturbation needs floating "
          "point leaves. Leave it out with mask=... .")


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_params(params) -> None:
  if params is None:
    raise ValueError(
        "This zeroth-order estimator needs the current params: call "
        "update(updates, state, params, value_fn=...).")
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=_is_masked_node):
    if not isinstance(leaf, optax.MaskedNode) and not hasattr(leaf, "dtype"):
      raise TypeError(
          f"parameter {jax.tree_util.keystr(path)} is a "
          f"{type(leaf).__name__} ({leaf!r}), not an array: pass params as "
          "arrays, e.g. jax.tree.map(jnp.asarray, params).")
  if any(map(_is_masked_node,
             jax.tree.leaves(params, is_leaf=_is_masked_node))):
    raise ValueError(
        "params contain optax.MaskedNode: the estimator runs inside "
        "optax.masked, which hides the frozen leaves' values, but a "
        "zeroth-order estimator evaluates the loss on all the parameters. "
        "Freeze leaves with the estimator's own mask= (hz.hizoo(..., "
        "mask=m)); for a chain with stateful transformations use "
        "hz.masked_chain(estimator, *downstream, mask=m).")


def value_fn_kwargs(value_fn, extra_args: dict[str, Any]) -> dict[str, Any]:
  """The extra args that ``value_fn``'s signature names (as optax does)."""
  extra = {k: v for k, v in extra_args.items() if k not in PROTOCOL_ARGS}
  try:
    parameters = list(inspect.signature(value_fn).parameters.values())
  except (TypeError, ValueError):
    return {}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return extra
  names = {p.name for p in parameters[1:]}
  return {k: v for k, v in extra.items() if k in names}


def check_loss(loss, where: str):
  """The loss as a float array of shape (), or a clear error."""
  if loss is None:
    raise TypeError(
        f"value_fn returned None at {where}: it must return the scalar loss "
        "(did it miss a return statement?).")
  if isinstance(loss, (tuple, list, dict)):
    raise TypeError(
        f"value_fn must return a scalar loss, got a {type(loss).__name__} at "
        f"{where}. If it returns (loss, aux), pass lambda p: f(p)[0].")
  loss = jnp.asarray(loss)
  if loss.shape != ():
    raise ValueError(
        f"value_fn must return a scalar loss, got shape {loss.shape} at "
        f"{where}. Reduce it (e.g. jnp.mean) before returning.")
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(
        f"value_fn must return a floating point loss, got dtype {loss.dtype} "
        f"at {where}.")
  if loss.dtype.itemsize < 4:  # Once, at trace time.
    warn_once(
        "loss_dtype",
        f"value_fn returns a {loss.dtype} loss: l+ - l- below its resolution "
        "(2**-8 |loss| for bfloat16) rounds to 0 and the step learns "
        "nothing. Reduce the loss in float32, e.g. "
        "jnp.mean(per_example.astype(jnp.float32)); the Flax helpers "
        "(hz.nnx_zo_step, hz.linen_zo_step) accept per-example losses and "
        "do this.")
  return loss.astype(jnp.promote_types(loss.dtype, jnp.float32))
