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
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import async_path
from disam_jax.harness import checkpoint

real_save, real_rename, real_delete = checkpoint.CheckpointStore.save, async_path.rename, ocp.CheckpointManager.delete

def save(self, s, *args, **kwargs):
  if s == step and what == "kill_before_save":
    kill()
  if s == step and what == "hold":  # holds the run (and its lock) until a signal ends it
    time.sleep(120)
  if s == step and what == "fill_disk":
    with open(os.environ["DISAM_FILL"], "wb") as f:
      try:
        while True:
          f.write(b"\0" * 4096)
          f.flush()
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

def delete(self, s):
  if what == "kill_half_deleted" and s == step:
    folder = os.path.join(str(self.directory), str(s))
    for name in sorted(os.listdir(folder))[:2]:  # part of the old step is gone
      path = os.path.join(folder, name)
      os.remove(path) if os.path.isfile(path) else __import__("shutil").rmtree(path)
    kill()
  return real_delete(self, s)

checkpoint.CheckpointStore.save, async_path.rename, ocp.CheckpointManager.delete = save, rename, delete
from disam_jax.harness.cli import main
sys.exit(main())
"""


def _faulty_run(fault, args, env=None, wait=True):
  """disam-train `args` in a subprocess with `fault` injected; the CompletedProcess (or the Popen if not `wait`)."""
  command = [sys.executable, "-c", _FAULT, *args]
  env = {**os.environ, "DISAM_FAULT": fault, **(env or {})}
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
    lines = [[{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(r / "cells" / cell /
                                                                                         "metrics.jsonl")]
             for r in (run, reference)]
    assert lines[0] == lines[1], cell
    for u, v in zip(_latest_leaves(run / "cells" / cell), _latest_leaves(reference / "cells" / cell)):
      np.testing.assert_array_equal(u, v)


def _resume(capsys, run, *extra):
  code, out, err = _run(capsys, ["--resume", "--output-dir", str(run), "--quiet", "--no-plots", *extra])
  return code, err


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL at every moment of a checkpoint save, then --resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault, left", [
  ("kill_before_save:6", ["4"]),
  ("kill_in_flight:6", ["4", "6.orbax-checkpoint-tmp"]),  # the step's folder half written
  ("kill_before_rename:6", ["4", "6.orbax-checkpoint-tmp"]),  # written, not renamed
  ("kill_after_rename:4", ["2", "4"]),  # renamed, the old step 2 not deleted yet
  ("kill_half_deleted:2", ["2", "4"]),  # step 2 half deleted
])
def test_sigkill_during_a_checkpoint_save_then_resume_ends_as_an_uninterrupted_run(capsys, tmp_path, reference,
                                                                                   fault, left):
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
