"""The loss/accuracy history of an examples/finetune.py run, beside its
checkpoints.

One file, ``checkpoints/history.json``, rewritten after every checkpoint
with the history up to that checkpoint's step (``"step"``). It is written
to a temporary file and renamed, so a kill leaves the old or the new file,
never half of one. A run resumes from the newest checkpoint whose history
is whole (step <= the file's step) and trims the history to that step.
"""

from __future__ import annotations

import json
import os
import re

NAME = "history.json"
_LEGACY = re.compile(r"history_(\d+)\.json$")  # one file per checkpoint, before


def new() -> dict:
  return {"step": 0, "train_steps": [], "train_loss": [], "eval_steps": [],
          "eval_accuracy": [], "train_seconds": 0.0}


def write(directory: str, step: int, history: dict) -> None:
  """Records ``history`` as whole up to ``step``, atomically."""
  path = os.path.join(directory, NAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(dict(history, step=step), f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  for name in os.listdir(directory):  # superseded by this one file
    if _LEGACY.match(name):
      os.remove(os.path.join(directory, name))


def _legacy_path(directory: str) -> str | None:
  """The newest ``history_<step>.json`` a run of the older example wrote."""
  found = [(int(m.group(1)), name) for name in os.listdir(directory)
           if (m := _LEGACY.match(name))]
  return os.path.join(directory, max(found)[1]) if found else None


def read(directory: str) -> dict | None:
  """The recorded history (``"step"``: up to where it is whole), or None.

  Raises:
    ValueError: the file cannot be read; the message names it.
  """
  path = os.path.join(directory, NAME)
  step = None
  if not os.path.isfile(path):
    path = _legacy_path(directory) if os.path.isdir(directory) else None
    if path is None:
      return None
    step = int(_LEGACY.search(path).group(1))
  try:
    with open(path, encoding="utf-8") as f:
      history = json.load(f)
    history.setdefault("step", step)
    lists = [history[k] for k in ("train_steps", "train_loss", "eval_steps",
                                  "eval_accuracy")]
    if not all(isinstance(v, list) for v in lists) or history["step"] is None:
      raise ValueError("missing fields")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(
        f"--resume: cannot read the run's history {path} ({e}); it is "
        "damaged: restore it from a backup, or start a new run.") from None
  return history


def trim(history: dict, step: int) -> dict:
  """The history up to and including ``step``."""
  out = dict(history, step=step)
  for steps, values in (("train_steps", "train_loss"),
                        ("eval_steps", "eval_accuracy")):
    keep = [i for i, s in enumerate(history[steps]) if s <= step]
    out[steps] = [history[steps][i] for i in keep]
    out[values] = [history[values][i] for i in keep]
  return out
