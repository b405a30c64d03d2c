"""Sharded, atomic checkpoints of params and optimizer state (orbax).

A thin layer over ``orbax.checkpoint.CheckpointManager``:

* Each step is a directory ``<dir>/<step>`` holding three items: ``params``
  and ``opt_state`` (flattened to ``{"0": leaf, "1": leaf, ...}`` so that any
  optax state, FactoredHessian and MaskedNode included, round-trips) and
  ``meta`` (JSON: the path, shape and dtype of every leaf).
* Sharded: every process writes and reads only its own shards; restoring
  onto other shardings (another mesh shape) reshards on read.
* Atomic: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it
  when complete, so a run killed during a save leaves only a temporary
  directory, which restore ignores.
* ``max_to_keep`` newest steps are kept; older ones are deleted after a save.
* Restoring checks the stored metadata against the target first and reports
  a mismatch with :class:`CheckpointError`. When the newest step cannot be
  read (corrupt files, or data that fails its checksum), restore warns once,
  names it and falls back to the newest step that reads; restore never
  deletes or changes anything, and prints nothing else.
* Checksummed: the metadata holds two 32-bit checksums of every array
  (:mod:`hizoo_jax._checksum`, computed by value, so the same on any mesh);
  restore and ``all_steps(verify=True)`` check them, so any single-bit flip
  in the data is caught. Checkpoints written before checksums (format 1)
  still restore, unchecked.
* One writer per directory: the first save of a process takes a lock file
  (``.hizoo_jax-writer.lock``, an OS ``flock`` recording pid and host;
  :mod:`hizoo_jax.dirlock`) held until the process exits; a save from any
  other process fails with :class:`CheckpointError` naming the owner. A lock
  left by a killed process is taken over. (In a multi-host run process 0
  holds it.)
* Steps only go forward: saving a step below the newest saved one raises,
  unless ``supersede=True`` deletes the later steps first (a rollback).
* Leaves may be arrays, typed PRNG keys (stored as their key data) and
  Python or NumPy scalars (restored as the target's type).

The optimizer state holds the step count and the PRNG key words, so a run
restored from step ``k`` draws the same z and updates the same H as the run
that was never interrupted.

Example:
  >>> import tempfile, jax.numpy as jnp, hizoo_jax as hz
  >>> tx = hz.hizoo(1e-3)
  >>> params = {"w": jnp.ones((4, 2))}
  >>> state = tx.init(params)
  >>> d = tempfile.mkdtemp()
  >>> _ = hz.save_checkpoint(d, 7, params, state)
  >>> step, params, state = hz.restore_checkpoint(d, params, state)
  >>> step
  7
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional
import warnings

import jax
import numpy as np

from hizoo_jax import _checksum
from hizoo_jax import _orbax_quiet
from hizoo_jax import dirlock
from hizoo_jax._checkpoint_leaves import (KEY_WORDS, abstract_flat, decode,
                                          describe, host_only,
                                          toggle_leaf_numbers)
from hizoo_jax._checkpoint_leaves import flat as flat_tree

_FORMAT = "hizoo_jax.checkpoint/2"  # /2: with checksums.
_FORMATS = ("hizoo_jax.checkpoint/1", _FORMAT)
LOCK_NAME = ".hizoo_jax-writer.lock"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt or does not fit the target."""


class _Unreadable(CheckpointError):
  """One step's files cannot be read: the case restore falls back from."""


def _orbax():
  """orbax.checkpoint, imported on first use (an optional dependency)."""
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the install.
    raise ImportError(
        "checkpoints need orbax-checkpoint: pip install 'hizoo_jax[checkpoint]'"
        " (or pip install orbax-checkpoint).") from e
  return ocp


def _options(max_to_keep: Optional[int], read_only: bool):
  # save_interval_steps=0 is what orbax sets for a read-only manager anyway;
  # giving it here spares the warning it logs when it has to change it.
  return _orbax().CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=False)


