"""Memory of one step against a forward pass, side by side.

    python benchmarks/bench_memory.py                 # 100M, analysis + RSS
    python benchmarks/bench_memory.py --quick         # 25M, fewer modes
    python benchmarks/bench_memory.py --sizes 25M,100M,350M --no-rss
    python benchmarks/bench_memory.py --flat 100      # RSS over 100 steps

Two measurements per mode:

* ``memory_analysis()`` of the compiled step: arguments + temporaries +
  outputs not aliased to donated arguments ("total"), compared with the
  forward pass's total (plus one float32 copy of the parameters for HiZOO,
  whose H is an argument).
* The peak resident set of a fresh process running the mode. The parent
  compiles every mode into a persistent compilation cache, so the process
  loads the executable instead of compiling it (as a production run with the
  cache does; compiling leaves freed heap behind that glibc keeps). It builds
  the model, loads the step, returns freed heap to the system
  (``malloc_trim``), resets its peak counter (``/proc/self/clear_refs``),
  runs two steps and reads ``VmHWM``. *Program* is what loading the
  executable added to the resident set: XLA:CPU keeps the optimized HLO
  module of a loaded executable in host memory, a few KiB per instruction.
  *Growth in run* is the peak minus the resident set just before the first
  step: what executing the step added.

Results go to ``benchmarks/results/memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

CORE = ["forward", "mezo", "hizoo", "hizoo_l", "backprop_adam"]
CACHE_ENV = "HIZOO_BENCH_CACHE"
MORE = ["mezo_naive", "hizoo_naive", "hizoo_l_naive", "mezo_store",
        "hizoo_store"]


def child(size: str, mode: str, steps: int) -> None:
  """Runs in a fresh process; prints one JSON line."""
  import jax
  common.use_compilation_cache(os.environ.get(CACHE_ENV))
  cfg, params, batch, loss_fn = common.build(size)
  fn, make_state = common.mode_fn(mode, loss_fn)
  state = make_state(params)
  jax.block_until_ready((params, state))
  common.trim_heap()
  unloaded = common.status_kib("VmRSS")
  start = time.perf_counter()
  compiled = fn.lower(params, state, batch).compile()
  load_seconds = time.perf_counter() - start
  common.trim_heap()
  before = common.status_kib("VmRSS")
  reset = common.reset_peak()
  trace = []
  for i in range(steps):
    out = compiled(params, state, batch)
    jax.block_until_ready(out)
    if isinstance(out, tuple) and isinstance(out[0], dict):
      params, state = out[0], out[1]
    if i + 1 in (1, 10, 50, 100, steps):
      trace.append((i + 1, common.status_kib("VmRSS") / 1024))
  print(json.dumps({
      "rss_before_mib": before / 1024,
      "program_mib": (before - unloaded) / 1024,
      "load_seconds": load_seconds,
      "peak_mib": common.status_kib("VmHWM") / 1024,
      "peak_reset": reset, "trace": trace,
      "params_mib": cfg.num_params * 4 / common.MiB}))


def run_child(size: str, mode: str, steps: int = 2) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", mode,
         "--sizes", size, "--steps", str(steps)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(size: str, modes, rss: bool) -> dict:
  cfg, params, batch, loss_fn = common.build(size)
  rows = {}
  for mode in modes:
    _, compiled, _ = common.compile_mode(mode, params, batch, loss_fn)
    rows[mode] = {"analysis": common.memory(compiled)}
    del compiled
    if rss:
      rows[mode]["rss"] = run_child(size, mode)
    print(size, mode, rows[mode], flush=True)
  return {"params": cfg.num_params, "params_mib": cfg.num_params * 4 / common.MiB,
          "modes": rows}


def table(results: dict) -> str:
  lines = [
      "| size | mode | args (MiB) | temp (MiB) | new outputs (MiB) | total (MiB) "
      "| total / reference | HLO instructions | peak RSS (MiB) "
      "| RSS / reference | program (MiB) | RSS growth in run (MiB) "
      "| growth / forward's |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
      "| --- | --- |"]
  for size, r in results["sizes"].items():
    modes = r["modes"]
    fwd = modes["forward"]
    for mode, row in modes.items():
      a, rss = row["analysis"], row.get("rss")
      ref_total, ref_rss = fwd["analysis"]["total"], fwd.get("rss")
      ref_name, extra = "fwd", 0.0
      if mode.startswith("hizoo") and not mode.startswith("hizoo_l"):
        extra = r["params_mib"]  # A forward pass plus one float32 copy (H).
        ref_name = "fwd + H"
      cells = [size, mode, f"{a['argument']:.0f}", f"{a['temp']:.1f}",
               f"{a['output'] - a['alias']:.1f}", f"{a['total']:.0f}",
               f"{a['total'] / (ref_total + extra):.3f} ({ref_name})",
               str(a["hlo_instructions"])]
      if rss and ref_rss:
        growth = rss["peak_mib"] - rss["rss_before_mib"]
        ref_growth = ref_rss["peak_mib"] - ref_rss["rss_before_mib"]
        cells += [f"{rss['peak_mib']:.0f}",
                  f"{rss['peak_mib'] / (ref_rss['peak_mib'] + extra):.3f}",
                  f"{rss['program_mib']:.0f}", f"{growth:.0f}",
                  f"{growth / ref_growth:.3f}"]
      else:
        cells += [""] * 5
      lines.append("| " + " | ".join(cells) + " |")
  flat = results.get("flat")
  if flat:
    lines.append("")
    lines.append("| size | mode | RSS after steps (MiB) |")
    lines.append("| --- | --- | --- |")
    for key, row in flat.items():
      trace = ", ".join(f"{s}: {m:.0f}" for s, m in row["trace"])
      lines.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | {trace} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sizes", default=None)
  parser.add_argument("--modes", default=None, help="comma-separated")
  parser.add_argument("--no-rss", action="store_true")
  parser.add_argument("--flat", type=int, default=0,
                      help="also run mezo, hizoo and hizoo_l this many steps "
                      "(first size) and record RSS along the way")
  parser.add_argument("--out", default="memory",
                      help="results name in benchmarks/results/")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.sizes, args.child, args.steps)
    return
  sizes = (args.sizes or ("25M" if args.quick else "100M")).split(",")
  modes = args.modes.split(",") if args.modes else (
      CORE if args.quick else CORE + MORE)
  results = {"environment": common.environment(), "sizes": {}}
  with tempfile.TemporaryDirectory(prefix="hizoo_bench_cache_") as cache:
    os.environ[CACHE_ENV] = cache  # The children load what the parent built.
    common.use_compilation_cache(cache)
    for size in sizes:
      results["sizes"][size] = bench_size(size, modes, not args.no_rss)
    if args.flat:
      results["flat"] = {
          f"{sizes[0]}/{mode}": run_child(sizes[0], mode, args.flat)
          for mode in ("mezo", "hizoo", "hizoo_l")}
  common.save(args.out, results, table(results))


if __name__ == "__main__":
  main()
