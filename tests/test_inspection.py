"""hz.curvature_tree: the learned H as a tree like params, on every rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz

ESTIMATORS = {
    "tensor": dict(),
    "row": dict(curvature="row", min_dim_size_to_factor=4),
    "column": dict(curvature="column", min_dim_size_to_factor=4),
    "element": dict(curvature="element"),
    "factored": dict(factored=True, min_dim_size_to_factor=4),
    "paper": dict(estimator="paper"),
    "paper_factored": dict(estimator="paper", curvature="factored",
                           min_dim_size_to_factor=4),
    "reference": dict(estimator="reference"),
}


def _problem():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k[0], (16, 8)), "b": jnp.zeros(8),
            "v": jax.random.normal(k[2], (2, 8, 4))}
  scale = jax.random.uniform(k[1], (16, 8)) * 10

  def loss(p):
    return (jnp.sum(scale * p["w"] ** 2) + 3 * jnp.sum((p["b"] - 1) ** 2)
            + jnp.sum(p["v"] ** 2))

  return params, loss


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_update_is_g_z_over_sqrt_of_the_tree(name):
  """The estimator's direction is g z H^{-1/2} with the H it returns."""
  params, loss = _problem()
  tx = hz.scale_by_hizoo(1e-2, 0.5, **ESTIMATORS[name])
  state = tx.init(params)
  update = jax.jit(lambda s: tx.update(None, s, params, value_fn=loss))
  for _ in range(20):
    _, state = update(state)
  updates, new_state = update(state)
  h = hz.curvature_tree(new_state, params)
  z = hz.step_noise(state, params)
  g = new_state.projected_grad
  for key, x in params.items():
    assert h[key].shape == x.shape and h[key].dtype == jnp.float32
    np.testing.assert_allclose(updates[key], g * z[key] / jnp.sqrt(h[key]),
                               rtol=1e-5, atol=1e-7 * float(jnp.abs(g)))
  # H moved off its start (1) where the rule learns per coordinate.
  if name in ("element", "factored", "paper", "paper_factored", "reference"):
    assert float(jnp.std(h["w"])) > 1e-3


def test_compact_form_and_masked_leaves():
  params, _ = _problem()
  mask = {"w": True, "b": False, "v": True}
  state = hz.hizoo_l(1e-2, min_dim_size_to_factor=4, mask=mask).init(params)
  tree = hz.curvature_tree(state, params, expand=False)
  assert tree["b"] is None
  rows, cols = tree["w"]
  assert rows.shape == (16, 1) and cols.shape == (1, 8)
  assert tree["v"][0].shape == (2, 8, 1) and tree["v"][1].shape == (2, 1, 4)
  assert hz.curvature_tree(state, params)["b"] is None
  per_row = hz.hizoo(1e-2, curvature="row",
                     min_dim_size_to_factor=4).init(params)
  assert hz.curvature_tree(per_row, params, expand=False)["w"].shape == (16, 1)
  paper = hz.hizoo_l(1e-2, estimator="paper", min_dim_size_to_factor=4)
  compact = hz.curvature_tree(paper.init(params), params, expand=False)
  assert isinstance(compact["w"], hz.FactoredHessian)
  # Inside a chain (the alias's state is a tuple), found as find_state does.
  assert hz.curvature_tree((state, optax.EmptyState()), params)["w"].shape \
      == (16, 8)


def test_bad_inputs():
  params, _ = _problem()
  with pytest.raises(ValueError, match="MeZO"):
    hz.curvature_tree(hz.mezo(1e-2).init(params), params)
  state = hz.hizoo(1e-2).init(params)
  with pytest.raises(ValueError, match="structure of params"):
    hz.curvature_tree(state, {"w": params["w"]})
  with pytest.raises(ValueError, match="no zeroth-order"):
    hz.curvature_tree(optax.adam(1e-3).init(params), params)


def test_docstring_examples():
  import doctest  # pylint: disable=import-outside-toplevel
  from hizoo_jax import inspection  # pylint: disable=import-outside-toplevel
  result = doctest.testmod(inspection, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
