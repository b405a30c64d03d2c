"""Structural figures of docs/performance.md, measured from compiled programs.

Two tables, both from XLA's own accounting (no timing, so load does not
matter):

* ``temporaries``: ``memory_analysis().temp_size_in_bytes`` (MiB) of one
  step on an MLP of 8 float32 layers of 1024 x 1024 (32 MiB of parameters,
  arguments donated, one device): the forward pass alone, the plain
  ``tx.update`` step under ``jax.jit``, ``hz.make_train_step`` and
  ``make_train_step(..., store_noise=True)``, for MeZO, HiZOO, HiZOO-L and
  chains with Adam and momentum.
* ``small_leaves``: HLO instructions per extra small leaf (a bias of 16
  entries next to eight 64 x 64 layers; 4 and 16 biases, one device), with
  small leaves drawn together (the default) and each drawn on its own (the
  model of ``tests/test_leaf_draws.py``).

Writes ``results/structure.{json,md}``.

    python benchmarks/bench_structure.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import hizoo_jax as hz  # noqa: E402
from hizoo_jax import _xla, leaf_draws  # noqa: E402
from hizoo_jax import program as _program  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2.0**20

CHAINS = {
    "MeZO": lambda: hz.mezo(1e-3),
    "HiZOO": lambda: hz.hizoo(1e-3),
    "HiZOO-L": lambda: hz.hizoo_l(1e-3),
    "MeZO + optax.adam": lambda: optax.chain(hz.scale_by_mezo(1e-3),
                                             optax.adam(1e-3)),
    "HiZOO + optax.adam": lambda: optax.chain(hz.scale_by_hizoo(1e-3),
                                              optax.adam(1e-3)),
    "MeZO + optax.sgd(momentum=0.9)": lambda: optax.chain(
        hz.scale_by_mezo(1e-3), optax.sgd(1e-3, momentum=0.9)),
}


def instructions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def distinct_kernels(compiled) -> int:
  """Fused computations and wrapped single operations that differ other
  than by their names (as tests/test_program.py counts them)."""
  bodies = re.findall(r"\n%?(?:fused|wrapped_\w+)_computation[\w.]* \(.*?\n(.*?)\n\}",
                      compiled.as_text(), re.S)
  names = r"%[\w.\-]+|metadata=\{[^}]*\}|, (backend_config|frontend_attr).*"
  return len({re.sub(names, "", body) for body in bodies})


def temp_mib(fn, *args) -> float:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def temporaries():
  params = {f"w{i}": jnp.full((1024, 1024), 1e-3, jnp.float32)
            for i in range(8)}
  x = jnp.ones((16, 1024), jnp.float32)

  def loss(p, x):
    for k in sorted(p):
      x = jnp.tanh(x @ p[k])
    return jnp.mean(x ** 2)

  rows = {"forward pass alone": {"forward": temp_mib(jax.jit(loss), params, x)}}
  for name, make in CHAINS.items():
    tx = make()
    state = tx.init(params)

    def plain(p, s, x, tx=tx):
      updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, x))
      return optax.apply_updates(p, updates), s

    rows[name] = {
        "plain tx.update under jit": temp_mib(
            jax.jit(plain, donate_argnums=(0, 1)), params, state, x),
        "make_train_step": temp_mib(hz.make_train_step(tx, loss),
                                    params, state, x),
        "store_noise=True": temp_mib(
            hz.make_train_step(tx, loss, store_noise=True), params, state, x),
    }
  return rows


def small_leaves():
  def mlp(n):
    params = {"w": [jnp.eye(64) for _ in range(8)],
              "b": [jnp.zeros((16,)) for _ in range(n)]}

    def loss(p, x):
      for w in p["w"]:
        x = jnp.tanh(x @ w)
      for b in p["b"]:
        x = x + jnp.tile(b, 4)
      return jnp.mean(x ** 2)
    return params, loss, jnp.ones((2, 64))

  opts = {"MeZO": lambda: hz.mezo(1e-3), "HiZOO": lambda: hz.hizoo(1e-3),
          "HiZOO-L": lambda: hz.hizoo_l(1e-3, min_dim_size_to_factor=4)}

  def growth():
    out = {}
    for name, make in opts.items():
      counts, kernels = [], []
      for n in (4, 16):
        params, loss, x = mlp(n)
        tx = make()
        compiled = hz.make_train_step(tx, loss).lower(
            params, tx.init(params), x).compile()
        counts.append(instructions(compiled))
        kernels.append(distinct_kernels(compiled))
      out[name] = (counts[1] - counts[0]) / 12
      out[name + " distinct kernels at 4, 16 biases"] = kernels
    return out

  share = leaf_draws.SMALL_SHARE
  result = {"drawn together (default)": growth()}
  leaf_draws.SMALL_SHARE = 2**62  # no leaf is small
  try:
    result["each drawn on its own"] = growth()
  finally:
    leaf_draws.SMALL_SHARE = share
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  parser.parse_args()
  real = _xla.single_device
  _xla.single_device = lambda: True
  try:
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "jax": jax.__version__, "program": _program.resolve(None),
              "temporaries_mib": temporaries(),
              "instructions_per_small_leaf": small_leaves()}
  finally:
    _xla.single_device = real
  os.makedirs(HERE and os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "structure.json"), "w") as f:
    json.dump(result, f, indent=1)
  cols = ["plain tx.update under jit", "make_train_step", "store_noise=True"]
  lines = [f"Measured {result['date']}, jax {result['jax']}, program "
           f"{result['program']}, one device: `python benchmarks/bench_structure.py`",
           "", "Temporaries (MiB, `memory_analysis()`), MLP of 8 x (1024 x 1024)"
           " float32, arguments donated:", "",
           "| step | " + " | ".join(cols) + " |", "| --- | --- | --- | --- |"]
  for name, row in result["temporaries_mib"].items():
    if "forward" in row:
      lines.append(f"| {name} | {row['forward']:.2f} | | |")
    else:
      lines.append(f"| {name} | " + " | ".join(
          f"{row[c]:.2f}" for c in cols) + " |")
  lines += ["", "HLO instructions per extra bias of 16 entries (next to eight"
            " 64 x 64 layers; 4 and 16 biases):", "",
            "| small leaves | MeZO | HiZOO | HiZOO-L | distinct kernels at 4 and 16 biases |",
            "| --- | --- | --- | --- | --- |"]
  for name, row in result["instructions_per_small_leaf"].items():
    lines.append(f"| {name} | " + " | ".join(
        f"{row[m]:.0f}" for m in ("MeZO", "HiZOO", "HiZOO-L")) + " | " + ", ".join(
        "/".join(str(k) for k in row[m + " distinct kernels at 4, 16 biases"])
        for m in ("MeZO", "HiZOO", "HiZOO-L")) + " |")
  with open(os.path.join(HERE, "results", "structure.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
