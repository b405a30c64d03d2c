"""Checkpoints under attack: rollbacks, two writers, bit flips, odd leaves.

The adversarial runs of issue 26, sized for CI; benchmarks/
checkpoint_attacks.py repeats them at scale by hand.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hizoo_jax as hz
from hizoo_jax import dirlock
from hizoo_jax.checkpoint import (LOCK_NAME, CheckpointError, all_steps,
                                  restore_checkpoint, save_checkpoint)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _params(value, n=4):
  rng = np.random.default_rng(int(value))
  return {f"w{i}": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
          for i in range(n)}


def _same(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_save_below_the_newest_step_refuses_or_supersedes(tmp_path):
  for step in (10, 20, 30):
    save_checkpoint(tmp_path, step, _params(step), (), max_to_keep=None)
  before = _listing(tmp_path)
  with pytest.raises(CheckpointError, match=r"step 15.*\[20, 30\].*supersede"):
    save_checkpoint(tmp_path, 15, _params(15), ())
  assert _listing(tmp_path) == before and all_steps(tmp_path) == [10, 20, 30]
  # A rollback says so: the later steps go, the new one is saved.
  save_checkpoint(tmp_path, 15, _params(15), (), supersede=True)
  assert all_steps(tmp_path) == [10, 15]
  save_checkpoint(tmp_path, 25, _params(25), ())
  assert all_steps(tmp_path) == [10, 15, 25]
  step, got, _ = restore_checkpoint(tmp_path, _params(0), ())
  assert step == 25 and _same(got, _params(25))


_SAVER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from hizoo_jax.checkpoint import save_checkpoint, CheckpointError
    directory, value, steps, hold = sys.argv[1], float(sys.argv[2]), \\
        [int(s) for s in sys.argv[3].split(",")], float(sys.argv[4])
    try:
      for step in steps:
        save_checkpoint(directory, step, {"w": jnp.full((64, 64), value)},
                        {"v": jnp.full((8,), value)}, max_to_keep=None)
    except CheckpointError as e:
      print("REFUSED", e)
      sys.exit(3)
    print("SAVED", flush=True)
    time.sleep(hold)
""")


def _saver(directory, value, steps, hold=0.0):
  return subprocess.Popen(
      [sys.executable, "-c", _SAVER, str(directory), str(value),
       ",".join(map(str, steps)), str(hold)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_one_writer_per_directory(tmp_path):
  save_checkpoint(tmp_path, 1, {"w": jnp.zeros((64, 64))},
                  {"v": jnp.zeros(8)})
  assert os.path.isfile(tmp_path / LOCK_NAME)
  other = _saver(tmp_path, 2.0, [2])
  out, err = other.communicate(timeout=120)
  assert other.returncode == 3, err[-2000:]
  assert f"pid {os.getpid()}" in out and "one writer per directory" in out
  assert all_steps(tmp_path) == [1]
  # Released (as at exit), the directory can change hands.
  dirlock.release(tmp_path, LOCK_NAME)
  other = _saver(tmp_path, 2.0, [2])
  assert other.wait(timeout=120) == 0, other.stderr.read()[-2000:]
  assert all_steps(tmp_path) == [1, 2]


def test_concurrent_savers_never_mix_runs(tmp_path):
  procs = [_saver(tmp_path, float(v), [1, 2, 3], hold=2.0) for v in (1, 2)]
  codes = [p.wait(timeout=180) for p in procs]
  assert sorted(codes) == [0, 3], [p.stderr.read()[-2000:] for p in procs]
  winner = 1.0 if codes[0] == 0 else 2.0
  assert all_steps(tmp_path, verify=True) == [1, 2, 3]
  for step in (1, 2, 3):
    _, p, s = restore_checkpoint(tmp_path, {"w": jnp.zeros((64, 64))},
                                 {"v": jnp.zeros(8)}, step=step)
    assert float(p["w"].min()) == float(p["w"].max()) == winner
    assert float(s["v"].min()) == float(s["v"].max()) == winner


def test_a_killed_writer_leaves_a_lock_that_is_taken_over(tmp_path):
  held = _saver(tmp_path, 1.0, [1], hold=300.0)
  assert held.stdout.readline().strip() == "SAVED"
  os.kill(held.pid, signal.SIGKILL)
  held.wait(timeout=60)
  with open(tmp_path / LOCK_NAME) as f:
    assert json.load(f)["pid"] == held.pid  # stale: its owner is gone
  save_checkpoint(tmp_path, 2, {"w": jnp.ones((64, 64))}, {"v": jnp.ones(8)})
  assert all_steps(tmp_path) == [1, 2]
  with open(tmp_path / LOCK_NAME) as f:
    assert json.load(f)["pid"] == os.getpid()


def _data_files(step_dir):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(step_dir)
                for f in fs if os.sep + "d" in d and
                os.path.getsize(os.path.join(d, f)) > 0)


def test_damaged_metadata_falls_back_instead_of_a_mismatch(tmp_path):
  """A flipped byte in a step's JSON metadata (e.g. a dtype) is damage, not
  another run: restore falls back with its warning."""
  params = _params(2, n=1)
  save_checkpoint(tmp_path, 1, _params(1, n=1), ())
  save_checkpoint(tmp_path, 2, params, ())
  [meta] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "2" / "meta")
            for f in fs if f == "metadata"]
  text = open(meta).read()
  assert '"float32"' in text
  open(meta, "w").write(text.replace('"float32"', '"flnat32"', 1))
  with pytest.warns(RuntimeWarning, match="step 2.*metadata fails its checksum"):
    step, got, _ = restore_checkpoint(tmp_path, params, ())
  assert step == 1 and _same(got, _params(1, n=1))
  assert all_steps(tmp_path, verify=True) == [1]


