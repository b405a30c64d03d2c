"""Modes shared by the benchmarks: the forward pass, each optimizer's step.

A *mode* is a jitted function of ``(params, opt_state, batch)`` with the
arguments it donates, plus how to build its optimizer state. Every mode
returns something that depends on all of its work, so nothing is dead code.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as model_lib  # noqa: E402

import hizoo_jax as hz  # noqa: E402
from hizoo_jax.train_step import make_train_step  # noqa: E402

MiB = 2.0**20
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

ZO = {
    "mezo": lambda: hz.mezo(1e-6, mu=1e-3),
    "hizoo": lambda: hz.hizoo(1e-6, mu=1e-3),
    "hizoo_l": lambda: hz.hizoo_l(1e-6, mu=1e-3),
    "fzoo": lambda: hz.fzoo(1e-6, eps=1e-3),
}

# Forward passes and noise passes (one draw of z fused into a parameter-sized
# elementwise pass) that each step needs, for the speed budget.
#   mezo:    +z, -2z, +z + update: the loop's three moves.
#   hizoo:   the same three moves, and the sums of z^2 (one loop over all
#            leaves, run on the last phase only; on a mesh: leaf by leaf, on
#            every phase, 3 + 6).
#   hizoo_l: the same, its row and column sums in that one loop (on a mesh:
#            +z, -2z, +z in the loop; row sums, column sums; the update).
PASSES = {"mezo": (2, 3), "hizoo": (3, 4), "hizoo_l": (3, 4)}


def build(size: str):
  cfg = model_lib.SIZES[size]
  params = model_lib.init(cfg, jax.random.key(0))
  return cfg, params, model_lib.make_batch(cfg), model_lib.make_loss(cfg)


def mode_fn(name: str, loss_fn):
  """``(jitted fn, make_state(params))`` for a mode name.

  Names: ``forward``, ``mezo``, ``hizoo``, ``hizoo_l`` (lean step),
  ``<opt>_store`` (store_noise), ``<opt>_master`` (``hz.master_weights``
  around the optimizer, for bf16 parameters), ``<opt>_naive`` (plain
  tx.update under jit,
  donated), ``<opt>_noise`` (one noise pass, params + mu s z, donated),
  ``backprop_adam`` (value_and_grad + Adam, donated).
  """
  if name == "forward":
    return jax.jit(lambda p, s, b: loss_fn(p, b)), lambda p: ()
  if name == "backprop_adam":
    tx = optax.adam(1e-4)

    def step(p, s, b):
      loss, grads = jax.value_and_grad(loss_fn)(p, b)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    return jax.jit(step, donate_argnums=(0, 1)), tx.init
  base, _, variant = name.partition("_")
  if name.startswith("hizoo_l"):
    base, variant = "hizoo_l", name[len("hizoo_l"):].lstrip("_")
  tx = ZO[base]()
  if variant == "":
    return make_train_step(tx, loss_fn), tx.init
  if variant == "master":
    master = hz.master_weights(tx)
    return make_train_step(master, loss_fn), master.init
  if variant == "store":
    return make_train_step(tx, loss_fn, store_noise=True), tx.init
  if variant == "naive":
    def naive(p, s, b):
      updates, s = tx.update(None, s, p, value_fn=lambda q: loss_fn(q, b))
      return optax.apply_updates(p, updates), s
    return jax.jit(naive, donate_argnums=(0, 1)), tx.init
  if variant == "noise":
    def noise_pass(p, s, b):
      probe = hz.PerturbationProbe()
      tx.update(None, s, p, zo_probe=probe)
      return probe.perturbation.shift(p, 1.0, 0)
    return jax.jit(noise_pass, donate_argnums=(0,)), tx.init
  raise ValueError(f"unknown mode {name!r}")


def use_compilation_cache(path) -> None:
  """Stores and loads every compiled program in ``path`` (None: off)."""
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compile_mode(name, params, batch, loss_fn):
  fn, make_state = mode_fn(name, loss_fn)
  state = make_state(params)
  compiled = fn.lower(params, state, batch).compile()
  return fn, compiled, state


def memory(compiled) -> dict:
  """memory_analysis() in MiB; ``total`` = arguments + temp + fresh outputs."""
  m = compiled.memory_analysis()
  out = {
      "argument": m.argument_size_in_bytes / MiB,
      "output": m.output_size_in_bytes / MiB,
      "alias": m.alias_size_in_bytes / MiB,
      "temp": m.temp_size_in_bytes / MiB,
  }
  out["total"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
  out["hlo_instructions"] = sum(
      1 for line in compiled.as_text().splitlines() if " = " in line)
  return out


def status_kib(field: str) -> int:
  """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``), or -1."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def trim_heap() -> None:
  """Returns the heap glibc holds free to the system (no-op elsewhere)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS; False if the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def state_group(name: str) -> str:
  """Modes of one optimizer (``hizoo``, ``hizoo_noise``, ...) share a state."""
  for base in ("hizoo_l", "hizoo", "mezo"):
    if name.startswith(base):
      return base
  return name


class Runner:
  """Calls a compiled mode on inputs shared with the other modes.

  Every mode reads ``pool["params"]`` and, when it returns parameters (a
  donated step or noise pass), replaces them; modes of one optimizer share
  ``pool[state_group(name)]``. So timing every mode holds one copy of the
  model and one state per optimizer, not one of each per mode (at 350M the
  per-mode copies did not fit in 24 GiB).
  """

  def __init__(self, compiled, pool: dict, name: str, batch):
    self.compiled, self.pool, self.batch = compiled, pool, batch
    self.group = state_group(name)

  def call(self) -> float:
    """Runs once; returns the wall time in seconds."""
    pool = self.pool
    start = time.perf_counter()
    out = self.compiled(pool["params"], pool[self.group], self.batch)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    if isinstance(out, tuple) and isinstance(out[0], dict):
      pool["params"], pool[self.group] = out[0], out[1]  # A donated step.
    elif isinstance(out, dict):
      pool["params"] = out  # A noise pass returns the params.
    return seconds


def environment() -> dict:
  return {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "jax": jax.__version__,
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "device": str(jax.devices()[0].device_kind),
  }


def save(name: str, data: dict, markdown: str, echo: bool = True) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(data, f, indent=1)
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(markdown)
  if echo:
    print(markdown)
