"""Checkpoints: exact resume, sharded save/restore, keep-last-N, atomicity."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hizoo_jax as hz
from hizoo_jax.checkpoint import (CheckpointError, all_steps,
                                  restore_checkpoint, save_checkpoint)
from hizoo_jax.sharding import abstract_state, init_sharded

SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None),
         "b2": P()}


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (16, 32)) / 4, "b1": jnp.zeros(32),
          "w2": jax.random.normal(k2, (32, 8)) / 6, "b2": jnp.zeros(8)}


def loss(p, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)


def batch_at(step):
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(1), step))
  return jax.random.normal(k1, (16, 16)), jax.random.normal(k2, (16, 8))


def make_tx():
  return hz.hizoo_l(1e-2, mu=1e-2, hessian_smooth=1e-2, min_dim_size_to_factor=8,
                    weight_decay=1e-3)


def make_step(tx):
  def step(params, state, batch):
    updates, state = tx.update(None, state, params,
                               value_fn=lambda p: loss(p, batch))
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def run(step, params, state, start, stop):
  for i in range(start, stop):
    params, state = step(params, state, batch_at(i))
  return params, state


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_resume_continues_the_exact_trajectory(tmp_path):
  tx = make_tx()
  step_fn = make_step(tx)
  params0 = make_params()
  full_params, full_state = run(step_fn, params0, tx.init(params0), 0, 4)

  params, state = run(step_fn, params0, tx.init(params0), 0, 2)
  save_checkpoint(tmp_path, 2, params, state)
  del params, state  # a restart: only fresh targets are available.
  step, params, state = restore_checkpoint(tmp_path, make_params(),
                                           tx.init(make_params()))
  assert step == 2 and int(hz.find_state(state).count) == 2
  assert isinstance(state[0].hessian, tuple)  # row and column factor trees
  params, state = run(step_fn, params, state, step, 4)
  assert_trees_equal(params, full_params)  # bit-exact: same z, same H.
  assert_trees_equal(state, full_state)
  noise = jax.jit(hz.step_noise)
  assert_trees_equal(noise(state, params),
                     noise(full_state, full_params))


def test_sharded_save_and_restore_onto_other_meshes(tmp_path):
  tx = make_tx()
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
  params = jax.device_put(make_params(), p_sh)
  state = init_sharded(tx, params)
  params, state = run(make_step(tx), params, state, 0, 2)
  save_checkpoint(tmp_path, 2, params, state)
  for shape, names in (((4, 2), ("data", "model")), ((8,), ("model",))):
    other = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    specs = dict(SPECS, w1=P("model", None)) if shape == (8,) else SPECS
    o_sh = jax.tree.map(lambda s: NamedSharding(other, s), specs)
    target_p = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        make_params(), o_sh)
    target_s = abstract_state(tx, target_p)
    step, new_p, new_s = restore_checkpoint(tmp_path, target_p, target_s)
    assert step == 2
    assert_trees_equal(new_p, params)
    assert_trees_equal(new_s, state)
    assert new_p["w1"].sharding.is_equivalent_to(o_sh["w1"], 2)
    col = new_s[0].hessian[1]["w1"]  # (1, n): sharded like axis 1
    assert col.sharding.is_equivalent_to(
        NamedSharding(other, P(None, None if shape == (8,) else "model")), 2)
  # Onto one device (no mesh): plain arrays.
  _, new_p, _ = restore_checkpoint(tmp_path, make_params(), tx.init(make_params()))
  assert_trees_equal(new_p, params)


def test_keeps_the_last_n_steps(tmp_path):
  params = {"w": jnp.ones(4)}
  tx = hz.mezo(1e-3)
  for step in range(5):
    save_checkpoint(tmp_path, step, params, tx.init(params), max_to_keep=2)
  assert all_steps(tmp_path) == [3, 4]
  with pytest.raises(CheckpointError, match="already saved"):
    save_checkpoint(tmp_path, 4, params, tx.init(params))
  with pytest.raises(ValueError, match="step"):
    save_checkpoint(tmp_path, -1, params, tx.init(params))


_KILLED_SAVER = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    import hizoo_jax as hz
    from hizoo_jax import checkpoint
    from orbax.checkpoint._src.path import async_path

    rename = async_path.rename

    async def rename_or_die(src, dst):
      if os.path.basename(str(dst)) == "3":  # the save of step 3 is written
        os.kill(os.getpid(), signal.SIGKILL)  # but not yet committed.
      return await rename(src, dst)

    async_path.rename = rename_or_die
    for step in (1, 2, 3):
      params = {"w": jnp.full((64, 64), float(step))}
      checkpoint.save_checkpoint(sys.argv[1], step, params, ())
""")


