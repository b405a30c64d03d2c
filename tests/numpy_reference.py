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


def signed_step(hess, stats, zs, l0, lp, lm, mu, rate, stats_rate=0.1,
                clip=0.5, probe=True, floor=1e-4):
  """One step of the "signed" rule (hizoo_jax.grouped_curvature), float64.

  Args:
    hess: dict name -> list of factors (arrays of the leaf's ndim, size 1 on
      the axes a factor is shared over); H = their broadcast product.
    stats: (b, v, t): running mean of q, of (y / lam)^2, probes so far.
    zs, l0, lp, lm, mu: as in hizoo_step; rate: the largest log-step gain.
    probe: False on a step that does not measure the curvature (l0 unused).

  Returns:
    (direction, new hess, new stats).
  """
  q_count = len(zs)
  lp, lm = np.asarray(lp, np.float64), np.asarray(lm, np.float64)
  g = (lp - lm) / (2 * mu)
  if not probe:
    direction = {
        name: sum(g[j] * zs[j][name] for j in range(q_count)) / q_count
        / np.sqrt(np.prod(np.broadcast_arrays(*factors), axis=0))
        for name, factors in hess.items()}
    return direction, hess, stats
  q = ((lp - l0) + (lm - l0)) / (2 * mu**2)
  b, v, t = stats
  d = sum(zs[0][k].size for k in hess)
  lam = 2 * b / d
  norm_sq = np.array([sum(np.sum(z[k] ** 2) for k in hess) for z in zs])
  y = q - b * norm_sq / d
  usable = t >= 2 and lam > 0 and v > 0
  new_hess = {}
  for name, factors in hess.items():
    shape = zs[0][name].shape
    moved = []
    for f in factors:
      axes = tuple(a for a in range(len(shape)) if f.shape[a] == 1)
      n = np.prod(shape) / f.size
      rho = sum(np.sum(zs[j][name] ** 2 - 1, axis=axes, keepdims=True) * y[j]
                for j in range(q_count)) / q_count / (n * lam if usable else 1)
      gain = rate / len(factors) * min(1.0, n / (2 * v)) if usable else 0.0
      moved.append(f * np.exp(np.clip(gain * rho, -clip, clip)))
    new_hess[name] = moved
  if usable:
    total = sum(np.sum(np.prod(np.broadcast_arrays(*fs), axis=0) *
                       np.ones(zs[0][name].shape))
                for name, fs in new_hess.items())
    for name in new_hess:
      new_hess[name][0] = new_hess[name][0] / (total / d)
  for name, factors in new_hess.items():
    new_hess[name] = [np.maximum(f, floor ** (1 / len(factors)))
                      for f in factors]
  new_b = b + max(stats_rate, 1 / (t + 1)) * (np.mean(q) - b)
  new_v = v
  if t >= 1 and lam > 0:
    new_v = v + max(stats_rate, 1 / t) * (np.mean((y / lam) ** 2) - v)
  direction = {}
  for name, factors in new_hess.items():
    h = np.prod(np.broadcast_arrays(*factors), axis=0)
    direction[name] = sum(g[j] * zs[j][name] for j in range(q_count)) / q_count / np.sqrt(h)
  return direction, new_hess, (new_b, new_v, t + 1)
