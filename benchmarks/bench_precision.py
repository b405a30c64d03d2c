"""bf16/fp16 parameters: plain, float32 master weights, stochastic rounding.

A 64-weight quadratic whose weights sit near |w| = 1.5 (bfloat16 spacing
2**-7 there) and whose optimum is 0.05 away: ZO steps of ``lr * g * z`` are
~1e-4, far below half the spacing. Reports, after ``--steps`` MeZO and HiZOO
steps through ``tx.update`` and through ``hz.make_train_step``, the loss
relative to the start (mean over seeds) and the fraction of weights that
ever changed. The loss is computed in float32 from the params.

    python benchmarks/bench_precision.py            # writes results/precision.md
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hizoo_jax as hz

N = 64


def problem(seed):
  rng = np.random.default_rng(seed)
  w0 = 1.5 + 0.1 * rng.standard_normal(N)
  target = w0 + 0.05 * rng.standard_normal(N)
  return w0.astype(np.float32), target.astype(np.float32)


def run(make_tx, dtype, seed, steps, wrap, lean=False):
  w0, target = problem(seed)
  params = {"w": jnp.asarray(w0, dtype)}
  t = jnp.asarray(target)

  def loss(p):
    return jnp.sum((p["w"].astype(jnp.float32) - t) ** 2)

  tx = make_tx()
  tx = {"plain": tx, "master": hz.master_weights(tx),
        "stochastic": hz.stochastic_rounding(tx)}[wrap]

  @jax.jit
  def train(params):
    def body(_, carry):
      params, state = carry
      updates, state = tx.update(None, state, params, value_fn=loss)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  if lean:  # hz.make_train_step: the points walked in place (or exact)
    step = hz.make_train_step(tx, lambda p, batch: loss(p), donate=False)

    def train(params):  # noqa: F811
      state = tx.init(params)
      for _ in range(steps):
        params, state, _ = step(params, state, None)
      return params

  final = train(params)
  start = float(loss({"w": jnp.asarray(w0, dtype)}))
  changed = float(np.mean(np.asarray(final["w"], np.float32)
                          != np.asarray(jnp.asarray(w0, dtype), np.float32)))
  return float(loss(final)) / start, changed


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  optimizers = {
      "mezo": lambda mu: (lambda: hz.mezo(2e-3, mu=mu)),
      "hizoo": lambda mu: (lambda: hz.hizoo(2e-3, mu=mu,
                                            hessian_smooth=1e-3)),
  }
  rows = []
  import warnings
  warnings.simplefilter("ignore", RuntimeWarning)  # plain bf16 warns
  for name, make in optimizers.items():
    for mu in (1e-3, 1e-2):
      for dtype, wraps in ((jnp.float32, ("plain",)),
                           (jnp.bfloat16, ("plain", "master", "stochastic")),
                           (jnp.float16, ("plain", "master", "stochastic"))):
        for wrap in wraps:
          for lean in (False, True):
            results = [run(make(mu), dtype, s, args.steps, wrap, lean)
                       for s in range(args.seeds)]
            ratio, changed = np.mean(results, axis=0)
            rows.append(dict(optimizer=name, mu=mu,
                             dtype=jnp.dtype(dtype).name, mode=wrap,
                             step="make_train_step" if lean else "tx.update",
                             loss_ratio=round(float(ratio), 4),
                             changed=round(float(changed), 3)))
            print(rows[-1], flush=True)
  out = os.path.join(os.path.dirname(__file__), "results")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "precision.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(out, "precision.md"), "w") as f:
    f.write(f"Loss after {args.steps} steps / initial loss (mean of "
            f"{args.seeds} seeds); 'changed': fraction of weights moved.\n\n"
            "| optimizer | mu | dtype | mode | step | loss ratio | changed |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n")
    for r in rows:
      f.write(f"| {r['optimizer']} | {r['mu']} | {r['dtype']} | {r['mode']} "
              f"| {r['step']} | {r['loss_ratio']} | {r['changed']} |\n")


if __name__ == "__main__":
  main()
