"""One process of the 2-process run launched by test_multihost.py.

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz STEPS

Each process has 2 simulated CPU devices; the processes join through
``jax.distributed.initialize`` on 127.0.0.1:PORT with gloo collectives. The
parameters are sharded over all 4 devices of a (data=2, model=2) mesh and
each process feeds only its half of the batch. Process 0 writes the gathered
final parameters, curvature and losses to OUT.npz, and both write a sharded
checkpoint to OUT.npz.<optimizer>.ckpt. The problem definition is
shared with the single-process reference in the test.
"""

import os
import sys

import numpy as np

SPECS = {"w1": (None, ("data", "model")), "b1": (("data", "model"),),
         "w2": (("data", "model"), None), "b2": ()}
HYPER = dict(learning_rate=5e-3, mu=5e-2, hessian_smooth=1e-2)


def make_problem():
  """Numpy params and the global batch, identical in every process."""
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 32)).astype(np.float32) / 4,
            "b1": np.zeros(32, np.float32),
            "w2": rng.normal(size=(32, 8)).astype(np.float32) / 6,
            "b2": np.zeros(8, np.float32)}
  batch = (rng.normal(size=(16, 16)).astype(np.float32),
           rng.normal(size=(16, 8)).astype(np.float32))
  return params, batch


def loss(p, batch):
  import jax.numpy as jnp
  x, y = batch
  out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return jnp.mean((out - y) ** 2)


def make_optimizer(name):
  import hizoo_jax as hz
  if name == "hizoo":
    return hz.hizoo(**HYPER)
  return hz.hizoo_l(**HYPER, min_dim_size_to_factor=8)


def flat_results(name, params, state, losses):
  """Dict of numpy arrays keyed by ``name/path``."""
  import jax
  out = {f"{name}/losses": np.asarray(losses)}
  for tree, kind in ((params, "params"), (state[0].hessian, "hessian")):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[f"{name}/{kind}{jax.tree_util.keystr(path)}"] = np.asarray(x)
  return out


def main(process_id, num_processes, port, out, steps):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
      process_id=process_id, initialization_timeout=60)
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import hizoo_jax as hz
  from hizoo_jax.checkpoint import save_checkpoint
  from hizoo_jax.sharding import init_sharded, state_shardings

  assert jax.device_count() == 2 * num_processes, jax.devices()
  # Row i of the mesh holds the devices of process i: the data axis splits
  # the batch across processes, and every parameter spans all 4 devices.
  mesh = Mesh(np.array(jax.devices()).reshape(num_processes, 2),
              ("data", "model"))
  params_np, (x, y) = make_problem()
  p_sh = {k: NamedSharding(mesh, P(*s)) for k, s in SPECS.items()}
  b_sh = NamedSharding(mesh, P("data"))
  rows = slice(process_id * 16 // num_processes,
               (process_id + 1) * 16 // num_processes)
  batch = tuple(jax.make_array_from_process_local_data(b_sh, a[rows])
                for a in (x, y))
  results = {}
  for name in ("hizoo", "hizoo_l"):
    tx = make_optimizer(name)
    params = {k: jax.make_array_from_callback(
        v.shape, p_sh[k], lambda idx, v=v: v[idx]) for k, v in params_np.items()}
    s_sh = state_shardings(tx, params, p_sh)
    state = init_sharded(tx, params)

    def step(p, s, b, tx=tx):
      updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, updates), s

    step = jax.jit(step, in_shardings=(p_sh, s_sh, (b_sh, b_sh)),
                   out_shardings=(p_sh, s_sh))
    losses = []
    for _ in range(steps):
      params, state = step(params, state, batch)
      losses.append(float(hz.find_state(state).loss_plus))
    gathered = multihost_utils.process_allgather((params, state), tiled=True)
    results.update(flat_results(name, *gathered, losses))
    # Every process writes its own shards of the same checkpoint.
    save_checkpoint(f"{out}.{name}.ckpt", steps, params, state)
  if process_id == 0:
    np.savez(out, **results)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, nproc, port_, out_, steps_ = sys.argv[1:6]
  assert "device_count=2" in os.environ.get("XLA_FLAGS", ""), os.environ
  main(int(pid), int(nproc), int(port_), out_, int(steps_))
