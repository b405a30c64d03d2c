"""FZOO against MeZO on the diagonal quadratics of ``quadratic.py``.

f(x) = 1/2 sum_i A_i x_i^2 with log-spaced curvature (optimum 0, f known),
the problems of ``quadratic.py``. Every method gets the same forward passes
(``--budget`` per coordinate), three noise seeds and its best learning rate
from a grid (by the median final f / f0), run together with ``vmap``:

* ``mezo``: ``c / tr(A)``, c in {1/4, ..., 4} (2 passes a step);
* ``fzoo8``, ``fzoo4``, ``fzoo16``, ``fzoo8_gauss`` (normalized steps):
  ``c N |g_0| / tr(A)``, c in {1/128, ..., 2} by 2x, where g_0 is the
  gradient at x_0: the step is normalized, so its rate carries the scale
  of |g| that MeZO's estimate has built in (N + 1 passes a step);
* ``fzoo8_unnorm`` (one-sided ZO-SGD, 8 queries): ``c / tr(A)``, c in
  {1, ..., 64} by 2x.

All float32, eps = mu = 1e-3, constant learning rates. Reported: median
final f / f0, forward passes to reach 1e-2 f0, and the curves.

    python benchmarks/curvature/fzoo_quadratic.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import quadratic  # noqa: E402  (the problems)

import hizoo_jax as hz  # noqa: E402

METHODS = {  # name: (passes per step, estimator(key), grid, rate scale)
    "mezo": (2, lambda k: hz.scale_by_mezo(1e-3, key=k),
             [0.25, 0.5, 1.0, 2.0, 4.0], "trace"),
    "fzoo8": (9, lambda k: hz.scale_by_fzoo(1e-3, key=k), None, "normalized"),
    "fzoo4": (5, lambda k: hz.scale_by_fzoo(1e-3, num_probes=4, key=k), None,
              "normalized"),
    "fzoo16": (17, lambda k: hz.scale_by_fzoo(1e-3, num_probes=16, key=k),
               None, "normalized"),
    "fzoo8_gauss": (9, lambda k: hz.scale_by_fzoo(
        1e-3, noise="gaussian", key=k), None, "normalized"),
    "fzoo8_unnorm": (9, lambda k: hz.scale_by_fzoo(
        1e-3, normalize=False, key=k), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        "trace"),
}
NORMALIZED_GRID = [2.0**-k for k in range(7, -2, -1)]  # 1/128 .. 2


def run_method(x0, a, budget_passes, passes, make, lrs, seeds):
  """f / f0 curves, shape (lrs, seeds, POINTS)."""
  steps = budget_passes // passes
  every = max(steps // quadratic.POINTS, 1)
  a_j = jax.tree.map(jnp.asarray, a)

  def loss(x):
    return 0.5 * sum(jnp.sum(ai * xi * xi) for ai, xi in
                     zip(jax.tree.leaves(a_j), jax.tree.leaves(x)))

  def one(lr, seed):
    tx = optax.chain(make(seed), optax.scale(-lr))

    def body(carry, _):
      x, s = carry
      updates, s = tx.update(None, s, x, value_fn=loss)
      return (optax.apply_updates(x, updates), s), None

    def chunk(carry, _):
      carry, _ = jax.lax.scan(body, carry, length=every)
      return carry, loss(carry[0])

    _, curve = jax.lax.scan(chunk, (x0, tx.init(x0)), length=steps // every)
    return curve / loss(x0)

  lr_b = jnp.repeat(jnp.asarray(lrs, jnp.float32), len(seeds))
  seed_b = jnp.tile(jnp.asarray(seeds, jnp.uint32), len(lrs))
  curves = jax.jit(jax.vmap(one))(lr_b, seed_b)
  return (np.asarray(curves).reshape(len(lrs), len(seeds), -1),
          every * passes)


def summarise(curves, per_point, grid):
  final = np.nanmedian(np.where(np.isfinite(curves[..., -1]),
                                curves[..., -1], np.inf), axis=1)
  best = int(np.argmin(final))
  reached = []
  for curve in curves[best]:
    hit = np.flatnonzero(curve < quadratic.TARGET)
    reached.append((hit[0] + 1) * per_point if hit.size else np.inf)
  return {"best_c": grid[best], "final": float(final[best]),
          "final_per_c": [float(f) for f in final],
          "passes_to_target": float(np.median(reached)),
          "curve": [float(v) for v in np.median(curves[best], axis=0)]}


def plot(results, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = list(results)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4),
                           squeeze=False)
  for ax, key in zip(axes[0], keys):
    d = int(key.split("d=")[1].split()[0])
    for i, (name, r) in enumerate(results[key].items()):
      curve = np.asarray(r["curve"])
      passes = np.linspace(0, r["budget_passes"], len(curve) + 1)[1:] / d
      ax.loglog(passes, curve, color=f"C{i}", label=name)
    ax.axhline(quadratic.TARGET, color="grey", lw=0.5, ls=":")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("forward passes / d")
    ax.set_ylim(1e-5, 2)
    ax.legend(fontsize=6)
  axes[0, 0].set_ylabel("f / f0 (median over seeds, best lr)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def table(results) -> str:
  lines = ["| problem | method | best c | final f/f0 (median, 3 seeds) | "
           "vs MeZO | passes to 1e-2 f0 | final f/f0 per c |",
           "|" + " --- |" * 7]
  for key, entry in results.items():
    mezo = entry.get("mezo", {}).get("final")
    for name, r in entry.items():
      ratio = f"{r['final'] / mezo:.2f}x" if mezo else "-"
      reach = ("not reached" if not np.isfinite(r["passes_to_target"])
               else f"{r['passes_to_target']:.0f}")
      per_c = ", ".join(f"{c:g}: {f:.3g}" for c, f in zip(
          METHODS[name][2] or NORMALIZED_GRID, r["final_per_c"]))
      lines.append(f"| {key} | {name} | {r['best_c']:g} | {r['final']:.3g} |"
                   f" {ratio} | {reach} | {per_c} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--problems", default="tensors:1000:1e2,"
                      "tensors:1000:1e3,rows:1000:1e3",
                      help="comma-separated layout:d:cond")
  parser.add_argument("--budget", type=float, default=30.0,
                      help="forward passes per coordinate")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(HERE, "results"),
                      help="directory for fzoo_quadratic.json / .png")
  args = parser.parse_args()
  seeds = list(range(args.seeds))
  path = os.path.join(args.out, "fzoo_quadratic.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  for item in args.problems.split(","):
    layout, d, cond = item.split(":")
    d, cond = int(d), float(cond)
    key = f"{layout} d={d} cond={cond:g}"
    x0, a = quadratic.problem(layout, d, cond, 10)
    a_j = jax.tree.map(jnp.asarray, a)
    trace = float(sum(np.sum(v) for v in a.values()))
    g0 = float(np.sqrt(sum(np.sum((a[k] * x0[k]) ** 2) for k in a)))
    entry = results.setdefault(key, {})
    for name in args.methods.split(","):
      if name in entry:
        continue
      passes, make, grid, scale = METHODS[name]
      if scale == "normalized":
        grid = NORMALIZED_GRID
        lrs = [c * (passes - 1) * g0 / trace for c in grid]
      else:
        lrs = [c / trace for c in grid]
      start = time.time()
      curves, per_point = run_method(x0, a_j, int(args.budget * d), passes,
                                     make, lrs, seeds)
      entry[name] = summarise(curves, per_point, grid)
      entry[name].update(budget_passes=int(args.budget * d),
                         seeds=len(seeds), lrs=lrs,
                         seconds=round(time.time() - start, 1))
      print(key, name, {k: v for k, v in entry[name].items()
                        if k not in ("curve", "lrs")}, flush=True)
      with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
      os.replace(path + ".tmp", path)  # resumable, per method
  plot(results, os.path.join(args.out, "fzoo_quadratic.png"))
  text = table(results)
  print(text)
  with open(os.path.join(args.out, "fzoo_quadratic.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
