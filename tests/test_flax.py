"""Flax integrations: NNX Optimizer, Linen TrainState, HF Flax bf16 params."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax import flax_utils

nnx = pytest.importorskip("flax.nnx")


def _regression(n=64):
  x = jax.random.normal(jax.random.key(1), (n, 3))
  y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
  return x, y


def _mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("tx", [
    hz.hizoo(0.05, mu=1e-3, hessian_smooth=1e-2),
    hz.hizoo_l(0.05, mu=1e-3, hessian_smooth=1e-2),
    hz.mezo(0.05, mu=1e-3),
])
def test_nnx_optimizer_converges_on_regression(tx):
  x, y = _regression()
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    return flax_utils.nnx_zo_step(optimizer, model, _mse, x, y).loss

  start = float(_mse(model, x, y))
  losses = [float(step(model, optimizer, x, y)) for _ in range(250)]
  assert int(optimizer.step[...]) == 250
  assert np.isfinite(losses).all()
  assert float(_mse(model, x, y)) < 1e-2 * start
  np.testing.assert_allclose(model.kernel[...].ravel(), [1.0, -2.0, 0.5],
                             atol=0.1)


def test_nnx_step_leaves_other_variables_alone():
  """Only the ``wrt`` variables move; the rest of the model is untouched."""

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.body = nnx.Linear(3, 1, rngs=rngs)
      self.offset = nnx.Variable(jnp.full((1,), 0.3))

    def __call__(self, x):
      return self.body(x) + self.offset[...]

  x, y = _regression()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, hz.hizoo(0.05, hessian_smooth=1e-2),
                            wrt=nnx.Param)
  before = np.asarray(model.body.kernel[...]).copy()
  zo = flax_utils.nnx_zo_step(optimizer, model, _mse, x, y)
  assert isinstance(zo, hz.ZOState)
  assert not np.allclose(before, model.body.kernel[...])
  np.testing.assert_array_equal(model.offset[...], jnp.full((1,), 0.3))


class _NoisyNet(nnx.Module):
  """Linear -> BatchNorm (train mode) -> ReLU -> Dropout(0.5) -> Linear."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))


def _noisy_data():
  x = jax.random.normal(jax.random.key(1), (32, 4))
  return x, jnp.sum(x, 1, keepdims=True)


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_step_evaluates_with_one_state_and_keeps_updates_once(jit):
  """Dropout masks and batch statistics are those of the model before the
  step in every evaluation; the loss's updates are kept once, at theta."""
  x, y = _noisy_data()
  model = _NoisyNet(nnx.Rngs(0))
  mu = 1e-2
  optimizer = nnx.Optimizer(model, hz.mezo(1e-3, mu=mu), wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  z = hz.step_noise(nnx.as_pure(optimizer.opt_state), params)

  def loss_at(p):  # a fresh copy with the state before the step
    copy = nnx.merge(graphdef, p, rest)
    return float(_mse(copy, x, y)), copy

  plus, _ = loss_at(jax.tree.map(lambda a, b: a + mu * b, params, z))
  minus, _ = loss_at(jax.tree.map(lambda a, b: a - mu * b, params, z))
  _, at_theta = loss_at(params)
  step = flax_utils.nnx_zo_step
  if jit:
    step = nnx.jit(lambda o, m, x, y: flax_utils.nnx_zo_step(o, m, _mse, x, y))
    zo = step(optimizer, model, x, y)
  else:
    zo = step(optimizer, model, _mse, x, y)
  # One dropout mask, one set of statistics: the MeZO difference quotient
  # of one function (different masks gave 1e2-1e4 times the true value).
  np.testing.assert_allclose(float(zo.projected_grad), (plus - minus) / (2 * mu),
                             rtol=2e-3)
  # BatchNorm statistics and the RNG count moved once, as at theta.
  np.testing.assert_allclose(model.bn.mean[...], at_theta.bn.mean[...],
                             rtol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], at_theta.bn.var[...],
                             rtol=1e-6)
  counts = jax.tree.leaves(nnx.state(model, nnx.RngCount))
  assert [int(c) for c in counts] == [
      int(c) for c in jax.tree.leaves(nnx.state(at_theta, nnx.RngCount))]
  assert [int(c) for c in counts] == [1]


