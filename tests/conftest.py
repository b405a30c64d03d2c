"""Test configuration: 8 simulated CPU devices for the whole suite.

XLA reads the flag when jax is first imported, so it is set here, before any
test module imports jax. ``HIZOO_TEST_DEVICES=1`` runs it on one device
(the tests that need a mesh then fail); single-device code paths are tested
within the suite by patching ``hizoo_jax._xla.single_device``.
"""

import os

_FLAG = ("--xla_force_host_platform_device_count="
         + os.environ.get("HIZOO_TEST_DEVICES", "8"))
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
