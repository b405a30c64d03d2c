"""Tables (Markdown) and the fine-tuning plot from the curvature studies' JSON.

    python benchmarks/curvature/report.py     # writes results/summary.md, finetune_sst2.png
"""

from __future__ import annotations

import json
import os

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _load(name):
  path = os.path.join(RESULTS, name)
  return json.load(open(path)) if os.path.exists(path) else None


def _num(x, fmt="{:.3g}"):
  if x is None:
    return "-"
  if isinstance(x, float) and not np.isfinite(x):
    return "not reached"
  return fmt.format(x)


def quadratic_table(results) -> str:
  lines = ["| problem | method | final f/f0 | passes to 1e-2 f0 | vs oracle | "
           "passes vs MeZO | corr(log H, log A) | best c |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for key, entry in results.items():
    oracle = entry.get("oracle", {}).get("passes_to_target", np.nan)
    # MeZO's passes to the target, or the largest budget it was given.
    mezo_runs = [r for n, r in entry.items() if n.startswith("mezo")]
    mezo = min((r["passes_to_target"] for r in mezo_runs), default=np.nan)
    mezo_budget = max((r["budget_passes"] for r in mezo_runs), default=np.nan)
    for name, r in entry.items():
      p = r["passes_to_target"]
      if not np.isfinite(p) or name.startswith("mezo"):
        vs_mezo = "-"
      elif np.isfinite(mezo):
        vs_mezo = f"{mezo / p:.1f}x fewer"
      else:
        vs_mezo = f"> {mezo_budget / p:.1f}x fewer"
      lines.append(
          f"| {key} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''}) | "
          f"{name} | {_num(r['final'])} | {_num(p, '{:.0f}')} | "
          f"{_num(p / oracle if np.isfinite(p) else None, '{:.2f}x')} | "
          f"{vs_mezo} | {_num(r['corr_log_h'], '{:.3f}')} | {r['best_c']} |")
  return "\n".join(lines)


def hessian_table(r) -> str:
  keys = ["tensors", "resolved_tensors", "positive_resolved",
          "split_half_spearman_diag", "split_half_spearman_proxy",
          "spearman_learned_vs_diag_resolved", "spearman_learned_vs_diag_all",
          "spearman_learned_vs_proxy", "learned_range", "baseline_b",
          "spread_v", "largest_gain", "loss_first_last"]
  lines = ["| quantity | value |", "| --- | --- |"]
  for k in keys:
    v = r.get(k)
    if isinstance(v, float):
      v = f"{v:.3f}"
    elif isinstance(v, list):
      v = ", ".join(f"{x:.3g}" for x in v)
    lines.append(f"| {k} | {v} |")
  return "\n".join(lines)


def finetune_summary(record):
  """Per method: mean/std final accuracy, curves, passes to MeZO's final."""
  runs = record.get("runs", {})
  by_method = {}
  for key, run in runs.items():
    method, seed = key.split("/")
    if run.get("evals"):
      by_method.setdefault(method, {})[seed] = run
  rows = []
  mezo_final = {s: r["evals"][-1][1] for s, r in by_method.get("mezo", {}).items()
                if r.get("done")}
  for method, seeds in by_method.items():
    done = {s: r for s, r in seeds.items() if r.get("done")}
    finals = [r["evals"][-1][1] for r in done.values()]
    reach = []
    for s, r in done.items():
      if s in mezo_final:
        hit = [p for p, acc in r["evals"] if acc >= mezo_final[s]]
        reach.append(hit[0] if hit else np.inf)
    rows.append((method, len(done), len(seeds) - len(done),
                 np.mean(finals) if finals else None,
                 np.std(finals) if len(finals) > 1 else None,
                 np.mean([r["evals"][0][1] for r in seeds.values()]),
                 reach))
  return by_method, rows


def finetune_table(rows) -> str:
  lines = ["| method | seeds done | zero-shot | final test acc. (mean) | std |"
           " passes to MeZO's final acc. (per seed) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for method, done, running, mean, std, zero, reach in rows:
    lines.append(
        f"| {method} | {done}{f' (+{running} running)' if running else ''} | "
        f"{zero:.3f} | {_num(mean, '{:.3f}')} | {_num(std, '{:.3f}')} | "
        f"{', '.join(_num(float(x), '{:.0f}') for x in reach) or '-'} |")
  return "\n".join(lines)


def finetune_plot(by_method, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for method, seeds in by_method.items():
    for i, (seed, run) in enumerate(sorted(seeds.items())):
      passes, acc = zip(*run["evals"])
      ax.plot(passes, acc, marker=".", label=method if i == 0 else None,
              color=f"C{list(by_method).index(method)}", alpha=0.8)
  zero_shot = next(iter(next(iter(by_method.values())).values()))["evals"][0][1]
  ax.axhline(zero_shot, color="grey", ls="--", lw=0.8, label="zero-shot")
  ax.set_xlabel("forward passes")
  ax.set_ylabel("SST-2 test accuracy (872)")
  ax.legend(fontsize=8)
  ax.set_title("MiniLM, k = 16, full fine-tuning (one line per data seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parts = []
  quad = _load("quadratic.json")
  if quad:
    parts += ["## Known curvature (quadratic.json)", quadratic_table(quad)]
  hess = _load("minilm_hessian.json")
  if hess:
    parts += ["## MiniLM: learned H against autodiff (minilm_hessian.json)",
              hessian_table(hess)]
  ft = _load("finetune_sst2.json")
  if ft:
    by_method, rows = finetune_summary(ft)
    parts += ["## Fine-tuning, k-shot SST-2 (finetune_sst2.json)",
              # methods/seeds: of the last invocation only (runs resume).
              "config: `" + json.dumps({
                  k: v for k, v in ft.get("config", {}).items()
                  if k not in ("methods", "seeds")}) + "`",
              finetune_table(rows)]
    finetune_plot(by_method, os.path.join(RESULTS, "finetune_sst2.png"))
  text = "\n\n".join(parts) + "\n"
  open(os.path.join(RESULTS, "summary.md"), "w").write(text)
  print(text)


if __name__ == "__main__":
  main()