def test_single_bit_flips_never_restore_other_values(tmp_path):
  tx = hz.mezo(1e-3)
  params = _params(2, n=2)
  state = tx.init(params)
  save_checkpoint(tmp_path / "ok", 1, _params(1, n=2), state)
  save_checkpoint(tmp_path / "ok", 2, params, state)
  # The largest file holds the parameters' bytes; flips spread over it.
  biggest = max(_data_files(tmp_path / "ok" / "2"), key=os.path.getsize)
  size = os.path.getsize(biggest)
  outcomes = {"fell back": 0, "identical": 0}
  for trial in range(12):
    work = tmp_path / f"t{trial}"
    shutil.copytree(tmp_path / "ok", work)
    path = os.path.join(work, os.path.relpath(biggest, tmp_path / "ok"))
    data = bytearray(open(path, "rb").read())
    data[(2 * trial + 1) * size // 25] ^= 1 << (trial % 8)
    open(path, "wb").write(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      step, got, _ = restore_checkpoint(work, params, state)
    if step == 2:  # the flip did not touch the values: they are exact.
      assert _same(got, params) and not caught
      assert all_steps(work, verify=True) == [1, 2]
      outcomes["identical"] += 1
    else:
      assert step == 1 and _same(got, _params(1, n=2))
      assert len(caught) == 1 and "step 2" in str(caught[0].message)
      assert all_steps(work, verify=True) == [1]
      outcomes["fell back"] += 1
  assert outcomes["fell back"] >= 9, outcomes


_DAMAGED_RESTORE = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    import hizoo_jax as hz
    d = sys.argv[1]
    p = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(40)}
    for step in (1, 2):
      hz.save_checkpoint(d, step, p, hz.hizoo(1e-3).init(p))
    for root, _, files in os.walk(os.path.join(d, "2")):
      for f in files:
        path = os.path.join(root, f)
        if os.sep + "d" in root and os.path.getsize(path):
          data = bytearray(open(path, "rb").read())
          data[len(data) // 2] ^= 4
          open(path, "wb").write(bytes(data))
    print("RESTORING", file=sys.stderr, flush=True)
    step = hz.restore_checkpoint(d, p, hz.hizoo(1e-3).init(p))[0]
    # Single flips anywhere in a step (orbax's metadata included) fail in
    # other places of orbax; each must stay as quiet.
    import random, shutil, warnings
    rng = random.Random(0)
    base = os.path.join(d, "single")
    state = hz.hizoo(1e-3).init(p)
    for s in (1, 2):
      hz.save_checkpoint(base, s, p, state)
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(base, "2"))
             for f in fs if os.path.getsize(os.path.join(r, f))]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      for trial in range(int(sys.argv[2])):
        work = os.path.join(d, f"t{trial}")
        shutil.copytree(base, work)
        path = os.path.join(work, os.path.relpath(rng.choice(files), base))
        data = bytearray(open(path, "rb").read())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        open(path, "wb").write(bytes(data))
        hz.restore_checkpoint(work, p, state)
    import gc, time
    gc.collect()
    time.sleep(1)  # late callbacks would print by now
    print("RESTORED", step, file=sys.stderr)
