"""The plain and the compact program give the same numbers; the core is open.

``program="plain"`` (hizoo_jax.core through plain leaf loops) and
``program="compact"`` (the XLA:CPU machinery) compile the same mathematics:
params and state after 5 steps agree within float32 rounding, through
``tx.update`` and through the lean step, with and without a mask. The loss
is of order 1 and mu is large enough that the rounding of a loss, amplified
by 1 / mu^2 in the curvature's q, stays small.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hizoo_jax as hz
from hizoo_jax.core import estimators, leafwise, scheme
from hizoo_jax import noise

MU = 5e-2


def make_params():
  rng = np.random.default_rng(1)
  return {"w": jnp.asarray(rng.normal(size=(6, 4)) / 3, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(4,)) / 3, jnp.float32),
          "t": jnp.asarray(rng.normal(size=(2, 5, 3)) / 3, jnp.float32)}


def loss(p):
  return sum(jnp.mean(x**2 + 0.1 * jnp.sin(3 * x)) * (i + 1)
             for i, x in enumerate(jax.tree.leaves(p)))


def run(tx, lean, steps=5):
  params, state = make_params(), None
  state = tx.init(params)
  if lean:
    step = hz.make_train_step(tx, lambda p, b: loss(p), donate=False)
    for _ in range(steps):
      params, state, _ = step(params, state, None)
    return params, state

  @jax.jit
  def one(p, s):
    u, s = tx.update(None, s, p, value_fn=loss)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = one(params, state)
  return params, state


MASK = {"w": True, "b": False, "t": True}
CASES = {
    "mezo": dict(kind="mezo"),
    "mezo_q2": dict(kind="mezo", num_queries=2),
    "tensor": dict(),
    "row": dict(curvature="row", min_dim_size_to_factor=2),
    "column": dict(curvature="column", min_dim_size_to_factor=2),
    "element": dict(curvature="element"),
    "factored": dict(factored=True, min_dim_size_to_factor=2),
    "paper": dict(estimator="paper", hessian_smooth=0.1),
    "paper_factored": dict(estimator="paper", factored=True,
                           min_dim_size_to_factor=2, hessian_smooth=0.1),
    "reference": dict(estimator="reference", hessian_smooth=0.1),
    "q2_every2": dict(num_queries=2, curvature_every=2),
}


def make(case, program, mask):
  opts = dict(CASES[case])
  if opts.pop("kind", None) == "mezo":
    return hz.mezo(0.05, mu=MU, mask=mask, program=program, **opts)
  return hz.hizoo(0.05, mu=MU, mask=mask, program=program, **opts)


# The matrix (every estimator and rule, masked or not); the other
# cases run without a mask.
MASKED = ("mezo", "tensor", "row", "element", "factored", "paper",
          "reference")
MATRIX = [(case, mask) for case in sorted(CASES) for mask in (None, MASK)
          if mask is None or case in MASKED]


@pytest.mark.parametrize("lean", [False, True], ids=["update", "lean"])
@pytest.mark.parametrize("case, mask", MATRIX, ids=[
    f"{case}-{'masked' if mask else 'all'}" for case, mask in MATRIX])
def test_plain_equals_compact(case, mask, lean):
  p_plain, s_plain = run(make(case, "plain", mask), lean)
  p_compact, s_compact = run(make(case, "compact", mask), lean)
  start = make_params()
  for name in start:
    np.testing.assert_allclose(p_plain[name], p_compact[name],
                               rtol=1e-5, atol=1e-6)
    moved = not np.array_equal(p_plain[name], start[name])
    assert moved == (mask is None or MASK[name]), name
  zo_plain, zo_compact = s_plain[0], s_compact[0]
  assert zo_plain.leaf_numbers is None  # no compiler device in the state
  for field in ("count", "skipped", "loss", "loss_plus", "loss_minus",
                "projected_grad"):
    np.testing.assert_allclose(getattr(zo_plain, field),
                               getattr(zo_compact, field), rtol=2e-5,
                               atol=1e-5)
  h_plain = jax.tree.leaves(zo_plain.hessian)
  h_compact = jax.tree.leaves(zo_compact.hessian)
  assert len(h_plain) == len(h_compact)
  for a, b in zip(h_plain, h_compact):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  if case not in ("mezo", "mezo_q2"):
    assert any(not np.allclose(h, 1.0) for h in h_plain), "H never moved"


def _points(tx, params):
  """The Perturbation the estimator hands the lean step."""
  found = hz.PerturbationProbe()
  tx.update(None, tx.init(params), params, zo_probe=found)
  return found.perturbation


def test_program_switch(monkeypatch):
  params = make_params()
  assert _points(hz.mezo(0.1, program="plain"), params).loop == "walk"
  assert _points(hz.mezo(0.1, program="compact"), params).loop == "compact"
  monkeypatch.setenv("HIZOO_PROGRAM", "plain")
  assert _points(hz.hizoo(0.1), params).loop == "walk"
  with pytest.raises(ValueError, match="program must be one of"):
    hz.mezo(0.1, program="fast")


def test_states_differ_only_in_leaf_numbers():
  """The plain program's state holds the mathematics only; the compact one
  also holds each leaf's number (docs/api.md says why)."""
  params = make_params()
  for make in (hz.mezo, hz.hizoo, hz.hizoo_l):
    plain = make(0.1, program="plain").init(params)
    compact = make(0.1, program="compact").init(params)
    assert plain[0].leaf_numbers is None
    assert jax.tree.leaves(compact[0].leaf_numbers)
    assert (jax.tree.structure(plain[0]._replace(leaf_numbers=None)) ==
            jax.tree.structure(compact[0]._replace(leaf_numbers=None)))


