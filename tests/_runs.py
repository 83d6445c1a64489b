"""Shared by the run-level tests: a run's metrics lines, and a run killed at a step (then resumed by the test)."""

import json
import os

import pytest

from disam_jax.harness.experiment import cell_directory, run_experiment


class Killed(Exception):
  """Raised from `on_step` to stop a run as a kill would (its checkpoints so far remain)."""


def metrics_lines(run_dir, held_out, algorithm="disam", seed=0):
  """The metrics.jsonl lines of one run of `run_dir`, without their wall times."""
  with open(os.path.join(cell_directory(run_dir, algorithm, held_out, seed), "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  for line in lines:
    line.pop("time", None)
  return lines


def run_killed_at(config, run_dir, step):
  """Runs `config` into `run_dir` and stops it right after `step` (the caller resumes it)."""

  def crash(algorithm, held_out, seed, at, line):
    if at == step:
      raise Killed

  with pytest.raises(Killed):
    run_experiment(config, run_dir, progress=False, on_step=crash)
