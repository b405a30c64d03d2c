"""Fine-tuning study: k-shot SST-2 with MiniLM, compared by forward passes.

all-MiniLM-L6-v2 (the example's ``embed`` head, full fine-tuning, float32)
on k = 16 examples per class drawn from ``train.tsv + dev.tsv`` with each
data seed, evaluated on ``test.tsv`` (the GLUE dev split, 872 sentences).
Methods, each with its learning rate (``--lr-*``) and ``mu = 1e-3``:

* ``mezo``: two passes a step;
* ``hizoo_paper``: ``estimator="paper"`` with its default rate 1e-6;
* ``hizoo``: the default (signed, per-tensor curvature);
* ``hizoo_frozen``: the same with H frozen at 1 (rate 0): the curvature
  probe's pass without its use;
* ``hizoo_shuffled``: the default, but after every step the per-tensor
  values of H are permuted across tensors (a fixed random permutation):
  H of the right spread assigned to the wrong tensors;
* ``hizoo_every4``: the default probing the curvature every 4th step
  (``curvature_every=4``, 2.25 passes a step).

Every run has the same budget of forward passes (MeZO takes 1.5x the steps
of the three-pass methods), evaluates every ``--eval-every`` passes, and
saves its record after each evaluation: the study resumes where it stopped
(``--out``), one run after another. The final per-tensor H of ``hizoo`` is
kept for ``minilm_hessian.py``.

    python benchmarks/curvature/finetune_sst2.py --data-dir ../shared/data/SST-2
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

METHODS = ("mezo", "hizoo", "hizoo_paper", "hizoo_frozen", "hizoo_shuffled",
           "hizoo_every4")
PASSES = {"mezo": 2, "hizoo_every4": 2.25}


def optimizer(method: str, lr: float, key: int):
  if method == "mezo":
    return hz.mezo(lr, mu=1e-3, key=key)
  if method == "hizoo_paper":
    return hz.hizoo(lr, mu=1e-3, estimator="paper", key=key)
  if method == "hizoo_frozen":
    return hz.hizoo(lr, mu=1e-3, hessian_smooth=0.0, key=key)
  if method == "hizoo_every4":
    return hz.hizoo(lr, mu=1e-3, curvature_every=4, key=key)
  return hz.hizoo(lr, mu=1e-3, key=key)


def shuffle_tensors(state, permutation):
  """The estimator state with its per-tensor H values permuted."""
  zo = state[0]
  factors, = zo.hessian  # one value per tensor
  leaves, treedef = jax.tree.flatten(factors)
  values = jnp.stack([h.reshape(()) for h in leaves])[permutation]
  leaves = [v.reshape(h.shape) for h, v in zip(leaves, values)]
  return (zo._replace(hessian=(treedef.unflatten(leaves),)),) + tuple(
      state[1:])


def per_tensor_h(state) -> dict:
  factors, = hz.find_state(state).hessian
  flat = jax.tree_util.tree_flatten_with_path(factors)[0]
  return {jax.tree_util.keystr(p): float(np.mean(np.asarray(h)))
          for p, h in flat}


def run_one(args, clf_params, clf, method, data_seed, record, path):
  train_enc, _, test = kshot.train_batch(clf, args.data_dir, args.k,
                                         data_seed, args.max_length)
  test_enc = clf.encode(test.texts, args.max_length)
  loss_fn = kshot.loss_fn(clf)

  @jax.jit
  def predict(train, batch):
    return jnp.argmax(clf.logits(train["model"], train["head"], batch), -1)

  def accuracy(train):
    hits = 0
    for lo in range(0, len(test.labels), 128):
      batch = {k: v[lo:lo + 128] for k, v in test_enc.items()}
      hits += int(np.sum(np.asarray(predict(train, batch)) ==
                         test.labels[lo:lo + 128]))
    return hits / len(test.labels)

  lr = getattr(args, "lr_" + ("mezo" if method == "mezo" else "hizoo"))
  tx = optimizer(method, lr, data_seed)
  train = jax.tree.map(jnp.array, {"model": clf_params, "head": clf.head})
  state = tx.init(train)
  step = hz.make_train_step(tx, loss_fn)
  passes = PASSES.get(method, 3)
  steps = int(args.budget // passes)
  permutation = None
  if method == "hizoo_shuffled":
    n = len(per_tensor_h(state))
    permutation = jnp.asarray(np.random.default_rng(data_seed).permutation(n))
    shuffle = jax.jit(shuffle_tensors)
  run = record.setdefault("runs", {}).setdefault(f"{method}/{data_seed}", {})
  if run.get("done"):
    return
  run.update(lr=lr, passes_per_step=passes, steps=steps, evals=[],
             train_loss=[])
  run["evals"].append([0, accuracy(train)])
  eval_every = max(int(args.eval_every // passes), 1)
  start = time.time()
  batch = {k: v for k, v in train_enc.items()}
  for t in range(1, steps + 1):
    train, state, metrics = step(train, state, batch)
    if permutation is not None:
      state = shuffle(state, permutation)
    if t % 10 == 0:
      run["train_loss"].append([t * passes, float(metrics["loss"])])
    if t % eval_every == 0 or t == steps:
      run["evals"].append([t * passes, accuracy(train)])
      run["seconds"] = round(time.time() - start, 1)
      print(method, data_seed, run["evals"][-1], f"{run['seconds']}s",
            flush=True)
      json.dump(record, open(path, "w"), indent=1)
  if method.startswith("hizoo") and method != "hizoo_paper":
    run["h_per_tensor"] = per_tensor_h(state)
  run["done"] = True
  json.dump(record, open(path, "w"), indent=1)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  kshot.add_task_args(parser)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated, run in this order")
  parser.add_argument("--seeds", default="13,21,42", help="data seeds")
  parser.add_argument("--budget", type=int, default=1200,
                      help="forward passes per run")
  parser.add_argument("--eval-every", type=int, default=150,
                      help="evaluate every this many forward passes")
  parser.add_argument("--lr-mezo", type=float, default=2e-5,
                      help="MeZO learning rate")
  parser.add_argument("--lr-hizoo", type=float, default=2e-5,
                      help="learning rate of every HiZOO variant")
  parser.add_argument("--out", default=os.path.join(HERE, "results",
                                                    "finetune_sst2.json"),
                      help="the record (resumed if it exists)")
  args = parser.parse_args()
  kshot.require_data(args.data_dir)
  record = json.load(open(args.out)) if os.path.exists(args.out) else {}
  record["config"] = {k: v for k, v in vars(args).items()
                      if k not in ("out", "data_dir")}
  clf = kshot.load_model()
  params = clf.params
  for data_seed in [int(s) for s in args.seeds.split(",")]:
    for method in args.methods.split(","):
      run_one(args, params, clf, method, data_seed, record, args.out)


if __name__ == "__main__":
  main()
