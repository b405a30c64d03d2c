"""One writer per directory: a lock file held for the life of the process.

:func:`hold` takes an exclusive ``flock`` on ``<directory>/<name>`` and keeps
it until the process exits (or :func:`release`). The file records the owner
(pid, host, start time), so a second process asking for the same directory
gets an error that names the owner. The operating system drops a ``flock``
when its process dies, so a lock file left behind by a killed process (a
stale lock) is simply taken over; the file's old contents are only used to
say so.

``flock`` is advisory: it keeps out processes that ask (every
:func:`hizoo_jax.save_checkpoint` and examples/finetune.py), not ``rm``.
On network filesystems it is as reliable as their ``flock`` support (NFSv4
and Lustre emulate it with POSIX locks; some FUSE mounts ignore it).

Example:
  >>> import tempfile
  >>> from hizoo_jax import dirlock
  >>> d = tempfile.mkdtemp()
  >>> dirlock.hold(d, ".lock", "writing checkpoints")  # again: a no-op
  >>> dirlock.release(d, ".lock")
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time

try:
  import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking.
  fcntl = None

# (realpath of the lock file) -> open file object holding the flock.
_HELD: dict[str, object] = {}


class LockedError(RuntimeError):
  """Another live process holds the directory."""


def _owner_text(path: str) -> str:
  try:
    with open(path) as f:
      owner = json.load(f)
    return (f"pid {owner['pid']} on host {owner['host']} (since "
            f"{owner['since']})")
  except (OSError, ValueError, KeyError, TypeError):
    return "another process (its lock file is unreadable)"


def hold(directory, name: str, what: str) -> None:
  """Makes this process the only holder of ``directory`` (idempotent).

  Args:
    directory: an existing directory.
    name: the lock file's name inside it.
    what: what the holder does there, for the error message.

  Raises:
    LockedError: another live process holds it; names the owner.
  """
  path = os.path.realpath(os.path.join(os.fspath(directory), name))
  held = _HELD.get(path)
  if held is not None and held[1] == os.getpid():
    return
  if fcntl is None:  # pragma: no cover
    return
  handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.close()
    raise LockedError(
        f"{os.path.dirname(path)} is in use by {_owner_text(path)}, "
        f"{what}: one writer per directory. Wait for it to finish, or use "
        "another directory. (The lock is the operating system's flock on "
        f"{path}; it ends when that process ends.)") from None
  handle.seek(0)
  previous = handle.read()
  if previous.strip():
    print(f"hizoo_jax: took over {path} from a process that ended without "
          f"releasing it ({previous.strip()}).", file=sys.stderr, flush=True)
  handle.seek(0)
  handle.truncate()
  json.dump({"pid": os.getpid(), "host": socket.gethostname(),
             "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, handle)
  handle.flush()
  if not _HELD:
    atexit.register(_release_all)
  _HELD[path] = (handle, os.getpid())


def release(directory, name: str) -> None:
  """Gives up a directory :func:`hold` took (a no-op if not held)."""
  path = os.path.realpath(os.path.join(os.fspath(directory), name))
  held = _HELD.pop(path, None)
  if held is None:
    return
  handle, pid = held
  if pid == os.getpid():
    handle.seek(0)
    handle.truncate()  # an empty file: released, not stale.
    handle.flush()
  handle.close()


def _release_all() -> None:
  for path in list(_HELD):
    release(os.path.dirname(path), os.path.basename(path))
