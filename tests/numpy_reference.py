"""Plain NumPy float64 statements of the estimators' formulas, for the tests.

Curvature entries are arrays (full diagonal) or tuples ``(row, col, row_axis,
col_axis)`` (HiZOO-L).
"""

import numpy as np


def expand(h):
  if not isinstance(h, tuple):
    return h
  row, col, row_axis, col_axis = h
  scale = row.mean(axis=row_axis, keepdims=True)
  return np.expand_dims(row / scale, col_axis) * np.expand_dims(col, row_axis)


def ema(h, estimate, rate, reference):
  def step(old, target):
    if reference:
      return (1 - rate) * old + rate * target
    return old + rate * (target - old)

  if not isinstance(h, tuple):
    return step(h, estimate)
  row, col, row_axis, col_axis = h
  return (step(row, estimate.mean(axis=col_axis)),
          step(col, estimate.mean(axis=row_axis)), row_axis, col_axis)


def hizoo_step(hess, zs, l0, lp, lm, mu, alpha, estimator="paper"):
  """One HiZOO step: (direction g z H_new^{-1/2}, new curvature), per leaf.

  Args:
    hess: dict name -> curvature entry (float64).
    zs: list over queries of dict name -> z (float64).
    l0: loss at theta; lp, lm: sequences of losses at theta +/- mu s z_j.
    mu, alpha: perturbation scale and EMA rate.
    estimator: "paper" or "reference".
  """
  q = len(zs)
  lp, lm = np.asarray(lp, np.float64), np.asarray(lm, np.float64)
  g = (lp - lm) / (2 * mu)
  second = (lp + lm - 2 * l0) / (2 * mu**2)
  direction, new_hess = {}, {}
  for name, h in hess.items():
    full = expand(h)
    if estimator == "paper":
      est = full * np.abs(sum(second[j] * (zs[j][name] ** 2 - 1) for j in range(q))) / q
    else:
      est = full * sum(np.abs(second[j]) * zs[j][name] ** 2 for j in range(q)) / q
    new_hess[name] = ema(h, est, alpha, estimator == "reference")
    mean_gz = sum(g[j] * zs[j][name] for j in range(q)) / q
    direction[name] = mean_gz / np.sqrt(expand(new_hess[name]))
  return direction, new_hess


def mezo_step(zs, lp, lm, mu):
  q = len(zs)
  g = (np.asarray(lp, np.float64) - np.asarray(lm, np.float64)) / (2 * mu)
  return {name: sum(g[j] * zs[j][name] for j in range(q)) / q for name in zs[0]}
