"""Faults of long runs (docs/harness.md, "Faults"): kills, signals, corrupt and truncated files, a full or read-only
disk, two runs on one directory. Each ends with one line on stderr and a run that `--resume` finishes with exactly
the results of an uninterrupted run.

Faults that need a real process (SIGKILL, SIGTERM, SIGINT while orbax writes, a full disk) run `disam-train` in a
subprocess through `_FAULT`, which injects the fault at an exact point of a checkpoint save; the rest run the CLI in
this process on copies of one uninterrupted run. Runs are tiny: the MLP with 16 hidden units, 8 steps, a
checkpoint every 2 (lr 0.01 makes the best checkpoint, step 4, differ from the last, so a run keeps two).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_harness_cli import TINY, _latest_leaves, _run

FAULT_RUN = TINY + ["--algorithm", "erm", "--steps", "8", "--eval-every", "2", "--lr", "0.01"]
CELL = os.path.join("cells", "erm_heldout-75_seed-0")

# Runs disam-train with the fault DISAM_FAULT = "<what>:<step>" injected at the checkpoint save of <step>.
_FAULT = r"""
import os, signal, sys, time
what, step = os.environ["DISAM_FAULT"].split(":")
step = int(step)
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
from orbax.checkpoint._src.path import async_path, deleter
from disam_jax.harness import checkpoint

real_save, real_rename = checkpoint.CheckpointStore.save, async_path.rename
real_delete = deleter.StandardCheckpointDeleter.delete

def save(self, s, *args, **kwargs):
  if s == step and what == "kill_before_save":
    self._wait()  # the write of the step before, still in flight (saves return before it ends), is complete
    kill()
  if s == step and what == "hold":  # holds the run (and its lock) until a signal ends it
    time.sleep(120)
  if s == step and what == "fill_disk":
    self._wait()  # step 4's write, maybe still in flight, ends first: the disk fills for step 6's
    with open(os.environ["DISAM_FILL"], "wb", buffering=0) as f:  # until the disk is full
      try:
        while True:
          f.write(b"\0" * 4096)
      except OSError:
        pass
  real_save(self, s, *args, **kwargs)
  if s == step and what == "sigterm_after_save":
    os.kill(os.getpid(), signal.SIGTERM)

async def rename(src, dst):
  name, parent = os.path.basename(str(dst)), os.path.basename(os.path.dirname(str(dst)))
  if what == "kill_in_flight" and name == "state" and parent.startswith(f"{step}."):
    kill()  # the step's temporary folder is half written
  if name == str(step) and what == "kill_before_rename":
    kill()  # written, not renamed
  if name == str(step) and what == "sigint_during_save":  # in orbax's background thread; Ctrl-C twice
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
  await real_rename(src, dst)
  if name == str(step) and what == "kill_after_rename":
    kill()  # renamed, the old step not deleted yet

def delete(self, s):  # orbax's retention, in its background thread once the newer checkpoint is complete
  if what == "kill_half_deleted" and s == step:
    folder = os.path.join(str(self._directory), str(s))
    for name in sorted(os.listdir(folder))[:2]:  # part of the old step is gone
      path = os.path.join(folder, name)
      os.remove(path) if os.path.isfile(path) else __import__("shutil").rmtree(path)
    kill()
  return real_delete(self, s)

