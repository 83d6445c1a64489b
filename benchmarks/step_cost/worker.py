"""Sections that need XLA_FLAGS set before jax is imported run this package in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.step_cost.config import _REPO


def run_worker(mode: str, config: dict, xla_flags: str, timeout: float) -> dict[str, Any]:
  """Runs this module in a subprocess with XLA_FLAGS set before jax is imported; returns its JSON result."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "benchmarks.step_cost", f"--{mode}-worker", json.dumps(config)]
  proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:], "xla_flags": xla_flags}
  return json.loads(proc.stdout.strip().splitlines()[-1])
