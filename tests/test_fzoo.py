"""FZOO (hizoo_jax.core.fzoo) against a NumPy float64 statement of its formula."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz

SHAPES = {"w": (3, 4), "b": (5,), "inner": {"v": (2, 2, 2)}}


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
      is_leaf=lambda s: isinstance(s, tuple))


CURV = jax.tree.map(lambda s: np.linspace(0.5, 2.0, int(np.prod(s))).reshape(s),
                    SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def loss_np(params):
  """float64: a quadratic with a quartic term (not symmetric in +/- eps)."""
  total = 0.0
  for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(CURV)):
    x = np.asarray(x, np.float64)
    total += np.sum(0.5 * a * (x - 0.3) ** 2 + 0.05 * x**4)
  return total


def loss_jax(params):
  return sum(jnp.sum(0.5 * a * (x - 0.3) ** 2 + 0.05 * x**4)
             for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(CURV)))


def oracle_step(params, us, eps, lr, normalize):
  """One FZOO step in float64 from the exact u_i; (params, l0, l, sigma)."""
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  n = len(us)
  l0 = loss_np(p64)
  l = np.array([loss_np(jax.tree.map(lambda x, u: x + eps * np.asarray(u),
                                     p64, ui)) for ui in us])
  sigma = np.sqrt(np.mean((l - l.mean()) ** 2))
  c = (l - l0) / (n * (sigma if normalize else eps))
  new = jax.tree.map(
      lambda x, *u: x - lr * sum(ci * np.asarray(ui) for ci, ui in zip(c, u)),
      p64, *us)
  return new, l0, l, sigma


@pytest.mark.parametrize("noise,normalize",
                         [("rademacher", True), ("gaussian", True),
                          ("rademacher", False)])
def test_matches_numpy_oracle_over_several_steps(noise, normalize):
  eps, lr, n = 1e-2, 0.05 if normalize else 0.02, 4
  tx = hz.fzoo(lr, eps, key=3, num_probes=n, noise=noise,
               normalize=normalize)
  params = make_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss_jax))
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for _ in range(4):
    us = [hz.probe_noise(state, params, i, noise=noise) for i in range(n)]
    ref, l0, l, sigma = oracle_step(ref, us, eps, lr, normalize)
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    fz = state[0]
    np.testing.assert_allclose(fz.loss, l0, rtol=1e-5)
    np.testing.assert_allclose(fz.probe_losses, l, rtol=1e-5)
    np.testing.assert_allclose(fz.sigma, sigma, rtol=2e-3)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  assert int(state[0].count) == 4 and int(state[0].skipped) == 0
  # The steps moved the parameters (the comparison is not vacuous).
  assert not np.allclose(jax.tree.leaves(params)[0],
                         jax.tree.leaves(make_params())[0], atol=1e-3)


def test_probe_noise_rademacher_signs_and_gaussian_moments():
  params = {"big": jnp.zeros((200, 300)), "ids": jnp.zeros(3, jnp.int32)}
  state = hz.scale_by_fzoo(key=1, mask={"big": True, "ids": False}).init(
      params)
  u0 = hz.probe_noise(state, params, 0)
  u1 = hz.probe_noise(state, params, 1)
  assert u0["ids"] is None  # Non-float leaves have no noise.
  assert set(np.unique(u0["big"])) == {-1.0, 1.0}
  assert abs(float(jnp.mean(u0["big"]))) < 0.02
  assert abs(float(jnp.mean(u0["big"] * u1["big"]))) < 0.02  # independent
  later = state._replace(count=state.count + 1)
  assert not np.array_equal(hz.probe_noise(later, params, 0)["big"],
                            u0["big"])
  z = hz.probe_noise(state, params, 0, noise="gaussian")["big"]
  assert abs(float(jnp.mean(z))) < 0.02 and abs(float(jnp.var(z)) - 1) < 0.03


def test_constant_loss_sigma_zero_skips_and_counts():
  params = make_params()
  tx = hz.fzoo(0.1, 1e-3, num_probes=4)
  state = tx.init(params)
  updates, state = tx.update(None, state, params,
                             value_fn=lambda p: jnp.float32(2.0))
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
  assert int(state[0].skipped) == 1 and int(state[0].count) == 1
  assert float(state[0].sigma) == 0
  # Unnormalized, a constant loss is a zero step, not a skipped one.
  tx = hz.fzoo(0.1, 1e-3, num_probes=4, normalize=False)
  _, s = tx.update(None, tx.init(params), params,
                   value_fn=lambda p: jnp.float32(2.0))
  assert int(s[0].skipped) == 0


@pytest.mark.parametrize("where", ["center", "probe"])
def test_non_finite_loss_skips_and_counts(where):
  params = make_params()

  def loss(p):
    value = loss_jax(p)
    at_center = jnp.all(p["w"] == params["w"])  # probes move every entry
    bad = at_center if where == "center" else ~at_center
    return jnp.where(bad, jnp.nan, value)

  tx = hz.fzoo(0.1, 1e-2, num_probes=4)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
  state = tx.init(params)
  for _ in range(2):
    updates, state = step(params, state)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(state[0].skipped) == 2 and int(state[0].count) == 2


@pytest.mark.parametrize("mask", [
    {"w": False, "b": True, "inner": True},  # a full tree
    {"w": False, "b": True, "inner": {"v": True}},
    lambda p: {"w": False, "b": True, "inner": True},  # a callable
])
def test_masked_leaves_never_move_nor_perturb(mask):
  params = make_params()
  tx = hz.fzoo(0.05, 1e-2, num_probes=4, mask=mask, key=5,
               weight_decay=0.1)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss_jax))
  p = params
  for _ in range(3):
    us = [hz.probe_noise(state, p, i) for i in range(4)]
    l0 = loss_np(p)
    us = [dict(u, w=np.zeros((3, 4))) for u in us]  # w is not perturbed
    want = [loss_np(jax.tree.map(lambda x, u: np.asarray(x, np.float64)
                                 + 1e-2 * np.asarray(u), p, u)) for u in us]
    updates, state = step(p, state)
    np.testing.assert_allclose(state[0].probe_losses, want, rtol=1e-5)
    np.testing.assert_allclose(state[0].loss, l0, rtol=1e-5)
    p = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(p["w"], params["w"])
  assert not np.allclose(p["b"], params["b"])
  assert not np.allclose(p["inner"]["v"], params["inner"]["v"])


def test_composes_in_chain_with_schedules_under_jit():
  params = make_params()
  lr = optax.linear_schedule(0.1, 0.01, 5)
  eps = optax.exponential_decay(1e-2, 1, 0.5)
  plain = hz.scale_by_fzoo(eps, num_probes=4, key=9)
  chained = optax.chain(hz.scale_by_fzoo(eps, num_probes=4, key=9),
                        optax.scale_by_schedule(lambda t: -lr(t)))
  alias = hz.fzoo(lr, eps, num_probes=4, key=9)
  sp, sc, sa = plain.init(params), chained.init(params), alias.init(params)

  @jax.jit
  def steps(sp, sc, sa):
    d, sp = plain.update(None, sp, params, value_fn=loss_jax)
    uc, sc = chained.update(None, sc, params, value_fn=loss_jax)
    ua, sa = alias.update(None, sa, params, value_fn=loss_jax)
    return d, uc, ua, sp, sc, sa

  for t in range(3):
    d, uc, ua, sp, sc, sa = steps(sp, sc, sa)
    for a, b, c in zip(*map(jax.tree.leaves, (d, uc, ua))):
      np.testing.assert_allclose(b, -lr(t) * a, rtol=1e-6, atol=1e-9)
      np.testing.assert_allclose(c, -lr(t) * a, rtol=1e-6, atol=1e-9)
    # The probe scale follows its schedule: l_i - l_0 shrinks with eps.
    assert float(jnp.std(sp.probe_losses)) > 0
  assert int(sp.count) == 3


def test_inject_hyperparams_moves_the_rate_and_eps():
  params = make_params()
  tx = optax.inject_hyperparams(hz.fzoo)(0.1, 1e-2, key=4)
  ref = hz.fzoo(0.05, 1e-2, key=4)
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.05)
  u, _ = jax.jit(lambda s: tx.update(None, s, params, value_fn=loss_jax))(
      state)
  v, _ = jax.jit(lambda s: ref.update(None, s, params, value_fn=loss_jax))(
      ref.init(params))
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  tx = optax.inject_hyperparams(hz.fzoo)(0.1, num_probes=4)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda s: tx.update(None, s, params, value_fn=loss_jax))(
        tx.init(params))


def test_descends_a_quadratic():
  params = make_params()
  tx = hz.fzoo(0.02, 1e-3, num_probes=8, key=2)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    u, s = tx.update(None, s, p, value_fn=loss_jax)
    return optax.apply_updates(p, u), s

  start = float(loss_jax(params))
  for _ in range(150):
    params, state = step(params, state)
  assert float(loss_jax(params)) < 0.5 * start


def test_no_n_fold_copies_of_the_params():
  """Compiled temporaries stay a few parameter copies, not N of them."""
  params = {"w": jnp.zeros((1024, 1024))}  # 4 MiB
  loss = lambda p: jnp.sum(jnp.sin(p["w"]))  # noqa: E731

  def temp_bytes(n):
    tx = hz.scale_by_fzoo(1e-3, num_probes=n)
    fn = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
    compiled = fn.lower(params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  size = 4 * 1024 * 1024
  small, large = temp_bytes(2), temp_bytes(16)
  assert large < 4 * size, (small, large)
  assert large - small < size, (small, large)  # N does not scale memory


def test_errors_are_clear():
  with pytest.raises(ValueError, match="num_probes"):
    hz.scale_by_fzoo(num_probes=1)
  with pytest.raises(ValueError, match="noise"):
    hz.scale_by_fzoo(noise="uniform")
  with pytest.raises(ValueError, match="eps"):
    hz.scale_by_fzoo(0.0)
  with pytest.raises(TypeError, match="normalize"):
    hz.scale_by_fzoo(normalize=1)
  with pytest.raises(TypeError, match="key"):
    hz.scale_by_fzoo(key="seed")
  params = make_params()
  tx = hz.scale_by_fzoo()
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(None, tx.init(params), params)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(None, tx.init(params), params,
              value_fn=lambda p: p["b"])
  ints = {"x": jnp.ones(3), "n": jnp.ones(2, jnp.int32)}
  with pytest.raises(TypeError, match="floating"):
    tx.update(None, tx.init(ints), ints, value_fn=lambda p: p["x"].sum())
  with pytest.raises(ValueError, match="FZOO"):
    hz.probe_noise(hz.mezo(0.1).init(params), params, 0)
  hz.scale_by_fzoo(num_probes=1, normalize=False)  # one query is fine


def test_docstring_examples():
  module = importlib.import_module("hizoo_jax.core.fzoo")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask", [None, {"w": True, "b": False,
                                         "inner": True}])
def test_lean_step_equals_update(normalize, mask):
  """hz.make_train_step walks FZOO's N + 1 points in place (the one-sided
  scheme) and gives tx.update's result up to float32 rounding."""
  params = make_params()
  tx = hz.fzoo(0.05, eps=1e-2, num_probes=4, normalize=normalize, mask=mask)

  @jax.jit
  def plain(p, s):
    u, s = tx.update(None, s, p, value_fn=loss_jax)
    return optax.apply_updates(p, u), s

  step = hz.make_train_step(tx, lambda p, batch: loss_jax(p), donate=False)
  p_plain, s_plain = params, tx.init(params)
  p_lean, s_lean = params, tx.init(params)
  for _ in range(3):
    p_plain, s_plain = plain(p_plain, s_plain)
    p_lean, s_lean, metrics = step(p_lean, s_lean, None)
  for a, b in zip(jax.tree.leaves(p_lean), jax.tree.leaves(p_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_lean[0].probe_losses, s_plain[0].probe_losses,
                             rtol=1e-5)
  assert sorted(metrics) == ["loss", "probe_losses", "sigma", "skipped"]
  if mask is not None:
    np.testing.assert_array_equal(p_lean["b"], params["b"])
