"""The harness under several processes on loopback: same parameters as one device, faults, bad configuration.

Real processes (`python -m disam_jax.harness.cli`), each bounded by a timeout.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from disam_jax.harness import algorithms
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import cell_directory, load_latest_state
from disam_jax.harness.launch import free_port
from disam_jax.harness.steps import init_model, init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
  "--dataset",
  "rotated_digits",
  "--algorithm",
  "disam",
  "--held-out",
  "75",
  "--model",
  "mlp",
  "--model-option",
  "hidden=16",
  "--steps",
  "40",
  "--eval-every",
  "2",
  "--batch-size",
  "8",
  "--no-plots",
  "--quiet",
]
TIMEOUT = 240


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


def _start(run_dir, num_processes, devices, *extra_args, port=None):
  port = port or free_port()
  procs = []
  for pid in range(num_processes):
    env = _env(devices)
    if num_processes > 1:
      env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(pid)
      )
    cmd = [sys.executable, "-m", "disam_jax.harness.cli", *ARGS, "--output-dir", str(run_dir), *extra_args]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
  return procs


def _wait(procs):
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=TIMEOUT)
    out.append((p.returncode, stdout, stderr))
  return out


def _final_params(run_dir, steps=40):
  config = ExperimentConfig(
    algorithms=("disam",), held_out=("75",), model="mlp", model_kwargs={"hidden": 16}, hparams=HParams(batch_size=8)
  )
  graphdef, params, model_state = init_model(
    "mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs=config.model_kwargs
  )
  tx = algorithms.make_optimizer("disam", config.hparams, num_domains=5, aux_example=model_state)
  state, meta = load_latest_state(
    cell_directory(str(run_dir), "disam", "75", 0), init_train_state(params, model_state, tx)
  )
  assert meta["step"] == steps
  return jax.tree.leaves(state.params)


@pytest.fixture(scope="module")
def one_device_params(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("one_device")
  [(code, _, err)] = _wait(_start(run_dir, 1, 1))
  assert code == 0, err[-3000:]
  return _final_params(run_dir)


def _assert_same(a, b):
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.slow  # default tier: test_distributed.py's 2x2 = 1x4 = 1x1 worker
def test_two_processes_and_four_devices_equal_one_device(tmp_path, one_device_params):
  results = _wait(_start(tmp_path / "two", 2, 2))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  [(code, _, err)] = _wait(_start(tmp_path / "four", 1, 4, "--data-parallel"))
  assert code == 0, err[-3000:]
  _assert_same(_final_params(tmp_path / "two"), one_device_params)
  _assert_same(_final_params(tmp_path / "four"), one_device_params)
  # Only process 0 writes the logs and tables.
  assert (tmp_path / "two" / "results.md").exists()


@pytest.mark.slow  # default tier: test_harness_merged.py's 4-device mesh run against one device
def test_merged_batches_on_two_processes_equal_one_device(tmp_path):
  """--batching merged: each process reads its slice of the flat batch (40 examples, 10 per device) from the same
  stream; the parameters equal the one-device run's."""
  merged = ("--batching", "merged", "--steps", "6")
  results = _wait(_start(tmp_path / "two", 2, 2, *merged))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  [(code, _, err)] = _wait(_start(tmp_path / "one", 1, 1, *merged))
  assert code == 0, err[-3000:]
  _assert_same(_final_params(tmp_path / "two", steps=6), _final_params(tmp_path / "one", steps=6))


@pytest.mark.slow  # default tier: test_distributed.py's launcher fault test, test_harness_train's exact resume
def test_killed_process_stops_the_other_and_the_job_resumes_exactly(tmp_path, one_device_params):
  run_dir = tmp_path / "fault"
  procs = _start(run_dir, 2, 2, "--heartbeat-timeout", "5")
  checkpoints = run_dir / "cells" / "disam_heldout-75_seed-0" / "checkpoints"
  deadline = time.monotonic() + TIMEOUT
  while not (checkpoints.is_dir() and any(d.isdigit() and int(d) >= 6 for d in os.listdir(checkpoints))):
    assert time.monotonic() < deadline and procs[0].poll() is None, "the run did not reach step 6"
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGKILL)
  start = time.monotonic()
  code, _, err = _wait(procs[:1])[0]
  elapsed = time.monotonic() - start
  procs[1].wait()
  assert code != 0, "process 0 finished before its peer was killed: the fault was not exercised"
  assert elapsed < 45, f"the surviving process took {elapsed:.0f} s to stop"
  assert "stopped sending heartbeats" in err or "another task died" in err, err[-3000:]
  # Restart the job: it continues from the last complete checkpoint and ends where an uninterrupted run ends.
  results = _wait(_start(run_dir, 2, 2, "--resume"))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  _assert_same(_final_params(run_dir), one_device_params)


