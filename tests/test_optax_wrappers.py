"""Issue 11: hyperparameters checked every step, Optax and Flax wrappers,
prefix masks and downstream state kept off frozen leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz

MASK = {"w": True, "b": False}


def params_tree():
  return {"w": jnp.linspace(-1.0, 1.0, 8).reshape(2, 4), "b": jnp.ones(3)}


def loss(p):
  return jnp.sum(p["w"] ** 2) + jnp.sum(jnp.sin(p["b"]))


def zeros(p):
  return jax.tree.map(jnp.zeros_like, p)


def run(tx, steps, params=None, updates=lambda p: None, value_fn=loss):
  """``steps`` jitted updates; every params and state along the way."""
  params = params_tree() if params is None else params
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(updates(p), s, p, value_fn=value_fn))
  history = [(params, state)]
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    history.append((params, state))
  return history, step


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# Item 1: a hyperparameter out of range at some step skips that step.


@pytest.mark.parametrize("make", [
    lambda mu, rate: hz.hizoo(1e-2, mu=mu, hessian_smooth=rate),
    lambda mu, rate: hz.mezo(1e-2, mu=mu),
])
def test_mu_schedule_reaching_zero_skips_and_counts(make):
  mu = optax.cosine_decay_schedule(1e-3, 5)  # mu = 0 from step 5 on
  history, _ = run(make(mu, 0.1), 7)
  expected = np.cumsum([not mu(i) > 0 for i in range(7)])  # NumPy statement
  np.testing.assert_array_equal(
      [int(hz.find_state(s).skipped) for _, s in history[1:]], expected)
  params5, state5 = history[5]
  for params, state in history[6:]:  # untouched from step 5 on
    assert all_finite((params, state))
    jax.tree.map(np.testing.assert_array_equal, params, params5)
    jax.tree.map(np.testing.assert_array_equal,
                 hz.find_state(state).hessian, hz.find_state(state5).hessian)
  assert not np.allclose(history[4][0]["w"], history[0][0]["w"])  # it learnt


def test_hessian_smooth_schedule_above_one_skips():
  rate = optax.linear_schedule(0.5, 1.5, 4)  # 0.5, 0.75, 1.0, 1.25, 1.5
  history, _ = run(hz.hizoo(1e-2, hessian_smooth=rate), 5)
  skipped = [int(hz.find_state(s).skipped) for _, s in history[1:]]
  np.testing.assert_array_equal(
      skipped, np.cumsum([not 0 <= rate(i) <= 1 for i in range(5)]))
  assert all_finite(history[-1])
  jax.tree.map(np.testing.assert_array_equal,
               history[-1][0], history[3][0])


def test_injected_bad_values_skip_the_step():
  tx = optax.inject_hyperparams(hz.hizoo)(learning_rate=1e-2, mu=1e-3,
                                          hessian_smooth=0.1)
  params = params_tree()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
  bad = [("mu", 0.0), ("mu", np.inf), ("mu", np.nan), ("mu", -1e-3),
         ("hessian_smooth", 1.5), ("hessian_smooth", np.nan)]
  for i, (name, value) in enumerate(bad):
    good = state.hyperparams[name]
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    updates, new_state = step(params, state)
    assert int(hz.find_state(new_state).skipped) == i + 1, (name, value)
    for u in jax.tree.leaves(updates):
      np.testing.assert_array_equal(u, 0)
    jax.tree.map(np.testing.assert_array_equal,
                 hz.find_state(new_state).hessian,
                 hz.find_state(state).hessian)
    state = new_state
    state.hyperparams[name] = good
  assert step._cache_size() == 1


def test_make_train_step_counts_a_step_with_mu_zero():
  mu = optax.piecewise_constant_schedule(1e-3, {1: 0.0})  # 1e-3, then 0
  tx = hz.mezo(1e-2, mu=mu)
  step = hz.make_train_step(tx, lambda p, batch: loss(p), donate=False)
  params, state = params_tree(), tx.init(params_tree())
  for expected in (0, 1):
    params, state, metrics = step(params, state, None)
    assert int(metrics["skipped"]) == expected
  assert all_finite(params)


@pytest.mark.parametrize("bad, error", [
    (dict(mu=np.inf), ValueError), (dict(mu=np.nan), ValueError),
    (dict(key=0.0), TypeError), (dict(key=True), TypeError),
    (dict(key="0"), TypeError), (dict(key=jnp.ones(2)), TypeError),
    (dict(key=None), TypeError),
])
def test_static_bad_values_raise(bad, error):
  with pytest.raises(error, match="mu|key"):
    hz.mezo(1e-2, **bad)
  with pytest.raises(error, match="mu|key"):
    hz.scale_by_hizoo(**{"mu": 1e-3, "hessian_smooth": 0.1, **bad})


def test_callable_mask_in_inject_hyperparams_is_caught():
  """inject_hyperparams calls a callable mask with the step count."""
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  by_rank = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  with pytest.raises(ValueError, match="static_args=\\('mask',\\)"):
    optax.inject_hyperparams(hz.hizoo)(1e-2, mask=by_rank).init(params)
  tx = optax.inject_hyperparams(hz.hizoo, static_args=("mask",))(
      1e-2, mask=by_rank)
  updates, _ = tx.update(None, tx.init(params), params,
                         value_fn=lambda p: jnp.sum(p["w"] ** 2))
  np.testing.assert_array_equal(updates["b"], 0)
  assert float(jnp.abs(updates["w"]).sum()) > 0


def test_good_keys_are_accepted_and_distinct():
  params = params_tree()
  words = [hz.find_state(hz.mezo(1e-2, key=k).init(params)).rng_key
           for k in (1, np.int64(2), jax.random.key(3),
                     jax.random.key_data(jax.random.key(4)))]
  assert len({tuple(np.asarray(w)) for w in words}) == 4


# Item 2: Optax wrappers and Flax containers.


def test_multisteps_outer_with_zero_updates():
  """Outer MultiSteps: one ZO step every k calls (the k-th call's loss)."""
  k = 3
  history, step = run(optax.MultiSteps(hz.mezo(0.1), k), 2 * k,
                      updates=zeros)
  plain, _ = run(hz.mezo(0.1), 2)
  for i in range(1, k):
    np.testing.assert_array_equal(history[i][0]["w"], history[0][0]["w"])
  np.testing.assert_allclose(history[k][0]["w"], plain[1][0]["w"], rtol=1e-6)
  np.testing.assert_allclose(history[2 * k][0]["w"], plain[2][0]["w"],
                             rtol=1e-6)
  assert step._cache_size() == 1


def test_multisteps_downstream_averages_k_estimates():
  """The pattern for accumulation: k ZO estimates (fresh z each) averaged."""
  k, lr = 3, 0.1
  est = hz.scale_by_hizoo(1e-3, 0.1)
  tx = optax.chain(est, optax.MultiSteps(optax.sgd(lr), k)
                   .gradient_transformation())
  params = params_tree()
  state, est_state = tx.init(params), est.init(params)
  estimates = []
  for i in range(k):
    updates, state = tx.update(None, state, params, value_fn=loss)
    g, est_state = est.update(None, est_state, params, value_fn=loss)
    estimates.append(np.asarray(g["w"], np.float64))
    if i < k - 1:
      np.testing.assert_array_equal(updates["w"], 0)
  np.testing.assert_allclose(updates["w"], -lr * np.mean(estimates, 0),
                             rtol=1e-5, atol=1e-7)
  assert not np.allclose(estimates[0], estimates[1])  # fresh z per call


def test_apply_if_finite_outer_with_zero_updates():
  calls = []

  def nan_once(p):
    calls.append(None)
    return jnp.nan if len(calls) == 2 else loss(p)

  tx = optax.apply_if_finite(hz.hizoo(0.1, hessian_smooth=0.1), 3)
  params = params_tree()
  state = tx.init(params)
  updates, state = tx.update(zeros(params), state, params, value_fn=nan_once)
  for u in jax.tree.leaves(updates):  # the estimator skipped the NaN step
    np.testing.assert_array_equal(u, 0)
  assert int(hz.find_state(state).skipped) == 1
  updates, state = tx.update(zeros(params), state, params, value_fn=loss)
  assert float(jnp.abs(updates["w"]).sum()) > 0


def test_optax_masked_around_an_estimator_says_what_to_do():
  tx = optax.masked(hz.hizoo(1e-2), MASK)
  with pytest.raises(ValueError, match="masked_chain"):
    tx.init(params_tree())


@pytest.mark.parametrize("factory, kwargs, static", [
    (hz.scale_by_hizoo, dict(mu=1e-3, hessian_smooth=0.1), ()),
    (hz.scale_by_mezo, dict(mu=1e-3), ()),
    (hz.hizoo, dict(learning_rate=1e-2, hessian_smooth=0.1), ()),
    (hz.hizoo_l, dict(learning_rate=1e-2), ()),
    (hz.mezo, dict(learning_rate=1e-2, key=3), ()),
    # Explicit values of the options that shape the program are static.
    (hz.scale_by_hizoo, dict(mu=1e-3, hessian_smooth=0.1, num_queries=2,
                             factored=True, min_dim_size_to_factor=2,
                             hessian_dtype=jnp.bfloat16),
     ("num_queries", "min_dim_size_to_factor", "hessian_dtype")),
])
def test_inject_hyperparams_on_every_estimator_and_alias(
    factory, kwargs, static):
  tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  history, step = run(tx, 2)
  params, state = history[-1]
  assert int(hz.find_state(state).count) == 2 and step._cache_size() == 1
  assert not np.allclose(params["w"], history[0][0]["w"])


def test_reduce_on_plateau_downstream():
  alias = hz.hizoo(0.1, hessian_smooth=0.1)
  tx = optax.chain(alias, optax.contrib.reduce_on_plateau(
      patience=1, factor=0.5, cooldown=0))
  params = params_tree()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss,
                                         value=jnp.float32(1.0)))
  plain_step = jax.jit(lambda p, s: alias.update(None, s, p, value_fn=loss))
  for _ in range(4):  # the value never improves: the scale halves
    plain, _ = plain_step(params, state[0])
    updates, state = step(params, state)
    scale = float(optax.tree.get(state, "scale"))
    np.testing.assert_allclose(updates["w"], scale * plain["w"], rtol=1e-5)
    params = optax.apply_updates(params, updates)
  assert scale < 0.5


