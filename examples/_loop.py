"""Training-loop pieces for examples/finetune.py: step, eval, checkpoints, plots.

``make_step`` and ``save`` / ``restore`` are the only places that touch the
optimizer and checkpoint APIs: they use ``hizoo_jax.make_train_step`` and
``hizoo_jax.checkpoint`` when the installed package has them, and plain
``tx.update`` / Orbax otherwise.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hizoo_jax as hz


def _package_train_step():
  """``hizoo_jax.make_train_step`` (memory-lean in-place step) if present."""
  try:
    from hizoo_jax.train_step import make_train_step  # pylint: disable=import-outside-toplevel
  except ImportError:
    return getattr(hz, "make_train_step", None)
  return make_train_step


def make_step(tx, value_fn, zeroth_order: bool):
  """A jitted ``step(train, opt_state, batch) -> (train, opt_state, metrics)``.

  Args:
    tx: the optax transformation (ZO ones need ``value_fn``).
    value_fn: ``value_fn(train, batch) -> scalar`` objective.
    zeroth_order: True for HiZOO / HiZOO-L / MeZO, False for backprop.

  Returns:
    The step function; ``metrics["loss"]`` is the step's objective.
  """
  make_train_step = _package_train_step()
  if zeroth_order and make_train_step is not None:
    step = make_train_step(tx, value_fn)

    def wrapped(train, opt_state, batch):
      train, opt_state, metrics = step(train, opt_state, batch)
      return train, opt_state, {"loss": metrics["loss"]}

    return wrapped

  def step(train, opt_state, batch):
    if zeroth_order:
      updates, opt_state = tx.update(
          None, opt_state, train, value_fn=lambda p: value_fn(p, batch))
      loss = hz.find_state(opt_state).loss
    else:
      loss, grads = jax.value_and_grad(value_fn)(train, batch)
      updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, {"loss": loss}

  return jax.jit(step, donate_argnums=(0, 1))


def own_buffers(tree, device=None):
  """A copy of ``tree`` on one device in which no two leaves share a buffer.

  Donating a step's inputs fails when two leaves alias one buffer (an
  optimizer ``init`` may reuse one zero scalar for several fields), and
  arrays committed to the device after the first step would otherwise make
  the step compile a second time.
  """
  device = device or jax.devices()[0]
  return jax.tree.map(
      lambda x: jax.device_put(jnp.array(x, copy=True), device), tree)


def bucket(batch: dict, multiple: int = 16) -> dict:
  """Cut the right padding of a batch to a multiple of ``multiple`` tokens
  (few distinct shapes, so few compilations)."""
  longest = int(batch["attention_mask"].sum(1).max())
  width = batch["input_ids"].shape[1]
  length = min(width, -(-longest // multiple) * multiple)
  return {k: (v[:, :length] if v.ndim == 2 else v) for k, v in batch.items()}


def evaluate(predict, train, frozen, enc: dict, labels, batch_size: int = 64):
  """Accuracy of ``predict(train, frozen, batch) -> logits`` on a set."""
  order = np.argsort(enc["attention_mask"].sum(1), kind="stable")
  correct = 0
  for i in range(0, len(order), batch_size):
    idx = order[i:i + batch_size]
    batch = bucket({k: v[idx] for k, v in enc.items()})
    logits = predict(train, frozen, batch)
    correct += int(np.sum(np.argmax(np.asarray(logits), -1) == labels[idx]))
  return correct / max(len(order), 1)


def peak_memory_mb() -> float:
  """Peak resident memory of this process in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# --- checkpoints -----------------------------------------------------------


def _ckpt_module():
  try:
    from hizoo_jax import checkpoint  # pylint: disable=import-outside-toplevel
    if hasattr(checkpoint, "save_checkpoint"):
      return checkpoint
  except ImportError:
    pass
  return None


def save(directory: str, step: int, train, opt_state, history: dict) -> None:
  """Checkpoint (params, optimizer state) at ``step`` plus the history."""
  directory = os.path.abspath(directory)
  module = _ckpt_module()
  if module is not None:
    module.save_checkpoint(directory, step, train, opt_state, max_to_keep=2)
  else:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as m:
      m.save(step, args=ocp.args.StandardSave(
          {"params": train, "opt_state": opt_state}))
      m.wait_until_finished()
  with open(os.path.join(directory, f"history_{step}.json"), "w") as f:
    json.dump(history, f)


def restore(directory: str, train, opt_state):
  """The latest checkpoint in ``directory``: (step, train, opt_state, history).

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: the checkpoint is unreadable or does not match the run.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--resume: no checkpoint folder {directory}.")
  module = _ckpt_module()
  try:
    if module is not None:
      step, train, opt_state = _restore_with_module(
          module, directory, train, opt_state)
    else:
      import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
      with ocp.CheckpointManager(directory) as m:
        step = m.latest_step()
        if step is None:
          raise FileNotFoundError(
              f"--resume: no checkpoint in {directory}.")
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct,
            {"params": train, "opt_state": opt_state})
        got = m.restore(step, args=ocp.args.StandardRestore(abstract))
      train, opt_state = got["params"], got["opt_state"]
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"--resume: the checkpoint in {directory} is unreadable or was made "
        f"with other flags (model, --peft, --optimizer): {e}") from e
  path = os.path.join(directory, f"history_{step}.json")
  history = None
  if os.path.isfile(path):
    with open(path) as f:
      history = json.load(f)
  return int(step), train, opt_state, history


def _restore_with_module(module, directory, train, opt_state):
  """Adapter for ``hizoo_jax.checkpoint.restore_checkpoint``."""
  out = module.restore_checkpoint(directory, params=train, opt_state=opt_state)
  if isinstance(out, dict):
    return out["step"], out["params"], out["opt_state"]
  if hasattr(out, "step"):
    return out.step, out.params, out.opt_state
  step, train, opt_state = out
  if step is None:
    raise FileNotFoundError(f"--resume: no checkpoint in {directory}.")
  return step, train, opt_state


# --- outputs ---------------------------------------------------------------


def plot(path: str, history: dict, title: str) -> None:
  """Loss and eval accuracy against steps, as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  steps, losses = history["train_steps"], history["train_loss"]
  ax1.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
  if len(losses) >= 5:
    w = max(len(losses) // 20, 2)
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    ax1.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
  ax1.set_xlabel("step")
  ax1.set_ylabel("training objective")
  ax1.legend()
  ax2.plot(history["eval_steps"], history["eval_accuracy"], "o-")
  ax2.set_xlabel("step")
  ax2.set_ylabel("eval accuracy")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def to_json(x):
  """Config values as JSON-friendly types."""
  if isinstance(x, (np.generic, jnp.ndarray)):
    return np.asarray(x).tolist()
  return x
