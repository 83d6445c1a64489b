"""Tests for the TensorBoard events of a run (disam_jax/harness/tensorboard.py, `disam-train --tensorboard`).

The event files are read back by TensorBoard (the `tensorboard` package of the test extra), which shares no code
with the writer (tensorboardX): record by record with its `LegacyEventFileLoader` (CRC-32C checked; every record
and the file-version record of each file), and as its UI shows them with `EventAccumulator`. Each run's scalars
must be exactly its metrics.jsonl values (as float32, TensorBoard's `simple_value`), at their steps, each step
once, also after an interrupted run is resumed.
"""

import dataclasses
import glob
import json
import os
import sys

import numpy as np
import pytest

from disam_jax.harness import cli, distributed, experiment, tensorboard
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig

pytest.importorskip("tensorboardX", reason="the tensorboard extra: pip install 'disam_jax[tensorboard]'")
event_accumulator = pytest.importorskip(
  "tensorboard.backend.event_processing.event_accumulator",
  reason="TensorBoard's loader (the test extra): pip install tensorboard",
)
event_file_loader = pytest.importorskip(
  "tensorboard.backend.event_processing.event_file_loader",
  reason="TensorBoard's loader (the test extra): pip install tensorboard",
)

# The MLP of tests/test_harness_train.py (its compiled steps are shared through the harness's cache), with
# --diagnostics so that DISAM logs the cosine to SAM's direction too.
CONFIG = ExperimentConfig(
  algorithms=("disam",),
  held_out=("75",),
  seeds=(0,),
  steps=12,
  eval_every=4,
  model="mlp",
  model_kwargs={"hidden": 16},
  hparams=HParams(batch_size=8, diagnostics=True),
)
TRAIN_DOMAINS = ["0", "15", "30", "45", "60"]
CLI = [
  "--held-out",
  "75",
  "--model-option",
  "hidden=16",
  "--batch-size",
  "8",
  "--no-plots",
  "--quiet",
  "--algorithm",
  "erm",
  "disam",
  "--eval-every",
  "2",
]


# ---------------------------------------------------------------------------------------------------------------------
# The events as TensorBoard reads them
# ---------------------------------------------------------------------------------------------------------------------


def _raw_scalars(directory: str):
  """Every (tag, step, value) of the event files of `directory`, in file order, read record by record by
  TensorBoard's `LegacyEventFileLoader` (each record's CRC-32C checked, the Event protobuf parsed; unlike
  `EventFileLoader` it does not migrate scalars to tensors): Event.step and every Summary.Value's tag and
  simple_value. Each file must start with its one file-version record."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    events = list(event_file_loader.LegacyEventFileLoader(path).Load())
    versions = [e.file_version for e in events if e.HasField("file_version")]
    assert versions == ["brain.Event:2"] and events[0].HasField("file_version"), f"{path}: one file-version record"
    for event in events:
      for value in event.summary.value:
        assert value.HasField("simple_value"), f"{path}: {value.tag} is not a simple_value scalar"
        out.append((value.tag, event.step, value.simple_value))
  assert out, f"no scalars in {directory}"
  return out


# ---------------------------------------------------------------------------------------------------------------------
# What the events must be: the metrics file, mapped here independently of tensorboard.scalars
# ---------------------------------------------------------------------------------------------------------------------


def _expected(directory: str):
  """{tag: [(step, float32 value)]} from the run's metrics.jsonl."""
  out = {}

  def put(tag, step, value):
    if value is not None:
      out.setdefault(tag, []).append((step, float(np.float32(value))))

  with open(os.path.join(directory, "metrics.jsonl")) as f:
    for line in map(json.loads, f):
      step = line["step"]
      for key in ("loss", "variance", "perturbation_norm", "grad_norm", "sam_cosine", "penalty", "objective"):
        put(f"train/{key}", step, line.get(key))
      for key in ("domain_losses", "perturbation_weights"):
        for domain, value in (line.get(key) or {}).items():
          put(f"{key}/{domain}", step, value)
      if "eval" in line:
        for domain, value in line["eval"]["val_acc"].items():
          put(f"val_acc/{domain}", step, value)
        put("eval/val_acc_mean", step, line["eval"]["val_acc_mean"])
        for domain, value in line["eval"]["test_acc"].items():
          put(f"test_acc/{domain}", step, value)
  return out


def _by_tag(raw):
  out = {}
  for tag, step, value in raw:
    out.setdefault(tag, []).append((step, value))
  return out


def _accumulated(directory: str):
  """{tag: [(step, value)]} as TensorBoard loads them."""
  acc = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_events(directory: str, steps: int):
  raw = _raw_scalars(directory)
  pairs = [(tag, step) for tag, step, _ in raw]
  assert len(pairs) == len(set(pairs)), "a (tag, step) written twice"
  expected = _expected(directory)
  assert _by_tag(raw) == expected
  assert sorted({s for v in expected.values() for s, _ in v}) == list(range(steps + 1))
  return expected


# ---------------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------------


