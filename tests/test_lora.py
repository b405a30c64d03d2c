"""LoRA as a parameter transformation (hizoo_jax.lora)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax import lora


def _base():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "attn": {"query": {"kernel": jax.random.normal(k[0], (6, 4)),
                         "bias": jnp.zeros(4)},
               "value": {"kernel": jax.random.normal(k[1], (6, 2, 2))},
               "out": {"kernel": jax.random.normal(k[2], (4, 6))}},
      "steps": jnp.zeros((), jnp.int32),
  }


def test_init_selects_targets_and_is_identity_at_start():
  base = _base()
  adapters = lora.lora_init(jax.random.key(1), base, rank=2)
  assert sorted(adapters) == ["attn/query/kernel", "attn/value/kernel"]
  assert adapters["attn/query/kernel"]["a"].shape == (6, 2)
  assert adapters["attn/query/kernel"]["b"].shape == (2, 4)
  assert adapters["attn/value/kernel"]["b"].shape == (2, 4)  # (6, 2*2)
  merged = lora.lora_merge(base, adapters, scale=3.0)
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(x, y)


def test_nnx_and_tunix_names_match():
  """NNX state paths end in ``value``; tunix names its kernels ``w``."""
  nnx = pytest.importorskip("flax.nnx")

  class Attn(nnx.Module):

    def __init__(self, rngs):
      self.q_proj = nnx.Linear(6, 4, rngs=rngs)  # .../q_proj/kernel/value
      self.v_proj = nnx.Module()
      self.v_proj.w = nnx.Param(jnp.ones((6, 2, 2)))  # tunix-style
      self.o_proj = nnx.Linear(4, 6, rngs=rngs)

  model = Attn(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  adapters = lora.lora_init(jax.random.key(1), params, rank=2,
                            targets=("q_proj", "v_proj"))
  assert sorted(adapters) == ["q_proj/kernel/value", "v_proj/w/value"]
  assert adapters["v_proj/w/value"]["b"].shape == (2, 4)
  # A trained adapter changes exactly its kernel inside the nnx.State.
  adapters["v_proj/w/value"]["b"] = jnp.ones((2, 4))
  merged = lora.lora_merge(params, adapters, scale=1.0)
  graphdef, _ = nnx.split(model, nnx.Param)
  merged_model = nnx.merge(graphdef, merged)
  a = adapters["v_proj/w/value"]["a"]
  np.testing.assert_allclose(merged_model.v_proj.w[...],
                             1.0 + (a @ jnp.ones((2, 4))).reshape(6, 2, 2),
                             rtol=1e-6)
  np.testing.assert_array_equal(merged_model.o_proj.kernel[...],
                                model.o_proj.kernel[...])
  weight = {"layer": {"q_proj": {"weight": jnp.ones((3, 3))}}}
  assert list(lora.lora_init(jax.random.key(0), weight, targets=("q_proj",))
              ) == ["layer/q_proj/weight"]


def test_merge_adds_scaled_low_rank_product():
  base = _base()
  adapters = lora.lora_init(jax.random.key(1), base, rank=2,
                            targets=lambda name, x: name.startswith("attn/o"))
  assert list(adapters) == ["attn/out/kernel"]
  a = jnp.arange(8.0).reshape(4, 2)
  b = jnp.ones((2, 6))
  merged = lora.lora_merge(base, {"attn/out/kernel": {"a": a, "b": b}},
                           scale=0.5)
  np.testing.assert_allclose(merged["attn"]["out"]["kernel"],
                             base["attn"]["out"]["kernel"] + 0.5 * a @ b,
                             rtol=1e-6)
  np.testing.assert_array_equal(merged["attn"]["query"]["kernel"],
                                base["attn"]["query"]["kernel"])


def test_bf16_kernels_keep_their_dtype():
  base = jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                      if x.dtype == jnp.float32 else x, _base())
  adapters = lora.lora_init(jax.random.key(1), base, rank=2)
  assert adapters["attn/query/kernel"]["a"].dtype == jnp.float32
  merged = lora.lora_merge(base, adapters)
  assert merged["attn"]["query"]["kernel"].dtype == jnp.bfloat16


def test_bad_inputs_give_clear_errors():
  base = _base()
  with pytest.raises(ValueError, match="rank"):
    lora.lora_init(jax.random.key(0), base, rank=0)
  with pytest.raises(ValueError, match="no kernel matches"):
    lora.lora_init(jax.random.key(0), base, targets=("missing",))
  with pytest.raises(ValueError, match="not in params"):
    lora.lora_merge(base, {"nope/kernel": {"a": jnp.ones((1, 1)),
                                           "b": jnp.ones((1, 1))}})
  with pytest.raises(ValueError, match="do not fit"):
    lora.lora_merge(base, {"attn/query/kernel": {"a": jnp.ones((5, 1)),
                                                 "b": jnp.ones((1, 4))}})


@pytest.mark.parametrize("make", [
    lambda: hz.hizoo(0.02, mu=1e-3, key=3),
    lambda: hz.mezo(0.01, mu=1e-3, key=3),
])
def test_zo_trains_only_the_adapters(make):
  """A rank-2 target offset is learned through A and B alone."""
  base = {"dense": {"kernel": jnp.zeros((6, 5))}}
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  target = jax.random.normal(k1, (6, 2)) @ jax.random.normal(k2, (2, 5)) / 2
  x = jax.random.normal(k3, (64, 6))
  y = x @ target

  def loss(adapters):
    w = lora.lora_merge(base, adapters, scale=1.0)["dense"]["kernel"]
    return jnp.mean((x @ w - y) ** 2)

  adapters = lora.lora_init(jax.random.key(0), base, rank=2,
                            targets=("dense",))
  tx = make()
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state):
    updates, state = tx.update(None, state, adapters, value_fn=loss)
    return optax.apply_updates(adapters, updates), state

  start = float(loss(adapters))
  for _ in range(600):
    adapters, state = step(adapters, state)
  assert float(loss(adapters)) < 0.2 * start
  assert lora.num_params(adapters) == 6 * 2 + 2 * 5


def test_docstring_examples():
  result = doctest.testmod(lora, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
