"""FZOO (arXiv 2506.09034): a normalized step from N one-sided probes.

One step evaluates the loss at theta and at N one-sided probes:

.. math::
  l_0 = L(\\theta),\\quad l_i = L(\\theta + \\epsilon u_i),\\quad
  \\sigma = \\mathrm{std}(l_1, \\dots, l_N),\\quad
  c_i = \\frac{l_i - l_0}{N \\sigma},\\quad
  d = \\sum_i c_i u_i,

with u_i Rademacher (+/-1 per coordinate) and sigma the population standard
deviation. Since ``l_i - l_0 ~ eps g.u_i`` and ``sigma ~ eps |g|``, d
estimates ``g / |g|``: normalized SGD whose step the learning rate alone
sets. N + 1 forward passes a step. ``normalize=False`` is the ablation
one-sided ZO-SGD with N queries, ``c_i = (l_i - l_0) / (N eps)``.

The u_i are never stored: each is a function of the state's key, the step,
the probe index and the leaf's path (:mod:`hizoo_jax.noise`), regenerated
wherever it is read (:mod:`hizoo_jax.core.leafwise`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hizoo_jax import _checks
from hizoo_jax import noise as _noise
from hizoo_jax.core import leafwise
from hizoo_jax.core import scheme as schemes
from hizoo_jax.core.estimators import at_step, probe_or_losses

NOISES = ("rademacher", "gaussian")


class FZOOState(NamedTuple):
  """State of :func:`scale_by_fzoo`."""

  zeroth_order = True  # hizoo_jax.zo_state.find_state looks for this.

  count: jax.Array  # (), int32: steps taken; selects the next step's u_i.
  rng_key: jax.Array  # (k,), uint32: raw words of the run's PRNG key.
  loss: jax.Array  # (), float32: last step's l_0 = L(theta).
  probe_losses: jax.Array  # (N,), float32: last step's l_i.
  sigma: jax.Array  # (), float32: last step's population std of the l_i.
  skipped: jax.Array  # (), int32: steps skipped (non-finite, sigma = 0).


def rademacher(seed: jax.Array, shape, sharding=None) -> jax.Array:
  """+/-1 (float32) per element from a (2,) seed: the top hash bit."""
  bits = _noise.random_bits(seed, shape, sharding)
  return 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)


def _sample(noise: str):
  return rademacher if noise == "rademacher" else _noise.gaussian


def scale_by_fzoo(eps=1e-3, *, num_probes: int = 8, noise: str = "rademacher",
                  normalize: bool = True, mask=None, key=0
                  ) -> optax.GradientTransformationExtraArgs:
  r"""FZOO's direction ``d = sum_i c_i u_i`` (see the module docstring).

  A non-finite loss, an invalid ``eps`` from a schedule or, with
  ``normalize``, ``sigma = 0`` (all probe losses equal) skips the step: zero
  updates, counted in ``skipped``.

  Args:
    eps: probe scale epsilon (float or schedule of the step count), > 0.
    num_probes: N, probes per step (N + 1 loss evaluations); >= 2 with
      ``normalize``.
    noise: ``"rademacher"`` (the paper's) or ``"gaussian"`` (the library's
      standard noise, :mod:`hizoo_jax.noise`).
    normalize: divide by ``N sigma`` (FZOO) or by ``N eps`` (ZO-SGD).
    mask: tree of bools like params (or a prefix, or a callable); False
      leaves are never perturbed nor updated.
    key: int seed, typed PRNG key or raw key data for the noise.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
    params, *, value_fn)`` ignores ``updates``. Runs in
    :func:`hizoo_jax.make_train_step` (N + 1 passes, in place).

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(hz.scale_by_fzoo(1e-3, num_probes=4),
    ...                  optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(
    ...     None, state, params, value_fn=lambda p: jnp.sum(p["w"] ** 2))
  """
  if not isinstance(normalize, bool):
    raise TypeError(
        f"normalize must be a Python bool, got {normalize!r}. With "
        "optax.inject_hyperparams, pass static_args=('normalize', "
        "'num_probes').")
  n = _checks.static_int(num_probes, "num_probes", 2 if normalize else 1)
  if noise not in NOISES:
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}.")
  _checks.check_hyperparams(eps, name="eps")
  _checks.check_key(key)
  scheme = schemes.one_sided(n)

  def init_fn(params):
    leafwise.checked_leaves(params, mask)  # raises on bad params
    zero = lambda: jnp.zeros([], jnp.float32)  # noqa: E731 (distinct buffers)
    return FZOOState(count=jnp.zeros([], jnp.int32),
                     rng_key=_noise.key_words(key), loss=zero(),
                     probe_losses=jnp.zeros([n], jnp.float32), sigma=zero(),
                     skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra):
    del updates  # zeroth order: the incoming updates are not used.
    leaves = leafwise.leaves_of(params, mask, state.rng_key, state.count, n,
                                _sample(noise))
    eps_t, valid = _checks.step_hyperparams(
        at_step(eps, state.count), None, state.count)
    move = lambda tree, c, q: leafwise.perturb(leaves, tree, c, q, eps_t)
    losses = probe_or_losses(scheme, leaves, params, move, value_fn, extra,
                             state.count)
    if losses is None:
      return jax.tree.map(jnp.zeros_like, params), state
    l0, probes = losses[0], losses[1:]
    sigma = jnp.sqrt(jnp.mean(jnp.square(probes - jnp.mean(probes))))
    scale = n * (sigma if normalize else eps_t)
    ok = valid & (scale > 0) & jnp.isfinite(scale) & jnp.isfinite(l0)
    c = (probes - l0) / jnp.where(ok, scale, 1.0)
    ok &= jnp.all(jnp.isfinite(c))
    direction = leafwise.combine(leaves, jnp.where(ok, c, 0.0))
    return direction, FZOOState(
        count=optax.safe_increment(state.count), rng_key=state.rng_key,
        loss=l0, probe_losses=probes, sigma=sigma.astype(jnp.float32),
        skipped=state.skipped + (~ok).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def probe_noise(state, params, probe: int, *, noise: str = "rademacher"
                ) -> Any:
  """u_probe of the next ``update`` with ``state``, as a tree like params.

  Args:
    state: an :class:`FZOOState`, or an optimizer state that contains one.
    params: the parameters (only paths, shapes and dtypes are read).
    probe: the probe index i, 0 <= i < num_probes (u_{i+1} of the paper).
    noise: the ``noise`` the transformation was built with.

  Returns:
    A tree like params of float32 arrays (masked leaves get the u they would
    use; non-float leaves None).
  """
  if noise not in NOISES:
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}.")
  found = [node for node in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, FZOOState))
             if isinstance(node, FZOOState)]
  if not found:
    raise ValueError("probe_noise needs an FZOO state (hz.scale_by_fzoo, "
                     "hz.fzoo); for the other estimators use hz.step_noise.")
  fz = found[0]

  def leaf(path, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return None
    seed = _noise.leaf_seeds(fz.rng_key, fz.count,
                             jnp.asarray(probe, jnp.uint32), [path])[0]
    return _sample(noise)(seed, jnp.shape(x),
                          sharding=_noise.explicit_sharding(x))

  return jax.tree_util.tree_map_with_path(leaf, params)
