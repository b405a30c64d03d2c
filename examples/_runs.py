"""Run folders for examples/finetune.py: where a run writes, resuming, comparing.

Every run gets its own folder (by default ``runs/finetune/<time>-<optimizer>``)
holding ``config.json`` (written before the first step), ``checkpoints/``
(with ``history.json``), ``metrics.json`` and ``curves.png``. A folder that
already holds a run is never written over unless ``--overwrite`` says so, and
``--resume`` refuses a run made with flags that change the trajectory. A run
that stopped before its first checkpoint holds nothing worth keeping: a
plain rerun reuses its folder, ``--resume`` starts it from step 0. One run at
a time uses a folder: it holds ``.finetune.lock`` (pid, host) while it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

from hizoo_jax import dirlock

RUNS_ROOT = os.path.join("runs", "finetune")
RUN_FILES = ("config.json", "metrics.json", "curves.png", "checkpoints",
             "checkpoints-set-aside", "checkpoints-unreadable")
LOCK = ".finetune.lock"
# Flags that change the trained trajectory; eval-size is here too because
# the resumed history would otherwise mix accuracies on different sets.
TRAJECTORY_FLAGS = (
    "model", "head", "label_words", "dtype", "data", "data_dir", "k",
    "data_seed", "max_length", "optimizer", "peft", "objective", "batch_size",
    "lr", "mu", "hessian_smooth", "estimator", "weight_decay", "lora_rank",
    "lora_alpha", "lora_targets", "seed", "eval_size")
# Flags two runs must share for their curves to be drawn in one plot.
COMPARABLE_FLAGS = (
    "model", "head", "label_words", "dtype", "data", "data_dir", "k",
    "data_seed", "max_length", "peft", "objective", "batch_size", "eval_size")


def holds_run(path: str) -> bool:
  """True if ``path`` has any file a run writes."""
  return any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES)


def _has_checkpoint(path: str) -> bool:
  ckpt = os.path.join(path, "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def stopped_before_first_checkpoint(path: str) -> bool:
  """A run folder with nothing to keep: no checkpoint, no metrics, nothing
  set aside (the run was stopped before its first checkpoint)."""
  kept = ("metrics.json", "curves.png", "checkpoints-set-aside",
          "checkpoints-unreadable")
  return not (_has_checkpoint(path) or any(
      os.path.exists(os.path.join(path, f)) for f in kept))


def claim(path: str) -> None:
  """Makes this process the only run using ``path`` (ValueError if another
  live run holds it); the claim ends when the process does."""
  os.makedirs(path, exist_ok=True)
  try:
    dirlock.hold(path, LOCK, "running examples/finetune.py")
  except dirlock.LockedError as e:
    raise ValueError(f"--output: {e}") from None


def new_run_dir(root: str, optimizer: str) -> str:
  """Creates and returns a new folder under ``root`` for one run.

  Creating it here (not when the run starts writing) reserves the name, so
  two runs started in the same second get two folders.
  """
  os.makedirs(root, exist_ok=True)
  base = os.path.join(root, time.strftime("%Y%m%d-%H%M%S-") + optimizer)
  path, n = base, 1
  while True:
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      n += 1
      path = f"{base}-{n}"


def discard_if_empty(path: str) -> None:
  """Removes the folder :func:`new_run_dir` made if nothing was written."""
  if (os.path.dirname(os.path.normpath(path)) == RUNS_ROOT
      and os.path.isdir(path) and set(os.listdir(path)) <= {LOCK}):
    dirlock.release(path, LOCK)
    if os.path.exists(os.path.join(path, LOCK)):
      os.remove(os.path.join(path, LOCK))
    os.rmdir(path)


def newest_run(root: str) -> str | None:
  """The run folder under ``root`` whose checkpoints changed last."""
  if not os.path.isdir(root):
    return None
  found = [os.path.join(root, d) for d in os.listdir(root)
           if os.path.isdir(os.path.join(root, d, "checkpoints"))]
  return max(found, key=lambda d: os.path.getmtime(
      os.path.join(d, "checkpoints")), default=None)


def resolve_output(args) -> str:
  """The folder this run writes to, claimed for this process; ValueError if
  that would lose a run or another run uses it."""
  if args.output is None:
    if not args.resume:
      path = new_run_dir(RUNS_ROOT, args.optimizer)
      claim(path)
      return path
    found = newest_run(RUNS_ROOT)
    if found is None:
      raise ValueError(f"--resume: no run with checkpoints in {RUNS_ROOT}; "
                       "pass --output with the run's folder.")
    print(f"--resume: continuing the newest run, {found}", flush=True)
    claim(found)
    return found
  claim(args.output)  # first: two runs started together cannot both pass.
  if args.resume:
    if not _has_checkpoint(args.output):
      print(f"--resume: no checkpoint in {args.output} yet; the run starts "
            "from step 0.", flush=True)
  elif holds_run(args.output) and not args.overwrite:
    if stopped_before_first_checkpoint(args.output):
      print(f"{args.output}: the run there stopped before its first "
            "checkpoint; reusing the folder.", flush=True)
      _clear(args.output)
    else:
      raise ValueError(
          f"{args.output} already holds a run: pass --resume to continue it, "
          "--overwrite to replace it, or another --output (without --output "
          "every run gets a new folder).")
  return args.output


def _normal(name: str, value):
  """Paths as absolute paths, so a run resumed from elsewhere compares."""
  if name in ("model", "data_dir") and value and os.path.exists(value):
    return os.path.realpath(value)
  return value


def trajectory_config(args) -> dict:
  return {name: _normal(name, getattr(args, name)) for name in TRAJECTORY_FLAGS}


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def check_resume(args) -> None:
  """ValueError naming every trajectory flag that differs from the run's."""
  path = os.path.join(args.output, "config.json")
  if not os.path.isfile(path):
    if not _has_checkpoint(args.output):
      return  # stopped before it wrote anything: nothing to compare with.
    raise ValueError(f"--resume: {path} is missing, so the run's flags cannot"
                     " be checked; start a new run (or --overwrite).")
  with open(path) as f:
    saved = json.load(f)
  now = trajectory_config(args)
  diffs = [f"{_flag(k)} {saved.get(k)!r} (now {now[k]!r})"
           for k in TRAJECTORY_FLAGS if saved.get(k) != now[k]]
  if diffs:
    raise ValueError(
        f"--resume: the run in {args.output} was made with other flags that "
        f"change its trajectory: {'; '.join(diffs)}. Resume with the run's "
        "flags, or start a new run.")