""")


def test_restoring_a_damaged_step_prints_only_the_warning(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _DAMAGED_RESTORE,
                         str(tmp_path), "40"], capture_output=True, text=True,
                        timeout=300, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = proc.stderr.split("RESTORING\n", 1)[1]
  lines = [l for l in after.splitlines() if l.strip()]
  assert lines[-1] == "RESTORED 1", after[-3000:]
  assert "Event loop is closed" not in after and "Traceback" not in after
  warning = [l for l in lines if "RuntimeWarning" in l]
  assert len(warning) == 1 and "step 2" in warning[0]
  # The warning line, the source line warnings.warn shows, RESTORED.
  assert len(lines) <= 3, after[-3000:]


def test_typed_keys_and_python_scalars_round_trip(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  state = {"key": jax.random.key(7), "keys": jax.random.split(
      jax.random.key(1), 3), "count": 5, "lr": 0.125, "on": True,
           "np": np.float32(2.5)}
  save_checkpoint(tmp_path, 1, params, state)
  assert all_steps(tmp_path, verify=True) == [1]
  target = {"key": jax.random.key(0), "keys": jax.random.split(
      jax.random.key(0), 3), "count": 0, "lr": 0.0, "on": False,
            "np": np.float32(0)}
  step, got_p, got = restore_checkpoint(tmp_path, params, target)
  assert step == 1 and _same(got_p, params)
  for name in ("key", "keys"):
    assert jax.dtypes.issubdtype(got[name].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got[name]),
                                  jax.random.key_data(state[name]))
  assert got["count"] == 5 and type(got["count"]) is int
  assert got["lr"] == 0.125 and type(got["lr"]) is float
  assert got["on"] is True
  assert got["np"] == np.float32(2.5) and got["np"].dtype == np.float32
  # Abstract targets work too (the shapes and dtypes of the keys).
  abstract = jax.eval_shape(lambda: {"key": jax.random.key(0)})
  save_checkpoint(tmp_path / "k", 1, params, {"key": jax.random.key(9)})
  _, _, got = restore_checkpoint(tmp_path / "k", params, abstract)
  np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                jax.random.key_data(jax.random.key(9)))


def test_checkpoints_written_before_checksums_still_restore(tmp_path):
  shutil.copytree(os.path.join(DATA, "checkpoint_v1"), tmp_path / "v1")
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4, jnp.bfloat16)}
  state = {"count": jnp.int32(0), "m": jnp.zeros((3, 4))}
  assert all_steps(tmp_path / "v1", verify=True) == [5]
  step, got_p, got_s = restore_checkpoint(tmp_path / "v1", params, state)
  assert step == 5
  np.testing.assert_array_equal(
      got_p["w"], jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7)
  assert int(got_s["count"]) == 3 and float(got_s["m"][0, 0]) == 0.5
  # The next save into the old directory is checksummed.
  save_checkpoint(tmp_path / "v1", 6, got_p, got_s)
  assert all_steps(tmp_path / "v1", verify=True) == [5, 6]