def test_make_train_step_with_a_first_order_optimizer_says_what_to_do():
  tx = optax.adam(1e-3)
  step = hz.make_train_step(tx, lambda p, batch: loss(p))
  with pytest.raises(ValueError, match="needs an optimizer that contains a "
                     "zeroth-order estimator"):
    step(params_tree(), tx.init(params_tree()), None)


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.apply_if_finite(tx, 3),
    lambda tx: optax.MultiSteps(tx, 2)])
def test_make_train_step_with_an_outer_wrapper_says_what_to_do(wrap):
  tx = wrap(hz.mezo(1e-3))
  step = hz.make_train_step(tx, lambda p, batch: loss(p), donate=False)
  with pytest.raises(ValueError, match="Put the wrapper downstream"):
    step(params_tree(), tx.init(params_tree()), None)


def nested():
  return {"enc": {"w": jnp.ones((2, 2)), "n": jnp.array(5, jnp.int32)},
          "head": {"w": jnp.full((2, 3), 0.5, jnp.float32), "b": jnp.ones(3)}}


def nested_loss(p):
  return jnp.sum(p["enc"]["w"] * p["head"]["w"][:, :2]) + jnp.sum(
      p["head"]["b"] ** 2)


def test_prefix_mask_equals_the_full_mask():
  params = nested()
  full = {"enc": {"w": False, "n": False}, "head": {"w": True, "b": True}}
  prefix = {"enc": False, "head": True}
  out = []
  for mask in (full, prefix, lambda p: prefix):
    tx = hz.hizoo(0.1, hessian_smooth=0.1, weight_decay=0.5, mask=mask)
    state = tx.init(params)
    assert isinstance(state[0].hessian[0]["enc"]["w"], optax.MaskedNode)
    updates, _ = tx.update(None, state, params, value_fn=nested_loss)
    out.append(updates)
  for other in out[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, out[0])
  np.testing.assert_array_equal(out[0]["enc"]["w"], 0)
  assert float(jnp.abs(out[0]["head"]["w"]).sum()) > 0


