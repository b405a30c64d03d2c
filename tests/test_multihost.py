"""Two processes on localhost (2 CPU devices each) against a 1-process run."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax

import multihost_worker as worker

import hizoo_jax as hz
from hizoo_jax.checkpoint import restore_checkpoint

STEPS = 3
TIMEOUT = 120  # seconds for the whole 2-process run.
EPS32 = float(np.finfo(np.float32).eps)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def run_two_processes(out):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  port = free_port()
  script = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
  procs = []
  try:
    for pid in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, script, str(pid), "2", str(port), str(out),
           str(STEPS)], env=env, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:  # never leave a child behind (timeout or error).
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]


def single_process(name):
  """The same steps on one device, without a mesh."""
  params_np, batch = worker.make_problem()
  tx = worker.make_optimizer(name)
  params = jax.tree.map(jax.numpy.asarray, params_np)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(None, s, p, value_fn=lambda q: worker.loss(q, batch))
    return optax.apply_updates(p, updates), s

  losses = []
  for _ in range(STEPS):
    params, state = step(params, state)
    losses.append(float(hz.find_state(state).loss_plus))
  return worker.flat_results(name, params, state, losses)


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "result.npz"
  run_two_processes(out)
  got = dict(np.load(out))
  for name in ("hizoo", "hizoo_l"):
    want = single_process(name)
    assert set(want) <= set(got)
    # Bound as in test_sharding.trajectory_bounds: the losses are summed in
    # another order (<= 16 eps relative), which moves g by dl / mu and H by
    # alpha * 27.1 * 4 dl / (2 mu^2) per step.
    dl = 16 * EPS32 * float(np.max(np.abs(want[f"{name}/losses"])))
    hyper = worker.HYPER
    params_tol = STEPS * hyper["learning_rate"] * (dl / hyper["mu"]) * 5.3 * 2
    hess_tol = (STEPS * hyper["hessian_smooth"] * 2 * 27.1 * 4 * dl
                / (2 * hyper["mu"] ** 2))
    np.testing.assert_allclose(got[f"{name}/losses"], want[f"{name}/losses"],
                               rtol=64 * EPS32)
    for key in want:
      if "/params" in key:
        np.testing.assert_allclose(got[key], want[key], rtol=0,
                                   atol=params_tol + 8 * EPS32, err_msg=key)
      elif "/hessian" in key:
        np.testing.assert_allclose(got[key], want[key], rtol=0,
                                   atol=hess_tol + 8 * EPS32, err_msg=key)
    # The checkpoint both processes wrote restores on one device to exactly
    # the gathered arrays.
    params0 = jax.tree.map(jax.numpy.asarray, worker.make_problem()[0])
    tx = worker.make_optimizer(name)
    step, params, state = restore_checkpoint(
        f"{out}.{name}.ckpt", params0, tx.init(params0))
    assert step == STEPS and int(hz.find_state(state).count) == STEPS
    restored = worker.flat_results(name, params, state, got[f"{name}/losses"])
    for key in restored:
      np.testing.assert_array_equal(restored[key], got[key], err_msg=key)
    start = worker.make_problem()[0]["w1"]
    assert np.max(np.abs(want[f"{name}/params['w1']"] - start)) > 50 * params_tol


def test_free_port_is_on_localhost():
  port = free_port()
  assert 1024 <= port < 65536
  with socket.socket() as sock:  # still free: the run can bind it.
    sock.bind(("127.0.0.1", port))
