"""Keeps orbax quiet where hizoo_jax's checkpoints report for themselves.

Only named, redundant output is dropped: a failed read is already turned
into one warning or error by :mod:`hizoo_jax.checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import sys


# orbax's log lines that restore's own checks make redundant: the notice that
# a read-only manager will not save, and the complaints about a damaged
# _CHECKPOINT_METADATA (orbax's timestamps and handler names; the data is
# checked by checksum).
_REDUNDANT_LOGS = ("is read only", "Failed to json parse Metadata file",
                   "Provided metadata contains unknown key")


class _DropRedundantLogs(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in _REDUNDANT_LOGS)


def _is_closed_loop_callback(unraisable) -> bool:
  """The "Event loop is closed" of a read that orbax abandoned.

  When one array of a restore fails to decode, orbax's ``asyncio.run``
  ends while tensorstore still completes the other reads; their callbacks
  then call ``loop.call_soon_threadsafe`` on the closed loop, and Python
  reports each RuntimeError as unraisable (about 95 tracebacks for a model).
  The read has already failed and been reported, so only these are dropped.
  """
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == "Event loop is closed"
          and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


def _is_abandoned_read(unraisable) -> bool:
  """orbax's per-array read coroutine of a restore that already failed,
  reporting its own failure when it is garbage-collected."""
  return getattr(unraisable.object, "__qualname__", "") == (
      "_read_array_index_and_device_put")


class _DropAbandonedReads(logging.Filter):
  """asyncio's "Future exception was never retrieved" for the tensorstore
  reads of a restore that had already failed (reported by the warning)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and "tensorstore_spec" in message)


def _install_quiet_hooks() -> None:
  """Drops only :func:`_is_closed_loop_callback` and
  :func:`_is_abandoned_read` reports and asyncio's logs of abandoned
  tensorstore reads, once per process (they may come after restore has
  returned); everything else reaches the previous hook and handlers."""
  previous = sys.unraisablehook
  if getattr(previous, "hizoo_jax_filter", False):
    return

  def hook(unraisable):
    if not (_is_closed_loop_callback(unraisable)
            or _is_abandoned_read(unraisable)):
      previous(unraisable)

  hook.hizoo_jax_filter = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropAbandonedReads())


@contextlib.contextmanager
def quiet():
  _install_quiet_hooks()
  logger = logging.getLogger("absl")
  log_filter = _DropRedundantLogs()
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)
