"""Throughput of the noise generator against jax.random.normal.

    python benchmarks/bench_noise.py            # 16M elements
    python benchmarks/bench_noise.py --quick    # 4M elements

Each generator is timed fused into its consumer, ``x + 1e-3 * z`` with ``x``
donated (the way a zeroth-order step uses it), and alone (``z`` returned).
Reported: median milliseconds, elements per second, speed-up over
``jax.random.normal``, the compiled program's temporary bytes and its HLO
instruction count (what every leaf and draw of a zeroth-order step adds).
Generators:

* ``hash_binomial`` (the library's): two rounds of a 32-bit integer hash of
  the element index; the popcount of 24 bits plus the other 8 as a dither,
  standardised (``hizoo_jax.noise``).
* ``hash_lax_erfinv``: the same hash, 23 bits to a uniform, through
  ``sqrt(2) lax.erf_inv(2u - 1)`` (an exact normal quantile; the library
  used it, then a cheap-op version of it, until 2026-11-26).
* ``hash_box_muller``: the same hash for two uniforms per element (a second
  hash round), Box-Muller ``sqrt(-2 log u1) cos(2 pi u2)``.
* ``threefry_normal``: ``jax.random.normal`` (threefry, the default).
Results go to ``benchmarks/results/noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import common  # noqa: F401  (sets sys.path, results helpers)
from hizoo_jax import noise


def hash_binomial(seed, shape):
  return noise.gaussian(seed, shape)


def hash_lax_erfinv(seed, shape):
  u = noise.uniform(noise.random_bits(seed, shape))
  return np.float32(np.sqrt(2.0)) * lax.erf_inv(2.0 * u - 1.0)


def hash_box_muller(seed, shape):
  bits1 = noise.random_bits(seed, shape)
  bits2 = noise.mix32(bits1 ^ seed[1])
  u1, u2 = noise.uniform(bits1), noise.uniform(bits2)
  return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(np.float32(2 * np.pi) * u2)


def threefry_normal(seed, shape):
  key = jax.random.wrap_key_data(seed, impl="threefry2x32")
  return jax.random.normal(key, shape, jnp.float32)


GENERATORS = {"hash_binomial": hash_binomial, "hash_lax_erfinv": hash_lax_erfinv,
              "hash_box_muller": hash_box_muller,
              "threefry_normal": threefry_normal}


def _time(fn, args, donate, repeats):
  times = []
  x, seed = args
  for i in range(repeats + 1):
    start = time.perf_counter()
    out = fn(x, seed)
    out.block_until_ready()
    if i:
      times.append(time.perf_counter() - start)
    if donate:
      x = out
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  n = (1 << 22) if args.quick else (1 << 24)
  shape = (n // 1024, 1024)
  seed = noise.leaf_seed(noise.key_words(0), 0, 0, 1)
  rows = {}
  for name, gen in GENERATORS.items():
    fused = jax.jit(lambda x, s, gen=gen: x + 1e-3 * gen(s, shape),
                    donate_argnums=0)
    alone = jax.jit(lambda x, s, gen=gen: gen(s, shape))
    x = jnp.zeros(shape, jnp.float32)
    row = {}
    for kind, fn, donate in (("fused", fused, True), ("alone", alone, False)):
      compiled = fn.lower(x, seed).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      size = sum(1 for line in compiled.as_text().splitlines()
                 if " = " in line)
      seconds = _time(fn, (jnp.zeros(shape, jnp.float32), seed), donate,
                      args.repeats)
      row[kind] = {"ms": 1e3 * seconds, "elements_per_s": n / seconds,
                   "temp_mib": temp / common.MiB, "hlo_instructions": size}
    rows[name] = row
    print(name, row, flush=True)
  z = np.asarray(hash_binomial(seed, shape)).ravel()[: 1 << 20]
  stats = {"mean": float(z.mean()), "var": float(z.var()),
           "kurtosis": float(np.mean(z**4))}
  base = rows["threefry_normal"]
  lines = [f"{n} float32 elements ({n * 4 / common.MiB:.0f} MiB); medians of "
           f"{args.repeats}.", "",
           "| generator | fused x + 1e-3 z (ms) | speed-up | temp (MiB) "
           "| alone (ms) | speed-up | temp (MiB) | Gelem/s fused "
           "| HLO instructions fused |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, row in rows.items():
    f, a = row["fused"], row["alone"]
    lines.append(
        f"| {name} | {f['ms']:.0f} | {base['fused']['ms'] / f['ms']:.2f} | "
        f"{f['temp_mib']:.0f} | {a['ms']:.0f} | "
        f"{base['alone']['ms'] / a['ms']:.2f} | {a['temp_mib']:.0f} | "
        f"{f['elements_per_s'] / 1e9:.2f} | {f['hlo_instructions']} |")
  lines += ["", f"hash_binomial sample moments (2^20 draws): mean "
            f"{stats['mean']:+.4f}, variance {stats['var']:.4f}, E[z^4] "
            f"{stats['kurtosis']:.3f}."]
  common.save("noise", {"environment": common.environment(), "n": n,
                        "generators": rows, "stats": stats},
              "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
