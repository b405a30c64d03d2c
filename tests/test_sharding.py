"""Optimizer state on a device mesh: shardings, collectives, noise, trajectory.

Runs on the 8 simulated CPU devices that conftest.py requests.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hizoo_jax as hz
from hizoo_jax.sharding import init_sharded, state_shardings

EPS32 = float(np.finfo(np.float32).eps)
MESHES = {  # shape -> (axis names, parameter specs, batch spec)
    (8,): (("x",), {"w1": P(None, "x"), "b1": P("x"), "w2": P("x", None),
                    "b2": P()}, P("x")),
    (2, 4): (("data", "model"), {"w1": P(None, "model"), "b1": P("model"),
                                 "w2": P("model", None), "b2": P()},
             P("data")),
    (4, 2): (("data", "model"), {"w1": P("data", "model"), "b1": P("model"),
                                 "w2": P("model", "data"), "b2": P("model")},
             P("data")),
}


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (16, 32)) / 4, "b1": jnp.zeros(32),
          "w2": jax.random.normal(k2, (32, 8)) / 6, "b2": jnp.zeros(8)}


def make_batch():
  k1, k2 = jax.random.split(jax.random.key(1))
  return jax.random.normal(k1, (16, 16)), jax.random.normal(k2, (16, 8))


def mlp_loss(p, batch, out_sharding=None):
  x, y = batch
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  out = jnp.matmul(h, p["w2"], out_sharding=out_sharding) + p["b2"]
  return jnp.mean((out - y) ** 2)


def optimizers():
  return {
      "hizoo": hz.hizoo(5e-3, mu=5e-2, hessian_smooth=0.5),
      "hizoo_l": hz.hizoo_l(5e-3, mu=5e-2, hessian_smooth=0.5,
                            min_dim_size_to_factor=8),
      "mezo": hz.mezo(5e-3, mu=5e-2),
  }


def auto_mesh(shape):
  names = MESHES[shape][0]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def place(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def run_auto(tx, shape, steps):
  """``steps`` plain steps (tx.update + apply_updates) under jit on a mesh."""
  params, batch = make_params(), make_batch()
  if shape is None:
    state = tx.init(params)
    step = jax.jit(lambda p, s, b: _step(tx, p, s, b))
  else:
    mesh = auto_mesh(shape)
    _, specs, batch_spec = MESHES[shape]
    p_sh = place(mesh, specs)
    s_sh = state_shardings(tx, params, p_sh)
    b_sh = NamedSharding(mesh, batch_spec)
    params = jax.device_put(params, p_sh)
    batch = jax.device_put(batch, b_sh)
    state = init_sharded(tx, params)
    step = jax.jit(lambda p, s, b: _step(tx, p, s, b),
                   in_shardings=(p_sh, s_sh, b_sh), out_shardings=(p_sh, s_sh))
  losses = []
  for _ in range(steps):
    params, state = step(params, state, batch)
    losses.append(float(hz.find_state(state).loss_plus))
  return params, state, np.array(losses)


def _step(tx, params, state, batch, loss=mlp_loss):
  updates, state = tx.update(None, state, params,
                             value_fn=lambda p: loss(p, batch))
  return optax.apply_updates(params, updates), state


def assert_placed(tree, shardings):
  """Every array of ``tree`` is laid out as the matching sharding says."""
  placed = jax.tree.map(
      lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), tree, shardings)
  assert all(jax.tree.leaves(placed)), placed


def spec_of(x):
  return tuple(jax.typeof(x).sharding.spec)


# ---------------------------------------------------------------- shardings


def test_state_shardings_follow_params():
  mesh = auto_mesh((2, 4))
  specs = MESHES[(2, 4)][1]
  params = make_params()
  p_sh = place(mesh, specs)
  full = state_shardings(optimizers()["hizoo"], params, p_sh)
  factors, = full[0].hessian  # one value per tensor: replicated.
  for name in specs:
    assert all(axis is None for axis in factors[name].spec)
  for leaf in (full[0].count, full[0].rng_key, full[0].loss, full[0].skipped,
               *full[0].curvature_stats):
    assert leaf.spec == P()

  rows, cols = state_shardings(optimizers()["hizoo_l"], params, p_sh)[0].hessian
  # w1 (16, 32) P(None, "model"): rows (16, 1) keep axis 0, cols (1, 32) 1.
  assert (rows["w1"].spec, cols["w1"].spec) == (P(None, None), P(None, "model"))
  assert (rows["w2"].spec, cols["w2"].spec) == (P("model", None), P(None, None))
  assert (rows["b1"].spec, cols["b1"].spec) == (P(None), P(None))

  specs42 = MESHES[(4, 2)][1]
  rows, cols = state_shardings(optimizers()["hizoo_l"], params,
                               place(auto_mesh((4, 2)), specs42))[0].hessian
  assert (rows["w1"].spec, cols["w1"].spec) == (P("data", None), P(None, "model"))
  assert (rows["w2"].spec, cols["w2"].spec) == (P("model", None), P(None, "data"))


def test_state_shardings_through_adam_masks_and_inject_hyperparams():
  mesh = auto_mesh((2, 4))
  specs = MESHES[(2, 4)][1]
  params = make_params()
  mask = {"w1": True, "b1": False, "w2": True, "b2": False}
  tx = optax.chain(hz.scale_by_hizoo(1e-3, 1e-2, estimator="paper",
                                     factored=True, min_dim_size_to_factor=8,
                                     mask=mask),
                   optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3))
  sh = state_shardings(tx, params, specs, mesh=mesh)
  assert isinstance(sh[0].hessian["b1"], optax.MaskedNode)
  assert sh[0].hessian["w1"].col.spec == P("model")
  assert sh[1].mu["w2"].spec == P("model", None)
  assert sh[1].nu["b1"].spec == P("model") and sh[1].count.spec == P()

  injected = optax.inject_hyperparams(
      hz.hizoo_l, static_args=("min_dim_size_to_factor",))(
          learning_rate=1e-3, estimator="paper", min_dim_size_to_factor=8)
  sh = state_shardings(injected, params, specs, mesh=mesh)
  assert sh.hyperparams["learning_rate"].spec == P()
  assert sh.inner_state[0].hessian["w1"].row.spec == P(None)
  assert sh.inner_state[0].hessian["w1"].col.spec == P("model")
  # The shardings fit the real state: jit places every leaf accordingly.
  state = jax.jit(injected.init, out_shardings=sh)(params)
  assert state.inner_state[0].hessian["w2"].row.sharding.spec == P("model")


def test_state_shardings_bad_inputs():
  mesh = auto_mesh((8,))
  params = make_params()
  tx = optimizers()["hizoo"]
  with pytest.raises(ValueError, match="structure of params"):
    state_shardings(tx, params, {"w1": P()}, mesh=mesh)
  with pytest.raises(ValueError, match="mesh="):
    state_shardings(tx, params, MESHES[(8,)][1])
  too_long = dict(MESHES[(8,)][1], b1=P("x", None))
  with pytest.raises(ValueError, match="more entries"):
    state_shardings(tx, params, too_long, mesh=mesh)
  with pytest.raises(TypeError, match="NamedSharding"):
    state_shardings(tx, params, jax.tree.map(lambda _: "x", params))
  with pytest.raises(TypeError, match="GradientTransformation"):
    state_shardings(lambda p: p, params, MESHES[(8,)][1], mesh=mesh)


def test_explicit_mesh_keeps_state_shardings_stable():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  specs = MESHES[(2, 4)][1]
  loss = lambda p, b: mlp_loss(p, b, out_sharding=P("data", None))
  with jax.set_mesh(mesh):
    params = jax.device_put(make_params(), specs)
    batch = jax.device_put(make_batch(), P("data"))
    for name in ("hizoo", "hizoo_l"):  # (MeZO's state is only scalars.)
      tx = optimizers()[name]
      state = tx.init(params)  # eager init, placed like the params.
      types = jax.tree.map(jax.typeof, state)
      if name == "hizoo_l":
        assert jax.tree.map(jax.typeof, jax.jit(tx.init)(params)) == types
      step = jax.jit(lambda p, s, b, tx=tx: _step(tx, p, s, b, loss))
      p, s = params, state
      for _ in range(2):
        p, s = step(p, s, batch)
        assert jax.tree.map(jax.typeof, s) == types, name
        assert jax.tree.map(jax.typeof, p) == jax.tree.map(jax.typeof, params)
      hess = state[0].hessian
      if name == "hizoo":  # one value per tensor, replicated
        assert all(axis is None for h in hess[0].values()
                   for axis in spec_of(h))
      if name == "hizoo_l":  # row (m, 1) and column (1, n) factors
        assert spec_of(hess[1]["w1"]) == (None, "model")
        assert spec_of(hess[0]["w2"]) == ("model", None)
      # The noise of the next step is sharded like each parameter.
      z = jax.jit(hz.step_noise)(s, p)
      assert jax.tree.map(jax.typeof, z) == jax.tree.map(jax.typeof, p)


def test_auto_mesh_jit_keeps_state_shardings():
  for name in ("hizoo_l", "mezo"):
    tx = optimizers()[name]
    _, state, _ = run_auto(tx, (2, 4), steps=2)
    mesh = auto_mesh((2, 4))
    want = state_shardings(tx, make_params(),
                           place(mesh, MESHES[(2, 4)][1]))
    assert_placed(state, want)


# -------------------------------------------------------------- collectives

_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-to-all|all-reduce|collective-permute|"
    r"reduce-scatter|collective-broadcast)(?:-start)?\(")


def collectives(hlo: str):
  """(op, number of elements of its largest operand) for every collective."""
  out = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
      out.append((m.group(2), max(sizes)))
  return out


def per_leaf_loss(p, batch):
  """A loss needing no collective of its own but the scalar reductions."""
  x, _ = batch
  return jnp.mean(x) * sum(jnp.sum(jnp.tanh(v) ** 2) for v in jax.tree.leaves(p))


@pytest.mark.parametrize("name, mode", [
    ("hizoo", "auto"), ("hizoo_l", "auto"), ("mezo", "auto"),
    ("hizoo", "explicit"), ("hizoo_l", "explicit")])
def test_no_collective_on_parameter_sized_data(name, mode):
  tx = optimizers()[name]
  params, batch = make_params(), make_batch()
  _, specs, batch_spec = MESHES[(2, 4)]
  if mode == "auto":
    mesh = auto_mesh((2, 4))
    p_sh, b_sh = place(mesh, specs), NamedSharding(mesh, batch_spec)
    s_sh = state_shardings(tx, params, p_sh)
    step = jax.jit(lambda p, s, b: _step(tx, p, s, b, per_leaf_loss),
                   in_shardings=(p_sh, s_sh, b_sh), out_shardings=(p_sh, s_sh))
    hlo = step.lower(params, jax.eval_shape(tx.init, params),
                     batch).compile().as_text()
  else:
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
      params = jax.device_put(params, specs)
      batch = jax.device_put(batch, batch_spec)
      step = jax.jit(lambda p, s, b: _step(tx, p, s, b, per_leaf_loss))
      hlo = step.lower(params, tx.init(params), batch).compile().as_text()
  found = collectives(hlo)
  assert found, "expected the scalar loss reductions"
  assert {op for op, _ in found} == {"all-reduce"}, found
  # HiZOO and MeZO reduce scalars only; HiZOO-L also the row/column means of
  # its factors (at most one factor long: 32 here, never 16 x 32).
  limit = 32 if name == "hizoo_l" else 1
  assert max(size for _, size in found) <= limit, found


def test_megatron_mlp_step_gathers_no_parameter():
  """A real model: all-reduces only of activations and scalars."""
  mesh = auto_mesh((2, 4))
  _, specs, batch_spec = MESHES[(2, 4)]
  params, batch = make_params(), make_batch()
  p_sh, b_sh = place(mesh, specs), NamedSharding(mesh, batch_spec)
  for name in ("hizoo", "hizoo_l"):
    tx = optimizers()[name]
    s_sh = state_shardings(tx, params, p_sh)
    step = jax.jit(lambda p, s, b, tx=tx: _step(tx, p, s, b),
                   in_shardings=(p_sh, s_sh, b_sh), out_shardings=(p_sh, s_sh))
    found = collectives(step.lower(params, jax.eval_shape(tx.init, params),
                                   batch).compile().as_text())
    assert {op for op, _ in found} == {"all-reduce"}, (name, found)
    # Largest: the (8 rows x 8 outputs) partial products of h @ w2.
    assert max(size for _, size in found) <= 8 * 8, (name, found)


# ---------------------------------------------------- noise and trajectory


def test_noise_is_bit_identical_on_every_mesh():
  params = make_params()
  state = optimizers()["hizoo"].init(params)
  ref = jax.tree.map(np.asarray, jax.jit(hz.step_noise)(state, params))
  for shape in MESHES:
    mesh = auto_mesh(shape)
    p_sh = place(mesh, MESHES[shape][1])
    z = jax.jit(hz.step_noise, out_shardings=p_sh)(state,
                                                   jax.device_put(params, p_sh))
    jax.tree.map(np.testing.assert_array_equal, ref, jax.tree.map(np.asarray, z))
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, MESHES[(2, 4)][1])
    z = jax.jit(hz.step_noise)(state, sharded)
  jax.tree.map(np.testing.assert_array_equal, ref, jax.tree.map(np.asarray, z))


def trajectory_bounds(losses, steps, lr, mu, alpha):
  """Worst-case float32 drift of params and H between two device layouts.

  A different mesh sums the loss in another order: each loss moves by at most
  c * eps * |l| with c = 16 (pairwise sums over <= 256 terms). Then
  g = (l+ - l-) / (2 mu) moves by dg = 2 c eps |l| / (2 mu), the update by
  lr * dg * max|z| (|z| < 5.3) with H ~ 1, and H by
  alpha * H * |z^2 - 1| * dD / (2 mu^2) with dD = 4 c eps |l| (|z^2 - 1| < 27.1).
  Summed over the steps (no amplification over so few steps), plus a few eps
  of rounding in the parameter updates themselves.
  """
  dl = 16 * EPS32 * float(np.max(np.abs(losses)))
  dg = 2 * dl / (2 * mu)
  params_tol = steps * lr * dg * 5.3 * 2 + 8 * EPS32
  hess_tol = steps * alpha * 2 * 27.1 * 4 * dl / (2 * mu ** 2) + 8 * EPS32
  return params_tol, hess_tol


@pytest.mark.parametrize("name, shapes", [
    ("hizoo_l", [(2, 4), (4, 2)]), ("hizoo", [(8,)])])
def test_same_trajectory_on_every_mesh(name, shapes):
  steps, tx = 6, optimizers()[name]
  ref_params, ref_state, ref_losses = run_auto(tx, None, steps)
  params_tol, _ = trajectory_bounds(ref_losses, steps, 5e-3, 5e-2, 0.0)
  start = make_params()
  moved = max(float(jnp.max(jnp.abs(ref_params[k] - start[k]))) for k in start)
  assert moved > 50 * params_tol  # the bounds are far below the motion.
  h_moved = max(float(jnp.max(jnp.abs(h - 1)))
                for h in jax.tree.leaves(ref_state[0].hessian))
  assert h_moved > 1e-2
  # H is a smooth function of the losses and of sums of z: the layouts'
  # float32 rounding moves it by a tiny fraction of how far it moved.
  hess_tol = 1e-3 * h_moved
  for shape in shapes:
    params, state, losses = run_auto(tx, shape, steps)
    np.testing.assert_allclose(losses, ref_losses, rtol=16 * EPS32 * 6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                 atol=params_tol)
    for a, b in zip(jax.tree.leaves(state[0].hessian),
                    jax.tree.leaves(ref_state[0].hessian)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                 atol=hess_tol)
    assert int(state[0].count) == steps


def test_train_step_on_meshes():
  train_step = pytest.importorskip("hizoo_jax.train_step")
  tx = optimizers()["hizoo_l"]
  ref_params, ref_state, ref_losses = run_auto(tx, None, 3)
  params_tol, hess_tol = trajectory_bounds(ref_losses, 3, 5e-3, 5e-2, 1e-2)
  # Explicit axes: the step keeps every leaf's type (sharding included).
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  loss = lambda p, b: mlp_loss(p, b, out_sharding=P("data", None))
  step = train_step.make_train_step(tx, loss)
  with jax.set_mesh(mesh):
    params = jax.device_put(make_params(), MESHES[(2, 4)][1])
    batch = jax.device_put(make_batch(), P("data"))
    state = tx.init(params)
    types = jax.tree.map(jax.typeof, (params, state))
    for _ in range(3):
      params, state, _ = step(params, state, batch)
      assert jax.tree.map(jax.typeof, (params, state)) == types
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=params_tol)
  # Auto axes: inputs placed by state_shardings come back placed the same.
  mesh = auto_mesh((2, 4))
  p_sh = place(mesh, MESHES[(2, 4)][1])
  s_sh = state_shardings(tx, make_params(), p_sh)
  params = jax.device_put(make_params(), p_sh)
  state = init_sharded(tx, params)
  batch = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
  step = train_step.make_train_step(tx, mlp_loss)
  for _ in range(3):
    params, state, _ = step(params, state, batch)
  assert_placed(state, s_sh)
  for a, b in zip(jax.tree.leaves(state[0].hessian),
                  jax.tree.leaves(ref_state[0].hessian)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=hess_tol)


def test_hizoo_l_step_on_a_mesh_holds_few_leaf_shards():
  """Structural: on a multi-device CPU mesh the HiZOO-L means are jnp.means
  that XLA:CPU hands to YNNPACK, which stores its operand. The means run
  leaf after leaf, so the step holds a few shard-sized buffers (6 here), not
  one or more per leaf (15 when the normal quantile selected each
  polynomial coefficient; see hizoo_jax.fusible)."""
  train_step = pytest.importorskip("hizoo_jax.train_step")
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("d", None))
  num_leaves = 8
  params = {f"w{i}": jax.device_put(jnp.full((512, 512), 0.01, jnp.float32),
                                    sharding) for i in range(num_leaves)}
  x = jnp.ones((16, 512), jnp.float32)

  def loss(p, x):
    for i in range(num_leaves):
      x = jnp.tanh(x @ p[f"w{i}"])
    return jnp.mean(x**2)

  tx = hz.hizoo_l(1e-3, hessian_smooth=1e-6)
  compiled = train_step.make_train_step(tx, loss).lower(
      params, tx.init(params), x).compile()
  shard_bytes = 512 * 512 * 4 // 8
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < num_leaves * shard_bytes, temp / shard_bytes
