"""Workarounds for the XLA compiler, each with its reason.

The lean step's compiler options are :func:`step_compiler_options`.
:func:`traced_once` traces a per-leaf computation once per shape.
:func:`at_leaf` and :func:`leaf_piece` read a leaf's entry of a shared
vector at the leaf's number given as data (see their docstrings). The
reductions below are written so that XLA:CPU computes their operand as it
reduces.

XLA:CPU hands a plain float sum to YNNPACK, which first stores the whole
operand: for a sum over a noise expression, a leaf-sized temporary. One
reduction with two outputs (the sum and a count) stays in XLA's own loop
fusion, which computes the operand as it goes. The SPMD partitioner cannot
split a two-output reduction (it would all-gather the operand), so that form
is used only on a single CPU device, and plain ``jnp.sum`` / ``jnp.mean``
everywhere else (GPU and TPU fuse them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def single_device() -> bool:
  return jax.device_count() == 1


def step_compiler_options() -> dict:
  """XLA options for compiling the lean step (``hz.make_train_step``)."""
  disabled = [
      # Would hoist the loop-invariant parts of z (the element index,
      # H^{-1/2}) out of the evaluation loop and store them: parameter-sized.
      "while-loop-invariant-code-motion",
      # Its dead-parameter search over the evaluation loop (every leaf in
      # the carry, the whole step in the body) was a third of HiZOO's
      # compile time, to save under 0.4% of the instructions (JAX already
      # removes dead loop carries).
      "simplify-while-loops",
  ]
  options = {"xla_disable_hlo_passes": ",".join(disabled)}
  if jax.default_backend() == "cpu":
    # LLVM at -O1: hundreds of noise kernels compile in up to a third less
    # time, and the steps measured no slower (docs/performance.md).
    options["xla_backend_optimization_level"] = 1
  return options


def traced_once(static_argnames):
  """Decorator: the function is traced once per signature inside a trace.

  A jitted function called while tracing is traced once per signature
  (shapes, dtypes, static arguments) and bound as one call after that; XLA
  inlines the calls, so the compiled program is the same. For the noise
  generator, drawn once per leaf and draw: traced each time, its few dozen
  primitives per draw were most of the time to trace a step.
  """
  return functools.partial(jax.jit, static_argnames=static_argnames)


def at_leaf(table: jax.Array, number: jax.Array, axis: int = 0) -> jax.Array:
  """``table``'s entry ``number`` along ``axis`` (the axis removed).

  ``number`` is a runtime uint32 scalar, the leaf's position held in the
  optimizer state. XLA compiles identical kernels once; read at a constant
  offset, every leaf's noise kernel would differ and compile on its own.
  (Unsigned: a signed index costs a wrap of negative values in every read.)
  """
  return lax.dynamic_index_in_dim(table, number, axis, keepdims=False)


def leaf_piece(vector: jax.Array, starts: np.ndarray, number: jax.Array,
               shape) -> jax.Array:
  """``vector[starts[number]:][:size]`` reshaped to ``shape`` (see at_leaf).

  ``starts`` is a table indexed by leaf number.
  """
  return _leaf_piece(vector, np.asarray(starts, np.uint32), number,
                     tuple(shape))


@traced_once(static_argnames=("shape",))
def _leaf_piece(vector, starts, number, shape):
  size = int(np.prod(shape, dtype=np.int64))
  return lax.dynamic_slice_in_dim(
      vector, at_leaf(starts, number), size).reshape(shape)


def _single_cpu_device() -> bool:
  return jax.default_backend() == "cpu" and single_device()


def _two_sums(a: jax.Array, b: jax.Array, axes: tuple[int, ...]):
  """Sums of ``a`` and ``b`` over ``axes``: one reduction, two outputs."""
  return lax.reduce((a, b), (np.zeros((), a.dtype), np.zeros((), b.dtype)),
                    lambda x, y: (x[0] + y[0], x[1] + y[1]), axes)


def _sum_and_count(x: jax.Array, axes: tuple[int, ...]):
  return _two_sums(x, jnp.ones_like(x, dtype=jnp.int32), axes)


def fused_sum(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Sum of ``x`` over ``axes`` with the reduced axes kept (size 1)."""
  axes = tuple(axes)
  if not axes:
    return x
  if not _single_cpu_device():
    return jnp.sum(x, axis=axes, keepdims=True)
  total, n = _sum_and_count(x, axes)
  # Keep the count alive (XLA does not fold a float product with 0): a
  # one-output reduction would go to YNNPACK again.
  return jnp.expand_dims(total + 0.0 * n.astype(total.dtype), axes)


def fused_mean(x: jax.Array, axis: int) -> jax.Array:
  """Mean of ``x`` over ``axis`` (the axis removed)."""
  if not _single_cpu_device():
    return jnp.mean(x, axis=axis)
  total, n = _sum_and_count(x, (axis,))
  return total / n.astype(total.dtype)


def fused_counts(a: jax.Array, b: jax.Array):
  """The numbers of True entries of the bool arrays ``a`` and ``b`` (int32).

  One reduction with two outputs, so that on XLA:CPU neither operand (an
  expression of the noise) is stored first (see :func:`fused_sum`).
  """
  a, b = a.astype(jnp.int32), b.astype(jnp.int32)
  if not _single_cpu_device():
    return jnp.sum(a), jnp.sum(b)
  return _two_sums(a, b, tuple(range(a.ndim)))


def computed_like(value: jax.Array, leaf: jax.Array,
                  zero: jax.Array) -> jax.Array:
  """``value`` (shaped like ``leaf``), computed where ``leaf``'s shards live.

  On a mesh the SPMD partitioner computes an expression of iotas alone (the
  noise) in full on every device when it feeds a reduction. Adding ``leaf *
  zero`` (``zero``: a 0 that XLA cannot prove, so it neither folds the
  product nor computes it ahead) shards it like the leaf.
  """
  if single_device():
    return value
  return value + leaf.astype(value.dtype) * zero.astype(value.dtype)


def computed_once(value, zero: jax.Array):
  """``value`` (a tree of small arrays), computed once and stored.

  XLA duplicates a cheap elementwise producer into every fusion that reads
  it (an optimization barrier does not stop that on XLA:CPU): the per-leaf
  seeds' hash chain and the curvature rule's shared scalars would be
  recomputed in each leaf's fusions, about 80 instructions per leaf and use.
  A reduction's result is stored, so each value passes through a sum of
  ``(x, 0)`` whose mask depends on ``zero`` (a uint32 0 that XLA cannot
  prove, so it cannot simplify the sum away).
  """
  def stored(x):
    x = jnp.asarray(x)
    first = lax.broadcasted_iota(jnp.uint32, (2,) + x.shape, 0) == zero
    masked = jnp.where(first, x[None], jnp.zeros_like(x)[None])
    if x.dtype == jnp.bool_:  # kept a bool: readers need no comparison
      return jnp.any(masked, axis=0)
    return jnp.sum(masked, axis=0, dtype=x.dtype)
  return jax.tree.map(stored, value)
