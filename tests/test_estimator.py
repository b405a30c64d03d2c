"""The estimators' formulas against plain NumPy float64, fed with step_noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax import _xla
from hizoo_jax.core import paper_rule
import numpy_reference as ref

MU = 1e-2


def make_params():
  rng = np.random.default_rng(0)
  return {
      "w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
      "t": jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32),
  }


COEF = {"w": 0.5, "b": 2.0, "t": 1.5}


def loss_fn(p):
  """A smooth non-quadratic loss, so D and g are both informative."""
  total = 0.0
  for name, x in p.items():
    x = x.astype(jnp.float32)
    total = total + COEF[name] * jnp.sum(x**2) + 0.1 * jnp.sum(jnp.sin(3 * x))
  return total


class Recorder:
  """Eager value_fn that keeps every point it is called at and its value."""

  def __init__(self, fn=loss_fn):
    self.fn, self.points, self.values = fn, [], []

  def __call__(self, p):
    value = self.fn(p)
    self.points.append({k: np.asarray(v, np.float64) for k, v in p.items()})
    self.values.append(float(value))
    return value


def f64(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def hess_f64(hessian):
  out = {}
  for name, h in hessian.items():
    if isinstance(h, paper_rule.FactoredHessian):
      out[name] = (np.asarray(h.row, np.float64), np.asarray(h.col, np.float64),
                   h.row_axis, h.col_axis)
    else:
      out[name] = np.asarray(h, np.float64)
  return out


def assert_hess_close(actual, expected, rtol=1e-5):
  for name, e in expected.items():
    a = actual[name]
    if isinstance(e, tuple):
      np.testing.assert_allclose(np.asarray(a.row), e[0], rtol=rtol, atol=1e-7)
      np.testing.assert_allclose(np.asarray(a.col), e[1], rtol=rtol, atol=1e-7)
    else:
      np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("estimator", ["paper", "reference"])
@pytest.mark.parametrize("factored", [False, True])
def test_hizoo_matches_numpy_over_steps(estimator, factored):
  tx = hz.scale_by_hizoo(MU, 0.3, estimator=estimator, factored=factored,
                         min_dim_size_to_factor=3, key=7)
  params = make_params()
  state = tx.init(params)
  if factored:
    assert isinstance(state.hessian["w"], paper_rule.FactoredHessian)
    assert state.hessian["w"].row.shape == (6,)
    assert state.hessian["w"].col.shape == (4,)
    assert state.hessian["t"].row.shape == (2, 5)  # axes 1 and 2 factored
    assert state.hessian["t"].col.shape == (2, 3)
    assert state.hessian["b"].shape == (4,)
  for _ in range(3):  # H moves away from 1, so later steps test s = H^-1/2.
    theta, hess = f64(params), hess_f64(state.hessian)
    z = f64(hz.step_noise(state, params))
    rec = Recorder()
    updates, state = tx.update(None, state, params, value_fn=rec)
    assert len(rec.values) == 3
    scale = {k: 1 / np.sqrt(ref.expand(h)) for k, h in hess.items()}
    for k in theta:  # Evaluation points: theta, theta + mu s z, theta - mu s z.
      np.testing.assert_allclose(rec.points[0][k], theta[k])
      np.testing.assert_allclose(rec.points[1][k], theta[k] + MU * scale[k] * z[k],
                                 rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(rec.points[2][k], theta[k] - MU * scale[k] * z[k],
                                 rtol=1e-6, atol=1e-6)
    l0, lp, lm = rec.values
    direction, new_hess = ref.hizoo_step(hess, [z], l0, [lp], [lm], MU, 0.3,
                                         estimator)
    for k in theta:
      np.testing.assert_allclose(np.asarray(updates[k]), direction[k],
                                 rtol=1e-4, atol=1e-6)
    assert_hess_close(state.hessian, new_hess)
    assert float(state.loss) == pytest.approx(l0, rel=1e-6)
    assert float(state.projected_grad) == pytest.approx((lp - lm) / (2 * MU),
                                                        rel=1e-5)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u, updates))
  assert int(state.count) == 3 and int(state.skipped) == 0
  changed = ref.expand(hess_f64(state.hessian)["w"])
  assert np.abs(changed - 1).max() > 1e-3  # the test did exercise H != 1.


def per_leaf(hessian):
  """The "signed" state's factor trees as name -> list of float64 factors."""
  return {n: [np.asarray(t[n], np.float64) for t in hessian]
          for n in hessian[0]}


