"""make_train_step against the plain ``tx.update`` + ``apply_updates`` path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax import _xla
from hizoo_jax.train_step import make_train_step

MU = 0.05  # Large enough that the in-place round trip is well conditioned.


def make_params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
      "w1": jnp.asarray(rng.normal(size=(8, 16)) / 3, dtype),
      "b1": jnp.asarray(rng.normal(size=(16,)) / 3, dtype),
      "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, dtype),
  }


def make_batch(bad=False):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 8)).astype(np.float32)
  y = rng.normal(size=(32, 4)).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y),
          "bad": jnp.asarray(bad)}


def loss_fn(params, batch):
  p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
  loss = jnp.mean((h @ p["w2"] - batch["y"]) ** 2)
  return jnp.where(batch["bad"], jnp.nan, loss)


def copy_tree(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def plain_step(tx):
  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(
        None, state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), state
  return step


OPTIMIZERS = {
    "hizoo": lambda: hz.hizoo(0.05, mu=MU, hessian_smooth=0.5, key=3),
    "hizoo_l": lambda: hz.hizoo_l(0.05, mu=MU, hessian_smooth=0.5,
                                  min_dim_size_to_factor=4, key=3),
    "hizoo_every2": lambda: hz.hizoo(0.05, mu=MU, hessian_smooth=0.5,
                                     curvature_every=2, key=3),
    "hizoo_q2_masked": lambda: hz.hizoo(
        0.05, mu=MU, hessian_smooth=0.5, num_queries=2, key=3,
        estimator="reference", mask={"w1": True, "b1": False, "w2": True}),
    "mezo": lambda: hz.mezo(0.05, mu=MU, weight_decay=0.1, key=3),
    "mezo_q3": lambda: hz.mezo(0.05, mu=MU, num_queries=3, key=3),
    "mezo_adam": lambda: optax.chain(hz.scale_by_mezo(MU, key=3),
                                     optax.adam(0.01)),
}


def assert_trees_close(actual, expected, atol, rtol=0.0):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(e, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name, store_noise, one_device", [
    ("hizoo", False, False), ("hizoo", True, False), ("hizoo_l", False, False),
    ("hizoo_every2", False, False), ("hizoo_q2_masked", False, False),
    ("hizoo", False, True), ("hizoo_q2_masked", False, True),
    ("hizoo_l", False, True),
    ("mezo", False, False), ("mezo_q3", True, False),
    ("mezo_adam", False, False)])
def test_matches_plain_update(name, store_noise, one_device, monkeypatch):
  if one_device:  # HiZOO's sums of z^2 in one loop (hizoo_jax.range_sums)
    monkeypatch.setattr(_xla, "single_device", lambda: True)
  tx = OPTIMIZERS[name]()
  params = make_params()
  state = tx.init(params)
  plain = plain_step(tx)
  lean = make_train_step(tx, loss_fn, store_noise=store_noise)
  p_ref, s_ref = copy_tree(params), copy_tree(state)
  p_new, s_new = params, state
  # The second step's loss is NaN: both paths skip it (weight decay and
  # Adam's momentum still apply, as in the plain path).
  for bad in (False, True, False, False, False):
    batch = make_batch(bad)
    p_ref, s_ref = plain(p_ref, s_ref, batch)
    p_new, s_new, metrics = lean(p_new, s_new, batch)
  # The only difference is the rounding of the +mu, -2 mu, +mu round trip
  # (about one float32 ulp of theta per move), carried through the steps.
  assert_trees_close(p_new, p_ref, atol=2e-5)
  zo, zo_ref = hz.find_state(s_new), hz.find_state(s_ref)
  assert_trees_close(zo.hessian, zo_ref.hessian, atol=1e-6, rtol=1e-4)
  # q = D / (2 mu^2) and its residual carry the round trip's rounding too.
  assert_trees_close(zo.curvature_stats, zo_ref.curvature_stats, atol=1e-6,
                     rtol=2e-3)
  assert_trees_close(optax.tree.set(s_new, curvature_stats=None),
                     optax.tree.set(s_ref, curvature_stats=None),
                     atol=1e-4, rtol=1e-4)
  assert float(metrics["loss"]) == float(zo.loss)
  assert float(metrics["loss_plus"]) == float(zo.loss_plus)
  assert float(metrics["projected_grad"]) == float(zo.projected_grad)
  assert int(metrics["skipped"]) == int(zo.skipped) == 1
  assert int(zo.count) == 5
  for leaf in jax.tree.leaves(zo.hessian):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_losses_donation_cache_and_profiler(tmp_path):
  tx = OPTIMIZERS["hizoo"]()
  params, batch = make_params(), make_batch()
  state = tx.init(params)
  z = hz.step_noise(state, params)
  hess, = hz.find_state(state).hessian  # one factor per tensor
  expected = [
      loss_fn(jax.tree.map(lambda p, z, h: p + c * MU * z / jnp.sqrt(h),
                           params, z, hess), batch)
      for c in (0.0, 1.0, -1.0)]
  step = make_train_step(tx, loss_fn)
  with jax.profiler.trace(str(tmp_path)):
    new_params, state, metrics = step(params, state, batch)
    jax.block_until_ready(new_params)
  got = [metrics["loss"], metrics["loss_plus"], metrics["loss_minus"]]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["projected_grad"], (got[1] - got[2]) / (2 * MU), rtol=1e-3)
  assert all(x.is_deleted() for x in jax.tree.leaves(params))  # Donated.
  step(new_params, state, batch)
  assert step._cache_size() == 1  # No recompilation on step 2.


def test_bfloat16_params_without_donation():
  tx = hz.mezo(0.05, mu=MU, key=3)
  params = make_params(jnp.bfloat16)
  state = tx.init(params)
  p_ref, _ = plain_step(tx)(params, state, make_batch())
  step = make_train_step(tx, loss_fn, donate=False)
  p_new, _, _ = step(params, state, make_batch())
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  for a, e in zip(jax.tree.leaves(p_new), jax.tree.leaves(p_ref)):
    assert a.dtype == jnp.bfloat16
    # bf16 has 8 significant bits: the in-place round trip may move theta by
    # a few ulps, as in the PyTorch original.
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), rtol=0, atol=0.03)


def _temp_bytes(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


ONE_LEAF = 256 * 256 * 4  # Bytes of one leaf of the MLP below.
MLP_PARAMS = {f"w{i}": jnp.full((256, 256), 0.01, jnp.float32)
              for i in range(4)}
MLP_INPUT = jnp.ones((16, 256), jnp.float32)


def mlp_loss(p, x):
  for i in range(4):
    x = jnp.tanh(x @ p[f"w{i}"])
  return jnp.mean(x**2)


@pytest.mark.parametrize("name", ["mezo", "hizoo", "hizoo_l", "fzoo"])
def test_lean_step_uses_less_memory_than_naive(name, monkeypatch):
  """A structural check of the compiled programs, not a timing."""
  # The suite runs on 8 simulated devices; HiZOO-L's reduction that computes
  # its operand as it goes is XLA:CPU's single-device path (fused_mean).
  monkeypatch.setattr(_xla, "single_device", lambda: True)
  params, x = MLP_PARAMS, MLP_INPUT
  tx = {"mezo": hz.mezo, "hizoo": hz.hizoo, "hizoo_l": hz.hizoo_l,
        "fzoo": lambda lr: hz.fzoo(lr, num_probes=4)}[name](1e-3)
  state = tx.init(params)

  def naive(p, s, x):
    updates, s = tx.update(None, s, p, value_fn=lambda q: mlp_loss(q, x))
    return optax.apply_updates(p, updates), s

  naive_temp = _temp_bytes(jax.jit(naive, donate_argnums=(0, 1)),
                           params, state, x)
  lean_temp = _temp_bytes(make_train_step(tx, mlp_loss), params, state, x)
  assert lean_temp < naive_temp
  assert lean_temp < ONE_LEAF  # No parameter-sized temporary at all.


@pytest.mark.parametrize("estimator", ["mezo", "hizoo"])
@pytest.mark.parametrize("after", ["adam", "momentum"])
def test_chain_holds_only_its_own_state(estimator, after, monkeypatch):
  """A stateful transformation after the estimator reads the update twice
  (Adam's two moments); XLA must recompute z and H^{-1/2} in each reader
  rather than store them (hizoo_jax.fusible)."""
  # One device: the reductions of the curvature rule take XLA:CPU's
  # single-device form (hizoo_jax._xla), as in a one-device process.
  monkeypatch.setattr(_xla, "single_device", lambda: True)
  head = (hz.scale_by_mezo(MU) if estimator == "mezo"
          else hz.scale_by_hizoo(MU))
  tail = (optax.adam(1e-3) if after == "adam"
          else optax.sgd(1e-3, momentum=0.9))
  tx = optax.chain(head, tail)
  lean_temp = _temp_bytes(make_train_step(tx, mlp_loss), MLP_PARAMS,
                          tx.init(MLP_PARAMS), MLP_INPUT)
  assert lean_temp < ONE_LEAF  # No parameter-sized temporary at all.


def test_fused_mean_matches_mean(monkeypatch):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 300, 5)),
                  jnp.float32)
  for single in (True, False):
    monkeypatch.setattr(_xla, "_single_cpu_device", lambda: single)
    for axis in range(3):
      np.testing.assert_allclose(
          jax.jit(lambda a: _xla.fused_mean(a, axis))(x),
          np.mean(np.asarray(x, np.float64), axis=axis), rtol=1e-5,
          atol=1e-6)
    for axes in [(0,), (1, 2), (0, 2)]:
      np.testing.assert_allclose(
          jax.jit(lambda a: _xla.fused_sum(a, axes))(x),
          np.sum(np.asarray(x, np.float64), axis=axes, keepdims=True),
          rtol=1e-5, atol=1e-4)


def test_errors():
  params = make_params()
  step = make_train_step(optax.sgd(0.1), loss_fn)
  with pytest.raises(ValueError, match="zeroth-order estimator"):
    step(params, optax.sgd(0.1).init(params), make_batch())
  tx = hz.mezo(0.1)
  bad = make_train_step(tx, lambda p, b: p["w1"])
  with pytest.raises(ValueError, match="scalar"):
    bad(params, tx.init(params), make_batch())
  with pytest.raises(TypeError, match="callable"):
    make_train_step(tx, None)


def test_curvature_every_skips_the_center_evaluation():
  """With curvature_every=2 the lean step evaluates L(theta) every 2nd step
  only: 2 + 1 / 2 forward passes a step."""
  calls = []

  def counted_loss(p, x):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(p, x)

  tx = OPTIMIZERS["hizoo_every2"]()
  params = make_params()
  state = tx.init(params)
  step = make_train_step(tx, counted_loss)
  for _ in range(4):
    params, state, _ = step(params, state, make_batch())
  jax.effects_barrier()
  assert len(calls) == 4 * 2 + 2


@pytest.mark.parametrize("one_device", [True, False])
def test_loop_carries_the_curvature_as_one_vector(one_device, monkeypatch):
  """Perturbation.carry_state: H as one vector and back, losslessly; the
  estimator updates either form alike and returns the form it was given.
  On a mesh, factors sharded over its axes stay apart."""
  if one_device:
    monkeypatch.setattr(_xla, "single_device", lambda: True)
  params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(6, 4),
            "b": jnp.arange(4.0), "frozen": jnp.ones(3)}
  tx = hz.scale_by_hizoo(0.05, 0.5, factored=True, min_dim_size_to_factor=2,
                         mask={"w": True, "b": True, "frozen": False})
  value_fn = lambda p: jnp.sum(jnp.square(p["w"])) + jnp.sum(p["b"] ** 4)
  state = tx.init(params)
  for _ in range(3):  # H moves away from 1.
    _, state = jax.jit(lambda s: tx.update(None, s, params,
                                           value_fn=value_fn))(state)
  probe = hz.PerturbationProbe()
  tx.update(None, state, params, zo_probe=probe)
  to_carry = probe.perturbation.carry_state
  carried = to_carry(state, True)
  vectors = jax.tree.leaves(carried.hessian)
  if one_device:  # Four factors (w's rows and columns, b's two) in one.
    assert len(vectors) == 1 and vectors[0].shape == (6 + 4 + 1 + 1,)
  elif not _xla.single_device():  # w's rows and columns apart (not surely
    # replicated), b's joined.
    assert sorted(v.size for v in vectors) == [2, 4, 6], vectors
  jax.tree.map(np.testing.assert_array_equal, to_carry(carried, False),
               state)

  def update(s):
    return tx.update(None, s, params, value_fn=value_fn)
  want_updates, want = jax.jit(update)(state)
  got_updates, got = jax.jit(update)(carried)
  assert type(got.hessian) is type(carried.hessian)
  jax.tree.map(np.testing.assert_array_equal, got_updates, want_updates)
  jax.tree.map(np.testing.assert_array_equal, to_carry(got, False), want)
