"""`python -m benchmarks.sharding --quick` end to end: the FSDP x TP collectives benchmark cannot rot.

A subprocess (the benchmark sets its own 8-device XLA_FLAGS before importing jax), XLA's cheapest backend
optimization level (the collectives are placed by the SPMD partitioner, before the backend), results in tmp_path.
"""

import json
import os
import pathlib
import subprocess
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sharding_quick_smoke_and_no_extra_parameter_shaped_all_gathers(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.sharding", "--quick", "--out-dir", str(tmp_path)],
    cwd=_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads((tmp_path / "sharding_quick.json").read_text())
  for key in (
    "command",
    "date",
    "machine",
    "versions",
    "load",
    "config",
    "num_params",
    "cases",
    "targets",
    "param_shaped_definition",
    "param_shaped_shapes",
  ):
    assert key in data, key
  cases = data["cases"]
  assert set(cases) == {"erm", "optax_sam", "disam"}
  for label, row in cases.items():
    assert set(row["collectives"]) == {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"}
    assert row["total_bytes"] == sum(c["bytes"] for c in row["collectives"].values()) > 0
    assert {"temp", "argument", "output", "alias", "peak_estimate"} <= set(row["memory"])
    assert row["memory"]["temp"] > 0 and row["layout_kept"], label
    # memory_analysis is per device: the arguments are one device's shards, not the global arrays
    assert row["memory"]["argument"] < data["param_bytes_global"]
  erm, sam, disam = (
    cases["erm"]["param_shaped_all_gathers"],
    cases["optax_sam"]["param_shaped_all_gathers"],
    cases["disam"]["param_shaped_all_gathers"],
  )
  assert erm > 0  # FSDP: every 2-D weight is gathered where its forward pass uses it
  # DISAM gathers what ERM gathers, once per forward pass (two, as SAM): never a norm's or a dot product's gather
  assert disam == sam <= 2 * erm
  assert set(cases["disam"]["param_shaped_all_gather_shapes"]) <= set(cases["erm"]["param_shaped_all_gather_shapes"])
  d = cases["disam"]["vs_optax_sam"]
  assert all(o["op"] == "all-reduce" for o in d["extra"])  # what DISAM adds: small all-reduces (norms, [M] losses)
  assert d["extra_bytes"] < 0.01 * cases["optax_sam"]["total_bytes"]
  assert "## Target" in (tmp_path / "sharding_quick.md").read_text()