@pytest.mark.parametrize("granularity, every, one_device", [
    ("tensor", 1, False), ("row", 1, False), ("factored", 1, False),
    ("element", 1, False), ("tensor", 2, False), ("tensor", 1, True),
    ("tensor", 2, True), ("row", 1, True), ("factored", 1, True)])
def test_signed_matches_numpy_over_steps(granularity, every, one_device,
                                         monkeypatch):
  """The default rule against its NumPy float64 statement, fed step_noise."""
  if one_device:  # the sums of z^2 in one loop (hizoo_jax.range_sums)
    monkeypatch.setattr(_xla, "single_device", lambda: True)
  q = 2 if granularity == "factored" else 1
  tx = hz.scale_by_hizoo(MU, 0.3, curvature=granularity, num_queries=q,
                         min_dim_size_to_factor=3, curvature_every=every,
                         key=7)
  params = make_params()
  state = tx.init(params)
  shapes = {k: [f.shape for f in h] for k, h in per_leaf(state.hessian).items()}
  if granularity in ("row", "factored"):
    assert (6, 1) in shapes["w"] and (2, 5, 1) in shapes["t"]
  if granularity == "factored":
    assert shapes["w"] == [(6, 1), (1, 4)] and shapes["t"][1] == (2, 1, 3)
  assert shapes["b"] == {"element": [(4,)], "factored": [(1,), (1,)]}.get(
      granularity, [(1,)])  # HiZOO-L: two per-tensor factors for a vector
  step = jax.jit(lambda s, p, l0, lp, lm: tx.update(
      None, s, p, zo_losses=(l0, lp, lm)))
  for k in range(4 + 2 * every):  # H moves from the third probe on.
    theta = f64(params)
    hess = per_leaf(state.hessian)
    stats = tuple(float(a) for a in state.curvature_stats)
    zs = [f64(hz.step_noise(state, params, query=j)) for j in range(q)]
    scale = {n: 1 / np.sqrt(np.prod(np.broadcast_arrays(*h), axis=0))
             for n, h in hess.items()}
    l0 = float(loss_fn(params))
    lp = [float(loss_fn({n: theta[n] + MU * scale[n] * z[n] for n in theta}))
          for z in zs]
    lm = [float(loss_fn({n: theta[n] - MU * scale[n] * z[n] for n in theta}))
          for z in zs]
    updates, state = step(state, params, l0, jnp.asarray(lp), jnp.asarray(lm))
    direction, new_hess, new_stats = ref.signed_step(
        hess, stats, zs, l0, lp, lm, MU, 0.3, probe=k % every == 0)
    for n in theta:
      np.testing.assert_allclose(np.asarray(updates[n]), direction[n],
                                 rtol=2e-4, atol=1e-5)
      for got, want in zip(per_leaf(state.hessian)[n], new_hess[n]):
        np.testing.assert_allclose(got, want, rtol=2e-4)
    np.testing.assert_allclose(
        [float(a) for a in state.curvature_stats], new_stats, rtol=2e-4)
    params = optax.apply_updates(
        params, jax.tree.map(lambda u: -0.01 * u, updates))
  moved = [np.abs(f - 1).max()
           for h in per_leaf(state.hessian).values() for f in h]
  assert max(moved) > 1e-2  # the test did exercise H != 1.


