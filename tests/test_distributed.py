"""Multi-process JAX on loopback: real processes, bounded in time."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from disam_jax.harness import distributed
from disam_jax.harness.launch import free_port, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  return env


def _run_worker(num_processes, devices_per_process):
  """Runs tests/_mp_worker.py as N processes on loopback; returns what process 0 reports."""
  cmd = [sys.executable, "-m", "tests._mp_worker"]
  port = free_port()
  procs = []
  for pid in range(num_processes):
    env = dict(
      _env(devices_per_process),
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(pid),
    )
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
  outputs = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    outputs.append(out)
  line = [l for l in outputs[0].splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def test_two_processes_equal_one_process_and_one_device():
  two = _run_worker(2, 2)
  four = _run_worker(1, 4)
  one = _run_worker(1, 1)
  assert (two["processes"], two["devices"]) == (2, 4) and four["devices"] == 4 and one["devices"] == 1
  for k in one["params"]:
    np.testing.assert_allclose(two["params"][k], one["params"][k], atol=1e-5)
    np.testing.assert_allclose(four["params"][k], one["params"][k], atol=1e-5)


def test_unreachable_coordinator_fails_fast_with_a_clear_error():
  port = free_port()  # nothing listens there
  code = (
    "from disam_jax.harness import distributed\n"
    f'cfg = distributed.DistributedConfig("127.0.0.1:{port}", 2, 1, initialization_timeout=3)\n'
    "try:\n"
    "  distributed.initialize(cfg)\n"
    "except distributed.DistributedError as e:\n"
    '  print("ERROR", e)\n'
  )
  start = time.monotonic()
  res = subprocess.run([sys.executable, "-c", code], env=_env(1), capture_output=True, text=True, timeout=120)
  assert time.monotonic() - start < 60
  assert "ERROR process 1 of 2 could not join the coordinator" in res.stdout, res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize(
  "cfg, match",
  [
    (distributed.DistributedConfig("127.0.0.1:1234", 2, 2), r"process id 2 is out of range.*0\.\.1"),
    (distributed.DistributedConfig("127.0.0.1:1234", 2, -1), "process id -1 is out of range"),
    (distributed.DistributedConfig(None, 2, 0), "needs a coordinator address"),
    (distributed.DistributedConfig("localhost", 2, 0), "must be host:port"),
    (distributed.DistributedConfig("127.0.0.1:1234", 2, None), "needs --process-id"),
    (distributed.DistributedConfig(None, 1, 3), "process id 3 given for a single-process run"),
    (distributed.DistributedConfig(None, 0, None), "num_processes must be >= 1"),
  ],
)
def test_bad_configuration(cfg, match):
  with pytest.raises(distributed.DistributedError, match=match):
    cfg.validate()


def test_config_from_env(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:8476")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  cfg = distributed.DistributedConfig.from_env()
  assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:8476", 4, 3)
  assert distributed.DistributedConfig.from_env(process_id=1).process_id == 1
  monkeypatch.setenv("JAX_PROCESS_ID", "x")
  with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID='x' is not an integer"):
    distributed.DistributedConfig.from_env()


def test_batch_not_divisible_by_devices():
  mesh = distributed.data_mesh()  # 8 devices in the test process (conftest)
  with pytest.raises(
    distributed.DistributedError, match="per-domain batch size 12 is not divisible by the number of devices 8"
  ):
    distributed.local_batch_slice(12, mesh)
  assert distributed.local_batch_slice(16, mesh) == slice(0, 16)


def test_launcher_stops_the_others_when_one_process_fails(tmp_path):
  script = tmp_path / "die.py"
  script.write_text('import os, sys, time\nif os.environ["JAX_PROCESS_ID"] == "1":\n  sys.exit(3)\ntime.sleep(120)\n')
  start = time.monotonic()
  code = launch([sys.executable, str(script)], 2, 1, timeout=60, env=_env(1))
  assert code == 3 and time.monotonic() - start < 30


def test_launcher_refuses_a_command_not_on_path_in_one_line(tmp_path):
  """`python -m disam_jax.harness.launch ... -- disam-train ...` with the environment's bin folder off PATH: exit 2
  and one line saying what to write, before any process starts (a traceback before)."""
  env = dict(_env(1), PATH=str(tmp_path))  # nothing on PATH
  for program, hint in (
    ("disam-train", ("disam-train", "-m disam_jax.harness.cli")),
    ("no-such-program-42", ("full path",)),
  ):
    out = subprocess.run(
      [sys.executable, "-m", "disam_jax.harness.launch", "--num-processes", "2", "--", program, "--steps", "1"],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      cwd=ROOT,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert lines[-1].startswith("disam-launch: error: command ")
    assert f"'{program}' not found" in lines[-1] and any(h in lines[-1] for h in hint), lines[-1]
  not_executable = tmp_path / "data.txt"
  not_executable.write_text("")
  with pytest.raises(ValueError, match="not found"):
    launch([str(not_executable)], 2, env=env)
