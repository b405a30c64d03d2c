"""The table and the plot of ``fzoo_sst2.py``'s record (see its docstring).

Rows use the runs at each method's dev-chosen learning rate only.
"""

from __future__ import annotations

import numpy as np

from fzoo_plan import PASSES, SELECT_SEED, chosen_runs, dev_score


def _first_pass(points, ok):
  """The first pass count whose value satisfies ``ok``, else None."""
  hits = [x for x, v in points if ok(v)]
  return hits[0] if hits else None


def summarise(record, args):
  """Rows of the table: the runs at each method's dev-chosen rate."""
  rows = []
  for peft in ("full", "lora"):
    mezo = {s: e for s, e in chosen_runs(record, args, peft, "mezo").items()
            if e.get("done")}
    for method in PASSES:
      runs = chosen_runs(record, args, peft, method)
      if not runs:
        continue
      done = {s: e for s, e in runs.items() if e.get("done")}
      row = dict(peft=peft, method=method,
                 lr=next(iter(runs.values()))["lr"], seeds_done=sorted(done),
                 in_progress={s: e["evals"][-1]["passes"] for s, e in
                              runs.items() if s not in done},
                 zero_shot=next(iter(runs.values()))["evals"][0]["test_acc"],
                 final_test=[], best_test=[], final_train_loss=[],
                 to_mezo_test=[], to_mezo_loss=[], step_spread=[])
      for seed, e in done.items():
        evals = [(v["passes"], v["test_acc"]) for v in e["evals"]]
        trace = np.asarray(e["trace"])
        row["final_test"].append(evals[-1][1])
        row["best_test"].append(max(v for _, v in evals))
        row["final_train_loss"].append(float(trace[-1, 1]))
        # FZOO: sigma of the probe losses; MeZO/HiZOO: |(l+ - l-) / 2 mu|.
        row["step_spread"].append(float(np.median(np.abs(trace[:, 2]))))
        if seed in mezo:
          target = mezo[seed]["evals"][-1]["test_acc"]
          hit = _first_pass(evals, lambda v, t=target: v >= t)
          row["to_mezo_test"].append(None if hit is None
                                     else hit / args.budget)
          target = np.asarray(mezo[seed]["trace"])[-1, 1]
          hit = _first_pass(trace[:, :2], lambda v, t=target: v <= t)
          row["to_mezo_loss"].append(None if hit is None
                                     else float(hit) / args.budget)
      finals = row["final_test"]
      row["final_test_mean"] = float(np.mean(finals)) if finals else None
      row["final_test_std"] = float(np.std(finals)) if finals else None
      rows.append(row)
  return rows


def _fractions(values) -> str:
  return ", ".join("not reached" if x is None else f"{x:.2f}"
                   for x in values) or "-"


def table(rows, var, record=None, args=None) -> str:
  """Markdown: the chosen runs, the estimate quality and the lr grids."""
  lines = ["| setting | method | lr (dev) | seeds done | zero-shot | final "
           "test acc (mean +- std) | per seed | best test acc | final train "
           "loss | fraction of MeZO's passes to MeZO's final test acc | ... "
           "to MeZO's final train loss |", "|" + " --- |" * 11]
  for r in rows:
    acc = ("-" if r["final_test_mean"] is None else
           f"{r['final_test_mean']:.3f} +- {r['final_test_std']:.3f}")
    running = "".join(f" (+{s} at {p} passes)"
                      for s, p in r["in_progress"].items())
    lines.append(
        f"| {r['peft']} | {r['method']} | {r['lr']:.3g} | "
        f"{','.join(map(str, r['seeds_done'])) or '-'}{running} | "
        f"{r['zero_shot']:.3f} | {acc} | "
        f"{', '.join(f'{x:.3f}' for x in r['final_test'])} | "
        f"{', '.join(f'{x:.3f}' for x in r['best_test'])} | "
        f"{', '.join(f'{x:.3f}' for x in r['final_train_loss'])} | "
        f"{_fractions(r['to_mezo_test'])} | {_fractions(r['to_mezo_loss'])} |")
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
  if record is not None:
    lines += ["", "Learning-rate grids (seed 13; chosen by dev only):", "",
              "| run | dev score (late mean acc) | final dev acc | final test "
              "acc | final train loss | passes done |", "|" + " --- |" * 6]
    for name, e in sorted(record["runs"].items()):
      if e.get("seed") != SELECT_SEED or not e.get("evals"):
        continue
      last = e["evals"][-1]
      score = dev_score(e, args.budget)[0] if e.get("done") else float("nan")
      lines.append(
          f"| {name} | {score:.4f} | {last['dev_acc']:.4f} | "
          f"{last['test_acc']:.4f} | {e['trace'][-1][1]:.4f} | "
          f"{last['passes']}{'' if e.get('done') else ' (running)'} |")
  return "\n".join(lines)


def plot(record, args, path):
  """Test/dev accuracy and train loss against forward passes.

  Thin lines: every seed-13 run of the learning-rate grids (full
  fine-tuning); thick lines with markers: the mean over the seeds done at
  each method's dev-chosen rate (dashed: LoRA).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  keys = (("test_acc", "test accuracy"), ("dev_acc", "dev accuracy"))
  colors = {m: f"C{i}" for i, m in enumerate(PASSES)}
  for e in record["runs"].values():
    if e.get("seed") != SELECT_SEED or e.get("peft") != "full" or \
        not e.get("evals"):
      continue
    x = [v["passes"] for v in e["evals"]]
    for ax, (key, _) in zip(axes, keys):
      ax.plot(x, [v[key] for v in e["evals"]], color=colors[e["method"]],
              lw=0.6, alpha=0.5)
    t = np.asarray(e["trace"])
    axes[2].semilogy(t[:, 0], t[:, 1], color=colors[e["method"]], lw=0.6,
                     alpha=0.5)
  for method in PASSES:
    for peft, ls in (("full", "-"), ("lora", "--")):
      runs = [e for e in chosen_runs(record, args, peft, method).values()
              if e.get("done")]
      if not runs:
        continue
      label = f"{method} {peft} lr={runs[0]['lr']:.3g} ({len(runs)} seeds)"
      x = [v["passes"] for v in runs[0]["evals"]]
      for ax, (key, _) in zip(axes, keys):
        y = np.mean([[v[key] for v in e["evals"]] for e in runs], 0)
        ax.plot(x, y, ls, color=colors[method], lw=2, marker=".",
                label=label)
      t = np.mean([np.asarray(e["trace"])[:, :2] for e in runs], 0)
      axes[2].semilogy(t[:, 0], t[:, 1], ls, color=colors[method], lw=2,
                       label=label)
  titles = [k[1] for k in keys] + ["train loss L(theta) (32 examples)"]
  for ax, title in zip(axes, titles):
    ax.set_xlabel("forward passes")
    ax.set_title(title + " (thin: seed-13 lr grid)", fontsize=9)
  for method, c in colors.items():
    axes[1].plot([], [], color=c, label=method)
  axes[1].legend(fontsize=7)
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
