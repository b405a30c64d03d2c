"""Program size of the lean step, and models with stacked (scanned) layers.

Structural tests: they count HLO instructions of compiled programs, not time.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import hizoo_jax as hz
from hizoo_jax import _xla


def instructions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def distinct_kernels(compiled, wrapped=False) -> int:
  """How many fused computations (and, if ``wrapped``, single operations
  wrapped as kernels) differ other than by their names."""
  kind = r"(?:fused|wrapped_\w+)" if wrapped else "fused"
  bodies = re.findall(rf"\n%?{kind}_computation[\w.]* \(.*?\n(.*?)\n\}}",
                      compiled.as_text(), re.S)
  names = r"%[\w.\-]+|metadata=\{[^}]*\}|, (backend_config|frontend_attr).*"
  return len({re.sub(names, "", body) for body in bodies})


def largest_loop_carry(compiled) -> int:
  """How many arrays the largest while loop carries (the step's phases)."""
  sizes = [0]
  for line in compiled.as_text().splitlines():
    match = re.search(r" = \((.*)\) while\(", line)
    if match:  # Count the tuple's top-level elements.
      shape, depth, count = re.sub(r"/\*.*?\*/", "", match.group(1)), 0, 1
      for ch in shape:
        depth += ch in "([{"
        depth -= ch in ")]}"
        count += ch == "," and depth == 0
      sizes.append(count)
  return max(sizes)


def scanned_model(depth, width=16):
  """A residual MLP whose layers are stacked and run with lax.scan."""
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
      "layers": {
          "w": 0.3 * jax.random.normal(keys[0], (depth, width, width)),
          "b": jnp.zeros((depth, width)),
      },
      "head": jax.random.normal(keys[1], (width,)) / np.sqrt(width),
  }

  def loss(p, x):
    def layer(h, wb):
      w, b = wb
      return h + jnp.tanh(h @ w + b), None
    h, _ = lax.scan(layer, x, (p["layers"]["w"], p["layers"]["b"]))
    return jnp.mean((h @ p["head"] - 1.0) ** 2)

  return params, loss, jnp.ones((4, width))


STACKED = {"layers": True, "head": False}
OPTIMIZERS = {
    "mezo": lambda: hz.mezo(1e-3),
    "hizoo": lambda: hz.hizoo(1e-3, stacked=STACKED),
    "hizoo_l": lambda: hz.hizoo_l(1e-3, min_dim_size_to_factor=4,
                                  stacked=STACKED),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_program_does_not_grow_with_stacked_depth(name):
  counts = []
  for depth in (2, 8):
    params, loss, x = scanned_model(depth)
    tx = OPTIMIZERS[name]()
    step = hz.make_train_step(tx, loss)
    counts.append(instructions(
        step.lower(params, tx.init(params), x).compile()))
  # Only shapes differ between the two programs.
  assert abs(counts[1] - counts[0]) <= 0.02 * counts[0], counts


def test_stacked_layers_keep_their_own_curvature():
  params, loss, x = scanned_model(3)
  tx = hz.scale_by_hizoo(1e-3, stacked=STACKED)
  shapes = jax.tree.map(jnp.shape, tx.init(params).hessian[0])
  assert shapes == {"layers": {"w": (3, 1, 1), "b": (3, 1)}, "head": (1,)}
  rows, cols = hz.scale_by_hizoo(
      1e-3, factored=True, min_dim_size_to_factor=4,
      stacked=STACKED).init(params).hessian
  assert rows["layers"]["w"].shape == (3, 16, 1)
  assert cols["layers"]["w"].shape == (3, 1, 16)
  # Without the mark the layer axis is just another axis of one tensor.
  assert hz.scale_by_hizoo(1e-3).init(params).hessian[0]["layers"]["w"].shape \
      == (1, 1, 1)
  with pytest.raises(ValueError, match="scalar"):
    hz.scale_by_hizoo(1e-3, stacked=True).init({"s": jnp.ones(())})


def test_stacked_curvature_learns_per_layer():
  """A quadratic whose two stacked layers differ 30x in curvature."""
  depth, width = 2, 64
  scale = jnp.asarray([30.0, 1.0])[:, None]
  params = {"w": jnp.ones((depth, width))}

  def loss(p):
    return 0.5 * jnp.sum(scale * p["w"] ** 2)

  tx = optax.chain(
      hz.scale_by_hizoo(1e-2, 0.2, stacked=True, key=1), optax.scale(-1e-3))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
  for _ in range(300):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  h = np.asarray(state[0].hessian[0]["w"]).reshape(-1)
  assert h[0] / h[1] > 10  # learns the 30x; one shared H could not.


def test_nnx_scan_model_trains_with_the_lean_step():
  """Layers built with nnx.vmap and run with nnx.scan: stacked params."""
  depth, width = 3, 8

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
      return x + jnp.tanh(self.linear(x))

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_blocks(rngs):
    return Block(rngs)

  graphdef, params = nnx.split(make_blocks(nnx.Rngs(0)), nnx.Param)
  assert params["linear"]["kernel"].shape == (depth, width, width)

  def loss(p, x):
    blocks = nnx.merge(graphdef, p)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, h):
      return block(h)

    return jnp.mean((forward(blocks, x) - 0.5) ** 2)

  x = jnp.linspace(-1, 1, 4 * width).reshape(4, width)
  tx = hz.hizoo(3e-3, stacked=True)
  state = tx.init(params)
  assert state[0].hessian[0]["linear"]["kernel"].shape == (depth, 1, 1)
  step = hz.make_train_step(tx, loss, donate=False)
  plain = jax.jit(lambda p, s: tx.update(
      None, s, p, value_fn=lambda q: loss(q, x)))
  updates, _ = plain(params, state)
  new_params, _, metrics = step(params, state, x)
  for a, b, u in zip(jax.tree.leaves(new_params), jax.tree.leaves(params),
                     jax.tree.leaves(updates)):
    np.testing.assert_allclose(a - b, u, rtol=1e-4, atol=1e-7)
  first = float(metrics["loss"])
  p, s = params, state
  for _ in range(60):
    p, s, metrics = step(p, s, x)
  assert float(metrics["loss"]) < 0.9 * first


