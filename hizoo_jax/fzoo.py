"""FZOO: a normalized step built from a batch of one-sided probes.

FZOO (arXiv 2506.09034) evaluates the loss at theta and at N one-sided
probes ``theta + eps u_i`` and steps along the probes weighted by their loss
differences, divided by the spread of the probe losses:

.. math::
  l_0 = L(\\theta),\\quad l_i = L(\\theta + \\epsilon u_i),\\quad
  \\sigma = \\mathrm{std}(l_1, \\dots, l_N),\\quad
  c_i = \\frac{l_i - l_0}{N \\sigma},\\quad
  d = \\sum_i c_i u_i.

Since ``l_i - l_0 ~ eps g.u_i`` and ``sigma ~ eps |g|`` (Rademacher u), ``d``
estimates ``g / |g|``: a normalized-SGD step whose size the learning rate
alone sets. N + 1 forward passes a step.

The u_i are never stored: each is a pure function of the state's key, the
step count, the probe index and the leaf's path (:mod:`hizoo_jax.noise`),
regenerated wherever it is needed (in the probe's loss and in the direction).
:func:`probe_noise` returns them for tests and custom loops.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from hizoo_jax import _checks
from hizoo_jax import noise as _noise
from hizoo_jax.alias import _tail
from hizoo_jax.estimator import ScalarOrSchedule

NOISES = ("rademacher", "gaussian")


class FZOOState(NamedTuple):
  """State of :func:`scale_by_fzoo`."""

  count: jax.Array  # (), int32: steps taken; selects the next step's u_i.
  rng_key: jax.Array  # (k,), uint32: raw words of the run's PRNG key.
  loss: jax.Array  # (), float32: last step's l_0 = L(theta).
  probe_losses: jax.Array  # (N,), float32: last step's l_i = L(theta + eps u_i).
  sigma: jax.Array  # (), float32: last step's population std of probe_losses.
  skipped: jax.Array  # (), int32: steps skipped (non-finite loss, sigma = 0).


def _draw(seed: jax.Array, shape, kind: str) -> jax.Array:
  """u of one leaf (float32) from its (2,) seed: a +/-1 sign or z."""
  bits = _noise.random_bits(seed, shape)
  if kind == "rademacher":  # The top hash bit is a fair coin.
    return 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)
  return _noise.standard(bits)


def _probe_seeds(state: FZOOState, probe, paths) -> jax.Array:
  """(leaves, 2) uint32 seeds of probe ``probe`` at the state's step."""
  return _noise.leaf_seeds(state.rng_key, state.count,
                           jnp.asarray(probe, jnp.uint32), paths)


def _leaf_info(params, mask):
  """Key paths, a tree of leaf numbers and a tree of trainable flags."""
  _checks.check_params(params)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [p for p, _ in paths_leaves]
  trainable = _checks.trainable_leaves(mask, params, treedef, paths)
  _checks.check_leaf_dtypes([x for _, x in paths_leaves], paths, trainable)
  return (paths, treedef.unflatten(list(range(len(paths)))),
          treedef.unflatten(trainable))


