"""scripts/science.py: paired rows, differences of differences, the power column, and that docs/results.md gives
the command of every run directory its rows read. References are hand-written NumPy, never science.py itself."""

import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _science():
  spec = importlib.util.spec_from_file_location("science", os.path.join(ROOT, "scripts", "science.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


science = _science()

# Student t quantiles t_{0.975} by degrees of freedom (tables)
T975 = {4: 2.7764451051977987, 8: 2.306004135204166, 9: 2.2621571627409915}


def _write_run(root, name, accs, algorithm):
  """A run directory as disam-train writes it, reduced to what science.py reads: one cell per (held-out, seed)."""
  cells = []
  for (held_out, seed), acc in accs.items():
    cell = f"{algorithm}_heldout-{held_out}_seed-{seed}"
    os.makedirs(os.path.join(root, name, "cells", cell))
    with open(os.path.join(root, name, "cells", cell, "metrics.jsonl"), "w") as f:
      for step in range(1, 11):
        f.write(
          json.dumps(
            {
              "step": step,
              "loss": 1.0 / step,
              "domain_losses": {"a": 1.0 / step, "b": 1.1 / step},
              "variance": 0.01 / step,
              "perturbation_norm": 0.1,
              "grad_norm": 1.0,
              "time": float(step),
            }
          )
          + "\n"
        )
    cells.append(
      {
        "algorithm": algorithm,
        "held_out": held_out,
        "seed": seed,
        "directory": f"cells/{cell}/",
        "selected": {"test_acc": acc / 100},
        "last": {"test_acc": acc / 100},
      }
    )
  path = os.path.join(root, name, "results.json")
  old = json.load(open(path))["cells"] if os.path.exists(path) else []
  with open(path, "w") as f:
    json.dump({"cells": old + cells, "config": {"hparams": {"lam": 0.1}}}, f)


def _interval(d, df):
  half = T975[df] * d.std(ddof=1) / math.sqrt(len(d))
  return d.mean(), d.mean() - half, d.mean() + half


def test_difference_of_differences_row_pairs_by_held_out_and_seed(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  keys = [("75", s) for s in range(10)]
  arms = {arm: rng.uniform(60, 80, size=10) for arm in "ABCD"}
  _write_run(tmp_path, "x", dict(zip(keys, arms["A"])), "disam")
  _write_run(tmp_path, "x", dict(zip(keys, arms["B"])), "sam")
  _write_run(tmp_path, "y", dict(zip(keys, arms["C"])), "disam")
  # D lacks seed 9 and has an extra seed: only the 9 (held-out, seed) keys every arm has are paired
  d_accs = dict(zip(keys[:9], arms["D"][:9]))
  d_accs[("75", 42)] = 0.0
  _write_run(tmp_path, "y", d_accs, "sam")
  monkeypatch.setattr(
    science,
    "COMPARISONS",
    {
      "r": (
        0.5,
        [("A − B", ("x", "disam"), ("x", "sam")), ("dd", ("x", "disam"), ("x", "sam"), ("y", "disam"), ("y", "sam"))],
      )
    },
  )
  out = science.tables(str(tmp_path))
  ab = arms["A"] - arms["B"]
  dd = (arms["A"] - arms["B"] - arms["C"] + arms["D"])[:9]
  for label, d in (("A − B", ab), ("dd", dd)):
    row = next(line for line in out.splitlines() if line.startswith(f"| r | {label} |"))
    mean, low, high = _interval(d, len(d) - 1)
    assert f"| {len(d)} | {mean:+.2f} [{low:+.2f}, {high:+.2f}]" in row, row
  assert row.endswith("| – | – |")  # the weights of a difference of differences are nobody's: not shown
  power = science.power_table(str(tmp_path))
  row = next(line for line in power.splitlines() if line.startswith("| r | dd |"))
  assert f"| {dd.std(ddof=1):.2f} |" in row


def test_rows_need_two_or_four_sides(tmp_path, monkeypatch):
  _write_run(tmp_path, "x", {("75", 0): 50.0, ("75", 1): 60.0}, "sam")
  monkeypatch.setattr(science, "COMPARISONS", {"r": (0.5, [("bad", ("x", "sam"), ("x", "sam"), ("x", "sam"))])})
  with pytest.raises(ValueError, match="give A, B or A, B, C, D"):
    science.tables(str(tmp_path))


def test_detectable_difference_has_the_power_it_claims():
  """Monte Carlo: paired differences N(delta, 1), n of them, two-sided t-test at 5%: rejected in 80% of trials."""
  rng = np.random.default_rng(1)
  for n, crit in ((5, T975[4]), (10, T975[9])):
    delta = science.detectable_difference(1.0, n)
    d = rng.normal(delta, 1.0, size=(40_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert abs(np.mean(np.abs(t) > crit) - 0.8) < 0.01, (n, delta)
  # scale: linear in the s.d.; large n: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n)
  assert science.detectable_difference(3.0, 10) == pytest.approx(3 * science.detectable_difference(1.0, 10))
  assert science.detectable_difference(1.0, 4000) == pytest.approx((1.959964 + 0.841621) / math.sqrt(4000), rel=2e-3)
  assert science.detectable_difference(1.0, 1) is None and science.detectable_difference(0.0, 5) is None


def test_results_md_gives_the_command_of_every_run_directory_of_the_issue_31_rows():
  """One command per row: each run directory the BatchNorm and batching rows read is an --output-dir in results.md."""
  text = open(os.path.join(ROOT, "docs", "results.md")).read()
  written = set(re.findall(r"--output-dir (\S+)", text))
  for regime, (_, rows) in science.COMPARISONS.items():
    if "BatchNorm mode" not in regime and "merged batches" not in regime:
      continue
    for _, *sides in rows:
      for directory, _ in sides:
        missing = set(directory.split(",")) - written
        assert not missing, (regime, missing)
