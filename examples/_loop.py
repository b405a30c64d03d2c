"""Training-loop pieces for examples/finetune.py: step, eval, checkpoints.

The zeroth-order step is ``hizoo_jax.make_train_step`` and checkpoints are
``hizoo_jax.save_checkpoint`` / ``restore_checkpoint``; this file only adds
what the example needs around them (the Adam baseline's step, evaluation,
the loss history beside the checkpoints, examples/_history.py).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hizoo_jax as hz
import _history

KEEP_CHECKPOINTS = 2
SET_ASIDE = "checkpoints-set-aside"


def make_step(tx, value_fn, zeroth_order: bool):
  """A jitted ``step(train, opt_state, batch) -> (train, opt_state, metrics)``.

  Args:
    tx: the optax transformation (zeroth-order ones take ``value_fn``).
    value_fn: ``value_fn(train, batch) -> scalar`` objective.
    zeroth_order: True for HiZOO / HiZOO-L / MeZO, False for backprop.

  Returns:
    The step function; ``metrics["loss"]`` is the step's objective.
  """
  if zeroth_order:
    return hz.make_train_step(tx, value_fn)

  def step(train, opt_state, batch):
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


def save(directory: str, step: int, train, opt_state, history: dict) -> None:
  """Checkpoint (trained tree, optimizer state) at ``step``, then the
  history up to it (a kill in between: resume goes back one checkpoint)."""
  directory = os.path.abspath(directory)
  hz.save_checkpoint(directory, step, train, opt_state,
                     max_to_keep=KEEP_CHECKPOINTS)
  _history.write(directory, step, history)


def _set_aside(directory: str, step: int, why: str) -> None:
  """Moves a step to ``<run>/checkpoints-set-aside`` (kept, not deleted), so
  the resumed run can save that step number again."""
  aside = os.path.join(os.path.dirname(directory), SET_ASIDE, str(step))
  while os.path.exists(aside):  # moved before: keep both copies.
    aside += "-again"
  os.makedirs(os.path.dirname(aside), exist_ok=True)
  shutil.move(os.path.join(directory, str(step)), aside)
  print(f"--resume: step {step} {why}; moved it to {aside}.", flush=True)


def restore(directory: str, train, opt_state):
  """The newest readable checkpoint whose history is whole.

  Returns ``(step, train, opt_state, history)``, the history trimmed to the
  step; or None (and says so) when there is no such checkpoint, e.g. a run
  killed before its first one: it then starts from step 0. Newer steps
  (unreadable, or saved without their history) are set aside.

  Raises:
    ValueError: an unreadable history file, no readable checkpoint, or one
      that does not fit the run.
  """
  directory = os.path.abspath(directory)
  history = _history.read(directory)
  whole = -1 if history is None else history["step"]
  unrecorded = [s for s in hz.all_steps(directory) if s > whole]
  for step in unrecorded:
    _set_aside(directory, step, "has no recorded history (the run stopped "
               "between its checkpoint and its history)")
  if not hz.all_steps(directory):
    if unrecorded:  # (without any checkpoint, finetune.py has said so)
      print("--resume: no checkpoint with a recorded history; starting from "
            "step 0.", flush=True)
    return None
  try:
    step, train, opt_state = hz.restore_checkpoint(directory, train, opt_state)
  except hz.CheckpointError as e:
    raise ValueError(f"--resume: {e}") from e
  for newer in (s for s in hz.all_steps(directory) if s > step):
    _set_aside(directory, newer, f"is unreadable; resumed from step {step}")
  return step, train, opt_state, _history.trim(history, step)


def to_json(x):
  """Config values as JSON-friendly types."""
  if isinstance(x, (np.generic, jnp.ndarray)):
    return np.asarray(x).tolist()
  return x
