"""Test configuration: 8 host CPU devices for the multi-device tests.

XLA reads the flag when jax initializes its backend, so it must be set before jax is first imported; pytest
imports this conftest before any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