def _clear(folder: str) -> None:
  for name in RUN_FILES:
    path = os.path.join(folder, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def prepare(args) -> None:
  """Clears an old run if ``--overwrite``, then records this run's flags."""
  if args.resume and os.path.isfile(os.path.join(args.output, "config.json")):
    return
  if args.overwrite and holds_run(args.output):
    _clear(args.output)
    print(f"--overwrite: removed the previous run in {args.output} "
          f"({', '.join(RUN_FILES)})", flush=True)
  os.makedirs(args.output, exist_ok=True)
  with open(os.path.join(args.output, "config.json"), "w") as f:
    json.dump(trajectory_config(args), f, indent=2)


def load_metrics(path: str) -> dict | None:
  """A run's metrics (``path``: its folder or metrics.json); None if it has
  none; ValueError naming the file if it cannot be read."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      metrics = json.load(f)
    if not isinstance(metrics, dict) or not isinstance(
        metrics.get("config", {}), dict):
      raise ValueError("not a metrics object")
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None
  return metrics


def comparisons(args) -> list[dict]:
  """Other runs' metrics to plot beside this one.

  ``--compare PATH ...`` names them (run folders or metrics.json files; an
  empty ``--compare`` turns comparing off). Without it, the newest sibling
  run of each other optimizer with the same data, model and objective flags
  is used, e.g. a MeZO run beside a HiZOO run under ``runs/finetune``.
  (finetune.py has checked that the ``--compare`` paths exist.)
  """
  if args.compare is not None:
    return [load_metrics(path) for path in args.compare]
  parent = os.path.dirname(os.path.abspath(args.output))
  mine = trajectory_config(args)
  newest = {}
  for name in sorted(os.listdir(parent)):
    path = os.path.join(parent, name, "metrics.json")
    if (not os.path.isfile(path)
        or os.path.samefile(os.path.dirname(path), args.output)):
      continue
    try:
      metrics = load_metrics(path)
    except ValueError as e:  # a broken sibling must not fail this run
      warnings.warn(f"not comparing with a broken run: {e}", RuntimeWarning,
                    stacklevel=2)
      continue
    config = metrics.get("config", {})
    if (config.get("optimizer") in (None, args.optimizer) or any(
        _normal(k, config.get(k)) != mine[k] for k in COMPARABLE_FLAGS)):
      continue
    when = os.path.getmtime(path)
    if when >= newest.get(config["optimizer"], (0, None))[0]:
      newest[config["optimizer"]] = (when, metrics)
  return [metrics for _, metrics in newest.values()]