def test_process_id_out_of_range_is_a_clear_error(tmp_path):
  env = _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2")
  res = subprocess.run(
    [sys.executable, "-m", "disam_jax.harness.cli", *ARGS, "--output-dir", str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=ROOT,
  )
  assert res.returncode == 2
  assert "process id 2 is out of range for num_processes=2" in res.stderr


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "disam_jax.harness.cli",
      *ARGS,
      "--output-dir",
      str(tmp_path),
      "--data-parallel",
      "--batch-size",
      "6",
    ],
    env=_env(4),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=ROOT,
  )
  assert res.returncode == 2
  assert "per-domain batch size 6 is not divisible by the number of devices 4" in res.stderr


def test_replicate_places_nan_metrics_and_typed_keys():
  """The state may hold NaN (sam_cosine without diagnostics) and typed PRNG keys: both are placed, neither refused."""
  import jax
  import numpy as np

  from disam_jax.harness import distributed

  mesh = distributed.data_mesh()
  tree = {"cosine": np.float32(np.nan), "losses": np.array([1.0, np.nan], np.float32), "key": jax.random.key(3)}
  placed = distributed.replicate(tree, mesh)
  assert np.isnan(np.asarray(placed["cosine"])) and np.asarray(placed["losses"])[0] == 1.0
  assert jax.random.key_data(placed["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()
  assert all(a.sharding.is_fully_replicated for a in jax.tree.leaves(placed))


@pytest.mark.slow  # default tier: test_place_state_splits_weights..., the bad-mesh line, test_harness_train's resume
def test_fsdp_mesh_run_resumed_from_a_sharded_checkpoint_equals_one_device(tmp_path, one_device_params):
  """--mesh data=4,fsdp=2 on 8 devices: weights and optimizer state split 2 ways, batch over all 8; stopped at step
  20 (checkpoint written from the sharded state), resumed to 40: the parameters of one device's uninterrupted run."""
  run_dir = tmp_path / "fsdp"
  mesh_args = ("--mesh", "data=4,fsdp=2")
  [(code, _, err)] = _wait(_start(run_dir, 1, 8, *mesh_args, "--steps", "20"))
  assert code == 0, err[-3000:]
  [(code, _, err)] = _wait(_start(run_dir, 1, 8, *mesh_args, "--resume"))
  assert code == 0, err[-3000:]
  _assert_same(_final_params(run_dir), one_device_params)


def test_a_bad_mesh_is_one_clear_line(tmp_path):
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "disam_jax.harness.cli",
      *ARGS,
      "--output-dir",
      str(tmp_path / "r"),
      "--mesh",
      "data=4,fsdp=4",
    ],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=ROOT,
  )
  assert res.returncode == 2, res.stderr[-2000:]
  assert "--mesh 'data=4,fsdp=4' has 16 devices but there are 8" in res.stderr and "Traceback" not in res.stderr
  assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
  "mesh,message",
  [
    ("data=4,model=2", "expected 'data=N' or 'data=N,fsdp=K'"),
    ("data=4,data=2", "expected 'data=N' or 'data=N,fsdp=K'"),
    ("data=x", "the size of 'data' must be an integer"),
    ("data=0,fsdp=8", "the size of 'data' must be >= 1"),
  ],
)
def test_parse_mesh_refuses_bad_specs(mesh, message):
  from disam_jax.harness import distributed

  with pytest.raises(distributed.DistributedError, match=re.escape(message)):
    distributed.parse_mesh(mesh)


def test_place_state_splits_weights_and_their_optimizer_state_fsdp_style():
  """In this 8-device process: leaves of 2+ dims split over 'fsdp' along their largest divisible dimension, the
  rest replicated; local_replica gathers the full values back."""
  import optax
  from jax.sharding import PartitionSpec as P

  from disam_jax.harness import distributed

  mesh = distributed.parse_mesh("data=4,fsdp=2")
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 4, "fsdp": 2}
  params = {
    "w": np.arange(64 * 16, dtype=np.float32).reshape(64, 16),
    "odd": np.ones((3, 5), np.float32),
    "b": np.ones(16, np.float32),
  }
  state = {"params": params, "adam": optax.adam(0.1).init(params)}
  placed = distributed.place_state(state, mesh)
  assert placed["params"]["w"].sharding.spec == P("fsdp", None)
  assert placed["adam"][0].mu["w"].sharding.spec == P("fsdp", None)  # the moments are split like their weight
  assert placed["params"]["odd"].sharding.is_fully_replicated  # no dimension divisible by 2
  assert placed["params"]["b"].sharding.is_fully_replicated
  assert distributed.batch_sharding(mesh).spec == P(None, ("data", "fsdp"))
  back = distributed.local_replica(placed)
  np.testing.assert_array_equal(np.asarray(back["params"]["w"]), params["w"])
  assert len(back["params"]["w"].sharding.device_set) == 1
  assert distributed.fsdp_sharding((8, 64), mesh).spec == P(None, "fsdp")  # the largest divisible dimension
  assert distributed.place_state(state, distributed.data_mesh())["params"]["w"].sharding.is_fully_replicated


# ---------------------------------------------------------------------------------------------------------------------
# The FSDP axis across processes: sharded checkpoints, their faults, resume onto another mesh
# ---------------------------------------------------------------------------------------------------------------------

FSDP_ARGS = ("--steps", "8", "--mesh", "data=1,fsdp=4")
FSDP_CELL = os.path.join("cells", "disam_heldout-75_seed-0")


