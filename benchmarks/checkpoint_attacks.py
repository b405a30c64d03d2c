#!/usr/bin/env python
"""Adversarial runs against hizoo_jax checkpoints, repeatable by hand.

Issue 26's attacks at scale (tests/test_checkpoint_safety.py runs a few of
each in CI):

* ``kill``: a child process saves steps 1, 2, ... of a HiZOO state; it is
  SIGKILLed at a random moment (uniform over its saves after the first). Then the
  newest step must restore exactly what was saved at that step, every listed
  step must verify, and the run must go on (a save of the next step, taking
  over the dead writer's lock).
* ``concurrent``: two children save steps 1..K into one directory at once.
  Exactly one may write; every step must restore one writer's params *and*
  state (never a mix).
* ``flips``: a single bit of a random file of the newest step is flipped.
  Restore must fall back to the older step with one warning, or (when the
  flip is in bytes that do not hold values) restore exactly the saved values;
  any other outcome is counted as silent corruption.
* ``example``: examples/finetune.py on a tiny random BERT is SIGKILLed at a
  random moment, then ``--resume``d to the end; its losses must equal an
  uninterrupted run's.
* ``example_concurrent``: two such runs started together on one
  ``--output``: one must run, the other be refused ("in use by").

Usage (from the repository root; each attack prints a table and writes
``benchmarks/results/checkpoint_attacks.json``)::

  python benchmarks/checkpoint_attacks.py                 # all, default sizes
  python benchmarks/checkpoint_attacks.py --attacks kill,flips --trials 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import hizoo_jax as hz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")

_SAVER = """
import sys, time
import jax, jax.numpy as jnp
import hizoo_jax as hz
sys.path.insert(0, sys.argv[4])
from checkpoint_attacks import tree_at
directory, value, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
print("READY", flush=True)
try:
  for step in range(1, steps + 1):
    params, state = tree_at(step, value)
    hz.save_checkpoint(directory, step, params, state, max_to_keep=None)
    print("SAVED", step, flush=True)
except hz.CheckpointError as e:
  print("REFUSED", e, flush=True)
  sys.exit(3)
"""


def tree_at(step: int, value: float = 0.0):
  """(params, HiZOO state) that a run would hold at ``step``: a function of
  (step, value) only, so a restore can be checked exactly."""
  key = jax.random.fold_in(jax.random.key(int(value * 1000)), step)
  params = {f"layer{i}": {"w": jax.random.normal(jax.random.fold_in(key, i),
                                                 (128, 64)),
                          "b": jnp.full((64,), step + value)}
            for i in range(6)}
  tx = hz.hizoo(1e-3, key=step)
  return params, tx.init(params)


def _equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _saver(directory, value, steps):
  return subprocess.Popen(
      [sys.executable, "-c", _SAVER, directory, str(value), str(steps),
       os.path.join(ROOT, "benchmarks")],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def attack_kill(trials: int, steps: int = 8) -> dict:
  """SIGKILL during saves; restore, verify, go on."""
  # Kills land uniformly over the saves after the first one (before it,
  # there is nothing to lose).
  with tempfile.TemporaryDirectory() as d:
    proc = _saver(d, 0.0, steps)
    while not proc.stdout.readline().startswith("SAVED"):
      pass
    t0 = time.time()
    proc.wait()
    duration = time.time() - t0
  out = {"trials": trials, "restored_exactly": 0, "wrong": 0,
         "nothing_saved": 0, "went_on": 0, "leftover_tmp": 0}
  rng = random.Random(0)
  for _ in range(trials):
    with tempfile.TemporaryDirectory() as d:
      proc = _saver(d, 0.0, steps)
      while not proc.stdout.readline().startswith("SAVED"):
        pass
      time.sleep(rng.uniform(0, duration))
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      out["leftover_tmp"] += any("tmp" in n for n in os.listdir(d))
      listed = hz.all_steps(d)
      if not listed:
        out["nothing_saved"] += 1
        step = 0
      else:
        template = tree_at(0)
        step, params, state = hz.restore_checkpoint(d, *template)
        ok = _equal((params, state), tree_at(step))
        ok &= hz.all_steps(d, verify=True) == listed
        out["restored_exactly" if ok else "wrong"] += 1
      hz.save_checkpoint(d, step + 1, *tree_at(step + 1), supersede=True)
      restored = hz.restore_checkpoint(d, *tree_at(0))
      out["went_on"] += restored[0] == step + 1 and _equal(
          restored[1:], tree_at(step + 1))
  return out


def attack_concurrent(trials: int, steps: int = 4) -> dict:
  """Two writers at once: one is refused, no step mixes them."""
  out = {"trials": trials, "one_writer": 0, "mixed_steps": 0,
         "both_wrote": 0}
  for _ in range(trials):
    with tempfile.TemporaryDirectory() as d:
      procs = [_saver(d, v, steps) for v in (1.0, 2.0)]
      codes = [p.wait(timeout=600) for p in procs]
      out["both_wrote"] += codes == [0, 0]
      out["one_writer"] += sorted(codes) == [0, 3]
      for step in hz.all_steps(d):
        got = hz.restore_checkpoint(d, *tree_at(0), step=step)[1:]
        out["mixed_steps"] += not any(_equal(got, tree_at(step, v))
                                      for v in (1.0, 2.0))
  return out


def attack_flips(trials: int) -> dict:
  """Single-bit flips anywhere in the newest step's files."""
  out = {"trials": trials, "fell_back": 0, "identical": 0,
         "silent_corruption": 0, "error": 0}
  rng = random.Random(0)
  with tempfile.TemporaryDirectory() as d:
    base = os.path.join(d, "base")
    for step in (1, 2):
      hz.save_checkpoint(base, step, *tree_at(step))
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(base, "2"))
             for f in fs if os.path.getsize(os.path.join(r, f))]
    for trial in range(trials):
      work = os.path.join(d, f"t{trial}")
      shutil.copytree(base, work)
      path = os.path.join(work, os.path.relpath(rng.choice(files), base))
      data = bytearray(open(path, "rb").read())
      data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
      open(path, "wb").write(bytes(data))
      try:
        with warnings.catch_warnings(record=True):
          warnings.simplefilter("always")
          step, *got = hz.restore_checkpoint(work, *tree_at(0))
      except hz.CheckpointError:
        out["error"] += 1
        continue
      if _equal(got, tree_at(step)):
        out["fell_back" if step == 1 else "identical"] += 1
      else:
        out["silent_corruption"] += 1
      shutil.rmtree(work)
  return out


