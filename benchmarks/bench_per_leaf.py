"""HLO instructions a lean step adds per parameter leaf, and the forward pass's.

The MLP of ``tests/test_program.py`` (``test_program_grows_per_leaf_at_a_bounded
_rate``): n square ``width x width`` layers, each a leaf of its own, loss
``mean(tanh(... tanh(x @ W_0) ...) ** 2)``. For n = 8 and 64 it compiles the
forward pass and ``hz.make_train_step`` with MeZO, HiZOO and HiZOO-L
(``min_dim_size_to_factor=4``) and reports (count(64) - count(8)) / 56, the
instructions per extra leaf, on one device (``_xla.single_device`` patched,
as the test does) and with 8 simulated CPU devices (the mesh code path:
sums leaf by leaf). Writes ``results/per_leaf.{json,md}``.

    python benchmarks/bench_per_leaf.py            # widths 16 (the test's) and 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hizoo_jax as hz  # noqa: E402
from hizoo_jax import _xla  # noqa: E402
from hizoo_jax import program as _program  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = {
    "mezo": lambda: hz.mezo(1e-3),
    "hizoo": lambda: hz.hizoo(1e-3),
    "hizoo_l": lambda: hz.hizoo_l(1e-3, min_dim_size_to_factor=4),
}


def instructions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def mlp(n, width):
  params = {f"l{i:02d}": jnp.eye(width) for i in range(n)}

  def loss(p, x):
    for k in sorted(p):
      x = jnp.tanh(x @ p[k])
    return jnp.mean(x ** 2)
  return params, loss, jnp.ones((2, width))


def growth(width):
  out = {}
  for name in ("forward", *OPTIMIZERS):
    counts = []
    for n in (8, 64):
      params, loss, x = mlp(n, width)
      if name == "forward":
        compiled = jax.jit(loss).lower(params, x).compile()
      else:
        tx = OPTIMIZERS[name]()
        compiled = hz.make_train_step(tx, loss).lower(
            params, tx.init(params), x).compile()
      counts.append(instructions(compiled))
    out[name] = {"count_8": counts[0], "count_64": counts[1],
                 "per_leaf": (counts[1] - counts[0]) / 56}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--widths", default="16,64")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  args = parser.parse_args()
  result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "jax": jax.__version__, "program": _program.resolve(None),
            "devices": jax.device_count(), "runs": {}}
  real = _xla.single_device
  for width in (int(w) for w in args.widths.split(",")):
    for where, patched in (("one device", lambda: True), ("8 devices", real)):
      _xla.single_device = patched
      try:
        result["runs"][f"{width}x{width}, {where}"] = growth(width)
      finally:
        _xla.single_device = real
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "per_leaf.json"), "w") as f:
    json.dump(result, f, indent=1)
  lines = [f"Instructions per extra leaf ({result['date']}, jax "
           f"{result['jax']}, program {result['program']}; "
           "`python benchmarks/bench_per_leaf.py`)", "",
           "| MLP layer, devices | forward | MeZO | HiZOO | HiZOO-L |",
           "| --- | --- | --- | --- | --- |"]
  for key, run in result["runs"].items():
    lines.append(f"| {key} | " + " | ".join(
        f"{run[m]['per_leaf']:.0f}" for m in ("forward", *OPTIMIZERS)) + " |")
  with open(os.path.join(args.out, "per_leaf.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