def _manager(directory, max_to_keep=None, read_only=False):
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  if read_only and not os.path.isdir(directory):
    raise CheckpointError(
        f"no complete checkpoint in {directory}: it does not exist.")
  with _orbax_quiet.quiet():
    return ocp.CheckpointManager(
        directory, options=_options(max_to_keep, read_only),
        item_names=("params", "opt_state", "meta"))


def all_steps(directory, *, verify: bool = False) -> list[int]:
  """The steps with a complete checkpoint in ``directory``, in order.

  Args:
    directory: the checkpoint directory.
    verify: also read every step in full (one at a time, on one device),
      check its checksums, and leave out the ones that cannot be read or
      fail them, e.g. files damaged after the save. Costs a full read per
      step; without it a damaged step is listed until
      :func:`restore_checkpoint` meets it.

  Returns:
    A sorted list of ints (temporary directories of unfinished saves are
    not counted).

  Example:
    >>> import tempfile, hizoo_jax as hz
    >>> hz.all_steps(tempfile.mkdtemp())
    []
  """
  if not os.path.isdir(os.fspath(directory)):
    return []
  with _manager(directory, read_only=True) as manager, _orbax_quiet.quiet():
    steps = sorted(manager.all_steps())
    if not verify:
      return steps
    readable = []
    for step in steps:
      try:
        _read_as_saved(manager, directory, step)
      except _Unreadable:
        continue
      readable.append(step)
    return readable


def save_checkpoint(directory, step: int, params, opt_state, *,
                    max_to_keep: Optional[int] = 3,
                    supersede: bool = False) -> str:
  """Saves ``params`` and ``opt_state`` as step ``step``, atomically.

  Every process of a multi-host run must call it with its (global) arrays;
  each writes its own shards. Returns when the checkpoint is complete. The
  first save takes the directory for this process (see the module notes):
  another process cannot save there until this one exits.

  Args:
    directory: checkpoint directory (created if needed).
    step: the training step, an int >= 0, above every saved step.
    params: parameter tree (sharded jax.Arrays, numpy arrays, typed PRNG
      keys, Python or NumPy scalars).
    opt_state: optimizer state tree, likewise.
    max_to_keep: keep only this many newest steps (None: keep all).
    supersede: if steps above ``step`` are saved (a run rolled back to an
      older checkpoint), delete them first; without it that raises, since
      orbax would silently not save.

  Returns:
    The path of the step's directory.

  Raises:
    CheckpointError: ``step`` is already saved; steps above it are saved
      and ``supersede`` is False; another process writes to the directory.

  Example:
    >>> import tempfile, jax.numpy as jnp, hizoo_jax as hz
    >>> d = tempfile.mkdtemp()
    >>> path = hz.save_checkpoint(d, 0, {"w": jnp.ones(2)}, ())
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an int >= 0, got {step!r}.")
  if max_to_keep is not None and (
      not isinstance(max_to_keep, int) or max_to_keep < 1):
    raise ValueError(f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}.")
  step = int(step)
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    try:
      dirlock.hold(directory, LOCK_NAME, "saving checkpoints")
    except dirlock.LockedError as e:
      raise CheckpointError(f"cannot save step {step}: {e}") from None
  flats = {"params": flat_tree(params), "opt_state": flat_tree(opt_state)}
  meta = {"format": _FORMAT, "step": step, "params": describe(params),
          "opt_state": describe(opt_state),
          "checksums": {k: _checksum.checksums(list(v.values()))
                        for k, v in flats.items()}}
  meta["digest"] = _digest(meta)
  ocp = _orbax()
  with _manager(directory, max_to_keep) as manager:
    steps = sorted(manager.all_steps())
    if step in steps:
      raise CheckpointError(
          f"step {step} is already saved in {directory}; delete it first or "
          "save under another step.")
    later = [s for s in steps if s > step]
    if later and not supersede:
      raise CheckpointError(
          f"cannot save step {step} in {directory}: steps {later} above it "
          "are saved, and checkpoints only go forward. After rolling back, "
          "pass supersede=True to delete those steps and save this one, or "
          "save into another directory.")
    for s in later:
      manager.delete(s)
    saved = manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(flats["params"]),
        opt_state=ocp.args.StandardSave(flats["opt_state"]),
        meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    if not saved:  # never silent: orbax declined to save.
      raise CheckpointError(f"orbax did not save step {step} in {directory}.")
    return os.path.join(directory, str(step))


def _check_fits(stored: list, target: list, what: str, where: str) -> None:
  if len(stored) != len(target):
    raise CheckpointError(
        f"{where}: {what} has {len(stored)} leaves in the checkpoint but "
        f"{len(target)} in the target; was it saved with another model or "
        "optimizer?")
  for (s_path, s_shape, s_dtype), (t_path, t_shape, t_dtype) in zip(stored, target):
    if s_path != t_path or list(s_shape) != list(t_shape) or s_dtype != t_dtype:
      raise CheckpointError(
          f"{where}: {what} leaf {s_path} {tuple(s_shape)} {s_dtype} in the "
          f"checkpoint does not match the target's {t_path} {tuple(t_shape)} "
          f"{t_dtype}.")


def _read_meta(manager, directory, step: int) -> dict:
  """The step's JSON metadata; :class:`_Unreadable` if it cannot be read."""
  ocp = _orbax()
  where = os.path.join(os.fspath(directory), str(step))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # orbax/tensorstore raise many kinds.
    raise _Unreadable(
        f"{where}: cannot read the checkpoint metadata (corrupt or not "
        f"written by hizoo_jax): {e}") from e
  if not isinstance(meta, dict) or meta.get("format") not in _FORMATS:
    raise _Unreadable(f"{where} was not written by hizoo_jax.save_checkpoint.")
  if meta["format"] != _FORMATS[0] and meta.get("digest") != _digest(meta):
    raise _Unreadable(f"{where}: the checkpoint metadata fails its checksum "
                      "(it changed after it was saved).")
  return meta


