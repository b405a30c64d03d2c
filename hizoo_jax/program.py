"""Which program an estimator compiles to: "plain" or "compact".

The mathematics (:mod:`hizoo_jax.core`) can be compiled two ways:

* ``"plain"``: each leaf's noise drawn and consumed where the formula reads
  it, trusting XLA to fuse the generator into its consumers. What an Optax
  engineer would write; the default on GPU and TPU, where the compact devices
  have not been measured.
* ``"compact"``: the machinery tuned on XLA:CPU (kernels shared across
  same-shaped leaves through leaf numbers held as data, small leaves drawn
  together, the curvature sums in one loop, H as one vector, values stored
  once, two-output reductions, the lean step's update inside its loop):
  smaller programs and faster compiles there (``docs/performance.md``).

Both give the same numbers up to float32 rounding (``tests/test_programs.py``).
The choice is made here only: ``program=`` on every estimator and alias, or
the environment variable ``HIZOO_PROGRAM``, else by backend.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

PROGRAMS = ("auto", "plain", "compact")


def resolve(program: Optional[str] = None) -> str:
  """``"plain"`` or ``"compact"`` for the ``program`` option.

  None or ``"auto"`` reads ``HIZOO_PROGRAM`` (if set), else takes compact
  on XLA:CPU, where it was measured to help, and plain on GPU and TPU.
  """
  if program is None or program == "auto":
    program = os.environ.get("HIZOO_PROGRAM", "auto") or "auto"
  if program not in PROGRAMS:
    raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}.")
  if program == "auto":
    return "compact" if jax.default_backend() == "cpu" else "plain"
  return program