checkpoint.CheckpointStore.save, async_path.rename, deleter.StandardCheckpointDeleter.delete = save, rename, delete
from disam_jax.harness.cli import main
sys.exit(main())
"""


_CACHE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for this module's subprocesses: each then loads the tiny run's compiled
  steps instead of compiling them (about 3 s of 11 on 2 shared cores)."""
  _CACHE.update(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  yield
  _CACHE.clear()


def _env(**extra):
  return {**os.environ, **_CACHE, **extra}


def _faulty_run(fault, args, wait=True):
  """disam-train `args` in a subprocess with `fault` injected; the CompletedProcess (or the Popen if not `wait`)."""
  command = [sys.executable, "-c", _FAULT, *args]
  env = _env(DISAM_FAULT=fault)
  if not wait:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of FAULT_RUN (this process)."""
  run = tmp_path_factory.mktemp("reference") / "run"
  code = _main(FAULT_RUN + ["--output-dir", str(run)])
  assert code == 0
  assert sorted(os.listdir(run / CELL / "checkpoints")) == ["4", "8"]  # latest and best differ
  return run


def _main(argv):
  from disam_jax.harness import cli

  return cli.main(argv)


def _assert_same_results(run, reference):
  """The tables, every evaluation, every metrics line (but wall times) and the final parameters of `reference`."""
  mine, theirs = (json.loads((r / "results.json").read_text()) for r in (run, reference))
  assert mine["tables"] == theirs["tables"]
  keys = ("algorithm", "held_out", "seed", "steps", "selected", "last", "evals")
  assert [{k: c[k] for k in keys} for c in mine["cells"]] == [{k: c[k] for k in keys} for c in theirs["cells"]]
  for cell in sorted(os.listdir(reference / "cells")):
    lines = [
      [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in open(r / "cells" / cell / "metrics.jsonl")
      ]
      for r in (run, reference)
    ]
    assert lines[0] == lines[1], cell
    for u, v in zip(_latest_leaves(run / "cells" / cell), _latest_leaves(reference / "cells" / cell)):
      np.testing.assert_array_equal(u, v)


def _resume(capsys, run, *extra):
  code, out, err = _run(capsys, ["--resume", "--output-dir", str(run), "--quiet", "--no-plots", *extra])
  return code, err


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL at every moment of a checkpoint save, then --resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "fault, left",
  [
    ("kill_before_save:6", ["4"]),
    ("kill_in_flight:6", ["4", "6.orbax-checkpoint-tmp"]),  # the step's folder half written
    ("kill_before_rename:6", ["4", "6.orbax-checkpoint-tmp"]),  # written, not renamed
    ("kill_after_rename:4", ["2", "4"]),  # renamed, the old step 2 not deleted yet
    ("kill_half_deleted:2", ["2", "4"]),  # step 2 half deleted
  ],
)
def test_sigkill_during_a_checkpoint_save_then_resume_ends_as_an_uninterrupted_run(
  capsys, tmp_path, reference, fault, left
):
  from disam_jax.harness.checkpoint import CheckpointStore

  run = tmp_path / "run"
  killed = _faulty_run(fault, FAULT_RUN + ["--output-dir", str(run)])
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  checkpoints = run / CELL / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == left
  CheckpointStore(str(checkpoints)).close()  # what --resume opens first: a killed save's folder goes
  assert not [n for n in os.listdir(checkpoints) if "tmp" in n]
  code, err = _resume(capsys, run)
  assert code == 0, err
  _assert_same_results(run, reference)


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM, Ctrl-C while orbax writes, two runs on one directory
# ---------------------------------------------------------------------------------------------------------------------


def _wait_for(condition, what, timeout=120):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.1)


def test_a_second_run_is_refused_by_the_lock_and_sigterm_stops_the_first_like_ctrl_c(capsys, tmp_path, reference):
  run = tmp_path / "run"
  first = _faulty_run("hold:4", FAULT_RUN + ["--output-dir", str(run)], wait=False)  # holds before step 4's save
  try:
    _wait_for(lambda: (run / CELL / "checkpoints" / "2").exists(), "the first run's checkpoint of step 2")
    code, err = _resume(capsys, run)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{run} is in use by another disam-train run (PID {first.pid} on " in err
    assert f"lock file {run / '.lock'}" in err
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
  finally:
    first.kill()
  assert first.returncode == 130
  assert err.splitlines() == [
    f"disam-train: error: terminated (SIGTERM); continue with: disam-train --resume --output-dir {run}"
  ]
  assert not (run / ".lock").exists()
  code, err = _resume(capsys, run)
  assert code == 0, err
  _assert_same_results(run, reference)


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_notice(capsys, tmp_path, reference):
  run = _copy(reference, tmp_path)
  (run / CELL / "result.json").unlink()
  (run / ".lock").write_text("PID 999999 on elsewhere, started 2020-01-01 00:00:00\n")
  code, err = _resume(capsys, run)
  assert code == 0, err
  assert (
    f"{run / '.lock'} was left by PID 999999 on elsewhere, started 2020-01-01 00:00:00, which is no longer "
    "running (killed?): taking it over" in err
  )
  _assert_same_results(run, reference)


def test_ctrl_c_while_orbax_writes_finishes_the_save_quietly_and_exits_130(capsys, tmp_path, reference):
  run = tmp_path / "run"
  interrupted = _faulty_run("sigint_during_save:4", FAULT_RUN + ["--output-dir", str(run)])  # Ctrl-C twice
  assert interrupted.returncode == 130, interrupted.stderr
  assert interrupted.stderr.splitlines() == [
    f"disam-train: error: interrupted; continue with: disam-train --resume --output-dir {run}"
  ]
  # The save in flight was finished. (Saves return before their write ends: the loop may have reached step 6's
  # save, which then held the signal until orbax had it in hand, and finished it too.)
  left = sorted(os.listdir(run / CELL / "checkpoints"))
  assert left in (["4"], ["4", "6"]), left
  code, err = _resume(capsys, run)
  assert code == 0, err
  _assert_same_results(run, reference)


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints, truncated result, config and metrics files of a run being resumed
# ---------------------------------------------------------------------------------------------------------------------


def _copy(reference, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  return run


def _data_files(step_dir):
  """The array data files of a checkpoint (OCDBT's `d/` folders)."""
  return [
    os.path.join(d, n) for d, _, names in os.walk(step_dir / "state") for n in names if os.path.basename(d) == "d"
  ]


def _truncate(step_dir):
  for path in _data_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _remove_meta(step_dir):
  os.remove(step_dir / "meta" / "metadata")


def _overwrite(step_dir):  # same length, other bytes: orbax restores such files without an error
  rng = np.random.default_rng(0)
  for path in _data_files(step_dir):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 4)
      f.write(rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes())


def _other_values(step_dir):
  """Silent corruption: the arrays of step 8 replaced by step 4's, a well-formed checkpoint that orbax restores
  without complaint, with other values. (Flipping bytes in a data file was not reliably a corruption: OCDBT's files
  can hold bytes that no array reads, and 1 run in 7 resumed unharmed.)"""
  shutil.rmtree(step_dir / "state")
  shutil.copytree(step_dir.parent / "4" / "state", step_dir / "state")


@pytest.mark.parametrize(
  "corrupt, reason, real_process",
  [
    (_truncate, "could not read the checkpoint of step 8 in", True),
    (_remove_meta, "could not read the checkpoint of step 8 in", False),
    (_overwrite, "could not read the checkpoint of step 8 in", True),
    (_other_values, "the checkpoint of step 8 in {} does not match its checksums", True),
  ],
)
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before_saying_so(
  capsys, tmp_path, reference, corrupt, reason, real_process
):
  """Resumed in a real process where tensorstore's callbacks of a failed read would print tracebacks until exit."""
  run = _copy(reference, tmp_path)
  (run / CELL / "result.json").unlink()  # interrupted after its last checkpoint: --resume restores it
  corrupt(run / CELL / "checkpoints" / "8")
  if real_process:
    done = subprocess.run(
      [sys.executable, "-m", "disam_jax.harness.cli", "--resume", "--output-dir", str(run), "--quiet", "--no-plots"],
      capture_output=True,
      text=True,
      timeout=300,
      env=_env(),
    )
    code, err = done.returncode, done.stderr
  else:
    code, err = _resume(capsys, run)
  assert code == 0, err
  assert len(err.splitlines()) == 1, err
  assert reason.format(run / CELL / "checkpoints") in err
  assert err.endswith("; resuming from step 4, the latest readable checkpoint\n"), err
  _assert_same_results(run, reference)


def test_no_readable_checkpoint_exits_2_naming_the_folder_and_retrains_nothing(capsys, tmp_path, reference):
  run = _copy(reference, tmp_path)
  (run / CELL / "result.json").unlink()
  for step in ("4", "8"):
    _overwrite(run / CELL / "checkpoints" / step)
  metrics = (run / CELL / "metrics.jsonl").read_text()
  code, err = _resume(capsys, run)
  assert code == 2 and err.count("\n") == 1, err
  assert f"disam-train: error: no readable checkpoint in {run / CELL / 'checkpoints'}: " in err
  assert "Delete that checkpoints folder to train the run again from step 0." in err
  assert (run / CELL / "metrics.jsonl").read_text() == metrics and not (run / CELL / "result.json").exists()


def _cut(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def test_a_truncated_result_is_rebuilt_from_the_checkpoint_saying_so(capsys, tmp_path, reference):
  run = _copy(reference, tmp_path)
  _cut(run / CELL / "result.json")
  code, err = _resume(capsys, run)
  assert code == 0, err
  assert f"{run / CELL / 'result.json'} is unreadable (" in err
  assert "rebuilding it from the run's latest checkpoint" in err
  _assert_same_results(run, reference)


def test_a_truncated_config_falls_back_to_the_copy_in_the_results_or_exits_2(capsys, tmp_path, reference):
  run = _copy(reference, tmp_path)
  _cut(run / "config.json")
  (run / CELL / "result.json").unlink()
  code, err = _resume(capsys, run)
  assert code == 0, err
  assert f"{run / 'config.json'} is unreadable (" in err
  assert f"using the configuration recorded in {run / 'results.json'}" in err
  _assert_same_results(run, reference)
  _cut(run / "config.json")
  _cut(run / "results.json")
  code, err = _resume(capsys, run)
  assert code == 2 and err.count("\n") == 1, err
  assert f"--resume: {run / 'config.json'} is unreadable (" in err and "the run's options are lost" in err


def test_truncated_metrics_are_said_and_the_tables_stay_those_of_the_uninterrupted_run(capsys, tmp_path, reference):
  run = _copy(reference, tmp_path)
  (run / CELL / "result.json").unlink()
  _cut(run / CELL / "metrics.jsonl")
  code, err = _resume(capsys, run)
  assert code == 0, err
  assert (
    f"{run / CELL / 'metrics.jsonl'} is unreadable after step 3 (line 5), before the checkpoint of step 8: "
    "steps 4-8 of this run will have no metrics line" in err
  )
  assert (
    json.loads((run / "results.json").read_text())["tables"]
    == json.loads((reference / "results.json").read_text())["tables"]
  )


# ---------------------------------------------------------------------------------------------------------------------
# A full disk, a read-only output directory (a small tmpfs in a mount namespace of its own)
# ---------------------------------------------------------------------------------------------------------------------


def _in_mount_namespace(tmp_path, script):
  """Runs the shell `script` with a 16 MB tmpfs mounted at tmp_path/mnt, in a user and mount namespace of its own
  (`unshare -rm`: no privileges needed); skips where namespaces are not available."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if shutil.which("unshare") is None:
    pytest.skip("needs unshare (util-linux) for a tmpfs of its own")
  probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True)
  if probe.returncode:
    pytest.skip(f"mount namespaces are not available: {probe.stderr.decode().strip()}")
  done = subprocess.run(
    ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16m tmpfs {mnt} && {script}"],
    capture_output=True,
    text=True,
    timeout=300,
    env=_env(),
  )
  assert done.returncode == 0, done.stderr
  return mnt


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resume_finishes_the_run(capsys, tmp_path, reference):
  from disam_jax.harness import report

  out, mnt = tmp_path / "out", tmp_path / "mnt"
  out.mkdir()
  run = mnt / "run"
  command = shlex.join([sys.executable, "-c", _FAULT, *FAULT_RUN, "--output-dir", str(run)])
  _in_mount_namespace(
    tmp_path,
    f"DISAM_FAULT=fill_disk:6 DISAM_FILL={mnt}/filler {command} 2> {out}/err; "
    f"echo $? > {out}/code; cp -a {run} {out}/run",
  )  # the filler stays behind
  assert (out / "code").read_text().strip() == "4"
  assert (out / "err").read_text().splitlines() == [
    f"disam-train: error: could not write the checkpoint of step 6 in {run / CELL / 'checkpoints'}: No space left on "
    f"device (errno 28); the checkpoint of step 4 is kept. Make room (or make {run} writable) and continue with: "
    f"disam-train --resume --output-dir {run}"
  ]
  copy = out / "run"  # as it was on the full disk
  # Step 4 intact (a temporary folder of step 6 may remain when orbax still wrote into it: the next open removes it)
  assert [n for n in os.listdir(copy / CELL / "checkpoints") if n.isdigit()] == ["4"]
  assert report.main([str(copy), "--no-plots"]) == 0  # the report works on what is there
  assert "incomplete: 1 of the 1 runs configured have no result" in capsys.readouterr().err
  code, err = _resume(capsys, copy)
  assert code == 0, err
  _assert_same_results(copy, reference)


def test_a_read_only_output_directory_is_one_line_and_changes_nothing(tmp_path, reference):
  out, mnt = tmp_path / "out", tmp_path / "mnt"
  out.mkdir()
  run = mnt / "run"
  cli = [sys.executable, "-m", "disam_jax.harness.cli"]
  resume = shlex.join(cli + ["--resume", "--output-dir", str(run), "--quiet", "--no-plots"])
  new = shlex.join(cli + FAULT_RUN + ["--output-dir", str(mnt / "new")])
  _in_mount_namespace(
    tmp_path,
    f"cp -a {reference} {run} && rm {run / CELL / 'result.json'} && ls -lR {run} > "
    f"{out}/before && mount -o remount,ro {mnt} && {{ {resume} 2> {out}/err_resume; "
    f"echo $? > {out}/code_resume; {new} 2> {out}/err_new; echo $? > {out}/code_new; "
    f"ls -lR {run} > {out}/after; }}",
  )
  assert (out / "code_resume").read_text().strip() == "4"
  assert (out / "err_resume").read_text().splitlines() == [
    f"disam-train: error: cannot write {run}: Read-only file system."
  ]
  assert (out / "code_new").read_text().strip() == "4"
  assert (out / "err_new").read_text().splitlines() == [
    f"disam-train: error: cannot write {mnt / 'new'}: Read-only file system."
  ]
  assert (out / "after").read_text() == (out / "before").read_text()


@pytest.mark.parametrize(
  "signum, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated (SIGTERM)")], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_before_training_starts_is_one_line_and_exit_130(capsys, monkeypatch, tmp_path, signum, said):
  from disam_jax.harness import experiment

  def prepare_and_fit(*args, **kwargs):  # while the data loads: the real handlers are installed
    signal.raise_signal(signum)

  def unhandled(*args):
    raise AssertionError("disam-train left SIGTERM to the previous handler")

  monkeypatch.setattr(experiment, "prepare_and_fit", prepare_and_fit)
  previous = signal.signal(signal.SIGTERM, unhandled)  # instead of the default, which would end pytest
  try:
    code, _, err = _run(capsys, FAULT_RUN + ["--output-dir", str(tmp_path / "run")])
    assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
  except KeyboardInterrupt:
    pytest.fail("a KeyboardInterrupt escaped disam-train")
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert code == 130 and err == f"disam-train: error: {said} before training started; nothing was trained\n"
  assert not (tmp_path / "run").exists()


def test_lost_checkpoints_retrain_from_step_0_saying_so(capsys, tmp_path, reference):
  run = _copy(reference, tmp_path)
  (run / CELL / "result.json").unlink()
  shutil.rmtree(run / CELL / "checkpoints")
  code, err = _resume(capsys, run)
  assert code == 0, err
  cell = run / CELL
  assert err == (
    f"disam-train: {cell / 'checkpoints'} holds no checkpoint although {cell / 'metrics.jsonl'} has "
    "lines: training this run again from step 0\n"
  )
  _assert_same_results(run, reference)