# Item 3: downstream state only for trainable leaves.


def test_masked_chain_keeps_no_adam_state_for_frozen_leaves():
  params = nested()
  mask = {"enc": False, "head": True}
  est = hz.scale_by_hizoo(1e-3, 0.1, mask=mask)
  tx = hz.masked_chain(est, optax.scale_by_adam(),
                       optax.scale_by_learning_rate(1e-2), mask=mask)
  history, step = run(tx, 3, params=params, value_fn=nested_loss)
  state = tx.init(params)
  adam = state[1].inner_state[0]
  assert jax.tree.leaves(adam.mu["enc"]) == []
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(params["head"]))
  adam_bytes = sum(x.nbytes for x in jax.tree.leaves((adam.mu, adam.nu)))
  assert adam_bytes == 2 * trainable_bytes
  final_params, final_state = history[-1]
  assert final_params["enc"]["n"].dtype == jnp.int32
  np.testing.assert_array_equal(final_params["enc"]["w"], params["enc"]["w"])
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype),
               final_state, state)
  # Same trainable updates as the unmasked chain restricted to head.
  plain = optax.chain(est, optax.scale_by_adam(),
                      optax.scale_by_learning_rate(1e-2))
  with jax.numpy_dtype_promotion("standard"):
    plain_history, _ = run(plain, 3, params=params, value_fn=nested_loss)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               final_params["head"], plain_history[-1][0]["head"])


