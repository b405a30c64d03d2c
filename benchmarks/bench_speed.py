"""Step time against forward time for every optimizer, side by side.

    python benchmarks/bench_speed.py            # 25M, 100M and 350M
    python benchmarks/bench_speed.py --quick    # 25M only, fewer repeats

For each model size this compiles the forward pass, the lean step of MeZO,
HiZOO and HiZOO-L, one noise pass of each (``params + mu s z``, donated) and
backprop + Adam, then reports median wall times and two ratios:
``step / forward`` and ``step / budget`` where ``budget = n_fwd * forward +
n_noise * noise pass`` counts the passes the step needs (see
``common.PASSES``); the target is ``step / budget <= 1.1``. Results go to
``benchmarks/results/speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics

import common


MODES = ["forward", "mezo", "mezo_noise", "hizoo", "hizoo_noise", "hizoo_l",
         "hizoo_l_noise", "backprop_adam"]


def bench_size(size: str, repeats: int, extra_modes, only=tuple(MODES)) -> dict:
  """Compiles every mode, then times them round-robin (shared CPU noise hits
  all modes alike) and keeps each mode's median."""
  cfg, params, batch, loss_fn = common.build(size)
  modes = [m for m in MODES if m in only] + list(extra_modes)
  runners, rows, pool = {}, {}, {}
  for name in modes:
    _, compiled, state = common.compile_mode(name, params, batch, loss_fn)
    rows[name] = {"memory": common.memory(compiled), "all": []}
    pool.setdefault(common.state_group(name), state)
    runners[name] = common.Runner(compiled, pool, name, batch)
    print(f"{size} {name}: compiled", flush=True)
  pool["params"] = params
  for name in modes:
    runners[name].call()  # Warm-up.
  for _ in range(repeats):
    for name in modes:
      rows[name]["all"].append(runners[name].call())
  for name in modes:
    rows[name]["seconds"] = statistics.median(rows[name]["all"])
    print(f"{size} {name}: {rows[name]['seconds']:.3f} s", flush=True)
  return {"params": cfg.num_params, "tokens": cfg.batch * cfg.seq,
          "config": vars(cfg), "modes": rows}


def table(results: dict) -> str:
  lines = [
      "| size | tokens | optimizer | step (s) | forward (s) | step / forward "
      "| noise pass (s) | passes fwd + noise | step / budget |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for size, r in results["sizes"].items():
    modes = r["modes"]
    fwd = modes["forward"]["seconds"]
    for opt in ("mezo", "hizoo", "hizoo_l"):
      if opt not in modes:
        continue
      step = modes[opt]["seconds"]
      noise = modes[f"{opt}_noise"]["seconds"]
      n_fwd, n_noise = common.PASSES[opt]
      budget = n_fwd * fwd + n_noise * noise
      lines.append(
          f"| {size} | {r['tokens']} | {opt} | {step:.3f} | {fwd:.3f} | "
          f"{step / fwd:.2f} | {noise:.3f} | {n_fwd} + {n_noise} | "
          f"**{step / budget:.2f}** |")
    for extra in [m for m in modes if m not in (
        "forward", "mezo", "hizoo", "hizoo_l") and not m.endswith("_noise")]:
      step = modes[extra]["seconds"]
      lines.append(f"| {size} | {r['tokens']} | {extra} | {step:.3f} | "
                   f"{fwd:.3f} | {step / fwd:.2f} | | | |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sizes", default=None,
                      help="comma-separated, from model.SIZES")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default="speed",
                      help="results name in benchmarks/results/")
  parser.add_argument("--only", default=",".join(MODES),
                      help="subset of the standard modes")
  parser.add_argument("--extra", default="",
                      help="extra modes, e.g. mezo_store,hizoo_store")
  args = parser.parse_args()
  sizes = (args.sizes or ("25M" if args.quick else "25M,100M,350M")).split(",")
  repeats = args.repeats or (2 if args.quick else 3)
  extra = [m for m in args.extra.split(",") if m]
  results = {"environment": common.environment(), "repeats": repeats,
             "sizes": {}}
  for size in sizes:  # Saved after each size, so a later failure keeps it.
    results["sizes"][size] = bench_size(size, repeats, extra,
                                        args.only.split(","))
    common.save(args.out, results, table(results))


if __name__ == "__main__":
  main()