def test_nnx_dropout_projected_grad_is_of_the_deterministic_order():
  x, y = _noisy_data()
  grads = {}
  for deterministic in (False, True):
    model = _NoisyNet(nnx.Rngs(0))
    model.drop.deterministic = deterministic
    optimizer = nnx.Optimizer(model, hz.hizoo(1e-3, mu=1e-3), wrt=nnx.Param)
    grads[deterministic] = [
        float(flax_utils.nnx_zo_step(optimizer, model, _mse, x, y)
              .projected_grad) for _ in range(3)]
  ratio = np.abs(grads[False]) / np.abs(grads[True])
  assert np.all(ratio < 10), grads


def test_linen_step_evaluates_with_one_dropout_key():
  """Linen losses are pure: a dropout key passed in draws the same mask in
  every evaluation of the step."""
  nn = pytest.importorskip("flax.linen")
  from flax.training.train_state import TrainState

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
      return nn.Dense(1)(x)

  x, y = _noisy_data()
  net = Net()
  mu = 1e-2
  state = TrainState.create(
      apply_fn=net.apply, params=net.init(jax.random.key(0), x, False),
      tx=hz.mezo(1e-3, mu=mu))

  def loss(params, x, y, key):
    out = net.apply(params, x, True, rngs={"dropout": key})
    return jnp.mean((out - y) ** 2)

  key = jax.random.fold_in(jax.random.key(5), 0)  # fold in the step
  z = hz.step_noise(state.opt_state, state.params)
  plus = loss(jax.tree.map(lambda a, b: a + mu * b, state.params, z), x, y, key)
  minus = loss(jax.tree.map(lambda a, b: a - mu * b, state.params, z), x, y,
               key)
  _, zo = jax.jit(flax_utils.linen_zo_step, static_argnums=1)(
      state, loss, x, y, key)
  np.testing.assert_allclose(float(zo.projected_grad),
                             float(plus - minus) / (2 * mu), rtol=2e-3)


def test_linen_train_state_converges():
  nn = pytest.importorskip("flax.linen")
  from flax.training.train_state import TrainState
  x, y = _regression()
  net = nn.Dense(1)
  state = TrainState.create(apply_fn=net.apply,
                            params=net.init(jax.random.key(0), x),
                            tx=hz.hizoo(0.05, hessian_smooth=1e-2))

  def loss(params, x, y):
    return jnp.mean((net.apply(params, x) - y) ** 2)

  step = jax.jit(flax_utils.linen_zo_step, static_argnums=1)
  start = float(loss(state.params, x, y))
  for _ in range(250):
    state, zo = step(state, loss, x, y)
  assert int(state.step) == 250 and int(zo.count) == 250
  assert float(loss(state.params, x, y)) < 1e-2 * start


def test_hf_flax_bert_trains_in_bf16():
  """HF Flax params cast to bf16 train with hz.hizoo; H stays float32."""
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxBertModel"):
    pytest.skip(f"transformers {transformers.__version__} has no Flax classes "
                "(removed in 5.0; the hf extra pins >=4.57,<5)")
  transformers.logging.set_verbosity_error()
  config = transformers.BertConfig(
      vocab_size=50, hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=32,
      max_position_embeddings=16)
  model = transformers.FlaxBertModel(config, _do_init=False)
  init = jax.jit(model.init_weights, static_argnums=1)  # one compilation
  params = flax_utils.cast_floating(init(jax.random.key(0), (1, 6)),
                                    jnp.bfloat16)
  ids = jax.random.randint(jax.random.key(0), (8, 6), 1, 50)
  target = jnp.linspace(-1, 1, 8)

  def loss(p):
    hidden = model(ids, params=p, train=False).last_hidden_state
    pred = hidden[:, 0].astype(jnp.float32) @ jnp.linspace(-1, 1, 16) / 4
    return jnp.mean((pred - target) ** 2)

  # Train the value projection only: every trained leaf is one more noise
  # stream to compile, and the test should stay fast.
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: "value" in jax.tree_util.keystr(path), params)
  tx = hz.hizoo(2e-2, mu=1e-2, hessian_smooth=1e-2, mask=mask)
  state = tx.init(params)
  frozen_before = params["embeddings"]["word_embeddings"]["embedding"]

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  start = float(loss(params))
  for _ in range(40):
    params, state = step(params, state)
  hess = jax.tree.leaves(hz.find_state(state).hessian)
  assert hess and all(h.dtype == jnp.float32 for h in hess)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  assert int(hz.find_state(state).skipped) == 0
  np.testing.assert_array_equal(
      params["embeddings"]["word_embeddings"]["embedding"], frozen_before)
  assert float(loss(params)) < start


def test_docstring_examples():
  result = doctest.testmod(flax_utils, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
