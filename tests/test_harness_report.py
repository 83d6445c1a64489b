"""Tests for disam_jax.harness.report: the DomainBed-style tables and the plots, on hand-made results."""

import json
import os
import subprocess
import sys

import numpy as np

from disam_jax.harness import report


def _cell(algorithm, held_out, seed, selected, last, directory=""):
  return {
    "algorithm": algorithm, "held_out": held_out, "seed": seed, "steps": 20,
    "selected": {"step": 10, "val_acc": 0.9, "test_acc": selected},
    "last": {"step": 20, "val_acc": 0.8, "test_acc": last},
    "evals": [], "seconds": 1.0, "directory": directory,
  }


CELLS = [
  _cell("erm", "a", 0, 0.90, 0.50), _cell("erm", "a", 1, 0.92, 0.52),
  _cell("erm", "b", 0, 0.80, 0.60), _cell("erm", "b", 1, 0.80, 0.62),
  _cell("disam", "a", 0, 0.95, 0.70), _cell("disam", "a", 1, 0.93, 0.72),
  _cell("disam", "b", 0, 0.81, 0.70),  # seed 1 missing: no Avg from it
]


def test_table_is_mean_plus_minus_sample_std_over_seeds():
  table = report.results_table(CELLS, "selected").splitlines()
  assert table[0] == "| Algorithm | a | b | Avg |"
  assert table[1] == "|---|:-:|:-:|:-:|"
  # erm: a = mean(90, 92) ± std(ddof=1) = 1.41; b = 80 ± 0; Avg over seeds of (85, 86) = 85.5 ± 0.71
  assert table[2] == "| ERM | 91.0 ± 1.4 | 80.0 ± 0.0 | 85.5 ± 0.7 |"
  # disam: b has one seed (mean alone); Avg only over seed 0, the one seed with every domain
  assert table[3] == "| DISAM | 94.0 ± 1.4 | 81.0 | 88.0 |"
  last = report.results_table(CELLS, "last").splitlines()
  assert last[2] == "| ERM | 51.0 ± 1.4 | 61.0 ± 1.4 | 56.0 ± 1.4 |"


def test_format_mean_std():
  assert report.format_mean_std([]) == "–"
  assert report.format_mean_std([0.5]) == "50.0"
  assert report.format_mean_std([0.5, 0.6, 0.7]) == "60.0 ± 10.0"


def test_results_markdown_has_both_selections_and_seed_note():
  text = report.results_markdown(CELLS, {"dataset": "rotated_digits", "model": "mlp", "steps": 20,
                                         "hparams": {"optimizer": "adam", "lr": 0.001, "batch_size": 64,
                                                     "rho": 0.05, "lam": 0.1}})
  assert "## Model selection: training-domain validation" in text
  assert "## Model selection: last checkpoint" in text
  assert "mean ± std over 2 seeds (0, 1)" in text
  assert "rotated_digits · model mlp · 20 steps · adam lr 0.001" in text


def test_steps_to_threshold_and_smoothing():
  steps = np.arange(1, 11)
  loss = np.array([5, 4, 3, 0.5, 3, 2, 1, 0.9, 0.8, 0.7])
  assert report.steps_to_threshold(steps, loss, 1.0) == 4
  assert report.steps_to_threshold(steps, loss, 1.0, window=3) == 9  # mean of steps 7-9: 0.9
  assert report.steps_to_threshold(steps, loss, 0.1) is None
  np.testing.assert_allclose(report.smooth(np.array([1.0, 2, 3, 4]), 2), [1, 1.5, 2.5, 3.5])


