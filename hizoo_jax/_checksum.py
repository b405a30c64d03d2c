"""Checksums of arrays by value, the same on any sharding, host or device.

Each array is read as 32-bit words ``w_i`` (its raw bits in row-major order;
narrower types widened, 64-bit types split in two, sub-byte types through an
exact float32 conversion) and summed as

    c = sum_i mix32(w_i + mix32(i + s))   (mod 2**32)

for two seeds ``s``. ``mix32`` is a bijection, so changing any one word
changes exactly one term and always changes ``c``: every single-bit flip of
the data is caught; other damage escapes with probability about 2**-64. The
sum is exact in uint32 and so independent of how the array is sharded:
checkpoints restored onto another mesh check the same values. jax arrays are
summed on their devices (one fused pass); numpy arrays with the same
arithmetic in numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x2545F491, 0x9E3779B9)


def _mix32(x, xp):
  x = x ^ (x >> xp.uint32(16))
  x = x * xp.uint32(0x7FEB352D)
  x = x ^ (x >> xp.uint32(15))
  x = x * xp.uint32(0x846CA68B)
  return x ^ (x >> xp.uint32(16))


def _words(x, xp):
  """The bits of ``x`` as a flat uint32 vector."""
  dtype = np.dtype(x.dtype)
  if dtype == np.bool_:
    return xp.ravel(x).astype(xp.uint32)
  if dtype.kind == "c":
    return xp.concatenate([_words(xp.real(x), xp), _words(xp.imag(x), xp)])
  bits = jax.dtypes.itemsize_bits(dtype)
  if bits < 8:  # int4, float4...: exact in float32, no bitcast to bytes.
    return _words(x.astype(np.float32), xp)
  unsigned = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint32}[bits]
  if xp is np:
    flat = np.ascontiguousarray(x).reshape(-1).view(unsigned)
  else:
    flat = jax.lax.bitcast_convert_type(xp.ravel(x), unsigned).reshape(-1)
  return flat.astype(xp.uint32)


def _sum(x, xp):
  w = _words(x, xp)
  i = xp.arange(w.shape[0], dtype=xp.uint32)
  return [xp.sum(_mix32(w + _mix32(i + xp.uint32(s), xp), xp),
                 dtype=xp.uint32) for s in _SEEDS]


@jax.jit
def _device_sums(leaves):
  return [jnp.stack(_sum(x, jnp)) for x in leaves]


def checksums(leaves: list) -> list[list[int]]:
  """``[[c0, c1], ...]``: two uint32 checksums per array, as Python ints."""
  on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  out = [None] * len(leaves)
  if on_device:
    sums = _device_sums([leaves[i] for i in on_device])
    for i, s in zip(on_device, jax.device_get(sums)):
      out[i] = [int(v) for v in s]
  for i, x in enumerate(leaves):
    if out[i] is None:
      with np.errstate(over="ignore"):
        out[i] = [int(v) for v in _sum(np.asarray(x), np)]
  return out