def _digest(meta: dict) -> str:
  """SHA-256 of the metadata without its digest (canonical JSON)."""
  body = {k: v for k, v in meta.items() if k != "digest"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_arrays(manager, directory, step: int, meta: dict, params,
                 opt_state) -> dict:
  """``{"params": flat, "opt_state": flat}`` read onto abstract targets and
  checked against the stored checksums (format 2)."""
  ocp = _orbax()
  where = os.path.join(os.fspath(directory), str(step))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        opt_state=ocp.args.StandardRestore(opt_state)))
  except Exception as e:  # orbax/tensorstore raise many kinds.
    raise _Unreadable(
        f"{where}: the checkpoint cannot be read (corrupt or incomplete "
        f"files): {type(e).__name__}: {e}") from e
  for name, expected in meta.get("checksums", {}).items():
    flat = restored[name]
    got = _checksum.checksums([flat[k] for k in sorted(flat, key=_order)])
    bad = [i for i, (g, x) in enumerate(zip(got, expected)) if g != list(x)]
    if bad or len(got) != len(expected):
      paths = [meta[name][i][0] for i in bad if i < len(meta[name])]
      raise _Unreadable(
          f"{where}: {name} leaves {paths} fail their checksums (the data "
          "changed after it was saved).")
  return restored


def _order(key: str) -> int:
  return -1 if key == "empty" else int(key)


def _read_as_saved(manager, directory, step: int) -> None:
  """Reads a step onto the shapes and dtypes its metadata records."""
  meta = _read_meta(manager, directory, step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def abstract(described):
    flat = {}
    for i, (_, shape, dtype) in enumerate(described):
      if dtype.startswith("key<"):  # typed keys are stored as key data.
        shape, dtype = list(shape) + [KEY_WORDS.get(dtype, 0)], "uint32"
      flat[str(i)] = (np.zeros(shape, dtype) if host_only(dtype) else
                      jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype),
                                           sharding=device))
    return flat or abstract_flat(())

  _read_arrays(manager, directory, step, meta, abstract(meta["params"]),
               abstract(meta["opt_state"]))


def _restore_step(manager, directory, step: int, params, opt_state) -> dict:
  """One step onto the targets: checks the metadata, then reads the arrays."""
  meta = _read_meta(manager, directory, step)
  where = os.path.join(os.fspath(directory), str(step))
  _check_fits(meta["params"], describe(params), "params", where)
  _check_fits(meta["opt_state"], describe(opt_state), "opt_state", where)
  return _read_arrays(manager, directory, step, meta, abstract_flat(params),
                      abstract_flat(opt_state))