def _write_fake_run(run_dir, steps=30, eval_every=10):
  """A run directory with synthetic metrics.jsonl files, as disam-train writes them."""
  rng = np.random.default_rng(0)
  cells = []
  for algorithm in ("erm", "sam", "disam"):
    for held_out in ("0", "75"):
      for seed in (0, 1):
        directory = os.path.join(run_dir, "cells", f"{algorithm}_heldout-{held_out}_seed-{seed}")
        os.makedirs(directory)
        train_domains = [d for d in ("0", "15", "75") if d != held_out]
        with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
          for step in range(steps + 1):
            line = {"step": step}
            if step:
              losses = {d: float(2.0 / step + rng.random() * 0.1) for d in train_domains}
              line.update(loss=float(np.mean(list(losses.values()))), domain_losses=losses,
                          variance=float(np.var(list(losses.values()))), perturbation_norm=0.5, grad_norm=1.0,
                          time=step * 0.01)
            if step % eval_every == 0:
              line["eval"] = {"val_acc": {d: 0.5 for d in train_domains}, "val_acc_mean": 0.5,
                              "test_acc": {held_out: float(0.1 + step / steps * 0.8)}}
            f.write(json.dumps(line) + "\n")
        cells.append(_cell(algorithm, held_out, seed, 0.8, 0.9, directory) | {"steps": steps})
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump({"config": None, "cells": cells}, f)
  return cells


def test_load_metrics_reads_steps_and_evaluations(tmp_path):
  _write_fake_run(str(tmp_path))
  m = report.load_metrics(str(tmp_path / "cells" / "disam_heldout-0_seed-1" / "metrics.jsonl"))
  assert m.steps.tolist() == list(range(1, 31)) and m.domains == ["15", "75"]
  assert m.domain_losses.shape == (30, 2)
  assert m.eval_steps.tolist() == [0, 10, 20, 30]
  np.testing.assert_allclose(m.test_acc, [0.1, 0.1 + 0.8 / 3, 0.1 + 1.6 / 3, 0.9])


def test_plots_are_written_as_png(tmp_path):
  cells = _write_fake_run(str(tmp_path))
  paths = report.write_report(str(tmp_path), cells, None)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["domain_losses.png", "heldout_accuracy.png", "results.json", "results.md",
                   "training_curves.png"]
  for path in paths:
    assert os.path.getsize(path) > 1000 or path.endswith((".json", ".md"))
    if path.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_command_regenerates_a_run_directory(tmp_path):
  _write_fake_run(str(tmp_path))
  assert report.main([str(tmp_path), "--no-plots"]) == 0
  assert "| DISAM |" in (tmp_path / "results.md").read_text()
  assert report.main([str(tmp_path / "nowhere")]) == 2


def test_report_module_does_not_import_matplotlib_until_plotting():
  code = "import sys, disam_jax.harness.report, disam_jax.harness.cli; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_dynamics_table_compares_algorithms_run_by_run(tmp_path):
  cells = _write_fake_run(str(tmp_path))
  text = report.dynamics_table(str(tmp_path), cells, threshold=0.2)
  lines = text.splitlines()
  header = next(line for line in lines if line.startswith("| Algorithm"))
  assert "steps to loss ≤ 0.2" in header and "variance (all steps)" in header and "ms / step" in header
  erm = next(line for line in lines if line.startswith("| ERM |"))
  assert "| 4/4 |" in erm  # every run gets below 0.2 (the synthetic loss is 2/step + noise < 0.1)
  assert any(line.startswith("| DISAM vs SAM | 4 |") for line in lines)
  assert any(line.startswith("| DISAM vs ERM | 4 |") for line in lines)


def test_merge_combines_run_directories_with_renamed_algorithms(tmp_path):
  _write_fake_run(str(tmp_path / "a"))
  _write_fake_run(str(tmp_path / "b"))
  out = tmp_path / "merged"
  code = report.main([str(out), "--no-plots", "--merge", str(tmp_path / "a"), f"{tmp_path / 'b'}=_lam1"])
  assert code == 0
  text = (out / "results.md").read_text()
  assert "| DISAM_LAM1 |" in text and "| SAM |" in text and "| DISAM_LAM1 vs SAM | 4 |" in text