def test_events_are_the_metrics_lines_of_every_run(tmp_path):
  config = dataclasses.replace(CONFIG, steps=6, eval_every=3)
  experiment.run_experiment(config, str(tmp_path), progress=False, tensorboard=True)
  cell = experiment.cell_directory(str(tmp_path), "disam", "75", 0)
  expected = _check_events(cell, steps=6)
  tags = set(expected)
  assert {
    "train/loss",
    "train/variance",
    "train/perturbation_norm",
    "train/grad_norm",
    "train/sam_cosine",
    "eval/val_acc_mean",
    "test_acc/75",
  } <= tags
  for d in TRAIN_DOMAINS:
    assert {f"domain_losses/{d}", f"perturbation_weights/{d}", f"val_acc/{d}"} <= tags
  assert [s for s, _ in expected["test_acc/75"]] == [0, 3, 6] and [s for s, _ in expected["train/loss"]] == list(
    range(1, 7)
  )
  assert _accumulated(cell) == expected  # and TensorBoard shows exactly that


def test_a_resumed_run_has_every_step_once_with_the_values_of_an_uninterrupted_run(tmp_path):
  full = str(tmp_path / "full")
  experiment.run_experiment(CONFIG, full, progress=False, tensorboard=True)

  class Killed(Exception):
    pass

  def kill(algorithm, held_out, seed, step, line):
    if step == 7:
      raise Killed

  run = str(tmp_path / "run")
  with pytest.raises(Killed):
    experiment.run_experiment(CONFIG, run, progress=False, tensorboard=True, on_step=kill)
  cell = experiment.cell_directory(run, "disam", "75", 0)
  assert max(s for _, s, _ in _raw_scalars(cell)) == 7  # events past the checkpoint of step 4
  experiment.run_experiment(CONFIG, run, progress=False, tensorboard=True, resume=True)
  resumed = _check_events(cell, steps=12)
  assert resumed == _expected(experiment.cell_directory(full, "disam", "75", 0))  # deterministic steps
  assert _accumulated(cell) == resumed


def test_cli_tensorboard_and_resume_keeps_writing_without_the_flag(tmp_path, capsys):
  run = tmp_path / "run"
  assert cli.main(CLI + ["--steps", "3", "--output-dir", str(run), "--tensorboard"]) == 0
  for algorithm in ("erm", "disam"):
    _check_events(run / "cells" / f"{algorithm}_heldout-75_seed-0", steps=3)
  # The command printed after an interruption has no --tensorboard: a run with events keeps them up to date.
  assert cli.main(CLI + ["--steps", "5", "--output-dir", str(run), "--resume"]) == 0
  for algorithm in ("erm", "disam"):
    expected = _check_events(run / "cells" / f"{algorithm}_heldout-75_seed-0", steps=5)
    assert "perturbation_weights/0" in expected or algorithm == "erm"
  capsys.readouterr()


def test_resume_with_the_flag_writes_the_events_of_runs_that_finished_without(tmp_path, capsys):
  run = tmp_path / "run"
  assert cli.main(CLI + ["--steps", "2", "--output-dir", str(run)]) == 0
  assert not tensorboard.run_has_events(str(run))
  assert cli.main(CLI + ["--steps", "2", "--output-dir", str(run), "--resume", "--tensorboard"]) == 0
  for algorithm in ("erm", "disam"):
    _check_events(run / "cells" / f"{algorithm}_heldout-75_seed-0", steps=2)
  capsys.readouterr()


def test_without_tensorboardx_the_flag_is_refused_naming_the_extra(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
  run = tmp_path / "run"
  assert cli.main(CLI + ["--steps", "2", "--output-dir", str(run), "--tensorboard"]) == 2
  err = capsys.readouterr().err
  assert "pip install 'disam_jax[tensorboard]'" in err and "--tensorboard" in err and "Traceback" not in err
  assert not run.exists()  # refused before anything is written
  with pytest.raises(ImportError, match=r"disam_jax\[tensorboard\]"):
    experiment.run_experiment(CONFIG, str(tmp_path / "api"), progress=False, tensorboard=True)
  assert not (tmp_path / "api").exists()
  # Without the flag nothing needs it.
  assert cli.main(CLI + ["--steps", "2", "--output-dir", str(run)]) == 0
  # A run with events, resumed: refused with what to install or delete.
  (run / "cells" / "erm_heldout-75_seed-0" / "events.out.tfevents.0.host").write_bytes(b"")
  assert cli.main(CLI + ["--steps", "3", "--output-dir", str(run), "--resume"]) == 2
  err = capsys.readouterr().err
  assert "holds TensorBoard event files" in err and "disam_jax[tensorboard]" in err


def test_only_process_0_writes_events(tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, "is_main_process", lambda: False)
  config = dataclasses.replace(CONFIG, steps=2, eval_every=2)
  experiment.run_experiment(config, str(tmp_path), progress=False, tensorboard=True)
  assert glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True) == []


def test_scalars_skips_missing_values():
  line = {
    "step": 3,
    "loss": 1.5,
    "time": 0.2,
    "sam_cosine": None,
    "domain_losses": {"a": 1.0, "b": 2.0},
    "eval": {"val_acc": {"a": 0.5}, "val_acc_mean": 0.5, "test_acc": {"c": 0.25}},
  }
  assert tensorboard.scalars(line) == {
    "train/loss": 1.5,
    "domain_losses/a": 1.0,
    "domain_losses/b": 2.0,
    "val_acc/a": 0.5,
    "eval/val_acc_mean": 0.5,
    "test_acc/c": 0.25,
  }