def scale_by_fzoo(
    eps: ScalarOrSchedule = 1e-3,
    *,
    num_probes: int = 8,
    noise: str = "rademacher",
    normalize: bool = True,
    mask=None,
    key=0,
) -> optax.GradientTransformationExtraArgs:
  r"""FZOO's direction from N one-sided probes (see the module docstring).

  Returns ``d = sum_i c_i u_i`` as the "gradient" for downstream
  transformations (e.g. ``optax.scale(-learning_rate)``). With
  ``normalize=False`` it is one-sided ZO-SGD with N queries,
  ``c_i = (l_i - l_0) / (N eps)``, whose learning rate has MeZO's meaning.

  A non-finite loss, an invalid ``eps`` (from a schedule) or, with
  ``normalize``, ``sigma = 0`` (all probe losses equal, e.g. a flat
  objective) skips the step: zero updates, counted in ``skipped``.

  Args:
    eps: probe scale epsilon (float or schedule of the step count), > 0.
    num_probes: N, probes per step (N + 1 loss evaluations); >= 2 with
      ``normalize`` (sigma of one probe is 0).
    noise: ``"rademacher"`` (u in {-1, +1}^d, the paper's) or
      ``"gaussian"`` (the library's standard noise, see
      :mod:`hizoo_jax.noise`).
    normalize: divide by ``N sigma`` (FZOO) or by ``N eps`` (ZO-SGD).
    mask: tree of bools like params (or a prefix, or a callable); False
      leaves are never perturbed nor updated.
    key: int seed, typed PRNG key or raw key data for the noise.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
    params, *, value_fn, **extra_args)`` ignores ``updates`` and calls
    ``value_fn(params, **named_extra_args)`` N + 1 times.

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
  num_probes = _checks.static_int(num_probes, "num_probes",
                                  2 if normalize else 1)
  if noise not in NOISES:
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}.")
  eps_value = _checks.concrete_float(eps)
  if eps_value is not None and not 0 < eps_value < float("inf"):
    raise ValueError(f"eps (the probe scale) must be finite and > 0, got "
                     f"{eps!r}.")
  _checks.check_key(key)

  def init_fn(params):
    del params
    zero = lambda: jnp.zeros([], jnp.float32)  # noqa: E731 (distinct buffers)
    return FZOOState(count=jnp.zeros([], jnp.int32),
                     rng_key=_noise.key_words(key), loss=zero(),
                     probe_losses=jnp.zeros([num_probes], jnp.float32),
                     sigma=zero(), skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    del updates  # Zeroth order: the incoming updates are not used.
    if value_fn is None:
      raise ValueError("scale_by_fzoo needs update(..., value_fn=loss).")
    paths, index, keep = _leaf_info(params, mask)
    kwargs = _checks.value_fn_kwargs(value_fn, extra_args)
    loss = lambda p, where: _checks.check_loss(  # noqa: E731
        value_fn(p, **kwargs), where).astype(jnp.float32)
    eps_t = jnp.asarray(eps(state.count) if callable(eps) else eps,
                        jnp.float32)
    eps_t, valid = _checks.step_hyperparams(eps_t, None, state.count)

    def u(seeds, i, x):  # u_i of leaf i, regenerated at each use.
      return _draw(seeds[i], jnp.shape(x), noise)

    def probe_loss(j):  # One perturbed copy of params at a time.
      seeds = _probe_seeds(state, j, paths)
      shifted = jax.tree.map(
          lambda x, i, k: (x + eps_t * u(seeds, i, x)).astype(x.dtype)
          if k else x, params, index, keep)
      return loss(shifted, "theta + eps u_i")

    l0 = loss(params, "theta")
    probes = lax.map(probe_loss, jnp.arange(num_probes, dtype=jnp.uint32))
    sigma = jnp.sqrt(jnp.mean(jnp.square(probes - jnp.mean(probes))))
    ok = valid & jnp.isfinite(l0) & jnp.all(jnp.isfinite(probes))
    if normalize:
      ok &= sigma > 0  # All probes equal: no direction, no scale.
    scale = num_probes * (sigma if normalize else eps_t)
    coeffs = jnp.where(ok, (probes - l0) / jnp.where(ok, scale, 1.0), 0.0)
    all_seeds = [_probe_seeds(state, j, paths) for j in range(num_probes)]

    def direction(x, i, k):  # One fused pass: every u_j regenerated.
      if not k:
        return jnp.zeros_like(x)
      d = sum(coeffs[j] * u(all_seeds[j], i, x) for j in range(num_probes))
      return d.astype(x.dtype)

    new_state = FZOOState(
        count=optax.safe_increment(state.count), rng_key=state.rng_key,
        loss=l0, probe_losses=probes, sigma=sigma.astype(jnp.float32),
        skipped=state.skipped + (~ok).astype(jnp.int32))
    return jax.tree.map(direction, params, index, keep), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def fzoo(
    learning_rate: ScalarOrSchedule,
    eps: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.0,
    key=0,
    *,
    num_probes: Optional[int] = None,
    noise: str = "rademacher",
    normalize: bool = True,
    mask=None,
    weight_decay_mask=None,
) -> optax.GradientTransformationExtraArgs:
  r"""FZOO (arXiv 2506.09034): normalized SGD from N one-sided probes.

  .. math::
    \theta \leftarrow \theta - \eta\,\Big(\sum_{i=1}^N
    \frac{L(\theta + \epsilon u_i) - L(\theta)}{N \sigma} u_i
    + \lambda \theta\Big)

  with sigma the population std of the N probe losses (see
  :func:`scale_by_fzoo`); weight decay lambda is decoupled and by default
  spares leaves with ndim < 2. The step's size is set by eta alone (the
  direction estimates g / |g|), so eta is not on MeZO's scale.

  Args:
    learning_rate: eta, a float or an optax schedule.
    eps: probe scale (float or schedule).
    weight_decay: lambda (float or schedule).
    key: seed or PRNG key for the noise.
    num_probes: N (N + 1 forward passes a step; None: 8, and static
      under ``optax.inject_hyperparams``).
    noise: ``"rademacher"`` or ``"gaussian"``.
    normalize: False gives one-sided ZO-SGD with N queries (the ablation).
    mask: tree of bools or callable; False leaves are frozen.
    weight_decay_mask: override of the default decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``value_fn``.

  Example:
    >>> import jax.numpy as jnp, optax, hizoo_jax as hz
    >>> params = {"w": jnp.ones(3)}
    >>> tx = hz.fzoo(learning_rate=1e-2, eps=1e-3)
    >>> updates, state = tx.update(None, tx.init(params), params,
    ...                            value_fn=lambda p: p["w"] @ p["w"])
    >>> params = optax.apply_updates(params, updates)
  """
  return optax.chain(
      scale_by_fzoo(eps, num_probes=8 if num_probes is None else num_probes,
                    noise=noise,
                    normalize=normalize, mask=mask, key=key),
      *_tail(learning_rate, weight_decay, weight_decay_mask, mask),
  )


def find_fzoo_state(opt_state) -> FZOOState:
  """The first :class:`FZOOState` inside an optimizer state."""
  for node in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, FZOOState)):
    if isinstance(node, FZOOState):
      return node
  raise ValueError("no FZOO state (FZOOState) in opt_state.")


def probe_noise(state, params, probe: int, *, noise: str = "rademacher"
                ) -> Any:
  """u_probe of the next ``update`` with ``state``, as a tree like params.

  Args:
    state: an :class:`FZOOState`, or an optimizer state that contains one.
    params: the parameters (only paths, shapes and dtypes are read).
    probe: the probe index i, 0 <= i < num_probes.
    noise: the ``noise`` the transformation was built with.

  Returns:
    A tree like params of float32 arrays (masked leaves get the u they would
    use; non-float leaves None).
  """
  if noise not in NOISES:
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}.")
  fz = find_fzoo_state(state)

  def leaf(path, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return None
    seed = _probe_seeds(fz, probe, [path])[0]
    return _draw(seed, jnp.shape(x), noise)

  return jax.tree_util.tree_map_with_path(leaf, params)


__all__ = ["FZOOState", "find_fzoo_state", "fzoo", "probe_noise",
           "scale_by_fzoo"]
