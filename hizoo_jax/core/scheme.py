"""Where a zeroth-order step evaluates the loss, as data.

A step of every estimator here evaluates L at points

    theta_k = theta + mu * s * sum_j points[k, j] * z_j,     k < P,

with z_j the step's noise of query j (never stored), s a per-coordinate scale
(H^{-1/2} for HiZOO, 1 otherwise) and mu the perturbation scale. Point k is
evaluated on the steps whose count is a multiple of ``every[k]`` (HiZOO's
L(theta) with ``curvature_every``); elsewhere its loss is not used.

The plain ``update`` evaluates each point from theta; the lean step
(:func:`hizoo_jax.make_train_step`) walks from one point to the next in place
(:func:`moves`) and hands the losses back to ``update`` as ``zo_losses``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Scheme(NamedTuple):
  """The evaluation points of one step (see the module docstring)."""

  points: np.ndarray  # (P, Q) float32: each point's coefficient of mu s z_j.
  every: np.ndarray  # (P,) int32: point k is evaluated when count % every[k]
  # == 0.

  @property
  def num_queries(self) -> int:
    return self.points.shape[1]


def central(num_queries: int, center_every: int = 0) -> Scheme:
  """MeZO and HiZOO: ``theta +/- mu s z_j`` for each query, after ``theta``
  itself when ``center_every > 0`` (on every ``center_every``-th step)."""
  rows = []
  for j in range(num_queries):
    unit = np.eye(num_queries, dtype=np.float32)[j]
    rows += [unit, -unit]
  every = [1] * len(rows)
  if center_every:
    rows.insert(0, np.zeros(num_queries, np.float32))
    every.insert(0, center_every)
  return Scheme(np.stack(rows), np.asarray(every, np.int32))


def one_sided(num_queries: int) -> Scheme:
  """``theta``, then ``theta + mu s z_j`` for each query (FZOO)."""
  rows = np.concatenate([np.zeros((1, num_queries), np.float32),
                         np.eye(num_queries, dtype=np.float32)])
  return Scheme(rows, np.ones(num_queries + 1, np.int32))


def moves(scheme: Scheme) -> np.ndarray:
  """(P + 1, Q): the move after each point's evaluation, in place.

  Move 0 takes theta to point 0, move k (1 <= k < P) point k - 1 to point k,
  and the last move restores theta: the differences of consecutive points.
  Applied before evaluating point k, ``moves[k]`` walks the whole scheme.
  """
  zero = np.zeros((1, scheme.num_queries), np.float32)
  return np.diff(np.concatenate([zero, scheme.points, zero]), axis=0)


def split_losses(scheme: Scheme, losses):
  """Views of the (P,) losses: (center or None, plus (q,), minus (q,)) for a
  :func:`central` scheme."""
  offset = int(np.all(scheme.points[0] == 0))
  center = losses[0] if offset else None
  return center, losses[offset::2], losses[offset + 1::2]


def sparse(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(coeffs, queries)``, each (R, T): row r of ``table`` (R, Q) as its
  non-zero terms ``sum_t coeffs[r, t] * z_{queries[r, t]}``, padded with
  zero terms; T is the most terms of a row (one or two here), so a point or
  a move draws only the z it needs. A padding term repeats its row's last
  query: the same draw, which XLA merges, not another."""
  terms = max(1, int(np.max(np.sum(table != 0, axis=1))))
  coeffs = np.zeros((table.shape[0], terms), np.float32)
  queries = np.zeros((table.shape[0], terms), np.int32)
  for r, row in enumerate(table):
    nonzero = np.flatnonzero(row)
    coeffs[r, :len(nonzero)] = row[nonzero]
    queries[r, :len(nonzero)] = nonzero
    queries[r, len(nonzero):] = nonzero[-1] if len(nonzero) else 0
  return coeffs, queries


def walk(scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
  """The lean step's phases: ``(evaluates, moves)``.

  Phase k evaluates point ``evaluates[k]`` (-1: none), then moves the
  parameters by ``moves[k]`` (a (Q,) coefficient row of mu s z_j). A scheme
  that starts at theta evaluates it on phase 0; otherwise phase 0 only moves
  out. The last move restores theta.
  """
  table = moves(scheme)
  if np.all(scheme.points[0] == 0):  # theta first: no move into it
    return np.arange(scheme.points.shape[0], dtype=np.int32), table[1:]
  evaluates = np.arange(-1, scheme.points.shape[0], dtype=np.int32)
  return evaluates, table


# Schemes of at most this many points evaluate them in straight-line code
# (a value_fn with Python side effects sees them as calls, as in eager
# code); larger ones in a loop, so the program holds one copy of the loss.
_UNROLLED = 3


def losses(scheme: Scheme, loss_at, count):
  """L at every point of the scheme from theta, shape (P,) float32.

  ``loss_at(coeffs, queries)`` evaluates one point given as its terms
  (:func:`sparse`, traced; both None for theta itself where the points are
  evaluated one by one). Points not evaluated at this ``count`` (see
  :class:`Scheme`) are NaN.
  """
  coeffs, queries = sparse(scheme.points)

  def one(k):
    row = (jnp.asarray(coeffs)[k], jnp.asarray(queries)[k])
    if isinstance(k, int) and not scheme.points[k].any():
      row = (None, None)  # theta itself: no noise to draw
    if np.all(scheme.every == 1):
      return loss_at(*row).astype(jnp.float32)
    return lax.cond(count % jnp.asarray(scheme.every)[k] == 0,
                    lambda r: loss_at(*r).astype(jnp.float32),
                    lambda r: jnp.full([], jnp.nan, jnp.float32), row)

  num_points = scheme.points.shape[0]
  if num_points <= _UNROLLED:  # one query: the loss's own calls, in order
    return jnp.stack([one(k) for k in range(num_points)])
  return lax.map(one, jnp.arange(num_points))  # one copy of the loss


def given_losses(scheme: Scheme, given) -> jax.Array:
  """Losses handed to ``update`` as ``zo_losses``, as a (P,) float32 array.

  Either in the scheme's order, or, for a :func:`central` scheme, as
  ``(center, plus (q,), minus (q,))`` (center ignored without one).
  """
  if isinstance(given, (tuple, list)) and len(given) == 3:
    center, plus, minus = given
    q = scheme.num_queries
    pairs = jnp.stack([jnp.reshape(jnp.asarray(plus, jnp.float32), (q,)),
                       jnp.reshape(jnp.asarray(minus, jnp.float32), (q,))],
                      axis=1).reshape(-1)
    if scheme.points.shape[0] == 2 * q:
      return pairs
    return jnp.concatenate([jnp.reshape(
        jnp.asarray(center, jnp.float32), (1,)), pairs])
  return jnp.reshape(jnp.asarray(given, jnp.float32), scheme.every.shape)


def value(scheme: Scheme, losses: jax.Array) -> jax.Array:
  """The step's loss, for transformations that read ``value``: L(theta)
  where the scheme evaluated it this step, else the mean over the others."""
  if not np.all(scheme.points[0] == 0):
    return jnp.mean(losses)
  others = jnp.mean(losses[1:])
  return jnp.where(jnp.isnan(losses[0]), others, losses[0])