@pytest.mark.parametrize("one_device", [True, False])
def test_program_grows_per_leaf_at_a_bounded_rate(one_device, monkeypatch):
  """Unstacked leaves: each adds its own fused noise code to the step.

  8 and 64 same-shaped leaves, too large to be drawn together
  (hizoo_jax.leaf_draws). The forward pass of this MLP adds 8 instructions
  per leaf. A step adds one fused copy of the generator per leaf (~80 with
  the move and the update: moves, restore and update are one expression in
  the loop): MeZO 95 per leaf, 12x the forward's growth. HiZOO's sums of
  z^2 are one loop for all leaves and its rule one vector
  (hizoo_jax.range_sums; 116 per leaf, 15x; HiZOO-L 137). On a mesh HiZOO
  sums leaf by leaf, each sum sharded like its leaf (269 per leaf, 34x).
  Those copies are alike, and XLA compiles each distinct kernel once.
  Stacked layers do not pay per leaf at all (test above). The loop carries
  per leaf only the leaf and its number: H rides as one vector
  (grouped_curvature.Carried), where each factor written on the last phase
  was a kernel of its own (HiZOO 122, HiZOO-L 149 instructions per leaf).
  """
  if one_device:
    monkeypatch.setattr(_xla, "single_device", lambda: True)

  def mlp(n, width=16):
    params = {f"l{i:02d}": jnp.eye(width) for i in range(n)}

    def loss(p, x):
      for k in sorted(p):
        x = jnp.tanh(x @ p[k])
      return jnp.mean(x ** 2)
    return params, loss, jnp.ones((2, width))

  optimizers = {"mezo": lambda: hz.mezo(1e-3), "hizoo": lambda: hz.hizoo(1e-3),
                "hizoo_l": lambda: hz.hizoo_l(1e-3, min_dim_size_to_factor=4)}
  growth, kernels, carry = {}, {}, {}
  for name in ("forward", *optimizers):
    counts = []
    for n in (8, 64):
      params, loss, x = mlp(n)
      if name == "forward":
        compiled = jax.jit(loss).lower(params, x).compile()
      else:
        tx = optimizers[name]()
        compiled = hz.make_train_step(tx, loss).lower(
            params, tx.init(params), x).compile()
        kernels.setdefault(name, []).append(distinct_kernels(compiled))
        carry.setdefault(name, []).append(largest_loop_carry(compiled))
      counts.append(instructions(compiled))
    growth[name] = (counts[1] - counts[0]) / 56
  assert 0 < growth["forward"] < 20, growth
  assert growth["mezo"] < 14 * growth["forward"], growth
  assert growth["hizoo"] < (18 if one_device else 40) * growth["forward"], (
      growth)
  # Same-shaped leaves share their kernels, which XLA compiles once: the
  # distinct kernels do not grow with the leaves (56 more leaves; a kernel
  # shaped by the total, such as the loop of sums' block, may differ).
  for name, (few, many) in kernels.items():
    assert many <= few + 2, (name, kernels)
  # HiZOO-L on a mesh updates after the loop (its sums leaf by leaf).
  in_loop = optimizers if one_device else ("mezo", "hizoo")
  for name in in_loop:
    assert carry[name][1] - carry[name][0] == 2 * 56, (name, carry)


def test_curvature_keeps_mean_one_over_all_coordinates():
  """H is normalised to mean 1 over every coordinate, whatever its factors:
  per-tensor numbers (computed together as one vector), rows and columns,
  and the per-layer factors of stacked leaves."""
  params = {"stack": {"w": jnp.ones((3, 8, 6)), "b": jnp.ones((3, 8))},
            "w": jnp.ones((8, 6)), "b": jnp.ones((6,))}
  scale = {"stack": {"w": 3.0, "b": 0.5}, "w": 2.0, "b": 1.0}

  def loss(p):
    return sum(jnp.sum(c * (x - 0.5) ** 2) for c, x in zip(
        jax.tree.leaves(scale), jax.tree.leaves(p)))

  stacked = {"stack": True, "w": False, "b": False}
  for tx in (hz.scale_by_hizoo(1e-2, 0.2, stacked=stacked, key=1),
             hz.scale_by_hizoo(1e-2, 0.2, factored=True, key=1,
                               min_dim_size_to_factor=4, stacked=stacked)):
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(None, s, params, value_fn=loss)[1])
    for _ in range(12):
      state = step(state)
    factors = state.hessian
    total = 0.0
    for leaf, *hs in zip(jax.tree.leaves(params),
                         *[jax.tree.leaves(f) for f in factors]):
      h = np.ones(leaf.shape)
      for f in hs:
        h = h * np.asarray(f, np.float64)
      total += h.sum()
    assert not np.allclose(jax.tree.leaves(factors[0])[0], 1.0)  # H moved
    dim = sum(x.size for x in jax.tree.leaves(params))
    np.testing.assert_allclose(total / dim, 1.0, rtol=1e-5)
