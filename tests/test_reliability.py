"""Bad inputs and skipped steps: clear errors, and nothing moves on a skip.

Each case runs on both programs (hizoo_jax.program).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz

PROGRAMS = ["plain", "compact"]
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}


def loss(p):
  return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))


def steps(tx, params, value_fn=loss, n=1):
  state = tx.init(params)
  for _ in range(n):
    updates, state = tx.update(None, state, params, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("make", [
    lambda p: hz.hizoo(1e-2, program=p),
    lambda p: hz.hizoo_l(1e-2, min_dim_size_to_factor=2, program=p),
    lambda p: hz.hizoo(1e-2, estimator="paper", program=p),
    lambda p: hz.mezo(1e-2, program=p)], ids=["hizoo", "hizoo_l", "paper",
                                              "mezo"])
def test_empty_zero_size_and_scalar_leaves(program, make):
  params = {"w": jnp.ones((3, 4)), "empty": jnp.ones((0, 3)),
            "s": jnp.ones(())}
  new, state = steps(make(program), params,
                     lambda p: jnp.sum(p["w"] ** 2) + p["s"] ** 2, n=2)
  assert new["empty"].shape == (0, 3)
  assert float(new["s"]) != 1.0  # a 0-d leaf trains
  assert int(state[0].skipped) == 0
  # No parameters at all: a step that does nothing, without an error.
  new, state = steps(make(program), {}, lambda p: jnp.float32(1.0))
  assert new == {} and int(state[0].count) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=float("nan")), "learning_rate must be finite"),
    (dict(learning_rate=-1.0), "learning_rate must be finite and >= 0"),
    (dict(learning_rate="1e-3"), "learning_rate must be a float or an optax"),
    (dict(learning_rate=1e-3, weight_decay=float("inf")),
     "weight_decay must be finite"),
    (dict(learning_rate=1e-3, mu=1e-25), "2 mu\\^2 must not underflow"),
    (dict(learning_rate=1e-3, mu=float("nan")), "mu"),
])
def test_static_hyperparameters_raise_at_construction(kwargs, match):
  for make in (hz.hizoo, hz.mezo, hz.hizoo_l):
    with pytest.raises((ValueError, TypeError), match=match):
      make(**kwargs)


@pytest.mark.parametrize("program", PROGRAMS)
def test_scheduled_invalid_values_do_not_move(program):
  # A NaN learning rate or weight decay from a schedule: nothing moves.
  new, _ = steps(hz.mezo(lambda c: jnp.nan, program=program), PARAMS)
  np.testing.assert_array_equal(new["w"], PARAMS["w"])
  new, _ = steps(hz.mezo(0.1, weight_decay=lambda c: jnp.nan,
                         program=program), PARAMS)
  np.testing.assert_array_equal(new["w"], PARAMS["w"])
  new, _ = steps(hz.mezo(0.1, weight_decay=lambda c: 0.1 + 0 * c,
                         program=program), PARAMS)
  assert not np.array_equal(new["w"], PARAMS["w"])  # a valid one moves
  # mu^2 underflowing float32 from a schedule: the step is skipped.
  new, state = steps(hz.hizoo(1e-2, mu=lambda c: 1e-25, program=program),
                     PARAMS)
  np.testing.assert_array_equal(new["w"], PARAMS["w"])
  assert int(state[0].skipped) == 1
  assert np.isfinite(float(state[0].curvature_stats.baseline))


@pytest.mark.parametrize("program", PROGRAMS)
def test_overflowing_difference_is_skipped(program):
  huge = lambda p: jnp.where(p["w"][0, 0] > -1, 3e38, -3e38).astype(
      jnp.float32)  # finite losses whose difference is inf
  for make in (hz.hizoo, hz.mezo):
    new, state = steps(make(1e-3, program=program), PARAMS, huge)
    np.testing.assert_array_equal(new["w"], PARAMS["w"])
    assert int(state[0].skipped) == 1


@pytest.mark.parametrize("program", PROGRAMS)
def test_skipped_step_moves_nothing_downstream(program):
  # Adam after the estimator: no momentum step, no count advance.
  tx = hz.chain(hz.scale_by_mezo(1e-3, program=program), optax.adam(0.1))
  new, state = steps(tx, PARAMS, lambda p: loss(p) * jnp.nan, n=3)
  np.testing.assert_array_equal(new["w"], PARAMS["w"])
  assert int(state[1][0].count) == 0
  assert int(state[0].skipped) == 3
  # The aliases' decoupled weight decay does not shrink a skipped step.
  new, _ = steps(hz.hizoo(0.1, weight_decay=0.5, program=program), PARAMS,
                 lambda p: loss(p) * jnp.nan)
  np.testing.assert_array_equal(new["w"], PARAMS["w"])
  # masked_chain: the same.
  mask = {"w": True, "b": False}
  tx = hz.masked_chain(hz.scale_by_mezo(1e-3, mask=mask, program=program),
                       optax.adam(0.1), mask=mask)
  new, state = steps(tx, PARAMS, lambda p: loss(p) * jnp.nan, n=2)
  np.testing.assert_array_equal(new["w"], PARAMS["w"])
  # A step that is not skipped still moves.
  new, _ = steps(hz.chain(hz.scale_by_mezo(1e-3, program=program),
                          optax.adam(0.1)), PARAMS, loss, n=1)
  assert not np.array_equal(new["w"], PARAMS["w"])


@pytest.mark.parametrize("program", PROGRAMS)
def test_unclear_inputs_get_clear_errors(program):
  tx = hz.mezo(1e-3, program=program)
  with pytest.raises(TypeError, match="is a float .* not an array"):
    steps(tx, {"w": 1.0}, lambda p: p["w"] ** 2)
  with pytest.raises(TypeError, match="returned None"):
    steps(tx, PARAMS, lambda p: None)
  with pytest.raises(ValueError, match="mu must be a scalar"):
    steps(hz.mezo(1e-3, mu=lambda c: jnp.ones(3) * 1e-3, program=program),
          PARAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_reduce_on_plateau_reads_the_lean_steps_loss(program):
  tx = hz.chain(hz.scale_by_hizoo(1e-3, program=program),
                optax.scale_by_learning_rate(0.05),
                optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
  step = hz.make_train_step(tx, lambda p, b: loss(p), donate=False)
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(3):
    params, state, metrics = step(params, state, None)
  plateau = state[-1]
  assert float(plateau.best_value) <= float(loss(PARAMS))
  assert np.isfinite(float(plateau.avg_value))


@pytest.mark.parametrize("program", PROGRAMS)
def test_plateau_value_on_steps_that_skip_theta(program):
  """With curvature_every = 2 every other step evaluates no L(theta); the
  value handed downstream is then the mean of the perturbed points', never
  the unevaluated slot."""
  tx = hz.chain(hz.scale_by_hizoo(1e-3, curvature_every=2, program=program),
                optax.scale_by_learning_rate(0.05),
                optax.contrib.reduce_on_plateau(patience=100,
                                                accumulation_size=100))
  step = hz.make_train_step(tx, lambda p, b: loss(p), donate=False)
  params, state, seen = PARAMS, tx.init(PARAMS), []
  for _ in range(4):
    seen.append(float(loss(params)))
    params, state, _ = step(params, state, None)
    # avg_value: the mean of the values handed over so far.
    np.testing.assert_allclose(float(state[-1].avg_value), np.mean(seen),
                               rtol=1e-2)


def _mlp():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(16, 8)) * 0.4, jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)) * 0.4, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)

  def mlp_loss(p, batch):
    h = jnp.tanh(batch.astype(p["w"].dtype) @ p["w"] + p["b"])
    return jnp.mean((h.astype(jnp.float32) - 0.3) ** 2)

  return params, x, mlp_loss


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_lean_step_leaves_low_precision_params_exact(program, dtype):
  """lr = 0: the lean step's points are computed afresh, never walked, for
  bf16 / fp16 leaves, so the parameters come back bit for bit."""
  params, x, mlp_loss = _mlp()
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  for tx in (hz.hizoo(0.0, program=program), hz.mezo(0.0, program=program),
             hz.hizoo_l(0.0, min_dim_size_to_factor=4, program=program)):
    step = hz.make_train_step(tx, mlp_loss, donate=False)
    new, state = params, tx.init(params)
    for _ in range(30):
      new, state, metrics = step(new, state, x)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32))
    assert int(metrics["skipped"]) == 0
    assert float(metrics["projected_grad"]) != 0.0  # it did measure


@pytest.mark.parametrize("program", PROGRAMS)
def test_master_weights_train_bf16_in_the_lean_step(program):
  """bf16 weights with float32 master copies inside make_train_step learn
  like the float32 model (same noise, points rounded once)."""
  params, x, mlp_loss = _mlp()
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  curves = {}
  for name, p, tx in [
      ("f32", params, hz.mezo(0.05, program=program)),
      ("bf16", bf16, hz.master_weights(hz.mezo(0.05, program=program)))]:
    step = hz.make_train_step(tx, mlp_loss, donate=False)
    state, losses = tx.init(p), []
    for _ in range(150):
      p, state, metrics = step(p, state, x)
      losses.append(float(mlp_loss(p, x)))
    curves[name] = np.asarray(losses)
  assert curves["bf16"][-1] < 0.8 * float(mlp_loss(params, x))
  np.testing.assert_allclose(curves["bf16"][-20:], curves["f32"][-20:],
                             rtol=0.05)