def _start_faulty(run_dir, fault, *extra_args, port=None):
  """2 processes x 2 devices running disam-train with tests/test_harness_faults.py's fault `fault` injected (the
  rename of a step folder happens on process 0 only)."""
  from tests.test_harness_faults import _FAULT

  port = port or free_port()
  procs = []
  for pid in range(2):
    env = _env(
      2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), DISAM_FAULT=fault
    )
    cmd = [sys.executable, "-c", _FAULT, *ARGS, "--output-dir", str(run_dir), *extra_args]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
  return procs


def _evals(run_dir):
  import json

  return json.loads((run_dir / FSDP_CELL / "result.json").read_text())["evals"]


@pytest.fixture(scope="module")
def fsdp_one_process(tmp_path_factory):
  """1 process x 4 devices on the mesh data=1,fsdp=4, uninterrupted: (its evaluations, its final parameters)."""
  run_dir = tmp_path_factory.mktemp("fsdp_one_process")
  [(code, _, err)] = _wait(_start(run_dir, 1, 4, *FSDP_ARGS))
  assert code == 0, err[-3000:]
  return _evals(run_dir), _final_params(run_dir, steps=8)


def test_fsdp_across_two_processes_killed_mid_save_resumes_and_equals_one_process(tmp_path, fsdp_one_process):
  """2 processes x 2 devices, the weights and optimizer state split 4 ways across both, each process writing its
  own shards: process 0 killed while step 6's checkpoint is written but not renamed (its peer then killed too, as
  a scheduler would), --resume on both restores step 4 (the killed save's folder removed) and ends with the
  evaluations and parameters of one process on the same mesh."""
  run_dir = tmp_path / "run"
  procs = _start_faulty(run_dir, "kill_before_rename:6", *FSDP_ARGS)
  assert procs[0].wait(timeout=TIMEOUT) == -signal.SIGKILL, procs[0].communicate()[1][-3000:]
  procs[1].kill()
  procs[1].wait()
  checkpoints = run_dir / FSDP_CELL / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["4", "6.orbax-checkpoint-tmp"]
  assert sorted(n for n in os.listdir(checkpoints / "4" / "state") if n.startswith("ocdbt.process_")) == [
    "ocdbt.process_0",
    "ocdbt.process_1",
  ]  # each process wrote its shards
  for code, _, err in _wait(_start(run_dir, 2, 2, *FSDP_ARGS, "--resume")):
    assert code == 0, err[-3000:]
  assert sorted(os.listdir(checkpoints)) == ["8"]  # the best is the latest here
  evals, params = fsdp_one_process
  assert _evals(run_dir) == evals
  _assert_same(_final_params(run_dir, steps=8), params)


@pytest.mark.slow  # default tier: tests/test_checkpoint.py's restores onto other meshes, the test above
def test_a_checkpoint_of_two_processes_resumes_in_one_process_on_another_mesh(tmp_path, fsdp_one_process):
  """Saved by 2 processes with fsdp=4 (stopped after step 4), resumed by 1 process with data=2,fsdp=2 to step 8:
  the evaluations and parameters of the uninterrupted run."""
  run_dir = tmp_path / "run"
  for code, _, err in _wait(_start(run_dir, 2, 2, "--steps", "4", "--mesh", "data=1,fsdp=4")):
    assert code == 0, err[-3000:]
  [(code, _, err)] = _wait(_start(run_dir, 1, 4, "--steps", "8", "--mesh", "data=2,fsdp=2", "--resume"))
  assert code == 0, err[-3000:]
  evals, params = fsdp_one_process
  assert _evals(run_dir) == evals
  _assert_same(_final_params(run_dir, steps=8), params)


@pytest.mark.slow  # default tier: tests/test_checkpoint.py's test of the same corruption in one process
def test_two_processes_refuse_a_well_formed_checkpoint_of_other_values_and_fall_back_together(
  tmp_path, fsdp_one_process
):
  """Step 4's arrays (both processes' shards) under step 8's name: both processes compute the digests of what they
  read on their devices, say so in one line, resume from step 4 and end as the uninterrupted run."""
  import shutil

  run_dir = tmp_path / "run"
  for code, _, err in _wait(_start(run_dir, 2, 2, *FSDP_ARGS, "--lr", "0.01")):
    assert code == 0, err[-3000:]
  checkpoints = run_dir / FSDP_CELL / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["4", "8"], "the best is not the latest (lr 0.01)"
  reference = _evals(run_dir)
  (run_dir / FSDP_CELL / "result.json").unlink()
  shutil.rmtree(checkpoints / "8" / "state")
  shutil.copytree(checkpoints / "4" / "state", checkpoints / "8" / "state")
  for code, _, err in _wait(_start(run_dir, 2, 2, *FSDP_ARGS, "--lr", "0.01", "--resume")):
    assert code == 0, err[-3000:]
    said = [line for line in err.splitlines() if "checksums" in line]
    assert len(said) == 1 and said[0].endswith("resuming from step 4, the latest readable checkpoint"), err[-3000:]
    assert "Traceback" not in err
  assert _evals(run_dir) == reference
