"""The queue of ``fzoo_sst2.py``: learning-rate selection on dev, then seeds.

For each (setting, method) a grid ``centre x {1/3, 1, 3}`` runs on data
seed 13; the rate with the best mean dev accuracy over the second half of
the run (ties: lower dev loss) is chosen, and the grid grows by 3x past an
edge that wins (at most twice). The test set is never read here.
"""

from __future__ import annotations

import numpy as np

PASSES = {"mezo": 2, "hizoo": 3, "fzoo8": 9, "fzoo8_gauss": 9,
          "fzoo8_unnorm": 9, "fzoo4": 5, "fzoo16": 17}
SELECT_SEED = 13


CENTRES = {("full", "mezo"): 3e-4, ("full", "hizoo"): 3e-4,
           ("full", "fzoo8"): 3e-3, ("lora", "mezo"): 3e-3,
           ("lora", "fzoo8"): 3e-2}
MAX_EXTENSIONS = 2


def run_name(peft, method, lr, eps, seed):
  return f"{peft}/{method}/lr={lr:.3g}/eps={eps:g}/seed={seed}"


def _lr(x):
  return float(f"{x:.3g}")


def dev_score(entry, budget):
  """Mean dev accuracy over the second half of the run; ties: dev loss."""
  late = [e for e in entry["evals"] if e["passes"] >= budget / 2]
  return (float(np.mean([e["dev_acc"] for e in late])),
          -float(np.mean([e["dev_loss"] for e in late])))


def centre(record, args, peft, method):
  if (peft, method) in CENTRES:
    return CENTRES[(peft, method)]
  if method == "fzoo8_unnorm":  # ZO-SGD scale: MeZO's rate, 8 queries.
    mezo = selection(record, args, peft, "mezo")
    return None if mezo[0] != "chosen" else 3 * mezo[1]
  fzoo8 = selection(record, args, peft, "fzoo8")  # FZOO's own scale.
  return None if fzoo8[0] != "chosen" else fzoo8[1]


def selection(record, args, peft, method, eps=1e-3):
  """("run", lr) for the next grid run, ("chosen", lr), or ("blocked",)."""
  c = centre(record, args, peft, method)
  if c is None:
    return ("blocked", None)
  lrs = [_lr(c), _lr(c / 3), _lr(3 * c)]
  for _ in range(MAX_EXTENSIONS + 1):
    for lr in lrs:
      entry = record["runs"].get(run_name(peft, method, lr, eps, SELECT_SEED))
      if not (entry and entry.get("done")):
        return ("run", lr)
    scores = {lr: dev_score(record["runs"][run_name(
        peft, method, lr, eps, SELECT_SEED)], args.budget) for lr in lrs}
    best = max(lrs, key=lambda lr: scores[lr])
    if best == min(lrs) and len(lrs) < 3 + MAX_EXTENSIONS:
      lrs.append(_lr(best / 3))
    elif best == max(lrs) and len(lrs) < 3 + MAX_EXTENSIONS:
      lrs.append(_lr(best * 3))
    else:
      return ("chosen", best)
  return ("chosen", best)


def jobs_of(record, args, kind, peft, method):
  """Runs still to do for one plan item: [(peft, method, lr, eps, seed)]."""
  sel = selection(record, args, peft, method)
  if sel[0] == "blocked":
    return []
  if sel[0] == "run":
    return [(peft, method, sel[1], 1e-3, SELECT_SEED)] if kind == "select" \
        else []
  if kind == "select":
    return []
  if kind == "eps":
    todo = [(peft, method, sel[1], 1e-4, SELECT_SEED)]
  else:  # "seeds"
    todo = [(peft, method, sel[1], 1e-3, s) for s in args.seeds
            if s != SELECT_SEED]
  return [j for j in todo if not record["runs"].get(
      run_name(*j), {}).get("done")]


ABLATIONS = ("fzoo8_unnorm", "fzoo4", "fzoo16", "fzoo8_gauss")
PLAN = (  # groups in priority order; within a group, runs are interleaved.
    [("select", "full", "mezo"), ("select", "full", "fzoo8")],
    [("seeds", "full", "mezo"), ("seeds", "full", "fzoo8")],
    [("select", "full", "hizoo")],
    [("seeds", "full", "hizoo")],
    [("select", "full", m) for m in ABLATIONS],
    [("eps", "full", "mezo"), ("eps", "full", "fzoo8")],
    [("select", "lora", "mezo"), ("select", "lora", "fzoo8")],
    [("seeds", "full", m) for m in ABLATIONS],
    [("seeds", "lora", "mezo"), ("seeds", "lora", "fzoo8")],
)


def next_job(record, args):
  """(group index, job) of the next run, or (None, None)."""
  for index, group in enumerate(PLAN):
    options = []
    for kind, peft, method in group:
      if method not in args.methods:
        continue
      todo = jobs_of(record, args, kind, peft, method)
      if todo:
        done = sum(1 for e in record["runs"].values()
                   if e.get("done") and e["method"] == method
                   and e["peft"] == peft)
        options.append((done, todo[0]))
    if options:
      return index, min(options, key=lambda o: o[0])[1]
  return None, None


def chosen_runs(record, args, peft, method):
  """The runs at the dev-chosen rate (eps 1e-3), by seed; {} if not chosen."""
  sel = selection(record, args, peft, method)
  if sel[0] != "chosen":
    return {}
  out = {}
  for seed in args.seeds:
    entry = record["runs"].get(run_name(peft, method, sel[1], 1e-3, seed))
    if entry and entry.get("evals"):
      out[seed] = entry
  return out
