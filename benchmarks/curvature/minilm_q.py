"""Why HiZOO's per-tensor H stays at 1 on MiniLM: the second difference's noise.

On the setting of ``minilm_hessian.py`` (the example's MiniLM classifier,
full parameters, the k-shot SST-2 batch of one data seed, HiZOO per tensor
at the same learning rate), runs ``--steps`` HiZOO steps and records, per
step, ``q = (l+ + l- - 2 l0) / (2 mu^2)`` from the step's three losses and
the rule's running statistics (``curvature_stats``: the baseline b, the
residual's mean square v in units of the mean curvature), and from v the
gain ``min(1, n / (2 v))`` of the largest tensor (n coordinates), the factor
by which the rule scales that tensor's log-step. Writes
``results/minilm_q.json``.

    python benchmarks/curvature/minilm_q.py --data-dir ../shared/data/SST-2
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kshot  # noqa: E402

import hizoo_jax as hz  # noqa: E402


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  kshot.add_task_args(parser)
  parser.add_argument("--seed", type=int, default=13, help="data seed")
  parser.add_argument("--steps", type=int, default=60, help="HiZOO steps")
  parser.add_argument("--lr", type=float, default=2.5e-4)
  parser.add_argument("--mu", type=float, default=1e-3)
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  args = parser.parse_args()
  kshot.require_data(args.data_dir)

  clf = kshot.load_model()
  batch, _, _ = kshot.train_batch(clf, args.data_dir, args.k, args.seed,
                                  args.max_length)
  loss_fn = kshot.loss_fn(clf)

  params = {"model": clf.params, "head": clf.head}
  sizes = [x.size for x in jax.tree.leaves(params)]
  tx = hz.hizoo(args.lr, mu=args.mu, key=args.seed)
  train = jax.tree.map(jnp.array, params)
  state = tx.init(train)
  step = hz.make_train_step(tx, loss_fn)
  rows, start = [], time.time()
  for i in range(args.steps):
    train, state, m = step(train, state, batch)
    zo = hz.find_state(state)
    l0, lp, lm = (float(m["loss"]), float(m["loss_plus"]),
                  float(m["loss_minus"]))
    v = float(zo.curvature_stats.spread)
    rows.append({"step": i + 1, "loss": l0,
                 "q": (lp + lm - 2 * l0) / (2 * args.mu ** 2),
                 "baseline_b": float(zo.curvature_stats.baseline),
                 "spread_v": v,
                 "largest_gain": min(1.0, max(sizes) / (2 * v)) if v > 0
                                 else None})
  q = np.array([r["q"] for r in rows])
  later = [r for r in rows if r["step"] > 10]  # running means settled
  d = sum(sizes)
  result = {
      "config": vars(args),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "jax": jax.__version__,
      "parameters": d, "tensors": len(sizes), "largest_tensor": max(sizes),
      "q_mean": float(q.mean()), "q_std": float(q.std(ddof=1)),
      "q_relative_std": float(q.std(ddof=1) / abs(q.mean())),
      "diagonal_relative_std": float(np.sqrt(2 / d)),
      "spread_v_range_after_step_10": [min(r["spread_v"] for r in later),
                                       max(r["spread_v"] for r in later)],
      "largest_gain_range_after_step_10": [
          min(r["largest_gain"] for r in later),
          max(r["largest_gain"] for r in later)],
      "learned_range": [float(np.min(np.asarray(h))) for h in
                        [jnp.concatenate([jnp.ravel(x) for x in
                                          jax.tree.leaves(zo.hessian)])]] + [
                            float(jnp.max(jnp.concatenate(
                                [jnp.ravel(x) for x in
                                 jax.tree.leaves(zo.hessian)])))],
      "seconds": round(time.time() - start, 1),
      "steps": rows,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "minilm_q.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "steps"},
                   indent=1))


if __name__ == "__main__":
  main()
