"""Argument checks shared by the estimators: clear errors for bad inputs."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

# Extra args that belong to the estimators' own protocol, never to value_fn.
PROTOCOL_ARGS = ("value_fn", "zo_losses", "zo_probe")


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


def check_hyperparams(mu, hessian_smooth=None) -> None:
  mu_value = concrete_float(mu)
  if mu_value is not None and not mu_value > 0:
    raise ValueError(f"mu (the perturbation scale) must be > 0, got {mu!r}.")
  if hessian_smooth is not None:
    rate = concrete_float(hessian_smooth)
    if rate is not None and not 0.0 <= rate <= 1.0:
      raise ValueError(
          f"hessian_smooth must lie in [0, 1], got {hessian_smooth!r}.")


def trainable_leaves(mask, params, treedef, paths) -> list[bool]:
  """One bool per leaf of ``params``: False where ``mask`` leaves it out."""
  if mask is None:
    return [True] * len(paths)
  tree = mask(params) if callable(mask) else mask
  try:
    leaves = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must be a tree of bools with the structure of params (or a "
        f"callable returning one). params: {treedef}; mask: "
        f"{jax.tree_util.tree_structure(tree)}.") from e
  out = []
  for path, leaf in zip(paths, leaves):
    try:
      out.append(bool(leaf))
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
      raise ValueError(
          f"mask entry at {jax.tree_util.keystr(path)} must be a Python bool "
          f"known at trace time, got {leaf!r}.") from e
  return out


def check_leaf_dtypes(leaves, paths, trainable) -> None:
  for leaf, path, keep in zip(leaves, paths, trainable):
    if keep and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"parameter {jax.tree_util.keystr(path)} has dtype "
          f"{jnp.result_type(leaf)}: zeroth-order perturbation needs floating "
          "point leaves. Leave it out with mask=... .")


def check_params(params) -> None:
  if params is None:
    raise ValueError(
        "This zeroth-order estimator needs the current params: call "
        "update(updates, state, params, value_fn=...).")


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
  return loss.astype(jnp.promote_types(loss.dtype, jnp.float32))
