"""A float32 rsqrt that XLA never stores.

XLA fuses an elementwise producer into each of its consumers, recomputing it,
only if the producer is cheap. ``log``, ``sqrt``, ``rsqrt``, ``exp`` and float
division count as expensive: when two fusions read the same expensive value,
XLA computes it once and keeps it in a buffer the size of the array. In a
zeroth-order step that happens whenever two outputs read the same
``H^{-1/2}`` of a per-element H (the paper's rules): with ``lax.rsqrt(H)``,
XLA:CPU kept a parameter-sized buffer per step (``docs/performance.md``).

:func:`rsqrt` uses only integer bit operations, multiplications, additions
and selects, which XLA duplicates into every consumer: the bit-level first
guess ``0x5F375A86 - (bits >> 1)`` refined by three Newton steps
``y (3/2 - x y^2 / 2)``, within 3 float32 ulps of float64
(``tests/test_fusible.py``). It is jitted, so that called eagerly it runs as
one compiled kernel and gives the same bits as inside a jitted step (op by
op, the multiply-adds would round differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32
_MIN_NORMAL = np.float32(2.0**-126)


def _bits(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(x, jnp.uint32)


def _float(bits: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(bits, _F32)


def _rsqrt_normal(x: jax.Array) -> jax.Array:
  """1/sqrt(x) for finite float32 ``x >= 2**-126``.

  The first guess is within 3.5%; each Newton step takes the relative error
  e to about 1.5 e^2 (measured: 1.8e-3, 4.7e-6, 1.4e-7 after 1, 2, 3 steps).
  """
  y = _float(np.uint32(0x5F375A86) - (_bits(x) >> 1))
  for _ in range(3):  # In this order no product leaves the normal range.
    y = y * (np.float32(1.5) - np.float32(0.5) * ((x * y) * y))
  return y


@jax.jit
def rsqrt(x: jax.Array) -> jax.Array:
  """``lax.rsqrt`` of float32 ``x``: 0 -> inf, inf -> 0, x < 0 -> nan."""
  x = jnp.asarray(x, _F32)
  subnormal = x < _MIN_NORMAL
  y = _rsqrt_normal(jnp.where(subnormal, x * np.float32(2.0**24), x))
  y = jnp.where(subnormal, y * np.float32(2.0**12), y)
  y = jnp.where(x == np.float32(np.inf), np.float32(0.0), y)
  y = jnp.where(x == 0, np.float32(np.inf), y)
  return jnp.where(x < 0, np.float32(np.nan), y)