def test_masked_chain_checkpoint_restores_into_fresh_init(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  params = nested()
  mask = {"enc": False, "head": True}
  tx = hz.masked_chain(hz.scale_by_mezo(1e-3, mask=mask),
                       optax.scale_by_adam(), optax.scale(-1e-2), mask=mask)
  history, _ = run(tx, 2, params=params, value_fn=nested_loss)
  params2, state2 = history[-1]
  hz.save_checkpoint(tmp_path, 2, params2, state2)
  _, _, restored = hz.restore_checkpoint(tmp_path, params, tx.init(params))
  jax.tree.map(np.testing.assert_array_equal, restored, state2)


def test_masked_chain_checks_the_estimator():
  mask = {"w": True, "b": False}
  with pytest.raises(ValueError, match="perturbs \\['b'\\].*same mask"):
    hz.masked_chain(hz.scale_by_mezo(1e-3), optax.adam(1e-2),
                    mask=mask).init(params_tree())
  with pytest.raises(ValueError, match="does not perturb \\['w'\\]"):
    hz.masked_chain(hz.scale_by_mezo(1e-3, mask={"w": False, "b": True}),
                    mask=True).init(params_tree())
  with pytest.raises(ValueError, match="zeroth-order estimator"):
    hz.masked_chain(optax.adam(1e-2), mask=mask).init(params_tree())
  with pytest.raises(ValueError, match="needs a mask"):
    hz.masked_chain(hz.scale_by_mezo(1e-3), mask=None)


# Flax containers with the wrappers above.


def test_nnx_optimizer_with_masked_chain_and_injected_hyperparams():
  nnx = pytest.importorskip("flax.nnx")
  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  y = jnp.ones((4, 1))

  def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  mask = {"bias": False, "kernel": True}  # a plain dict against nnx.State
  for tx in (hz.masked_chain(hz.scale_by_mezo(1e-3, mask=mask),
                             optax.scale_by_adam(), optax.scale(-0.05),
                             mask=mask),
             optax.inject_hyperparams(hz.hizoo)(
                 learning_rate=0.05, hessian_smooth=0.1, mask=mask)):
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    bias, kernel = np.asarray(model.bias[...]), np.asarray(model.kernel[...])
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      return hz.nnx_zo_step(optimizer, model, mse, x, y).loss

    for _ in range(2):
      step(model, optimizer)
    np.testing.assert_array_equal(model.bias[...], bias)
    assert not np.allclose(model.kernel[...], kernel)
    assert int(optimizer.step[...]) == 2


def test_linen_train_state_with_masked_chain_and_an_int_leaf():
  pytest.importorskip("flax")
  from flax.training.train_state import TrainState
  params = nested()
  mask = {"enc": False, "head": True}
  tx = hz.masked_chain(hz.scale_by_hizoo(1e-3, 0.1, mask=mask),
                       optax.scale_by_adam(), optax.scale(-0.05), mask=mask)
  state = TrainState.create(apply_fn=None, params=params, tx=tx)
  step = jax.jit(hz.linen_zo_step, static_argnums=1)
  for _ in range(2):  # TrainState's int step 0 becomes an array: 2 compiles
    state, _ = step(state, nested_loss)
  compiled = step._cache_size()
  state, zo = step(state, nested_loss)
  assert step._cache_size() == compiled  # the state keeps its dtypes
  assert state.params["enc"]["n"].dtype == jnp.int32
  assert int(zo.count) == 3 and int(state.step) == 3
