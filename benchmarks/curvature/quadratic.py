"""Known curvature: does HiZOO learn diag(A), and does it pay for its pass?

Diagonal quadratics f(x) = 1/2 sum_i A_i x_i^2, x_0 = A^{-1/2} e (e standard
normal, fixed), so every coordinate starts with the same expected share of
the loss. Two layouts:

* ``tensors``: d coordinates in G leaves of d/G, A constant inside a leaf and
  log-spaced across leaves (condition number ``cond``);
* ``rows``: one (r, c) matrix whose rows have log-spaced A (curvature varies
  inside a tensor; per-tensor H cannot represent it, rows and HiZOO-L can).

Methods (all through the library's own optimizers, float32, ``mu = 1e-3``):
MeZO; HiZOO-paper (``estimator="paper"``, its default rate); HiZOO (the
default: "signed", per tensor); HiZOO rows; HiZOO-L (signed, row x column
factors); the oracle (H = diag(A) / mean(A), frozen). Every method gets the
same number of forward passes (MeZO 1.5x the steps of the three-pass
methods), a learning rate from the grid ``c / tr(A)`` (the stable step of a
zeroth-order method scales as 1 / tr(A / H), and H has mean 1), and three
noise seeds, run together with ``vmap``.

Reported per problem and method: the median final f / f0 at the best
learning rate, the forward passes to reach 1e-2 f0 (median over seeds), and
the correlation of log H with log diag(A) at the granularity learned.

    python benchmarks/curvature/quadratic.py     # d = 1e3, 3 seeds
    python benchmarks/curvature/quadratic.py --problems tensors:10000:1e3 \
        --budget 20 --grid 0.5,1,2 --seeds 1      # d = 1e4 (about 30 min)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hizoo_jax as hz

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = (0.25, 0.5, 1.0, 2.0, 4.0)  # learning rate = c / tr(A)
TARGET = 1e-2
POINTS = 100  # loss samples per run


def problem(layout: str, d: int, cond: float, groups: int):
  """(params template, A as a tree like params)."""
  if layout == "tensors":
    curv = np.logspace(0, np.log10(cond), groups)
    a = {f"t{g:03d}": np.full(d // groups, curv[g], np.float32)
         for g in range(groups)}
  else:
    rows = int(np.sqrt(d))
    cols = d // rows
    a = {"m": np.repeat(np.logspace(0, np.log10(cond), rows)[:, None], cols,
                        axis=1).astype(np.float32)}
  e = np.random.default_rng(100)
  x0 = {k: (e.normal(size=v.shape) / np.sqrt(v)).astype(np.float32)
        for k, v in a.items()}
  return x0, a


def methods(a):
  mean_a = np.mean(np.concatenate([v.ravel() for v in a.values()]))
  return {
      "mezo": (2, lambda key: hz.scale_by_mezo(1e-3, key=key), None),
      "hizoo_paper": (3, lambda key: hz.scale_by_hizoo(
          1e-3, estimator="paper", key=key), None),
      "hizoo": (3, lambda key: hz.scale_by_hizoo(1e-3, key=key), None),
      "hizoo_rows": (3, lambda key: hz.scale_by_hizoo(
          1e-3, curvature="row", min_dim_size_to_factor=2, key=key), None),
      "hizoo_l": (3, lambda key: hz.scale_by_hizoo(
          1e-3, factored=True, min_dim_size_to_factor=2, key=key), None),
      "oracle": (3, lambda key: hz.scale_by_hizoo(
          1e-3, 0.0, estimator="paper", key=key),
                 {k: jnp.asarray(v / mean_a) for k, v in a.items()}),
  }


def expand_h(hessian, x0):
  """H at every coordinate, as a tree like params (either representation)."""
  if isinstance(hessian, tuple):  # "signed": trees of factors, H = product
    hessian = functools.reduce(
        lambda a, b: jax.tree.map(jnp.multiply, a, b), hessian)
  return jax.tree.map(lambda h, x: jnp.broadcast_to(h, x.shape), hessian, x0)


def run_method(x0, a, passes_budget, spec, lrs, seeds):
  """Loss curves (lrs, seeds, POINTS) and final expanded H (lrs, seeds, d)."""
  passes, make, fixed_h = spec
  steps = passes_budget // passes
  every = max(steps // POINTS, 1)
  a_j = jax.tree.map(jnp.asarray, a)

  def loss(x):
    return 0.5 * sum(jnp.sum(ai * xi * xi) for ai, xi in
                     zip(jax.tree.leaves(a_j), jax.tree.leaves(x)))

  def one(lr, seed):
    tx = optax.chain(make(seed), optax.scale(-lr))
    state = tx.init(x0)
    if fixed_h is not None:
      state = (state[0]._replace(hessian=fixed_h),) + tuple(state[1:])

    def body(carry, _):
      x, s = carry
      updates, s = tx.update(None, s, x, value_fn=loss)
      return (optax.apply_updates(x, updates), s), None

    def chunk(carry, _):
      carry, _ = jax.lax.scan(body, carry, length=every)
      return carry, loss(carry[0])

    (x, s), curve = jax.lax.scan(chunk, (x0, state), length=steps // every)
    h = s[0].hessian
    h_all = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(
        expand_h(h, x0))]) if h is not None else jnp.zeros(()))
    return curve / loss(x0), h_all

  lr_b = jnp.repeat(jnp.asarray(lrs, jnp.float32), len(seeds))
  seed_b = jnp.tile(jnp.asarray(seeds, jnp.uint32), len(lrs))
  curves, h = jax.jit(jax.vmap(one))(lr_b, seed_b)
  shape = (len(lrs), len(seeds))
  return (np.asarray(curves).reshape(shape + (-1,)),
          np.asarray(h).reshape(shape + np.shape(h)[1:]), every * passes)


def summarise(curves, h, passes_per_point, a_flat, groups_of, grid):
  """Best learning rate by median final loss, and what it reached."""
  final = np.nanmedian(np.where(np.isfinite(curves[..., -1]),
                                curves[..., -1], np.inf), axis=1)
  best = int(np.argmin(final))
  reached = []
  for curve in curves[best]:
    hit = np.flatnonzero(curve < TARGET)
    reached.append((hit[0] + 1) * passes_per_point if hit.size else np.inf)
  corr = None
  if h.ndim == 3:
    group_a, group_h = groups_of(a_flat), groups_of(np.median(h[best], 0))
    if np.ptp(np.log(group_a)) > 0 and np.ptp(np.log(group_h)) > 0:
      corr = float(np.corrcoef(np.log(group_h), np.log(group_a))[0, 1])
  return {"best_c": grid[best], "final": float(final[best]),
          "final_per_c": [float(f) for f in final],
          "passes_to_target": float(np.median(reached)),
          "corr_log_h": corr,
          "curve": [float(v) for v in np.median(curves[best], axis=0)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument(
      "--problems", default="tensors:1000:1e2,tensors:1000:1e3,"
      "tensors:1000:1e4,rows:1000:1e3",
      help="comma-separated layout:d:cond")
  parser.add_argument("--budget", type=float, default=30.0,
                      help="forward passes per coordinate (30 = 10 d HiZOO steps)")
  parser.add_argument("--grid", default=",".join(map(str, GRID)),
                      help="learning rates as multiples of 1 / tr(A)")
  parser.add_argument("--seeds", type=int, default=3, help="noise seeds")
  parser.add_argument("--long-mezo", type=float, default=10.0,
                      help="also run MeZO with this many times the budget "
                      "(0: not), to bound how many passes it needs")
  parser.add_argument("--out", default=os.path.join(HERE, "results"),
                      help="directory for quadratic.json and quadratic.png")
  args = parser.parse_args()
  grid = [float(c) for c in args.grid.split(",")]
  seeds = list(range(args.seeds))
  problems = []
  for item in args.problems.split(","):
    layout, d, cond = item.split(":")
    problems.append((layout, int(d), float(cond), 10))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "quadratic.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  for layout, d, cond, groups in problems:
    key = f"{layout} d={d} cond={cond:g}"
    x0, a = problem(layout, d, cond, groups)
    a_flat = np.concatenate([v.ravel() for v in a.values()])
    trace = float(np.sum(a_flat))
    lrs = [c / trace for c in grid]
    if layout == "tensors":
      def groups_of(v, n=d // groups):
        return v.reshape(-1, n).mean(axis=1)
    else:
      def groups_of(v, cols=a["m"].shape[1]):
        return v.reshape(-1, cols).mean(axis=1)
    entry = results.setdefault(key, {})
    todo = [(name, spec, args.budget) for name, spec in methods(a).items()]
    if args.long_mezo:
      todo.append((f"mezo_x{args.long_mezo:g}", methods(a)["mezo"],
                   args.budget * args.long_mezo))
    for name, spec, budget in todo:
      if name in entry or (layout == "tensors" and name == "hizoo_rows"):
        continue
      start = time.time()
      curves, h, per_point = run_method(
          x0, a, int(budget * d), spec, lrs, seeds)
      entry[name] = summarise(curves, h, per_point, a_flat, groups_of, grid)
      entry[name].update(budget_passes=int(budget * d), seeds=len(seeds))
      entry[name]["seconds"] = round(time.time() - start, 1)
      print(key, name, {k: v for k, v in entry[name].items()
                        if k not in ("curve", "final_per_c")}, flush=True)
      json.dump(results, open(path, "w"), indent=1)  # resumable
  plot(results, os.path.join(args.out, "quadratic.png"))


COLORS = {"mezo": "C0", "hizoo_paper": "C1", "hizoo": "C2", "hizoo_rows": "C6",
          "hizoo_l": "C3", "oracle": "C4"}


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = list(results)
  cols = min(4, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows),
                           squeeze=False)
  for ax, key in zip(axes.ravel(), keys):
    d = int(key.split("d=")[1].split()[0])
    for name, r in results[key].items():
      curve = np.asarray(r["curve"])
      passes = np.linspace(0, r["budget_passes"], len(curve) + 1)[1:] / d
      long_run = name.startswith("mezo_x")
      ax.loglog(passes, curve, label=name.replace("_x", " x"),
                color=COLORS["mezo" if long_run else name],
                ls=":" if long_run else "-")
    ax.axhline(TARGET, color="grey", lw=0.5, ls=":")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("forward passes / d")
    ax.set_ylim(1e-5, 2)
    ax.legend(fontsize=6)
  axes[0, 0].set_ylabel("f / f0 (median over seeds, best lr)")
  for ax in axes.ravel()[len(keys):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
