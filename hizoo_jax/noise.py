"""Counter-based standard noise that is never stored.

Zeroth-order optimizers perturb every parameter with a sample ``z`` (zero
mean, identity covariance) and need the same ``z`` again later in the step.
Storing it costs one copy of the parameters; drawing it with
``jax.random.normal`` costs about four (XLA:CPU materialises the threefry bits
before converting them). Here ``z`` is a pure elementwise function of the
element's global index and of a per-leaf seed:

    seed  = hash(key words, step, query, crc32(leaf path))
    bits  = mix(mix(index ^ seed_0) + seed_1)         # 32 random bits
    z     = (popcount(bits >> 8) - 12 + u) / sigma    # u: the low 8 bits as a
                                                      # uniform on (-1/2, 1/2)

``mix`` is a 32-bit integer finaliser (xor-shift and multiply, constants of
the "lowbias32" hash). The 24 high bits are 24 fair coins: their count is
Binomial(24, 1/2), which the central limit theorem makes close to normal;
the 8 low bits spread each count over a unit interval, so z is continuous to
1/256. ``sigma^2 = 6 + (1 - 2^-16) / 12`` makes the variance exactly 1. The
distribution is symmetric with E[z^4] = 2.92 (a normal's: 3) and |z| < 5.07
(at most 12.5 / sigma);
zeroth-order gradient estimates need only E[z z^T] = I, and the curvature
rules only a known E[z^4] (:data:`FOURTH_MOMENT`).

Every operation is a cheap integer or float operation (64 HLO instructions
for ``x + 1e-3 z`` fused, ``benchmarks/results/noise.md``), so XLA fuses the
generator into whatever consumes ``z``, recomputing it in each consumer
rather than storing it. Because the index is the element's global position,
the sample is bit-identical on any device mesh.

A leaf may hold at most 2**32 elements (the index is 32 bits).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hizoo_jax import _xla

_GOLDEN = 0x9E3779B9
_MAX_ELEMENTS = 2**32
_COINS = 24  # high bits counted; the other 8 dither the count.
_VARIANCE = _COINS / 4 + (1 - 2.0**-16) / 12
# E[z^4] of the generator: Binomial(24, 1/2) (fourth cumulant -24/8) plus the
# 256-point uniform dither (fourth cumulant -(256^4 - 1) / (120 * 256^4)).
FOURTH_MOMENT = 3.0 + (-_COINS / 8 - (1 - 2.0**-32) / 120) / _VARIANCE**2


def _u32(x):
  if isinstance(x, (int, np.integer)):  # crc32 hashes exceed int32.
    return jnp.uint32(x)
  return jnp.asarray(x).astype(jnp.uint32)


def mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash with good avalanche (elementwise)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _combine(h: jax.Array, v: jax.Array) -> jax.Array:
  """Hashes ``v`` into the running hash ``h`` (both uint32)."""
  return mix32(h ^ (v + jnp.uint32(_GOLDEN) + (h << 6) + (h >> 2)))


def path_hash(path) -> int:
  """A stable 32-bit hash of a pytree key path (same in every process)."""
  return zlib.crc32(jax.tree_util.keystr(path).encode("utf-8"))


def key_words(key) -> jax.Array:
  """Raw uint32 words of a PRNG key given as an int, a typed key or key data.

  An int seed in ``[-2**31, 2**32)`` gives the words of
  ``jax.random.key(seed)``. Any other Python int (``jax.random.key`` would
  drop its high bits, so ``2**32 + 5`` would alias 5, or overflow) is hashed
  over its full width (BLAKE2b of its bytes) into two words whose first is
  never 0, so it differs from every smaller seed and from every other large
  one (up to a 2**-63 collision chance).
  """
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    key = int(key)
    if -2**31 <= key < 2**32:
      return jax.random.key_data(jax.random.key(key)).astype(jnp.uint32)
    width = (key.bit_length() + 8) // 8  # room for the sign bit.
    digest = hashlib.blake2b(key.to_bytes(width, "little", signed=True),
                             digest_size=8, person=b"hizoo_jax.seed").digest()
    high, low = np.frombuffer(digest, "<u4")
    return jnp.asarray([high or 1, low], jnp.uint32)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
  if key.ndim == 0:  # an integer seed held in an array (inject_hyperparams).
    return jnp.stack([jnp.zeros((), jnp.uint32), key.astype(jnp.uint32)])
  return key.astype(jnp.uint32).reshape(-1)


def leaf_seed(words: jax.Array, count, query, leaf_hash) -> jax.Array:
  """Two uint32 seeds per leaf at one step and query, shape (..., 2).

  ``query`` and ``leaf_hash`` may be arrays (they broadcast): the seeds of
  every leaf and query of a step are then one small vector computation.
  """
  h = jnp.uint32(0x243F6A88)
  for i in range(words.shape[0]):
    h = _combine(h, words[i])
  h = _combine(h, _u32(count))
  h = _combine(h, _u32(query))
  h = _combine(h, _u32(leaf_hash))
  return jnp.stack([h, mix32(h ^ jnp.uint32(_GOLDEN))], axis=-1)


def leaf_seeds(words: jax.Array, count, query, paths) -> jax.Array:
  """:func:`leaf_seed` of every leaf, by key path: shape (..., leaves, 2)."""
  hashes = np.array([path_hash(p) for p in paths], np.uint32)
  return leaf_seed(words, count, query, hashes)


def explicit_sharding(x):
  """``x``'s sharding if it is laid out over Explicit mesh axes, else None.

  Passed as ``out_sharding`` to arrays built from a shape alone (noise, H_0),
  so that under ``jax.set_mesh`` with Explicit axes they are created sharded
  like the parameter instead of replicated on every device.
  """
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding


def on_no_explicit_axis(x) -> bool:
  """Whether ``x`` lies on no Explicit mesh axis (whole on every device)."""
  sharding = explicit_sharding(x)
  return sharding is None or all(s is None for s in sharding.spec)


def _flat_index(shape, sharding=None) -> jax.Array:
  """The row-major position of every element of ``shape``, as uint32."""
  index = jnp.zeros(shape, jnp.uint32, out_sharding=sharding)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(
        jnp.uint32, shape, axis, out_sharding=sharding) * jnp.uint32(
            stride % _MAX_ELEMENTS)
    stride *= shape[axis]
  return index


def random_bits(seed: jax.Array, shape, sharding=None) -> jax.Array:
  """32 hash bits (uint32) per element of ``shape`` from a (..., 2) ``seed``.

  A (2,) seed gives an array of ``shape``; seeds of shape (n, 2) give n
  leaves of one shape at once, shape (n, *shape), each row equal bit for bit
  to its own seed's draw. ``shape`` may hold at most 2**32 elements;
  ``sharding`` as in :func:`gaussian`.
  """
  if int(np.prod(shape, dtype=np.int64)) > _MAX_ELEMENTS:
    raise ValueError(
        f"a leaf of shape {tuple(shape)} has more than 2**32 elements; the "
        "noise generator indexes elements with 32 bits. Split the leaf.")
  lead = jnp.shape(seed)[:-1] + (1,) * len(shape)
  return bits_at(seed[..., 0].reshape(lead), seed[..., 1].reshape(lead),
                 _flat_index(shape, sharding))


def bits_at(seed_0, seed_1, index: jax.Array) -> jax.Array:
  """32 hash bits of the elements at flat ``index`` (uint32) of one leaf.

  The seed words broadcast against ``index``: one leaf's seed, or a seed per
  element when elements of several leaves are drawn together.
  """
  return mix32(mix32(index ^ seed_0) + seed_1)


def uniform(bits: jax.Array) -> jax.Array:
  """The top 23 of uint32 ``bits`` as float32 on ``[2**-24, 1 - 2**-24]``."""
  return ((bits >> 9).astype(jnp.float32) + 0.5) * np.float32(2.0**-23)


@_xla.traced_once(static_argnames=("shape", "dtype", "sharding"))
def gaussian(seed: jax.Array, shape, dtype=jnp.float32,
             sharding=None) -> jax.Array:
  """Standard noise of ``shape`` (see the module docstring) from a seed.

  Args:
    seed: (2,) uint32, the leaf's seed from :func:`leaf_seed`; or (n, 2),
      the seeds of n leaves of one shape, drawn as one (n, *shape) array
      (see :func:`random_bits`).
    shape: the leaf's shape; at most 2**32 elements.
    dtype: floating dtype of the result (computed in float32).
    sharding: the parameter's sharding over Explicit mesh axes (see
      :func:`explicit_sharding`), or None.

  Returns:
    An array of ``shape`` (or (n, *shape)) whose entries are i.i.d. (to
    hash quality), mean 0, variance 1, nearly normal (E[z^4] =
    :data:`FOURTH_MOMENT`).
  """
  return standard(random_bits(seed, shape, sharding)).astype(dtype)


def standard(bits: jax.Array) -> jax.Array:
  """z (float32) from its 32 hash bits (see the module docstring)."""
  coins = lax.population_count(bits >> 8).astype(jnp.float32)
  dither = (bits & np.uint32(0xFF)).astype(jnp.float32) * np.float32(1 / 256)
  centred = coins + dither + np.float32(1 / 512 - 1 / 2 - _COINS / 2)
  return centred * np.float32(1 / np.sqrt(_VARIANCE))


def zero_after(x: jax.Array) -> jax.Array:
  """uint32 0 computed from the float ``x >= +0``: its sign bit.

  Making a draw of z depend on ``x`` this way orders it after ``x`` and keeps
  XLA from merging it with another draw of the same z: XLA would then store
  the shared z (a parameter-sized buffer) instead of regenerating it.
  """
  if jnp.size(x) == 0:
    return jnp.zeros([], jnp.uint32)
  if explicit_sharding(x) is not None:
    # Explicit mesh axes forbid slicing one element out of a sharded array;
    # an optimization barrier gives the same ordering without a collective.
    return lax.optimization_barrier((x, jnp.zeros([], jnp.uint32)))[1]
  # Index without jnp.ravel: reshaping a sharded array makes the SPMD
  # partitioner all-gather it (a parameter-sized collective).
  first = x[(0,) * jnp.ndim(x)].astype(jnp.float32)
  return lax.bitcast_convert_type(first, jnp.uint32) >> 31


class Draws(NamedTuple):
  """z of one step for the curvature rules: ``z(i, j, order)``.

  ``order`` salts the draw of leaf ``i``, query ``j`` with a zero that XLA
  cannot prove (see :meth:`salt`), so that no two consumers share (and XLA
  stores) one draw.
  """

  z: Callable[..., jax.Array]
  zero: jax.Array  # (), uint32: 0, computed from the step count.
  seeds: jax.Array  # (q, leaves, 2) uint32: the seeds z(i, j) is drawn from.
  # (), bool, or None: False where the sums of z are not needed (H does not
  # move, or the result is discarded).
  active: Optional[jax.Array] = None

  def ordered_sums(self, requests, fn) -> list:
    """``sum(fn(z))`` over ``axes`` (kept) for each ``(leaf, query, axes)``.

    Each draw is salted with the previous sum (the sign bit of its absolute
    value: a zero XLA cannot prove), so the sums run one after another and
    no two share (and store) a draw: where a reduction stores its operand
    (XLA:CPU meshes), one leaf's noise is live at a time.
    """
    out, previous = [], None
    for leaf, query, axes in requests:
      z = self.z(leaf, query, 0 if previous is None else jnp.abs(previous))
      previous = _xla.fused_sum(fn(z), axes)
      out.append(previous)
    return out

  def salt(self, order) -> jax.Array:
    """A uint32 zero: distinct per int ``order``, or after an array."""
    return salt(self.zero, order)


def salt(zero: jax.Array, order) -> jax.Array:
  """A uint32 zero from ``zero`` (a 0 XLA cannot prove): distinct per int
  ``order`` (a consumer number), or computed after the array ``order``."""
  if isinstance(order, int):
    return zero * jnp.uint32(order + 1)
  order = jnp.asarray(order)
  if jnp.issubdtype(order.dtype, jnp.unsignedinteger):
    return order.astype(jnp.uint32)
  return zero_after(order)
