"""API behaviour: chains, jit, schedules, masks, guards and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz


def params_tree():
  return {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}


def loss(p):
  return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum((p["b"] - 0.5) ** 2)


def run(tx, steps=3, params=None, value_fn=loss):
  params = params_tree() if params is None else params
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=value_fn))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state, step


@pytest.mark.parametrize("make", [
    lambda: hz.hizoo(1e-2, hessian_smooth=0.1),
    lambda: hz.hizoo_l(1e-2, hessian_smooth=0.1, min_dim_size_to_factor=2),
    lambda: hz.mezo(1e-2),
    lambda: optax.chain(hz.scale_by_hizoo(1e-3, 0.1), optax.scale_by_adam(),
                        optax.scale_by_learning_rate(1e-2)),
    lambda: optax.chain(hz.scale_by_mezo(1e-3), optax.trace(0.9),
                        optax.clip_by_global_norm(1.0), optax.scale(-1e-2)),
    lambda: optax.chain(hz.scale_by_hizoo(1e-3, 0.1),
                        optax.MultiSteps(optax.sgd(1e-2), every_k_schedule=2)
                        .gradient_transformation()),
])
def test_chains_jit_reduce_loss_without_recompiling(make):
  tx = make()
  params, state, step = run(tx, steps=30)
  assert float(loss(params)) < float(loss(params_tree()))
  assert step._cache_size() == 1
  assert int(hz.find_state(state).count) == 30
  logged = optax.tree.get(state, "loss")
  assert np.isfinite(float(logged))


def test_state_is_chain_tuple_with_estimator_first():
  state = hz.hizoo(1e-3).init(params_tree())
  assert isinstance(state, tuple) and isinstance(state[0], hz.ZOState)
  for name in ("count", "rng_key", "leaf_numbers", "hessian", "loss",
               "loss_plus", "loss_minus", "projected_grad", "skipped"):
    assert hasattr(state[0], name)


def test_step_noise_is_what_update_uses_and_independent_of_leaves_and_mask():
  params = params_tree()
  tx = hz.scale_by_mezo(1e-3, key=4)
  state = tx.init(params)
  z = hz.step_noise(state, params)
  only_w = hz.step_noise(state, {"w": params["w"]})
  np.testing.assert_array_equal(z["w"], only_w["w"])
  masked = hz.scale_by_mezo(1e-3, key=4, mask={"w": True, "b": False})
  np.testing.assert_array_equal(
      z["w"], hz.step_noise(masked.init(params), params)["w"])
  # update's direction is g z: recover z from it.
  updates, new_state = tx.update(None, state, params, value_fn=loss)
  g = float(new_state.projected_grad)
  np.testing.assert_allclose(updates["w"] / g, z["w"], rtol=1e-5)
  z_next = hz.step_noise(new_state, params)
  assert not np.allclose(z_next["w"], z["w"])  # fresh noise every step
  other_key = hz.scale_by_mezo(1e-3, key=5).init(params)
  assert not np.allclose(hz.step_noise(other_key, params)["w"], z["w"])


def test_mask_freezes_leaves_without_state():
  params = dict(params_tree(), step=jnp.array(3, jnp.int32))
  mask = {"w": True, "b": False, "step": False}
  tx = hz.hizoo(1e-2, hessian_smooth=0.1, weight_decay=0.1, mask=mask)
  state = tx.init(params)
  factors, = state[0].hessian
  assert isinstance(factors["b"], optax.MaskedNode)
  assert isinstance(factors["step"], optax.MaskedNode)
  seen = []

  def value_fn(p):
    seen.append(p)
    return loss(p)

  updates, state = tx.update(None, state, params, value_fn=value_fn)
  for p in seen:  # b never perturbed
    np.testing.assert_array_equal(p["b"], params["b"])
    assert int(p["step"]) == 3
  assert not np.allclose(seen[1]["w"], params["w"])
  np.testing.assert_array_equal(updates["b"], 0)
  np.testing.assert_array_equal(updates["step"], 0)
  # a callable mask gives the same
  tx2 = hz.hizoo(1e-2, hessian_smooth=0.1, weight_decay=0.1,
                 mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
  updates2, _ = tx2.update(None, tx2.init(params), params, value_fn=loss)
  np.testing.assert_allclose(updates2["w"], updates["w"], rtol=1e-6)


def test_weight_decay_spares_vectors_by_default():
  params = params_tree()
  tx = hz.mezo(0.1, weight_decay=0.5)
  updates, _ = tx.update(None, tx.init(params), params,
                         value_fn=lambda p: jnp.float32(1.0))  # g = 0
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], 0)


def test_no_weight_decay_adds_nothing_and_keeps_optax_state():
  """With weight_decay=0 the step never evaluates the decay mask and the
  update is the estimator's alone; the state keeps optax's layout."""
  params = params_tree()
  calls = []

  def mask(p):
    calls.append(1)
    return jax.tree.map(lambda x: x.ndim == 2, p)

  tx = hz.mezo(0.1, weight_decay_mask=mask)
  state = tx.init(params)
  expected = optax.add_decayed_weights(0.0, mask).init(params)
  assert jax.tree.structure(state[1]) == jax.tree.structure(expected)
  calls.clear()
  updates, _ = jax.jit(lambda s, p: tx.update(
      None, s, p, value_fn=lambda q: jnp.float32(1.0)))(state, params)
  assert not calls  # g = 0 above, so the update is zero:
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0)


def test_schedules_are_evaluated_every_step():
  params = {"w": jnp.zeros(5)}
  mu = optax.piecewise_constant_schedule(1e-3, {1: 10.0})  # 1e-3 then 1e-2
  seen = []

  def value_fn(p):
    seen.append(np.asarray(p["w"]))
    return jnp.sum(p["w"])

  tx = hz.scale_by_mezo(mu)
  state = tx.init(params)
  norms = []
  for _ in range(2):
    z = np.asarray(hz.step_noise(state, params)["w"])
    seen.clear()
    _, state = tx.update(None, state, params, value_fn=value_fn)
    norms.append(np.abs(seen[0]).sum() / np.abs(z).sum())
  np.testing.assert_allclose(norms, [1e-3, 1e-2], rtol=1e-5)
  # learning-rate and hessian_smooth schedules in the alias
  lr = optax.linear_schedule(1.0, 0.0, 4)
  tx = hz.hizoo(lr, hessian_smooth=optax.constant_schedule(0.0))
  state = tx.init(params)
  sizes = []
  for _ in range(3):
    z = hz.step_noise(state, params)["w"]
    updates, state = tx.update(None, state, params, value_fn=value_fn)
    sizes.append(float(jnp.abs(updates["w"]).sum()) /
                 abs(float(state[0].projected_grad)) / float(jnp.abs(z).sum()))
  np.testing.assert_allclose(np.array(sizes) / sizes[0], [1, 0.75, 0.5], rtol=1e-4)
  for factor in jax.tree.leaves(state[0].hessian):  # the rate is 0
    np.testing.assert_array_equal(factor, 1.0)


def test_inject_hyperparams_on_aliases():
  params = params_tree()
  for factory, kwargs in [(hz.hizoo, dict(hessian_smooth=0.1)),
                          (hz.hizoo_l, dict(min_dim_size_to_factor=2)),
                          (hz.mezo, {})]:
    static = ("min_dim_size_to_factor",) if "min_dim_size_to_factor" in kwargs else ()
    tx = optax.inject_hyperparams(factory, static_args=static)(
        learning_rate=0.1, **kwargs)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
    u1, _ = step(params, state)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    u2, s2 = step(params, state)
    np.testing.assert_allclose(u2["w"], u1["w"] / 2, rtol=1e-5)
    assert int(hz.find_state(s2).count) == 1
  tx = optax.inject_hyperparams(hz.hizoo, static_args=("num_queries",))(
      learning_rate=0.1, num_queries=2)
  jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))(params, tx.init(params))


def test_value_fn_receives_named_extra_args():
  params = params_tree()
  tx = hz.hizoo(1e-2)

  def value_fn(p, batch):
    return jnp.sum((p["w"] @ batch) ** 2)

  batch = jnp.ones(4)
  _, state = tx.update(None, tx.init(params), params, value_fn=value_fn,
                       batch=batch, unrelated=3)
  assert float(state[0].loss) == pytest.approx(float(value_fn(params, batch)))


def test_non_finite_loss_skips_the_step():
  params = params_tree()
  tx = hz.hizoo(1e-1, hessian_smooth=0.5)
  state = tx.init(params)
  calls = []

  def value_fn(p):  # NaN at the second evaluation (theta + mu s z) only
    calls.append(None)
    value = loss(p)
    return jnp.nan * value if len(calls) == 2 else value

  updates, new_state = tx.update(None, state, params, value_fn=value_fn)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0)
  jax.tree.map(np.testing.assert_array_equal, new_state[0].hessian,
               state[0].hessian)
  assert int(new_state[0].skipped) == 1 and int(new_state[0].count) == 1
  calls.clear()
  calls.extend([None, None])  # the next step is clean again
  updates, new_state = tx.update(None, new_state, params, value_fn=value_fn)
  assert int(new_state[0].skipped) == 1
  assert float(jnp.abs(updates["w"]).sum()) > 0


def test_errors_are_clear():
  params = params_tree()
  tx = hz.hizoo(1e-2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(None, state, params)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(None, state, params, value_fn=lambda p: p["b"])
  with pytest.raises(TypeError, match="floating"):
    tx.update(None, state, params, value_fn=lambda p: jnp.int32(1))
  with pytest.raises(TypeError, match="aux"):
    tx.update(None, state, params, value_fn=lambda p: (loss(p), {}))
  with pytest.raises(ValueError, match="params"):
    tx.update(None, state, None, value_fn=loss)
  with pytest.raises(ValueError, match="params"):
    tx.init(None)
  with pytest.raises(ValueError, match="structure"):
    tx.update(None, state, {"w": params["w"]}, value_fn=loss)
  with pytest.raises(ValueError, match="shape"):
    tx.update(None, state, {"w": jnp.ones((4, 3, 2)), "b": params["b"]},
              value_fn=loss)
  with pytest.raises(ValueError, match="shape"):  # the per-element rule
    paper = hz.hizoo(1e-2, estimator="paper")
    paper.update(None, paper.init(params),
                 {"w": jnp.ones((4, 3)), "b": params["b"]}, value_fn=loss)
  with pytest.raises(ValueError, match="mu"):
    hz.hizoo(1e-2, mu=0.0)
  with pytest.raises(ValueError, match="mu"):
    hz.scale_by_mezo(-1.0)
  with pytest.raises(ValueError, match="hessian_smooth"):
    hz.hizoo(1e-2, hessian_smooth=1.5)
  with pytest.raises(ValueError, match="hessian_smooth"):
    hz.scale_by_hizoo(1e-3, -0.1)
  with pytest.raises(ValueError, match="estimator"):
    hz.scale_by_hizoo(1e-3, 0.1, estimator="other")
  with pytest.raises(ValueError, match="num_queries"):
    hz.scale_by_mezo(1e-3, num_queries=0)
  with pytest.raises(TypeError, match="hessian_dtype"):
    hz.scale_by_hizoo(1e-3, 0.1, hessian_dtype=jnp.int32)
  with pytest.raises(ValueError, match="mask"):
    hz.hizoo(1e-2, mask={"w": True}).init(params)
  with pytest.raises(TypeError, match="int32.*mask"):
    hz.mezo(1e-2).init(dict(params, n=jnp.array(1)))
  with pytest.raises(ValueError, match="ZOState"):
    hz.step_noise(optax.adam(1e-3).init(params), params)
