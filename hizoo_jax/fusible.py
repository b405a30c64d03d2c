"""float32 log, rsqrt and inverse normal CDF that XLA never stores.

XLA fuses an elementwise producer into each of its consumers, recomputing it,
only if the producer is cheap. ``log``, ``sqrt``, ``rsqrt``, ``exp`` and float
division count as expensive: when two fusions read the same expensive value,
XLA computes it once and keeps it in a buffer the size of the array. In a
zeroth-order step that happens whenever two outputs read the same noise,
e.g. Adam's first and second moments in ``optax.chain(hz.scale_by_mezo(...),
optax.adam(...))`` both read ``g s z``: with ``lax.erf_inv`` (which takes a
log and a square root) and ``lax.rsqrt(H)``, XLA:CPU kept two or three
parameter-sized buffers per step (``docs/performance.md``).

The functions here use only integer bit operations, multiplications,
additions and selects, which XLA duplicates into every consumer:

* :func:`log`: exponent from the float's bits, then the Cephes ``logf``
  polynomial on the mantissa in ``[sqrt(1/2), sqrt(2))``.
* :func:`rsqrt`: the bit-level first guess ``0x5F375A86 - (bits >> 1)``
  refined by three Newton steps ``y (3/2 - x y^2 / 2)``.
* :func:`normal_from_uniform`: ``sqrt(2) erfinv(2u - 1)`` with M. Giles'
  single-precision erfinv polynomials ("Approximating the erfinv function",
  GPU Computing Gems, 2011), the two branches picked per element.

``log`` and ``rsqrt`` are within 2 and 3 float32 ulps of float64, the
quantile within 1.2e-6 of it on every uniform the generator makes
(``tests/test_fusible.py``). Each is jitted, so that called eagerly it runs
as one compiled kernel and gives the same bits as inside a jitted step
(op by op, the multiply-adds would round differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32
_SQRT_HALF = np.float32(np.sqrt(0.5))
_LN2_HIGH = np.float32(0.693359375)  # ln 2 = _LN2_HIGH + _LN2_LOW, split so
_LN2_LOW = np.float32(-2.12194440e-4)  # that e * _LN2_HIGH is exact.
# Cephes logf: log(1 + m) = m - m^2 / 2 + m^3 P(m), highest power first.
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1,
          -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
          2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
# Giles' erfinv(x) = x P(t): t = w - 2.5 where w = -log(1 - x^2) < 5, else
# t = sqrt(w) - 3; highest power first.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06,
                   -4.39150654e-06, 0.00021858087, -0.00125372503,
                   -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322,
                -0.00367342844, 0.00573950773, -0.0076224613,
                0.00943887047, 1.00167406, 2.83297682)
_MIN_NORMAL = np.float32(2.0**-126)


def _horner(coefficients, x):
  out = jnp.full_like(x, coefficients[0])
  for c in coefficients[1:]:
    out = out * x + np.float32(c)
  return out


def _bits(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(x, jnp.uint32)


def _float(bits: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(bits, _F32)


@jax.jit
def log(x: jax.Array) -> jax.Array:
  """Natural log of float32 ``x``, for finite ``x >= 2**-126`` only."""
  bits = _bits(x)
  # x = mantissa * 2**exponent with mantissa in [1/2, 1).
  exponent = (bits >> 23).astype(jnp.int32) - 126
  mantissa = _float((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000))
  small = mantissa < _SQRT_HALF
  m = jnp.where(small, mantissa + mantissa, mantissa) - np.float32(1.0)
  e = (exponent - small.astype(jnp.int32)).astype(_F32)
  m2 = m * m
  tail = m * m2 * _horner(_LOG_P, m) + e * _LN2_LOW - np.float32(0.5) * m2
  return m + tail + e * _LN2_HIGH


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


@jax.jit
def normal_from_uniform(u: jax.Array) -> jax.Array:
  """The standard normal quantile ``sqrt(2) erfinv(2u - 1)`` of float32 u.

  Args:
    u: float32 in ``[2**-24, 1 - 2**-24]`` (the tails are cut at |z| < 5.3).

  Returns:
    float32 of u's shape.
  """
  # 1 - x^2 = 4 u (1 - u) for x = 2u - 1, without cancellation near |x| = 1.
  w = -log(np.float32(4.0) * u * (np.float32(1.0) - u))
  central = w < np.float32(5.0)
  tail_w = jnp.maximum(w, np.float32(5.0))
  tail_t = tail_w * _rsqrt_normal(tail_w) - np.float32(3.0)
  # Both polynomials, then one select: selecting each coefficient instead
  # made XLA:CPU store every select when it hands a mean to YNNPACK (the
  # HiZOO-L means on a multi-device CPU mesh: 7.5 vs 3 MiB per device).
  p = jnp.where(central, _horner(_ERFINV_CENTRAL, w - np.float32(2.5)),
                _horner(_ERFINV_TAIL, tail_t))
  x = np.float32(2.0) * u - np.float32(1.0)
  return np.float32(np.sqrt(2.0)) * p * x