def one_sided(mu, key=0):
  """A new estimator from the core's public pieces alone:
  g = (L(theta + mu z) - L(theta)) / mu, returns g z."""
  points = scheme.one_sided(1)

  def init_fn(params):
    return estimators.new_state(noise.key_words(key))

  def update_fn(updates, state, params=None, *, value_fn=None, **extra):
    leaves = leafwise.leaves_of(params, None, state.rng_key, state.count, 1)
    move = lambda tree, c, q: leafwise.perturb(leaves, tree, c, q, mu)
    losses = estimators.probe_or_losses(points, leaves, params, move,
                                        value_fn, extra, state.count)
    if losses is None:  # the lean step asked for the points
      return jax.tree.map(jnp.zeros_like, params), state
    g = (losses[1:] - losses[0]) / mu
    finite = jnp.all(jnp.isfinite(losses))
    direction = leafwise.combine(leaves, jnp.where(finite, g, 0.0))
    return direction, estimators.stepped(state, finite, losses[0],
                                         losses[1:], losses[1:], g)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@pytest.mark.parametrize("lean", [False, True], ids=["update", "lean"])
def test_new_estimator_from_core_pieces(lean):
  tx = optax.chain(one_sided(1e-3), optax.scale(-0.05))
  params = make_params()
  state = tx.init(params)
  z = hz.step_noise(state, params)
  expected_g = (float(loss(jax.tree.map(lambda x, z: x + 1e-3 * z, params, z)))
                - float(loss(params))) / 1e-3
  new, state = run(tx, lean, steps=1)
  np.testing.assert_allclose(float(state[0].projected_grad), expected_g,
                             rtol=2e-2)
  for name in params:
    np.testing.assert_allclose(new[name], params[name] - 0.05 * expected_g *
                               z[name], rtol=2e-2, atol=1e-4)
  trained, state = run(tx, lean, steps=60)
  assert float(loss(trained)) < 0.9 * float(loss(params))


@pytest.mark.parametrize("saved, restored", [("compact", "plain"),
                                             ("plain", "compact")])
def test_checkpoint_restores_into_the_other_program(tmp_path, saved,
                                                    restored):
  params = make_params()
  tx_saved = hz.hizoo(0.05, mu=MU, program=saved)
  params, state = run(tx_saved, lean=False, steps=2)
  hz.save_checkpoint(str(tmp_path), 2, params, state)
  tx = hz.hizoo(0.05, mu=MU, program=restored)
  step, p, s = hz.restore_checkpoint(str(tmp_path), make_params(),
                                     tx.init(make_params()))
  assert step == 2
  assert (s[0].leaf_numbers is None) == (restored == "plain")
  for a, b in zip(jax.tree.leaves(s[0].hessian), jax.tree.leaves(
      state[0].hessian)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(p["w"], params["w"])
  updates, _ = tx.update(None, s, p, value_fn=loss)  # and it steps on
  assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("program", ["plain", "compact"])
def test_checkpoint_with_leaf_numbers_restores(tmp_path, program):
  """A checkpoint written before this layout (its ZOState held a tree of
  leaf numbers, tests/data/checkpoint_leaf_numbers, by hizoo_jax at
  3180ffa) restores into today's state of either program."""
  import os, shutil  # pylint: disable=import-outside-toplevel,multiple-imports
  data = os.path.join(os.path.dirname(__file__), "data")
  shutil.copytree(os.path.join(data, "checkpoint_leaf_numbers"),
                  tmp_path / "old")
  expected = np.load(os.path.join(data,
                                  "checkpoint_leaf_numbers_expected.npz"))
  params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
  tx = hz.hizoo_l(0.05, mu=5e-2, min_dim_size_to_factor=2, program=program)
  step, p, s = hz.restore_checkpoint(str(tmp_path / "old"), params,
                                     tx.init(params))
  assert step == 3 and int(s[0].count) == int(expected["count"])
  assert (s[0].leaf_numbers is None) == (program == "plain")
  rows, cols = s[0].hessian
  np.testing.assert_array_equal(rows["w"], expected["rows_w"])
  np.testing.assert_array_equal(cols["w"], expected["cols_w"])
  np.testing.assert_array_equal(p["w"], expected["w"])
  updates, _ = tx.update(None, s, p, value_fn=loss)
  assert np.all(np.isfinite(updates["w"]))
