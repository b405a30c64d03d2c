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
