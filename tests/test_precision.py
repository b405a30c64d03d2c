"""Issue 11 item 4: bf16/fp16 parameters keep learning, or a warning says why."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax import precision

W0 = 1.5 + 0.1 * np.sin(np.arange(32.0))  # bfloat16 spacing there: 2**-7
TARGET = W0 + 0.05 * np.cos(np.arange(32.0))


def loss(p):
  return jnp.sum((p["w"].astype(jnp.float32) - TARGET) ** 2)


def start(dtype=jnp.bfloat16):
  return {"w": jnp.asarray(W0, dtype), "n": jnp.arange(3)}


MASK = {"w": True, "n": False}


def train(tx, params, steps):
  @jax.jit
  def run(params):
    def body(_, carry):
      params, state = carry
      updates, state = tx.update(None, state, params, value_fn=loss)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
  return run(params)


@pytest.fixture(autouse=True)
def fresh_warnings():
  precision.reset_warnings()
  yield
  precision.reset_warnings()


def test_plain_bf16_does_not_learn_and_warns_once():
  tx = hz.mezo(2e-3, mask=MASK)
  with pytest.warns(RuntimeWarning, match="round away"):
    params, _ = train(tx, start(), 20)
    jax.effects_barrier()
  np.testing.assert_array_equal(params["w"], start()["w"])  # the failure
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once: no second warning
    train(tx, start(), 2)
    jax.effects_barrier()


def test_lean_step_reports_the_rounding_of_its_update_only(monkeypatch):
  """make_train_step computes a bf16 model's update once, after its loop
  (the points are computed afresh, hizoo_jax.scheme_walk.walk): one report
  a step, of that update. (mu above half the bf16 spacing, 2**-8: below
  it the exact points round back to theta and g = 0.)"""
  reports = []
  monkeypatch.setattr(precision, "_report_rounding",
                      lambda *args: reports.append([int(a) for a in args]))
  tx = hz.mezo(2e-3, mu=1e-2, mask=MASK)
  step = hz.make_train_step(tx, lambda p, batch: loss(p), donate=False)
  params, state = start(), tx.init(start())
  for _ in range(2):
    params, state, _ = step(params, state, None)
  jax.effects_barrier()
  final = [r[:2] for r in reports if r[2]]
  assert len(final) == 2 and len(reports) == 2
  assert all(lost == moved == 32 for lost, moved in final), reports


def test_float32_params_get_no_rounding_check():
  tx = hz.hizoo(2e-3, mask=MASK)
  params = start(jnp.float32)
  step = lambda p, s: tx.update(None, s, p, value_fn=loss)
  state = tx.init(params)
  assert "callback" not in str(jax.make_jaxpr(step)(params, state))
  assert "callback" in str(jax.make_jaxpr(step)(start(), tx.init(start())))


@pytest.mark.parametrize("make", [
    lambda: hz.mezo(2e-3, mask=MASK),
    lambda: hz.hizoo(1e-2, hessian_smooth=1e-2, mask=MASK),
])
def test_master_weights_follow_the_float32_run(make):
  """The master copy is the float32 run from the same (bf16) start."""
  f32_start = jax.tree.map(lambda x: x.astype(jnp.float32)
                           if x.dtype == jnp.bfloat16 else x, start())
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # master weights: nothing rounds away
    params, state = train(hz.master_weights(make()), start(), 40)
    jax.effects_barrier()
  reference, _ = train(make(), f32_start, 40)
  np.testing.assert_allclose(state.master["w"], reference["w"], rtol=1e-6)
  np.testing.assert_array_equal(
      params["w"], np.asarray(reference["w"]).astype(jnp.bfloat16))
  assert params["w"].dtype == jnp.bfloat16 and params["n"].dtype == jnp.int32
  assert not np.array_equal(params["w"], start()["w"])
  assert float(loss(state.master)) < float(loss(start()))


def test_round_stochastic_is_exact_on_average():
  x = np.asarray([1.5 + 1e-3, -1.5 - 3e-3, 0.1 + 1e-5, 2.0, 1e3 + 0.7],
                 np.float32)
  k = 4096
  u = (np.arange(k, dtype=np.float32) + 0.5) / k  # a uniform grid
  for dtype in (jnp.bfloat16, jnp.float16):
    out = precision.round_stochastic(
        jnp.asarray(np.repeat(x[:, None], k, 1)), dtype,
        jnp.asarray(np.tile(u, (len(x), 1))))
    assert out.dtype == dtype
    values = np.asarray(out, np.float64)
    assert all(len(np.unique(row)) <= 2 for row in values)  # two neighbours
    # The grid mean of a Bernoulli(p) choice is p to within 1/k, so the mean
    # is x to within one spacing (< 2**-6 |x|) over k.
    np.testing.assert_allclose(values.mean(1), x, rtol=2.0**-6 / k)


def test_stochastic_rounding_moves_bf16_weights():
  tx = hz.stochastic_rounding(hz.mezo(2e-3, mu=1e-2, mask=MASK))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the inner alias's check is silenced
    params, _ = train(tx, start(), 40)
    jax.effects_barrier()
  assert np.mean(np.asarray(params["w"]) != np.asarray(start()["w"])) > 0.5
  assert float(loss(params)) < float(loss(start()))


def test_a_bf16_loss_warns_and_flax_helpers_reduce_in_float32():
  nnx = pytest.importorskip("flax.nnx")
  x = jnp.linspace(-1.0, 1.0, 64).reshape(32, 2)
  y = jnp.sum(x, axis=1, keepdims=True) + 3.0

  def per_example(model, x, y):
    return (model(x) - y) ** 2  # (32, 1), float32

  def bf16_mean(model, x, y):
    return jnp.mean(per_example(model, x, y).astype(jnp.bfloat16))

  grads = []
  for loss_fn in (per_example, bf16_mean):
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, hz.mezo(1e-2, mu=1e-4), wrt=nnx.Param)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      zo = hz.nnx_zo_step(optimizer, model, loss_fn, x, y)
    grads.append(float(zo.projected_grad))
    warned = [w for w in caught if "float32" in str(w.message)]
    assert bool(warned) == (loss_fn is bf16_mean)
  assert grads[0] != 0.0 and grads[1] == 0.0


def test_rounding_check_stores_less_than_a_float32_copy(monkeypatch):
  """The alias's rounding check reads each bf16 update twice. Counted in one
  two-output reduction (XLA:CPU, one device) the step holds at most twice
  the bf16 parameters in temporaries (4.25x before: float32 copies of the
  updates), plus the one bf16 copy that each exact point is written to
  (hizoo_jax.scheme_walk.walk); docs/performance.md."""
  from hizoo_jax import _xla
  monkeypatch.setattr(_xla, "single_device", lambda: True)
  params = {f"l{i}": (jnp.eye(256) * 0.5).astype(jnp.bfloat16)
            for i in range(4)}
  size = 4 * 256 * 256 * 2

  def loss(p, x):
    for k in sorted(p):
      x = jnp.tanh(x @ p[k].astype(jnp.float32))
    return jnp.mean(x ** 2)

  tx = hz.mezo(1e-6)
  step = hz.make_train_step(tx, loss)
  compiled = step.lower(params, tx.init(params), jnp.ones((8, 256))).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= 3.1 * size


def test_rounding_check_counts_a_sample_of_fixed_size(monkeypatch):
  """The aliases' check counts the leading entries of the 4 smallest
  trainable matrices: per bf16 leaf the step grows as it does without the
  check. Counting every leaf drew each update's noise again in a fusion of
  its own (MeZO: 201 instructions per leaf against 108)."""
  from hizoo_jax import _xla
  monkeypatch.setattr(_xla, "single_device", lambda: True)

  def loss(p, x):
    for k in sorted(p):
      x = jnp.tanh(x @ p[k].astype(jnp.float32))
    return jnp.mean(x ** 2)

  def growth(tx):
    counts = []
    for n in (8, 24):
      params = {f"l{i:02d}": jnp.eye(16, dtype=jnp.bfloat16) for i in range(n)}
      compiled = hz.make_train_step(tx, loss).lower(
          params, tx.init(params), jnp.ones((2, 16))).compile()
      counts.append(sum(" = " in line for line in
                        compiled.as_text().splitlines()))
    return (counts[1] - counts[0]) / 16

  checked = growth(hz.mezo(1e-3))
  unchecked = growth(optax.chain(hz.scale_by_mezo(1e-3),
                                 optax.scale_by_learning_rate(1e-3)))
  assert abs(checked - unchecked) <= 2, (checked, unchecked)


def test_rounding_sample_is_the_leading_entries():
  assert precision._leading_block((50272, 768), 4096) == (slice(0, 6),)
  assert precision._leading_block((2048, 8192), 4096) == (
      slice(0, 1), slice(0, 4096))
  assert precision._leading_block((4, 2048, 2048), 4096) == (
      slice(0, 1), slice(0, 2))
  assert precision._leading_block((10,), 4096) == (slice(0, 10),)
