"""A real network: does HiZOO's learned per-tensor H follow the true curvature?

On the example's MiniLM classifier (full parameters, the k-shot SST-2 batch of
one data seed), compares across tensors:

* the H that HiZOO (``curvature="tensor"``, the default) learns in
  ``--steps`` steps on that batch, and
* autodiff estimates of the loss Hessian's diagonal: Hutchinson probes
  ``v * (H v)`` (``jax.jvp`` of ``jax.grad``, Rademacher v), averaged per
  tensor, and the stable proxy ``sqrt(mean((H v)^2))`` = sqrt((H^2)_ii).

Reported: Spearman rank correlations across tensors (all tensors, and the
tensors whose Hutchinson mean is resolved, |mean| > 2 standard errors), the
split-half agreement of the probes, and per-tensor values (JSON and PNG).

    python benchmarks/curvature/minilm_hessian.py --data-dir ../shared/data/SST-2
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


def spearman(a, b) -> float:
  ra = np.argsort(np.argsort(a))
  rb = np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  kshot.add_task_args(parser)
  parser.add_argument("--seed", type=int, default=13, help="data seed")
  parser.add_argument("--probes", type=int, default=64,
                      help="Hutchinson probes")
  parser.add_argument("--steps", type=int, default=400, help="HiZOO steps")
  parser.add_argument("--lr", type=float, default=2.5e-4,
                      help="HiZOO learning rate")
  parser.add_argument("--out", default=os.path.join(HERE, "results"),
                      help="folder for minilm_hessian.json and .png")
  args = parser.parse_args()
  kshot.require_data(args.data_dir)

  clf = kshot.load_model()
  batch, _, _ = kshot.train_batch(clf, args.data_dir, args.k, args.seed,
                                  args.max_length)
  loss_fn = kshot.loss_fn(clf)

  params = {"model": clf.params, "head": clf.head}
  names = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  # Autodiff: per-tensor means of v * Hv and of (Hv)^2 for each probe.
  @jax.jit
  def probe(key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = treedef.unflatten([
        jax.random.rademacher(k, x.shape, jnp.float32)
        for k, x in zip(keys, leaves)])
    grad = jax.grad(lambda p: loss_fn(p, batch))
    _, hv = jax.jvp(grad, (params,), (v,))
    return (jnp.stack([jnp.mean(a * b) for a, b in zip(
        jax.tree.leaves(v), jax.tree.leaves(hv))]),
            jnp.stack([jnp.mean(b * b) for b in jax.tree.leaves(hv)]))

  start = time.time()
  diag, square = [], []
  for i in range(args.probes):
    d, s = probe(jax.random.key(1000 + i))
    diag.append(np.asarray(d))
    square.append(np.asarray(s))
  diag, square = np.array(diag), np.array(square)
  hutchinson_seconds = time.time() - start

  # HiZOO on the same batch: the per-tensor H it learns.
  tx = hz.hizoo(args.lr, mu=1e-3, key=args.seed)
  train = jax.tree.map(jnp.array, params)
  state = tx.init(train)
  step = hz.make_train_step(tx, loss_fn)
  start = time.time()
  losses = []
  for _ in range(args.steps):
    train, state, metrics = step(train, state, batch)
    losses.append(float(metrics["loss"]))
  hizoo_seconds = time.time() - start
  zo = hz.find_state(state)
  factors, = zo.hessian
  learned = np.array([float(np.mean(np.asarray(h)))
                      for h in jax.tree.leaves(factors)])

  mean = diag.mean(0)
  stderr = diag.std(0, ddof=1) / np.sqrt(len(diag))
  resolved = np.abs(mean) > 2 * stderr
  proxy = np.sqrt(square.mean(0))
  half = len(diag) // 2
  result = {
      "config": vars(args),
      "tensors": len(names),
      "resolved_tensors": int(resolved.sum()),
      "positive_resolved": int((resolved & (mean > 0)).sum()),
      "split_half_spearman_diag": spearman(diag[:half].mean(0),
                                           diag[half:].mean(0)),
      "split_half_spearman_proxy": spearman(
          np.sqrt(square[:half].mean(0)), np.sqrt(square[half:].mean(0))),
      "spearman_learned_vs_diag_resolved": spearman(
          learned[resolved], mean[resolved]) if resolved.sum() > 2 else None,
      "spearman_learned_vs_diag_all": spearman(learned, mean),
      "spearman_learned_vs_proxy": spearman(learned, proxy),
      "learned_range": [float(learned.min()), float(learned.max())],
      # The rule's own statistics: q's running mean b and the residual's
      # (y / lam)^2; the gain of a group of n is min(1, n / (2 v)).
      "baseline_b": float(zo.curvature_stats.baseline),
      "spread_v": float(zo.curvature_stats.spread),
      "largest_gain": min(1.0, max(x.size for x in jax.tree.leaves(params))
                          / (2 * float(zo.curvature_stats.spread))),
      "loss_first_last": [losses[0], losses[-1]],
      "hutchinson_seconds": round(hutchinson_seconds, 1),
      "hizoo_seconds": round(hizoo_seconds, 1),
      "per_tensor": {n: {"learned_h": float(h), "diag_mean": float(m),
                         "diag_stderr": float(e), "proxy": float(p)}
                     for n, h, m, e, p in zip(names, learned, mean, stderr,
                                              proxy)},
  }
  os.makedirs(args.out, exist_ok=True)
  json.dump(result, open(os.path.join(args.out, "minilm_hessian.json"), "w"),
            indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "per_tensor"},
                   indent=1))

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
  axes[0].loglog(proxy, learned, ".", alpha=0.6)
  axes[0].set_xlabel("sqrt((H^2)_ii), per-tensor mean (autodiff)")
  axes[0].set_ylabel("learned H (HiZOO, per tensor)")
  axes[0].set_title(f"Spearman {result['spearman_learned_vs_proxy']:.2f}")
  pos = resolved & (mean > 0)
  axes[1].loglog(mean[pos], learned[pos], ".", alpha=0.6)
  axes[1].set_xlabel("diag(H) mean, resolved and > 0 (Hutchinson)")
  axes[1].set_title(f"{int(pos.sum())} of {len(names)} tensors")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "minilm_hessian.png"), dpi=110)


if __name__ == "__main__":
  main()
