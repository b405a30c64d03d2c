"""Regression tests for two bugs found on today's stack (issue 23).

* ``curvature="element"`` on an Explicit mesh failed while tracing: the
  curvature's sum of z^2 reshaped a sharded (q, m, n@model) array to
  (q, m*n), which Explicit axes reject.
* ``optax.tree.map_params`` on an ``hz.hizoo_l`` state failed: init on
  params without leaves (optax's placeholder) gave one tree of factors where
  HiZOO-L keeps two.

Runs on the 8 simulated CPU devices that conftest.py requests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hizoo_jax as hz

SPECS = {"w": P(None, "model"), "b": P("model"), "v": P("model", None)}


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (64, 256)) / 8, "b": jnp.zeros(256),
          "v": jax.random.normal(k2, (256, 4)) / 16}


def _loss(p, x, out_sharding=None):
  h = jnp.tanh(x @ p["w"] + p["b"])
  return jnp.mean((jnp.matmul(h, p["v"], out_sharding=out_sharding) - 1) ** 2)


def _run(tx, params, x, steps=3, out_sharding=None):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(None, s, p, value_fn=lambda q: _loss(q, x, out_sharding))
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("estimator", ["signed", "paper"])
def test_element_curvature_on_a_mesh_matches_one_device(axis_type, estimator):
  make = lambda: hz.hizoo(1e-2, mu=1e-2, hessian_smooth=0.5,
                          estimator=estimator, curvature="element")
  x = jax.random.normal(jax.random.key(1), (8, 64))
  want_p, want_s = _run(make(), _params(), x)
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(getattr(AxisType, axis_type),) * 2)
  with jax.set_mesh(mesh):
    params = jax.device_put(
        _params(), jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    got_p, got_s = _run(make(), params, xs, out_sharding=(
        P("data", None) if axis_type == "Explicit" else None))
  hess = got_s[0].hessian[0] if estimator == "signed" else got_s[0].hessian
  # H per element is sharded like its parameter, and it moved off 1.
  for name, spec in SPECS.items():
    assert hess[name].shape == params[name].shape
    assert hess[name].sharding.is_equivalent_to(
        NamedSharding(mesh, spec), params[name].ndim), name
  want_h = (want_s[0].hessian[0] if estimator == "signed"
            else want_s[0].hessian)
  # The noise does not depend on the layout: the same trajectory, up to
  # the losses' reduction order (the paper's H divides their second
  # difference by mu^2, which amplifies it).
  rtol, atol = (2e-4, 1e-6) if estimator == "signed" else (5e-3, 1e-5)
  for name in SPECS:
    np.testing.assert_allclose(np.asarray(hess[name]),
                               np.asarray(want_h[name]), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(got_p[name]),
                               np.asarray(want_p[name]), rtol=rtol, atol=atol)
  if estimator == "signed":
    assert int(got_s[0].curvature_stats.probes) == 3


def _transforms():
  mask = {"w": True, "b": False, "v": True}
  return {
      "mezo": hz.mezo(1e-3),
      "hizoo": hz.hizoo(1e-3),
      "hizoo_l": hz.hizoo_l(1e-3, min_dim_size_to_factor=4),
      "hizoo_l_masked": hz.hizoo_l(1e-3, min_dim_size_to_factor=4, mask=mask),
      **{f"hizoo_{g}": hz.hizoo(1e-3, curvature=g)
         for g in ("element", "row", "column")},
      "paper": hz.hizoo(1e-3, estimator="paper"),
      "paper_factored": hz.hizoo_l(1e-3, estimator="paper"),
      "reference": hz.hizoo(1e-3, estimator="reference"),
      "scale_by_hizoo": hz.scale_by_hizoo(1e-3, curvature="factored"),
      "scale_by_mezo": hz.scale_by_mezo(1e-3),
      "masked_chain": hz.masked_chain(
          hz.scale_by_hizoo(1e-3, factored=True, mask=mask),
                                      optax.scale_by_adam(), mask=mask),
      "master_weights": hz.master_weights(hz.hizoo_l(1e-3)),
  }


@pytest.mark.parametrize("name", list(_transforms()))
def test_map_params_reaches_every_params_shaped_tree(name):
  tx = _transforms()[name]
  params = _params()
  state = tx.init(params)
  seen = []

  def f(x):
    seen.append(x.shape)
    return x + 1

  mapped = optax.tree.map_params(tx, f, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  zo = hz.find_state(state)
  got = hz.find_state(mapped)
  # leaf_numbers and every tree of factors are params-shaped: mapped.
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(got.leaf_numbers)),
      np.asarray(jax.tree.leaves(zo.leaf_numbers)) + 1)
  for h, h0 in zip(jax.tree.leaves(got.hessian), jax.tree.leaves(zo.hessian)):
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h0) + 1)
  # Scalars that are not params (count, key, losses) are left alone.
  assert int(got.count) == int(zo.count)
  np.testing.assert_array_equal(np.asarray(got.rng_key),
                                np.asarray(zo.rng_key))
  assert len(seen) >= len(jax.tree.leaves(zo.leaf_numbers))
