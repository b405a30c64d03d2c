"""tunix NNX LLMs (a tiny random Qwen3) fine-tuned with the estimators.

Flows of docs/finetuning.md: ``nnx.Optimizer`` + :func:`hz.nnx_zo_step`,
:func:`hz.make_train_step` on ``nnx.split`` state, qwix LoRA with
``wrt=nnx.LoRAParam``, tunix's ``PeftTrainer`` through
:mod:`hizoo_jax.tunix_trainer`; on one device and on an Auto ``fsdp x tp``
mesh of the 8 simulated CPU devices (conftest.py). Skipped without tunix
(the extra ``tunix``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("tunix", reason="needs google-tunix (extra: tunix)")
qwix = pytest.importorskip("qwix", reason="needs qwix (extra: tunix)")
from flax import nnx  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType, NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
from tunix.models.qwen3 import model as qwen3  # pylint: disable=g-import-not-at-top
from tunix.sft import peft_trainer  # pylint: disable=g-import-not-at-top
from tunix.sft import utils as sft_utils  # pylint: disable=g-import-not-at-top

import hizoo_jax as hz  # pylint: disable=g-import-not-at-top

CONFIG = dict(num_layers=1, vocab_size=64, embed_dim=32, hidden_dim=64,
              num_heads=2, head_dim=16, num_kv_heads=2, rope_theta=10_000,
              norm_eps=1e-6)
STEPS = 12


def _estimators():
  return {
      "mezo": hz.mezo(3e-3, mu=1e-3),
      # Per element on the mesh, so that H's sharding has something to show.
      "hizoo": hz.hizoo(3e-3, mu=1e-3, curvature="element"),
      "hizoo_l": hz.hizoo_l(3e-3, mu=1e-3, min_dim_size_to_factor=16),
  }


def _batch():
  tokens = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
  return jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.bool_)


def loss_fn(model, tokens, mask):
  """Next-token cross-entropy of a tunix decoder."""
  logits, _ = model(tokens, sft_utils.build_positions_from_mask(mask), None,
                    sft_utils.make_causal_attn_mask(mask))
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def _model(mesh=None):
  """The tiny Qwen3; on a mesh, each Param placed by its out_sharding."""
  config = qwen3.ModelConfig(**CONFIG)
  if mesh is None:
    return qwen3.Qwen3(config, rngs=nnx.Rngs(0))

  @nnx.jit
  def create():
    model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(
        state, nnx.get_partition_spec(state)))
    return model

  return create()


def _auto_mesh():
  # tunix's models cannot run on jax.make_mesh's default Explicit axes.
  return jax.make_mesh((2, 4), ("fsdp", "tp"),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def _spec(x, ndim):
  spec = tuple(x.sharding.spec) + (None,) * (ndim - len(x.sharding.spec))
  return spec[:ndim]


def _assert_state_follows_params(opt_state, params):
  """Every factor of H is sharded like its parameter on the axes it keeps."""
  zo = hz.find_state(opt_state)
  if zo.hessian is None:
    return
  leaves = jax.tree.leaves(params)
  checked = 0
  for tree in zo.hessian:
    for h, x in zip(jax.tree.leaves(tree), leaves):
      want = tuple(s if f == n else None
                   for s, f, n in zip(_spec(x, x.ndim), h.shape, x.shape))
      assert _spec(h, h.ndim) == want, (h.shape, x.shape)
      checked += any(s is not None for s in want)
  assert checked, "no factor is sharded: the test shows nothing"


def _run_optimizer(name, mesh=None):
  model = _model(mesh)
  tokens, mask = _batch()
  if mesh is not None:
    tokens, mask = jax.device_put((tokens, mask), NamedSharding(mesh, P("fsdp")))
  optimizer = nnx.Optimizer(model, _estimators()[name], wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens, mask):
    return hz.nnx_zo_step(optimizer, model, loss_fn, tokens, mask).loss

  before = float(loss_fn(model, tokens, mask))
  for _ in range(STEPS):
    step(model, optimizer, tokens, mask)
  after = float(loss_fn(model, tokens, mask))
  return before, after, optimizer, model


def _run_train_step(name, mesh=None):
  model = _model(mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = _estimators()[name]
  batch = _batch()
  if mesh is None:
    state = tx.init(params)
  else:
    batch = jax.device_put(batch, NamedSharding(mesh, P("fsdp")))
    state = hz.init_sharded(
        tx, params, jax.tree.map(lambda x: x.sharding, params))

  def pure_loss(params, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), *batch)

  step = hz.make_train_step(tx, pure_loss)
  before = float(pure_loss(params, batch))
  for _ in range(STEPS):
    params, state, _ = step(params, state, batch)
  return before, float(pure_loss(params, batch)), state, params


@pytest.mark.parametrize("name", ["mezo", "hizoo", "hizoo_l"])
@pytest.mark.parametrize("flow", ["nnx_optimizer", "make_train_step"])
def test_qwen3_one_device(flow, name):
  run = _run_optimizer if flow == "nnx_optimizer" else _run_train_step
  before, after, _, _ = run(name)
  assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("name", ["mezo", "hizoo", "hizoo_l"])
@pytest.mark.parametrize("flow", ["nnx_optimizer", "make_train_step"])
def test_qwen3_on_an_auto_fsdp_tp_mesh(flow, name):
  mesh = _auto_mesh()
  with jax.set_mesh(mesh):
    if flow == "nnx_optimizer":
      before, after, optimizer, model = _run_optimizer(name, mesh)
      state = optimizer.opt_state
      params = nnx.state(model, nnx.Param)
    else:
      before, after, state, params = _run_train_step(name, mesh)
  assert after < before - 0.05, (before, after)
  assert any(_spec(x, x.ndim) != (None,) * x.ndim
             for x in jax.tree.leaves(params)), "params not sharded"
  _assert_state_follows_params(state, params)


def test_qwix_lora_trains_only_the_adapters():
  model = _model()
  tokens, mask = _batch()
  provider = qwix.LoraProvider(
      module_path=".*q_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj",
      rank=4, alpha=8.0)
  model = qwix.apply_lora_to_model(
      model, provider, tokens, sft_utils.build_positions_from_mask(mask),
      None, sft_utils.make_causal_attn_mask(mask), rngs=nnx.Rngs(1))
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  frozen = jax.tree.map(np.asarray, nnx.state(model, base))
  adapters = nnx.state(model, nnx.LoRAParam)
  assert len(jax.tree.leaves(adapters)) == 10
  optimizer = nnx.Optimizer(model, hz.hizoo(1e-2, mu=1e-3),
                            wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    return hz.nnx_zo_step(optimizer, model, loss_fn, tokens, mask).loss

  before = float(loss_fn(model, tokens, mask))
  for _ in range(STEPS):
    step(model, optimizer)
  assert float(loss_fn(model, tokens, mask)) < before - 0.05
  for a, b in zip(jax.tree.leaves(frozen),
                  jax.tree.leaves(nnx.state(model, base))):
    np.testing.assert_array_equal(a, np.asarray(b))
  # H covers the adapters only.
  zo = hz.find_state(optimizer.opt_state)
  assert len(jax.tree.leaves(zo.hessian)) == 10


def _gen_inputs(x):
  return {"input_tokens": x["input_tokens"], "input_mask": x["input_mask"],
          "positions": sft_utils.build_positions_from_mask(x["input_mask"]),
          "attention_mask": sft_utils.make_causal_attn_mask(x["input_mask"])}


def test_peft_trainer_adapter_lowers_the_loss():
  from hizoo_jax.tunix_trainer import ZOPeftTrainer  # pylint: disable=g-import-not-at-top
  model = _model()
  tokens, mask = _batch()
  data = [{"input_tokens": np.asarray(tokens), "input_mask": np.asarray(mask)}
          ] * STEPS
  config = peft_trainer.TrainingConfig(eval_every_n_steps=1000,
                                       max_steps=STEPS)
  loss = lambda m, input_tokens, input_mask, positions, attention_mask: (
      loss_fn(m, input_tokens, input_mask))
  trainer = ZOPeftTrainer(model, hz.hizoo_l(3e-3, mu=1e-3), config)
  trainer.with_gen_model_input_fn(_gen_inputs).with_loss_fn(loss)
  before = float(loss_fn(model, tokens, mask))
  trainer.train(data)
  assert trainer.train_steps == STEPS
  assert int(hz.find_state(trainer.optimizer.opt_state).count) == STEPS
  assert float(loss_fn(model, tokens, mask)) < before - 0.05


def test_peft_trainer_adapter_rejects_what_it_cannot_do():
  from hizoo_jax.tunix_trainer import ZOPeftTrainer  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="estimators need the loss"):
    # Plain PeftTrainer: the step passes gradients, not the loss.
    trainer = peft_trainer.PeftTrainer(
        _model(), hz.mezo(1e-3),
        peft_trainer.TrainingConfig(eval_every_n_steps=10, max_steps=1))
    tokens, mask = _batch()
    trainer.with_gen_model_input_fn(_gen_inputs).train(
        [{"input_tokens": np.asarray(tokens), "input_mask": np.asarray(mask)}])
  trainer = ZOPeftTrainer(
      _model(), hz.mezo(1e-3),
      peft_trainer.TrainingConfig(eval_every_n_steps=10, max_steps=1))
  with pytest.raises(ValueError, match="has_aux=False"):
    trainer.with_loss_fn(loss_fn, has_aux=True)
  with pytest.raises(ValueError, match="MultiSteps"):
    ZOPeftTrainer(_model(), hz.mezo(1e-3), peft_trainer.TrainingConfig(
        eval_every_n_steps=10, max_steps=1, gradient_accumulation_steps=2))