def _example_argv(d):
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from example_assets import tiny_assets  # pylint: disable=import-outside-toplevel
  assets = tiny_assets(d)
  return [sys.executable, os.path.join(ROOT, "examples", "finetune.py"),
          "--model", assets["models"]["embed"], "--data-dir",
          assets["data"], "--k", "4", "--steps", "12", "--batch-size", "4",
          "--eval-every", "2", "--eval-size", "8", "--max-length", "16",
          "--lora-rank", "2", "--no-progress", "--compare"]


def attack_example_concurrent(trials: int) -> dict:
  """Two examples/finetune.py runs started together on one --output."""
  out = {"trials": trials, "one_ran_one_refused": 0, "other": 0}
  with tempfile.TemporaryDirectory() as d:
    argv = _example_argv(d)
    for trial in range(trials):
      run = os.path.join(d, f"run{trial}")
      procs = [subprocess.Popen(argv + ["--output", run], env=ENV,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
      results = [(p.wait(), p.stderr.read()) for p in procs]
      codes = sorted(code for code, _ in results)
      refused = any("in use by" in err for _, err in results)
      ok = codes[0] == 0 and codes[1] != 0 and refused
      out["one_ran_one_refused" if ok else "other"] += 1
  return out


def attack_example(trials: int) -> dict:
  """SIGKILL examples/finetune.py at random; --resume must match."""
  out = {"trials": trials, "identical": 0, "differs": 0, "failed": 0}
  rng = random.Random(0)
  with tempfile.TemporaryDirectory() as d:
    argv = _example_argv(d)
    t0 = time.time()
    ref = os.path.join(d, "ref")
    subprocess.run(argv + ["--output", ref], check=True, env=ENV,
                   capture_output=True)
    duration = time.time() - t0
    with open(os.path.join(ref, "metrics.json")) as f:
      expected = json.load(f)["train_loss"]
    for trial in range(trials):
      run = os.path.join(d, f"run{trial}")
      proc = subprocess.Popen(argv + ["--output", run], env=ENV,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      time.sleep(rng.uniform(0.3 * duration, duration))
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      done = subprocess.run(argv + ["--output", run, "--resume"], env=ENV,
                            capture_output=True, text=True)
      if done.returncode != 0:
        out["failed"] += 1
        print(done.stderr[-2000:])
        continue
      with open(os.path.join(run, "metrics.json")) as f:
        got = json.load(f)["train_loss"]
      out["identical" if got == expected else "differs"] += 1
  return out


ATTACKS = {"kill": attack_kill, "concurrent": attack_concurrent,
           "flips": attack_flips, "example": attack_example,
           "example_concurrent": attack_example_concurrent}
DEFAULT_TRIALS = {"kill": 20, "concurrent": 5, "flips": 100, "example": 5,
                  "example_concurrent": 2}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--attacks", default=",".join(ATTACKS),
                      help="comma-separated: " + ", ".join(ATTACKS))
  parser.add_argument("--trials", type=int, default=None,
                      help="trials per attack (default: %s)" % DEFAULT_TRIALS)
  parser.add_argument("--out", default=os.path.join(
      ROOT, "benchmarks", "results", "checkpoint_attacks.json"))
  args = parser.parse_args(argv)
  results = {}
  for name in args.attacks.split(","):
    t0 = time.time()
    results[name] = ATTACKS[name](args.trials or DEFAULT_TRIALS[name])
    results[name]["seconds"] = round(time.time() - t0, 1)
    print(name, json.dumps(results[name]), flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  saved = {}
  if os.path.isfile(args.out):  # attacks run separately add up in one file
    with open(args.out) as f:
      saved = json.load(f).get("results", {})
  when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  for result in results.values():
    result["when"] = when
  with open(args.out, "w") as f:
    json.dump({"results": dict(saved, **results)}, f, indent=2)
  return results


if __name__ == "__main__":
  main()