def test_mezo_matches_numpy():
  tx = hz.scale_by_mezo(MU, key=3)
  params = make_params()
  state = tx.init(params)
  assert state.hessian is None
  for _ in range(2):
    theta, z = f64(params), f64(hz.step_noise(state, params))
    rec = Recorder()
    updates, state = tx.update(None, state, params, value_fn=rec)
    assert len(rec.values) == 2
    for k in theta:
      np.testing.assert_allclose(rec.points[0][k], theta[k] + MU * z[k], atol=1e-6)
      np.testing.assert_allclose(rec.points[1][k], theta[k] - MU * z[k], atol=1e-6)
    expected = ref.mezo_step([z], [rec.values[0]], [rec.values[1]], MU)
    for k in theta:
      np.testing.assert_allclose(np.asarray(updates[k]), expected[k], rtol=1e-5,
                                 atol=1e-6)
    assert float(state.loss) == pytest.approx(np.mean(rec.values), rel=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u, updates))


def quadratic_loss(p):
  return sum(COEF[k] * jnp.sum(x**2) for k, x in p.items())


def np_quadratic(p):
  return sum(COEF[k] * np.sum(x**2) for k, x in p.items())


@pytest.mark.parametrize("factored", [False, True])
def test_num_queries_average_matches_numpy(factored):
  mu, q = 0.1, 3  # A large mu keeps float32 loss differences accurate.
  tx = hz.scale_by_hizoo(mu, 0.5, estimator="paper", num_queries=q,
                         factored=factored,
                         min_dim_size_to_factor=3, key=11)
  params = make_params()
  state = tx.init(params)
  _, state = jax.jit(lambda s, p: tx.update(None, s, p, value_fn=quadratic_loss))(
      state, params)  # one step so that H != 1
  theta, hess = f64(params), hess_f64(state.hessian)
  zs = [f64(hz.step_noise(state, params, query=j)) for j in range(q)]
  scale = {k: 1 / np.sqrt(ref.expand(h)) for k, h in hess.items()}
  lp = [np_quadratic({k: theta[k] + mu * scale[k] * z[k] for k in theta}) for z in zs]
  lm = [np_quadratic({k: theta[k] - mu * scale[k] * z[k] for k in theta}) for z in zs]
  l0 = np_quadratic(theta)
  updates, new_state = jax.jit(
      lambda s, p: tx.update(None, s, p, value_fn=quadratic_loss))(state, params)
  direction, new_hess = ref.hizoo_step(hess, zs, l0, lp, lm, mu, 0.5)
  for k in theta:
    np.testing.assert_allclose(np.asarray(updates[k]), direction[k], rtol=2e-3,
                               atol=1e-4)
  assert_hess_close(new_state.hessian, new_hess, rtol=2e-3)
  assert float(new_state.loss_plus) == pytest.approx(np.mean(lp), rel=1e-5)


def test_mezo_num_queries_matches_numpy():
  mu, q = 0.1, 4
  tx = hz.scale_by_mezo(mu, num_queries=q, key=5)
  params = make_params()
  state = tx.init(params)
  theta = f64(params)
  zs = [f64(hz.step_noise(state, params, query=j)) for j in range(q)]
  lp = [np_quadratic({k: theta[k] + mu * z[k] for k in theta}) for z in zs]
  lm = [np_quadratic({k: theta[k] - mu * z[k] for k in theta}) for z in zs]
  updates, _ = tx.update(None, state, params, value_fn=quadratic_loss)
  expected = ref.mezo_step(zs, lp, lm, mu)
  for k in theta:
    np.testing.assert_allclose(np.asarray(updates[k]), expected[k], rtol=2e-3,
                               atol=1e-4)


