"""`python -m benchmarks.checkpoint --quick` end to end (1 and 2 worker processes, a 4 MiB state), so the benchmark
cannot rot. Timings are not asserted: a smoke test, not a timed test; the restored state must equal the saved one."""

import json
import os
import pathlib
import subprocess
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_checkpoint_benchmark_quick_smoke(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.checkpoint", "--quick", "--out-dir", str(tmp_path)],
    cwd=_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "checkpoint_quick.json").read_text())["rows"]
  assert [(r["processes"], r["devices"]) for r in rows] == [(1, 2), (2, 4)]
  for r in rows:
    assert r["equal"] and 0 < r["blocking_s"] <= r["write_s"] and r["restore_s"] > 0
    assert abs(r["state_mib"] - 4) < 0.5 and abs(r["local_mib"] - 4 / r["processes"]) < 0.5
  assert "| 4.0 | 2 | 2.0 |" in (tmp_path / "checkpoint_quick.md").read_text()
