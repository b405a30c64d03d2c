"""curves.png for examples/finetune.py: training objective and eval accuracy.

A zeroth-order step's loss is the loss of one small batch at a perturbed
point, so per step it is mostly noise; the plot draws it faintly and an
exponential moving average over it. The accuracy axis starts at 0.5 (chance
for two classes) or lower if a run goes lower, with the zero-shot accuracy as
a dashed line, so a gain of a few points is visible. Other runs (e.g. MeZO
beside HiZOO) are drawn in the same axes.
"""

from __future__ import annotations

import numpy as np


def ema(values, span: int) -> np.ndarray:
  """Bias-corrected exponential moving average with the given span.

  Args:
    values: the sequence to smooth.
    span: about how many recent values it averages (alpha = 2 / (span + 1)).

  Returns:
    An array as long as ``values``.
  """
  alpha = 2.0 / (span + 1)
  out = np.empty(len(values))
  mean, weight = 0.0, 0.0
  for i, v in enumerate(values):
    mean = (1 - alpha) * mean + alpha * float(v)
    weight = (1 - alpha) * weight + alpha
    out[i] = mean / weight
  return out


def smoothing_span(n: int) -> int:
  """A span of a fifth of the run, at least 5 steps."""
  return max(5, n // 5)


def figure(runs: list[dict], title: str):
  """The figure for ``runs``, the first being this run.

  Args:
    runs: dicts with ``label``, ``train_steps``, ``train_loss``,
      ``eval_steps`` and ``eval_accuracy``.
    title: the figure title.

  Returns:
    A matplotlib Figure with two axes: objective and eval accuracy.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  raw = []
  for i, run in enumerate(runs):
    color = f"C{i}"
    steps, losses = run.get("train_steps") or [], run.get("train_loss") or []
    if losses:
      span = smoothing_span(len(losses))
      raw.extend(losses)
      ax_loss.plot(steps, losses, color=color, lw=0.5, alpha=0.25)
      ax_loss.plot(steps, ema(losses, span), color=color, lw=2,
                   label=f"{run['label']} (EMA over {span} steps)")
    ax_acc.plot(run["eval_steps"], run["eval_accuracy"], "o-", color=color,
                label=run["label"])
  if len(raw) >= 10:  # a few outlying batches should not set the scale
    low, high = np.percentile(raw, [2, 98])
    ax_loss.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
  zero_shot = runs[0]["eval_accuracy"][0]
  ax_acc.axhline(zero_shot, color="gray", ls="--", lw=1,
                 label=f"zero-shot {zero_shot:.3f}")
  lowest = min(min(r["eval_accuracy"]) for r in runs)
  highest = max(max(r["eval_accuracy"]) for r in runs)
  ax_acc.set_ylim(min(0.5, lowest - 0.02), max(highest + 0.02, 0.55))
  ax_loss.set(xlabel="step", ylabel="training objective (faint: per step)")
  ax_acc.set(xlabel="step", ylabel="eval accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a 0-step run has no loss curve
      ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def save(path: str, runs: list[dict], title: str) -> None:
  """Writes :func:`figure` as a PNG."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig = figure(runs, title)
  fig.savefig(path, dpi=100)
  plt.close(fig)