def test_queries_use_distinct_noise():
  state = hz.scale_by_hizoo(1e-3, 0.1).init(make_params())
  z0 = hz.step_noise(state, make_params(), query=0)["w"]
  z1 = hz.step_noise(state, make_params(), query=1)["w"]
  assert not np.allclose(z0, z1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params_keep_a_float32_hessian(dtype):
  """bf16/fp16 params: H in float32 evolves as for float32 params (same l, z)."""
  params32 = make_params()
  params16 = jax.tree.map(lambda x: x.astype(dtype), params32)
  tx = hz.scale_by_hizoo(MU, 1e-3, estimator="paper", key=2)
  s16, s32 = tx.init(params16), tx.init(params32)
  assert all(h.dtype == jnp.float32 for h in jax.tree.leaves(s16.hessian))
  for _ in range(3):
    rec = Recorder()
    u16, s16 = tx.update(None, s16, params16, value_fn=rec)
    l0, lp, lm = rec.values
    _, s32 = tx.update(None, s32, params32, zo_losses=(l0, [lp], [lm]))
    assert u16["w"].dtype == dtype
    params16 = optax.apply_updates(params16, jax.tree.map(lambda u: -0.01 * u, u16))
  for k in params32:
    np.testing.assert_allclose(s16.hessian[k], s32.hessian[k], rtol=1e-6)
  assert np.abs(np.asarray(s16.hessian["w"]) - 1).max() > 1e-6  # H moved.


def test_float32_resolution_of_the_ema():
  """Documents the float32 limit: H moves only if alpha*|est - H| > ~H*6e-8."""
  params = {"w": jnp.ones((3,))}
  big = (0.0, [1e3], [1e3])  # D / (2 mu^2) huge: the estimate is ~1e9 * H.
  for rate, moves in [(1e-8, True), (1e-20, False)]:
    tx = hz.scale_by_hizoo(1e-3, rate, estimator="paper")
    state = tx.init(params)
    _, state = tx.update(None, state, params, zo_losses=big)
    assert bool(np.any(np.asarray(state.hessian["w"]) != 1.0)) == moves


def test_signed_floor_bounds_a_tensor_without_curvature():
  """A tensor the loss ignores has zero curvature: H stops at the floor
  (relative to the mean) instead of shrinking to 0 and exploding the step."""
  params = {"dead": jnp.ones((8,)), "live": jnp.ones((8,))}
  tx = hz.scale_by_hizoo(1e-2, 1.0, key=0)
  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(
      None, s, params, value_fn=lambda p: jnp.sum(p["live"] ** 2)))
  for _ in range(200):
    _, state = step(state)
  factors, = state.hessian
  assert np.float32(1e-4) <= float(factors["dead"][0]) < 2e-4
  assert float(factors["live"][0]) > 1.0  # the mean is 1


def test_reference_in_the_parameter_dtype_freezes_fp16_h():
  """The official code keeps H in the parameter dtype: with fp16 parameters
  and alpha = 1e-8, alpha * h rounds to 0 and H stays exactly 1."""
  params = jax.tree.map(lambda x: x.astype(jnp.float16), make_params())
  moved = {}
  for dtype in ("param", jnp.float32):
    tx = hz.scale_by_hizoo(MU, 1e-8, estimator="reference",
                           hessian_dtype=dtype, key=1)
    state = tx.init(params)
    step = jax.jit(lambda s, tx=tx: tx.update(
        None, s, params, zo_losses=(1.0, [1.01], [1.01]))[1])  # q = 100
    for _ in range(3):
      state = step(state)
    moved[str(dtype)] = max(float(np.abs(np.asarray(h, np.float64) - 1).max())
                            for h in jax.tree.leaves(state.hessian))
    if dtype == "param":
      assert all(h.dtype == jnp.float16 for h in jax.tree.leaves(state.hessian))
  assert moved["param"] == 0.0
  assert moved[str(jnp.float32)] > 0.0
  with pytest.raises(ValueError, match="reference"):
    hz.scale_by_hizoo(MU, estimator="paper", hessian_dtype="param")
