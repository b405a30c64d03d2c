"""The table and the plot of ``fzoo_sst2.py``'s record (see its docstring).

Rows use the runs at each method's dev-chosen learning rate only.
"""

from __future__ import annotations

import numpy as np

from fzoo_plan import PASSES, chosen_runs


def summarise(record, args):
  """Rows of the table: final test accuracy and passes to MeZO's final."""
  rows = []
  for peft in ("full", "lora"):
    mezo = chosen_runs(record, args, peft, "mezo")
    for method in PASSES:
      runs = chosen_runs(record, args, peft, method)
      if not runs:
        continue
      done = {s: e for s, e in runs.items() if e.get("done")}
      finals = [e["evals"][-1]["test_acc"] for e in done.values()]
      reach = []
      for seed, e in done.items():
        if seed in mezo and mezo[seed].get("done"):
          target = mezo[seed]["evals"][-1]["test_acc"]
          hit = [v["passes"] for v in e["evals"] if v["test_acc"] >= target]
          reach.append(hit[0] / args.budget if hit else None)
      trace = [np.asarray(e["trace"]) for e in done.values()]
      rows.append(dict(
          peft=peft, method=method, lr=next(iter(runs.values()))["lr"],
          seeds_done=sorted(done), in_progress=sorted(set(runs) - set(done)),
          zero_shot=next(iter(runs.values()))["evals"][0]["test_acc"],
          final_test_mean=float(np.mean(finals)) if finals else None,
          final_test_std=float(np.std(finals)) if finals else None,
          final_test=finals,
          best_test_mean=float(np.mean([max(v["test_acc"] for v in e["evals"])
                                        for e in done.values()]))
          if done else None,
          final_train_loss=[float(t[-1, 1]) for t in trace],
          fraction_of_mezo_passes_to_mezo_final=reach))
  return rows


def table(rows, var) -> str:
  lines = ["| setting | method | lr (dev) | seeds | zero-shot | final test acc "
           "(mean +- std) | per seed | fraction of MeZO's passes to MeZO's "
           "final acc |", "|" + " --- |" * 8]
  for r in rows:
    acc = ("-" if r["final_test_mean"] is None else
           f"{r['final_test_mean']:.3f} +- {r['final_test_std']:.3f}")
    reach = ", ".join("not reached" if x is None else f"{x:.2f}"
                      for x in r["fraction_of_mezo_passes_to_mezo_final"])
    lines.append(
        f"| {r['peft']} | {r['method']} | {r['lr']:.3g} | "
        f"{','.join(map(str, r['seeds_done'])) or '-'}"
        f"{' (+' + ','.join(map(str, r['in_progress'])) + ' running)' if r['in_progress'] else ''}"
        f" | {r['zero_shot']:.3f} | {acc} | "
        f"{', '.join(f'{x:.3f}' for x in r['final_test'])} | {reach or '-'} |")
  if var:
    lines += ["", f"Estimate quality at the pretrained parameters (|g| = "
              f"{var.get('grad_norm', float('nan')):.3g}):", "",
              "| method | draws | cos(d, g) mean +- std | d.g/|g| mean +- std |"
              " efficiency per step | per pass | vs MeZO per pass |",
              "|" + " --- |" * 7]
    base = var.get("mezo", {}).get("efficiency_per_pass")
    for m, v in var.items():
      if not isinstance(v, dict):
        continue
      ratio = f"{v['efficiency_per_pass'] / base:.2f}x" if base else "-"
      lines.append(
          f"| {m} | {v['draws']} | {v['cos_mean']:.2e} +- {v['cos_std']:.1e} "
          f"| {v['proj_mean']:.3g} +- {v['proj_std']:.2g} | "
          f"{v['efficiency']:.2e} | {v['efficiency_per_pass']:.2e} | "
          f"{ratio} |")
  return "\n".join(lines)


def plot(record, args, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for i, method in enumerate(PASSES):
    for peft, ls in (("full", "-"), ("lora", "--")):
      runs = [e for e in chosen_runs(record, args, peft, method).values()]
      if not runs:
        continue
      label = f"{method} ({peft}, {len(runs)} seeds)"
      n = min(len(e["evals"]) for e in runs)
      x = [e["passes"] for e in runs[0]["evals"][:n]]
      for ax, key in ((axes[0], "test_acc"), (axes[1], "dev_acc")):
        y = np.mean([[v[key] for v in e["evals"][:n]] for e in runs], 0)
        ax.plot(x, y, ls, color=f"C{i}", label=label, marker=".")
      k = min(len(e["trace"]) for e in runs)
      t = np.mean([np.asarray(e["trace"])[:k, :2] for e in runs], 0)
      axes[2].semilogy(t[:, 0], t[:, 1], ls, color=f"C{i}", label=label)
  for ax, title in zip(axes, ("test accuracy (mean over seeds)",
                              "dev accuracy", "train loss L(theta)")):
    ax.set_xlabel("forward passes")
    ax.set_title(title, fontsize=10)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