def test_killed_save_resumes_from_last_complete_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(tmp_path)],
                        timeout=120, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  names = sorted(os.listdir(tmp_path))
  assert any(n.startswith("3") and "tmp" in n for n in names), names
  assert all_steps(tmp_path) == [1, 2]
  step, params, _ = restore_checkpoint(tmp_path, {"w": jnp.zeros((64, 64))}, ())
  assert step == 2 and float(params["w"][0, 0]) == 2.0
  # The run goes on: step 3 is saved again over the leftover.
  save_checkpoint(tmp_path, 3, {"w": jnp.full((64, 64), 3.0)}, ())
  assert restore_checkpoint(tmp_path, {"w": jnp.zeros((64, 64))}, ())[0] == 3


def _truncate_state_files(step_dir):
  """Cuts every non-empty data file of the step's optimizer state in half."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir)
           for f in fs if "opt_state" in d and os.path.getsize(os.path.join(d, f)) > 0]
  assert files
  for f in files:
    with open(f, "r+b") as handle:
      handle.truncate(os.path.getsize(f) // 2)


def test_corrupt_newest_step_falls_back_and_deletes_nothing(tmp_path):
  tx = make_tx()
  params = make_params()
  state = tx.init(params)
  for step in (1, 2):
    save_checkpoint(tmp_path, step, jax.tree.map(lambda x: x + step, params),
                    state)
  before = listing(tmp_path)
  _truncate_state_files(tmp_path / "2")
  with pytest.warns(RuntimeWarning, match=r"step 2.*restored step 1"):
    step, got, _ = restore_checkpoint(tmp_path, params, state)
  assert step == 1
  assert_trees_equal(got, jax.tree.map(lambda x: x + 1, params))
  assert listing(tmp_path) == before
  # Committed steps are still listed; verify=True reads them and drops 2.
  assert all_steps(tmp_path) == [1, 2]
  assert all_steps(tmp_path, verify=True) == [1]
  # Asking for the corrupt step names it and the steps that are left.
  with pytest.raises(CheckpointError, match=r"(?s)2.*corrupt.*step=.*\[1\]"):
    restore_checkpoint(tmp_path, params, state, step=2)
  # Garbled metadata of the older step too: nothing readable, a clear error.
  for d, _, fs in os.walk(tmp_path / "1" / "meta"):
    for f in fs:
      with open(os.path.join(d, f), "w") as handle:
        handle.write("{not json")
  with pytest.raises(CheckpointError, match="(?s)metadata.*step="):
    restore_checkpoint(tmp_path, params, state, step=1)
  with pytest.raises(CheckpointError,
                     match=r"(?s)no readable checkpoint.*step 2.*step 1.*metadata"):
    restore_checkpoint(tmp_path, params, state)
  assert all_steps(tmp_path, verify=True) == []
  assert listing(tmp_path) == before


def test_restore_logs_nothing(tmp_path, caplog):
  params = {"w": jnp.ones(4)}
  save_checkpoint(tmp_path, 1, params, ())
  caplog.clear()
  with caplog.at_level("INFO"):
    assert restore_checkpoint(tmp_path, params, ())[0] == 1
    assert all_steps(tmp_path) == [1]
  noise = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert not noise, noise


def test_mismatched_targets_raise_clear_errors(tmp_path):
  tx = make_tx()
  params = make_params()
  save_checkpoint(tmp_path, 5, params, tx.init(params))
  before = listing(tmp_path)
  bigger = dict(params, w2=jnp.zeros((32, 16)))
  with pytest.raises(CheckpointError, match=r"\['w2'\].*\(32, 8\).*step="):
    restore_checkpoint(tmp_path, bigger, tx.init(params))
  with pytest.raises(CheckpointError, match="opt_state"):
    restore_checkpoint(tmp_path, params, hz.hizoo(1e-2).init(params))
  with pytest.raises(CheckpointError, match="float32"):
    restore_checkpoint(tmp_path, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                              params), tx.init(params))
  with pytest.raises(CheckpointError, match=r"step 4.*step=.*\[5\]"):
    restore_checkpoint(tmp_path, params, tx.init(params), step=4)
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    restore_checkpoint(tmp_path / "empty_but_missing", params, tx.init(params))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    restore_checkpoint(tmp_path / "empty", params, tx.init(params))
  assert listing(tmp_path) == before
