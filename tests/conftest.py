"""Test configuration: 8 host CPU devices for the multi-device tests; SIGINT handled as in a terminal.

XLA reads the flag when jax initializes its backend, so it must be set before jax is first imported; pytest
imports this conftest before any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# A shell without job control starts a background job (`bash .ci/run &`) with SIGINT ignored, and an ignored signal
# stays ignored in every process started from it: disam-train would then never see the Ctrl-C that the fault tests
# send (test_harness_faults). The tests run with Python's own SIGINT handler, as in a terminal.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)