def _restore_newest_readable(manager, directory, steps, params, opt_state):
  """(step, arrays) of the newest step that reads, warning for each skipped.

  Only unreadable steps are skipped: a step that does not fit the targets
  raises, since an older one would then restore another run.
  """
  failures = []
  for step in reversed(steps):
    try:
      restored = _restore_step(manager, directory, step, params, opt_state)
    except _Unreadable as e:
      failures.append(f"step {step}: {e}")
      continue
    except CheckpointError as e:
      raise CheckpointError(
          f"{e} Pass step= to restore one of the other complete steps "
          f"{[s for s in steps if s != step]}.") from e
    for failure in failures:
      warnings.warn(
          f"skipped an unreadable checkpoint ({failure}); restored step "
          f"{step} instead. The unreadable step is left in place: inspect or "
          "delete it yourself.", RuntimeWarning, stacklevel=4)
    return step, restored
  raise CheckpointError(
      f"no readable checkpoint in {directory} (nothing was deleted): "
      + "; ".join(failures))


def restore_checkpoint(directory, params, opt_state, *,
                       step: Optional[int] = None):
  """Restores a checkpoint onto the structure and shardings of the targets.

  Args:
    directory: checkpoint directory.
    params: target params: arrays or ``jax.ShapeDtypeStruct`` with the
      wanted shardings (which may differ from those at save time).
    opt_state: target optimizer state likewise, e.g. ``tx.init(params)`` or
      :func:`hizoo_jax.abstract_state`.
    step: the step to restore; None: the newest complete step that can be
      read. An unreadable newer step is skipped with a ``RuntimeWarning``
      naming it, and left in place.

  Returns:
    ``(step, params, opt_state)``.

  Raises:
    CheckpointError: no complete checkpoint, an unknown step, a checkpoint
      that does not match the targets (structure, shapes, dtypes), no
      readable step, or an unreadable ``step``. Nothing is deleted.

  Example:
    >>> import tempfile, jax.numpy as jnp, hizoo_jax as hz
    >>> d = tempfile.mkdtemp()
    >>> _ = hz.save_checkpoint(d, 3, {"w": jnp.ones(2)}, ())
    >>> hz.restore_checkpoint(d, {"w": jnp.zeros(2)}, ())[1]["w"].tolist()
    [1.0, 1.0]
  """
  try:
    return _restore(directory, params, opt_state, step)
  except CheckpointError as error:
    # A checkpoint of the other program (hizoo_jax.program): the compact
    # program's estimator state also holds leaf_numbers, the plain one's
    # None. Read it into the other layout, then return the target's.
    other = toggle_leaf_numbers(opt_state, params)
    if other is None:
      raise
    try:
      step_, params_, state_ = _restore(directory, params, other, step)
    except CheckpointError:
      raise error from None
    return step_, params_, toggle_leaf_numbers(
        state_, params, like=opt_state)


def _restore(directory, params, opt_state, step):
  """:func:`restore_checkpoint` onto exactly these targets."""
  with _manager(directory, read_only=True) as manager, _orbax_quiet.quiet():
    steps = sorted(manager.all_steps())
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {directory}.")
    if step is None:
      step, restored = _restore_newest_readable(manager, directory, steps,
                                                params, opt_state)
    elif step not in steps:
      raise CheckpointError(
          f"no complete checkpoint for step {step} in {directory}; pass "
          f"step= one of the complete steps {steps}.")
    else:
      try:
        restored = _restore_step(manager, directory, step, params, opt_state)
      except CheckpointError as e:
        others = [s for s in steps if s != step]
        raise type(e)(f"{e} Other complete steps (step=): {others}.") from e
  out = []
  for tree, name in ((params, "params"), (opt_state, "opt_state")):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    flat = restored[name]
    out.append(treedef.unflatten(
        [decode(x, flat[str(i)]) for i, x in enumerate(leaves)]))
  return int(step), out[0], out[1]
