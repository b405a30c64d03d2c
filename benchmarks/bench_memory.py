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
* The peak resident set of a fresh process running the mode: the process
  builds the model, compiles, resets its peak counter (``/proc/self/
  clear_refs``), runs two steps and reads ``VmHWM``; so compilation is left
  out and the number is what executing the step needs.

Results go to ``benchmarks/results/memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

CORE = ["forward", "mezo", "hizoo", "hizoo_l", "backprop_adam"]
MORE = ["mezo_naive", "hizoo_naive", "hizoo_l_naive", "mezo_store",
        "hizoo_store"]


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def child(size: str, mode: str, steps: int) -> None:
  """Runs in a fresh process; prints one JSON line."""
  import jax
  cfg, params, batch, loss_fn = common.build(size)
  fn, compiled, state = common.compile_mode(mode, params, batch, loss_fn)
  jax.block_until_ready((params, state))
  before = _status_kib("VmRSS")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # Resets VmHWM to the current RSS.
    reset = True
  except OSError:
    reset = False
  trace = []
  for i in range(steps):
    out = compiled(params, state, batch)
    jax.block_until_ready(out)
    if isinstance(out, tuple) and isinstance(out[0], dict):
      params, state = out[0], out[1]
    if i + 1 in (1, 10, 50, 100, steps):
      trace.append((i + 1, _status_kib("VmRSS") / 1024))
  print(json.dumps({
      "rss_before_mib": before / 1024,
      "peak_mib": _status_kib("VmHWM") / 1024,
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
      "| total / reference | peak RSS (MiB) | RSS / reference "
      "| RSS growth in run (MiB) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for size, r in results["sizes"].items():
    modes = r["modes"]
    fwd = modes["forward"]
    h_copy = r["params_mib"]
    for mode, row in modes.items():
      a = row["analysis"]
      ref_total = fwd["analysis"]["total"]
      ref_rss = fwd.get("rss", {}).get("peak_mib")
      ref_name = "fwd"
      if mode.startswith("hizoo") and not mode.startswith("hizoo_l"):
        ref_total += h_copy  # A forward pass plus one float32 copy (H).
        ref_rss = ref_rss + h_copy if ref_rss else None
        ref_name = "fwd + H"
      rss = row.get("rss", {}).get("peak_mib")
      before = row.get("rss", {}).get("rss_before_mib", 0.0)
      lines.append(
          f"| {size} | {mode} | {a['argument']:.0f} | {a['temp']:.1f} | "
          f"{a['output'] - a['alias']:.1f} | {a['total']:.0f} | "
          f"{a['total'] / ref_total:.3f} ({ref_name}) | "
          f"{'' if rss is None else f'{rss:.0f}'} | "
          f"{'' if rss is None or not ref_rss else f'{rss / ref_rss:.3f}'} | "
          f"{'' if rss is None else f'{rss - before:.0f}'} |")
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
  for size in sizes:
    results["sizes"][size] = bench_size(size, modes, not args.no_rss)
  if args.flat:
    results["flat"] = {
        f"{sizes[0]}/{mode}": run_child(sizes[0], mode, args.flat)
        for mode in ("mezo", "hizoo", "hizoo_l")}
  common.save(args.out, results, table(results))


if __name__ == "__main__":
  main()
