"""Tests for disam_jax.harness.report: the DomainBed-style tables and the plots, on hand-made results."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from disam_jax.harness import report, tables


def _cell(algorithm, held_out, seed, selected, last, directory=""):
  return {
    "algorithm": algorithm,
    "held_out": held_out,
    "seed": seed,
    "steps": 20,
    "selected": {"step": 10, "val_acc": 0.9, "test_acc": selected},
    "last": {"step": 20, "val_acc": 0.8, "test_acc": last},
    "evals": [],
    "seconds": 1.0,
    "directory": directory,
  }


CELLS = [
  _cell("erm", "a", 0, 0.90, 0.50),
  _cell("erm", "a", 1, 0.92, 0.52),
  _cell("erm", "b", 0, 0.80, 0.60),
  _cell("erm", "b", 1, 0.80, 0.62),
  _cell("disam", "a", 0, 0.95, 0.70),
  _cell("disam", "a", 1, 0.93, 0.72),
  _cell("disam", "b", 0, 0.81, 0.70),  # seed 1 missing: no Avg from it
]


def test_table_is_mean_plus_minus_domainbeds_standard_error_over_seeds():
  table = report.results_table(CELLS, "selected").splitlines()
  assert table[0] == "| Algorithm | a | b | Avg |"
  assert table[1] == "|---|:-:|:-:|:-:|"
  # DomainBed's s.e.: std(ddof=0) / sqrt(n). erm: a = mean(90, 92) ± 1 / sqrt(2) = 0.71; b = 80 ± 0; Avg over seeds
  # of (85, 86) = 85.5 ± 0.5 / sqrt(2) = 0.35
  assert table[2] == "| ERM | 91.0 ± 0.7 | 80.0 ± 0.0 | 85.5 ± 0.4 |"
  # disam: b has one seed (mean alone); Avg only over seed 0, the one seed with every domain
  assert table[3] == "| DISAM | 94.0 ± 0.7 | 81.0 | 88.0 |"
  last = report.results_table(CELLS, "last").splitlines()
  assert last[2] == "| ERM | 51.0 ± 0.7 | 61.0 ± 0.7 | 56.0 ± 0.7 |"


def test_format_mean_se():
  """DomainBed's mean ± standard error, 100 * std(ddof=0) / sqrt(n): sqrt(200/3) / sqrt(3) = 4.71 for 50/60/70 %."""
  assert tables.format_mean_se([]) == "–"
  assert tables.format_mean_se([0.5]) == "50.0"
  assert tables.format_mean_se([0.5, 0.6, 0.7]) == "60.0 ± 4.7"


def test_results_markdown_has_both_selections_and_seed_note():
  text = report.results_markdown(
    CELLS,
    {
      "dataset": "rotated_digits",
      "model": "mlp",
      "steps": 20,
      "hparams": {"optimizer": "adam", "lr": 0.001, "batch_size": 64, "rho": 0.05, "lam": 0.1},
    },
  )
  assert "## Model selection: training-domain validation" in text
  assert "## Model selection: last checkpoint" in text
  assert "mean ± standard error over 2 trial seeds (0, 1)" in text
  assert "rotated_digits · model mlp · 20 steps · adam lr 0.001" in text


def test_steps_to_threshold_and_smoothing():
  steps = np.arange(1, 11)
  loss = np.array([5, 4, 3, 0.5, 3, 2, 1, 0.9, 0.8, 0.7])
  assert report.steps_to_threshold(steps, loss, 1.0) == 4
  assert report.steps_to_threshold(steps, loss, 1.0, window=3) == 9  # mean of steps 7-9: 0.9
  assert report.steps_to_threshold(steps, loss, 0.1) is None
  np.testing.assert_allclose(report.smooth(np.array([1.0, 2, 3, 4]), 2), [1, 1.5, 2.5, 3.5])


def _config(**changes):
  config = {
    "dataset": "rotated_digits",
    "data_dir": None,
    "image_size": None,
    "model": "mlp",
    "model_kwargs": {},
    "pretrained": None,
    "algorithms": ["erm", "sam", "disam"],
    "held_out": None,
    "seeds": [0, 1],
    "steps": 30,
    "eval_every": 10,
    "holdout_fraction": 0.2,
    "hard_domain": None,
    "hard_domain_fraction": 1.0,
    "hard_domain_label_noise": 0.0,
    "eval_batch_size": 512,
    "hparams": {
      "optimizer": "adam",
      "lr": 0.001,
      "weight_decay": 0.0,
      "batch_size": 64,
      "rho": 0.05,
      "lam": 0.1,
      "adaptive": False,
    },
  }
  for key, value in changes.items():
    (config["hparams"] if key in config["hparams"] else config)[key] = value
  return config


def _write_fake_run(
  run_dir,
  steps=30,
  eval_every=10,
  algorithms=("erm", "sam", "disam"),
  held_outs=("0", "75"),
  config=None,
  weights=False,
  cosine=False,
):
  """A run directory with synthetic metrics.jsonl files, as disam-train writes them."""
  rng = np.random.default_rng(0)
  cells = []
  for algorithm in algorithms:
    for held_out in held_outs:
      for seed in (0, 1):
        directory = os.path.join(run_dir, "cells", f"{algorithm}_heldout-{held_out}_seed-{seed}")
        os.makedirs(directory)
        train_domains = [d for d in ("0", "15", "75") if d != held_out]
        with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
          for step in range(steps + 1):
            line = {"step": step}
            if step:
              losses = {d: float(2.0 / step + rng.random() * 0.1) for d in train_domains}
              line.update(
                loss=float(np.mean(list(losses.values()))),
                domain_losses=losses,
                variance=float(np.var(list(losses.values()))),
                perturbation_norm=0.5,
                grad_norm=1.0,
                time=step * 0.01,
              )
              if weights:
                line["perturbation_weights"] = {
                  d: 0.5 + 0.1 * k * (algorithm == "disam") for k, d in enumerate(train_domains)
                }
                line["sam_cosine"] = 0.9 if cosine and algorithm == "disam" else None
            if step % eval_every == 0:
              line["eval"] = {
                "val_acc": {d: 0.5 for d in train_domains},
                "val_acc_mean": 0.5,
                "test_acc": {held_out: float(0.1 + step / steps * 0.8)},
              }
            f.write(json.dumps(line) + "\n")
        cells.append(_cell(algorithm, held_out, seed, 0.8, 0.9, directory) | {"steps": steps})
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump({"config": config, "cells": cells}, f)
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
  assert names == ["domain_losses.png", "heldout_accuracy.png", "results.json", "results.md", "training_curves.png"]
  for path in paths:
    assert os.path.getsize(path) > 1000 or path.endswith((".json", ".md"))
    if path.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_command_regenerates_a_run_directory(tmp_path, capsys):
  """It rewrites results.md and prints the main table (validation-selected held-out accuracy), then the paths."""
  _write_fake_run(str(tmp_path))
  assert report.main([str(tmp_path), "--no-plots"]) == 0
  results_md = (tmp_path / "results.md").read_text()
  assert "| DISAM |" in results_md
  out = capsys.readouterr().out
  first_section = results_md.split("## Model selection: leave-one-domain-out")[0].strip()
  assert out.startswith(first_section) and "## Model selection: leave-one-domain-out" not in out
  assert out.rstrip().endswith("results.json") or str(tmp_path) in out.splitlines()[-1]
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


# ---------------------------------------------------------------------------------------------------------------------
# Merges that never lose a run, atomic output
# ---------------------------------------------------------------------------------------------------------------------


def _merge(capsys, out, *sources, plots=False):
  code = report.main([str(out)] + ([] if plots else ["--no-plots"]) + ["--merge", *map(str, sources)])
  return code, capsys.readouterr().err


def _leftovers(parent):
  return sorted(p for p in os.listdir(parent) if p.startswith("."))


def test_merge_refuses_two_copies_of_one_run_and_names_the_suffix_to_add(tmp_path, capsys):
  _write_fake_run(str(tmp_path / "main"), algorithms=("disam",), config=_config())
  _write_fake_run(str(tmp_path / "main_lam05"), algorithms=("disam",), config=_config(lam=0.5))
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "main", tmp_path / "main_lam05")
  assert code == 2
  assert "'disam' run with held-out domain 0 and seed 0" in err and "keep only one" in err
  assert f"{tmp_path / 'main_lam05'}=_main_lam05" in err
  assert not os.path.exists(tmp_path / "out") and _leftovers(tmp_path) == []
  # With the suggested suffix both rows are kept, each with its own lam.
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "main", f"{tmp_path / 'main_lam05'}=_lam05")
  assert code == 0, err
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["rows"]["disam"]["lam"] == 0.1 and saved["rows"]["disam_lam05"]["lam"] == 0.5
  assert saved["rows"]["disam_lam05"]["run"] == str(tmp_path / "main_lam05")
  assert len(saved["cells"]) == 8


def test_merge_refuses_runs_on_different_data_and_writes_nothing(tmp_path, capsys):
  _write_fake_run(str(tmp_path / "digits"), config=_config())
  _write_fake_run(str(tmp_path / "pacs"), held_outs=("photo", "sketch"), config=_config(dataset="pacs"))
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "digits", f"{tmp_path / 'pacs'}=_pacs", plots=True)
  assert code == 2
  assert "different data: dataset is rotated_digits in" in err and "pacs in" in err
  assert not os.path.exists(tmp_path / "out") and _leftovers(tmp_path) == []


def test_merge_lists_the_differences_and_every_rows_settings(tmp_path, capsys):
  _write_fake_run(str(tmp_path / "short"), config=_config(steps=300))
  _write_fake_run(str(tmp_path / "long"), algorithms=("disam",), config=_config(steps=20000, lam=0.5))
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "short", f"{tmp_path / 'long'}=_long")
  assert code == 0, err
  text = (tmp_path / "out" / "results.md").read_text()
  assert f"steps (`{tmp_path / 'short'}`: 300, `{tmp_path / 'long'}`: 20000)" in text
  assert "lam (" in text
  settings = text[text.index("## Settings of each row") :].splitlines()
  header = settings[2]
  assert header.startswith("| Algorithm | run | dataset") is False and "| steps |" in header and "| lam |" in header
  row = next(line for line in settings if line.startswith("| DISAM_LONG |"))
  assert "| 20000 |" in row and "| 0.5 |" in row
  row = next(line for line in settings if line.startswith("| SAM |"))
  assert "| 300 |" in row and "| 0.1 |" in row


def test_merge_refuses_a_row_that_would_mix_settings(tmp_path, capsys):
  # Different seeds, so no run clashes, but one DISAM row would average 300-step and 20,000-step runs.
  short = _write_fake_run(str(tmp_path / "short"), algorithms=("disam",), config=_config(steps=300))
  _write_fake_run(str(tmp_path / "long"), algorithms=("disam",), config=_config(steps=20000))
  saved = json.loads((tmp_path / "long" / "results.json").read_text())
  for c in saved["cells"]:
    c["seed"] += 2
  (tmp_path / "long" / "results.json").write_text(json.dumps(saved))
  assert short
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "short", tmp_path / "long")
  assert code == 2
  assert "row DISAM would mix runs with different settings (steps: 300 in" in err and "=_long" in err


def test_merge_of_different_held_out_domains_draws_every_plot(tmp_path, capsys):
  _write_fake_run(str(tmp_path / "a"), held_outs=("0",), config=_config())
  _write_fake_run(str(tmp_path / "b"), algorithms=("disam",), held_outs=("75",), config=_config(lam=0.5))
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "a", f"{tmp_path / 'b'}=_lam05", plots=True)
  assert code == 0, err
  assert {"training_curves.png", "domain_losses.png", "heldout_accuracy.png"} <= set(os.listdir(tmp_path / "out"))


def test_a_failing_report_leaves_no_half_written_output(tmp_path, capsys, monkeypatch):
  _write_fake_run(str(tmp_path / "a"), config=_config())
  _write_fake_run(str(tmp_path / "b"), config=_config(lam=0.5))

  def broken(*args, **kwargs):
    raise RuntimeError("plotting failed")

  monkeypatch.setattr(report, "write_plots", broken)
  try:
    _merge(capsys, tmp_path / "out", tmp_path / "a", f"{tmp_path / 'b'}=_b", plots=True)
  except RuntimeError:
    pass
  assert not os.path.exists(tmp_path / "out") and _leftovers(tmp_path) == []
  # Regenerating a run directory in place: the old results stay whole.
  before = (tmp_path / "a" / "results.json").read_text()
  try:
    report.write_report(str(tmp_path / "a"))
  except RuntimeError:
    pass
  assert (tmp_path / "a" / "results.json").read_text() == before
  assert not os.path.exists(tmp_path / "a" / "results.md") and _leftovers(tmp_path / "a") == []


def test_merge_replaces_an_earlier_merged_report_but_not_a_run_directory(tmp_path, capsys):
  _write_fake_run(str(tmp_path / "a"), config=_config())
  _write_fake_run(str(tmp_path / "b"), config=_config(lam=0.5))
  assert _merge(capsys, tmp_path / "out", tmp_path / "a", f"{tmp_path / 'b'}=_b")[0] == 0
  assert _merge(capsys, tmp_path / "out", tmp_path / "a", f"{tmp_path / 'b'}=_c")[0] == 0
  assert "| DISAM_C |" in (tmp_path / "out" / "results.md").read_text()
  code, err = _merge(capsys, tmp_path / "a", tmp_path / "b")
  assert code == 2 and "not an earlier merged report" in err


# ---------------------------------------------------------------------------------------------------------------------
# Report cells, data warnings
# ---------------------------------------------------------------------------------------------------------------------


def test_threshold_cell_when_no_run_reaches_the_threshold(tmp_path):
  cells = _write_fake_run(str(tmp_path))
  text = report.dynamics_table(str(tmp_path), cells, threshold=1e-6)
  row = next(line for line in text.splitlines() if line.startswith("| DISAM vs SAM |"))
  assert row.endswith("| – (neither reached it) |")
  assert "| 0/4 |" in next(line for line in text.splitlines() if line.startswith("| DISAM |"))


def test_data_warnings_are_counted_in_results(tmp_path):
  cells = _write_fake_run(str(tmp_path), config=_config())
  (tmp_path / "data.json").write_text(
    json.dumps(
      {
        "dataset": "image_folder",
        "domains": {"a": 3, "b": 4},
        "unreadable_files": ["a/x/broken.jpg", "b/y/bad.png"],
        "warnings": ["domain 'a' has no folder for class(es) ['z']"],
      }
    )
  )
  report.write_report(str(tmp_path), cells, _config(), plots=False)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["data_warnings"] == 3
  text = (tmp_path / "results.md").read_text()
  assert "Data: 2 unreadable image file(s) skipped (a/x/broken.jpg, b/y/bad.png); 1 other warning(s)" in text
  (tmp_path / "data.json").write_text(
    json.dumps({"dataset": "rotated_digits", "domains": {}, "unreadable_files": [], "warnings": []})
  )
  report.write_report(str(tmp_path), cells, _config(), plots=False)
  assert "Data: no warnings." in (tmp_path / "results.md").read_text()
  assert json.loads((tmp_path / "results.json").read_text())["data_warnings"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# Plots a reader can compare
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
  """The matplotlib figures `write_plots` saves, by file name."""
  from matplotlib.figure import Figure

  saved = {}
  original = Figure.savefig

  def capture(self, path, *args, **kwargs):
    saved[os.path.basename(path)] = self
    return original(self, path, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", capture)
  return saved


def _lines(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_plots_distinguish_algorithms_and_zoom_the_accuracy_axes(tmp_path, figures):
  cells = _write_fake_run(str(tmp_path))
  report.write_plots(str(tmp_path), cells)
  # Every algorithm has its own color, line style and marker; markers of coinciding curves sit at other steps.
  ax = figures["training_curves.png"].axes[0]
  styles = {
    a: (line.get_color(), str(line.get_linestyle()), line.get_marker(), str(line.get_markevery()))
    for a, line in _lines(ax).items()
    if a in ("ERM", "SAM", "DISAM")
  }
  for k in range(4):
    assert len({s[k] for s in styles.values()}) == 3, styles
  # A paired DISAM - SAM panel under the curves.
  titles = [a.get_title() for a in figures["training_curves.png"].axes]
  assert "training loss: DISAM − SAM (paired runs)" in titles
  acc = figures["heldout_accuracy.png"]
  diff = next(a for a in acc.axes if a.get_title() == "DISAM − SAM, paired by seed")
  assert {"held-out 0", "held-out 75", "mean"} <= set(_lines(diff))
  # Accuracy axes start above the initialization's 10% and include the later evaluations (37% .. 90%).
  panel = next(a for a in acc.axes if a.get_title() == "held-out domain 0")
  low, high = panel.get_ylim()
  assert 10.0 < low < 100 * (0.1 + 0.8 / 3) and high >= 90.0
  # The per-domain losses: one legend naming every training domain, and one per variance panel.
  losses = figures["domain_losses.png"]
  assert [t.get_text() for t in losses.legends[0].get_texts()] == [f"training domain {d}" for d in ("0", "15", "75")]
  assert all(a.get_legend() is not None for a in losses.axes if a.get_title().endswith("variance"))


def test_mechanism_plot_shows_perturbation_weights_and_the_cosine_when_logged(tmp_path, figures):
  cells = _write_fake_run(str(tmp_path / "plain"))
  assert "mechanism.png" not in [os.path.basename(p) for p in report.write_plots(str(tmp_path / "plain"), cells)]
  cells = _write_fake_run(str(tmp_path / "weights"), weights=True)
  paths = report.write_plots(str(tmp_path / "weights"), cells)
  assert os.path.join(str(tmp_path / "weights"), "mechanism.png") in paths
  fig = figures["mechanism.png"]
  # The fake weights are 0.5 and 0.6 against SAM's 1/2: up to 20% from SAM's.
  assert [a.get_title() for a in fig.axes] == [
    f"DISAM, held-out {d}: weights c_i\n(up to 20% from SAM's)" for d in ("0", "75")
  ]
  np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata()[-1], 0.6)  # c of the second training domain
  assert "--diagnostics" in fig._suptitle.get_text()
  cells = _write_fake_run(str(tmp_path / "cosine"), weights=True, cosine=True)
  report.write_plots(str(tmp_path / "cosine"), cells)
  titles = [a.get_title() for a in figures["mechanism.png"].axes]
  cosine_title = "held-out 0: cosine of DISAM's\nand SAM's perturbation directions"
  assert cosine_title in titles
  cos = next(a for a in figures["mechanism.png"].axes if a.get_title() == cosine_title)
  np.testing.assert_allclose(_lines(cos)["DISAM"].get_ydata(), 0.9)


def test_every_registered_algorithm_has_its_own_color_line_style_and_marker():
  """Plotted together, every algorithm of the registry (and more) differs from every other in all three: color (as
  RGB), line style (as its dash pattern) and marker."""
  from matplotlib import colors, lines

  from disam_jax.harness import plots
  from disam_jax.harness.algorithms import ALGORITHMS

  def dashes(ls):
    offset, seq = lines._get_dash_pattern(ls)
    return None if seq is None else tuple(round(float(v), 3) for v in seq)

  names = list(ALGORITHMS)
  assert len(names) >= 28
  for algorithms in (names, names[::-1], names[3:], names + [f"disam_variant{k}" for k in range(40)]):
    styles = plots._styles(algorithms)
    assert list(styles) == algorithms
    for k, normalize in enumerate((lambda c: tuple(round(v, 3) for v in colors.to_rgb(c)), dashes, repr)):
      seen = [normalize(style[k]) for style in styles.values()]
      repeated = {a: styles[a][k] for a, v in zip(algorithms, seen) if seen.count(v) > 1}
      assert not repeated, (k, repeated)
  assert plots._styles(["erm", "sam", "disam"]) == {a: plots._STYLES[a] for a in ("erm", "sam", "disam")}


def test_docs_sample_output_is_what_the_report_prints():
  """docs/harness.md shows the start of the main job's printed report: every line but the numbers must be what
  `results_markdown` writes for the default configuration."""
  from disam_jax.harness.config import ExperimentConfig

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "docs", "harness.md")) as f:
    text = f.read()
  sample = text[text.index("```\n# Held-out accuracy") + 4 :]
  sample = sample[: sample.index("```")].rstrip("\n").splitlines()
  domains = ["0", "15", "30", "45", "60", "75"]
  cells = [_cell(a, d, 0, 0.9, 0.9) for a in ("erm", "sam", "disam") for d in domains]
  data = {"dataset": "rotated_digits", "domains": {}, "unreadable_files": [], "warnings": []}
  printed = report.results_markdown(cells, ExperimentConfig(), data).splitlines()[: len(sample)]
  numbers = lambda line: line.startswith(("| ERM |", "| SAM |", "| DISAM |"))
  assert [line for line in sample if not numbers(line)] == [line for line in printed if not numbers(line)]
  assert [line.split(" |")[0] for line in sample if numbers(line)] == ["| ERM", "| SAM", "| DISAM"]


def test_sam_counterparts():
  algorithms = [
    "sam",
    "gsam",
    "disam",
    "disam_gsam",
    "sam+coral",
    "disam+coral",
    "gsam+coral",
    "disam_gsam+coral",
    "disam_lam1",
  ]
  assert [report._sam_of(a, algorithms) for a in algorithms if a.startswith("disam")] == [
    "sam",
    "gsam",
    "sam+coral",
    "gsam+coral",
    "sam",
  ]
  # no sagm+coral: SAM on the same loss, else the penalty alone (ERM on it), never plain SAM (another objective)
  assert report._sam_of("disam_sagm+coral", algorithms) == "sam+coral"
  assert report._sam_of("disam_sagm+coral", ["sam", "coral", "disam_sagm+coral"]) == "coral"
  assert report._sam_of("disam_lam1", algorithms + ["sam_lam1"]) == "sam_lam1"


def test_a_disam_variant_is_compared_with_its_own_sam(tmp_path, figures):
  cells = _write_fake_run(str(tmp_path), algorithms=("sam", "disam", "sam+coral", "disam+coral"), held_outs=("0",))
  report.write_plots(str(tmp_path), cells)
  titles = [a.get_title() for a in figures["heldout_accuracy.png"].axes]
  assert "DISAM+CORAL − SAM+CORAL, paired by seed" in titles and "DISAM − SAM, paired by seed" in titles
  text = report.dynamics_table(str(tmp_path), cells)
  assert "| DISAM+CORAL vs SAM+CORAL | 2 |" in text


def test_a_disam_penalty_variant_is_compared_with_the_penalty_alone_not_with_sam_or_erm(tmp_path, figures):
  """DISAM+CORAL optimizes CORAL's loss: without SAM+CORAL its partner is CORAL (ERM on that loss), never SAM or
  ERM (another objective); a suffixed one (disam_sagm+coral) also meets its unsuffixed rule on the same loss."""
  cells = _write_fake_run(
    str(tmp_path), algorithms=("erm", "sam", "coral", "disam+coral", "disam_sagm+coral"), held_outs=("0",)
  )
  report.write_plots(str(tmp_path), cells)
  titles = [a.get_title() for a in figures["heldout_accuracy.png"].axes]
  assert "DISAM+CORAL − CORAL, paired by seed" in titles and "DISAM_SAGM+CORAL − CORAL, paired by seed" in titles
  assert not any("− SAM" in t or "− ERM" in t for t in titles), titles
  paired = [
    line.split(" |")[0] for line in report.paired_table(str(tmp_path), cells).splitlines() if line.startswith("| DISAM")
  ]
  assert paired == ["| DISAM+CORAL − CORAL", "| DISAM_SAGM+CORAL − CORAL", "| DISAM_SAGM+CORAL − DISAM+CORAL"]
  runs = [line.split(" |")[0] for line in report.dynamics_table(str(tmp_path), cells).splitlines() if " vs " in line]
  assert runs == ["| DISAM+CORAL vs CORAL", "| DISAM_SAGM+CORAL vs CORAL"]
  algorithms = ["sam", "coral", "sam+coral", "gsam+coral", "disam+coral", "disam_gsam+coral", "disam_sagm+coral"]
  assert report._partners("disam+coral", algorithms) == ["sam+coral", "coral"]
  assert report._partners("disam_gsam+coral", algorithms) == ["gsam+coral", "disam+coral", "sam+coral", "coral"]
  assert report._partners("disam_sagm+coral", algorithms) == ["sam+coral", "disam+coral", "coral"]
  assert report._partners("disam_gsam", ["erm", "sam", "gsam", "disam", "disam_gsam"]) == [
    "gsam",
    "disam",
    "sam",
    "erm",
  ]


# ---------------------------------------------------------------------------------------------------------------------
# Paired differences with a t interval
# ---------------------------------------------------------------------------------------------------------------------

T_975 = {4: 2.776445, 9: 2.262157}  # two-sided 95% Student t quantiles (printed tables) for 4 and 9 dof


def test_paired_difference_matches_a_hand_computation():
  mine = [0.9, 0.7, 1.6, 0.8, 1.3, 0.1, 1.4, 0.7, 1.1, 0.6]
  theirs = [0.4, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
  d = [a - b for a, b in zip(mine, theirs)]
  n = len(d)
  mean = sum(d) / n
  sd = (sum((v - mean) ** 2 for v in d) / (n - 1)) ** 0.5
  half = T_975[9] * sd / n**0.5
  p = report.paired_difference(mine, theirs)
  assert p["n"] == 10
  np.testing.assert_allclose([p["mean"], p["low"], p["high"]], [mean, mean - half, mean + half], rtol=1e-6)
  assert p["resolved"] and p["low"] > 0
  covering = report.paired_difference([1.0, 2.0, 0.0, 1.5, 0.5], [1.2, 1.0, 0.5, 1.5, 0.5])
  d = np.array([-0.2, 1.0, -0.5, 0.0, 0.0])
  half = T_975[4] * d.std(ddof=1) / np.sqrt(5)
  np.testing.assert_allclose([covering["low"], covering["high"]], [d.mean() - half, d.mean() + half], rtol=1e-6)
  assert not covering["resolved"]
  assert report.paired_difference([1.0], [0.0]) == {"n": 1, "mean": 1.0, "low": None, "high": None, "resolved": False}


def test_paired_table_says_no_difference_resolved_when_the_interval_covers_zero(tmp_path):
  cells = _write_fake_run(str(tmp_path))
  # held-out accuracy: DISAM - SAM = +2, +3 points on the (held-out, seed) pairs of "0", +2, +3 on those of "75"
  bump = {("0", 0): 0.02, ("0", 1): 0.03, ("75", 0): 0.02, ("75", 1): 0.03}
  for c in cells:
    if c["algorithm"] == "disam":
      c["selected"] = dict(c["selected"], test_acc=0.8 + bump[(c["held_out"], c["seed"])])
  text = report.paired_table(str(tmp_path), cells, threshold=0.2)
  row = next(line for line in text.splitlines() if line.startswith("| DISAM − SAM |"))
  d = np.array([2.0, 3.0, 2.0, 3.0])
  half = 3.182446 * d.std(ddof=1) / 2  # t_{0.975, 3}
  assert f"| 4 | +2.50 [{2.5 - half:+.2f}, {2.5 + half:+.2f}] |" in row
  assert "no difference resolved" not in row.split("|")[3]
  # the synthetic variances are independent noise: their ratio is not resolved from 1 on 4 pairs
  assert "no difference resolved" in row.split("|")[4]
  assert any(line.startswith("| DISAM − ERM | 4 |") for line in text.splitlines())
  assert "Paired differences" in report.dynamics_table(str(tmp_path), cells, threshold=0.2)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2; incomplete runs: said, averaged only over complete seeds
# ---------------------------------------------------------------------------------------------------------------------


def _damage(run_dir, how):
  path = os.path.join(run_dir, "results.json")
  if how == "a directory":
    os.remove(path)
    os.mkdir(path)
  elif how == "no results.json":
    os.remove(path)
  else:
    text = open(path).read()
    content = {
      "empty": "",
      "not JSON": "<html>not found</html>",
      "truncated": text[: len(text) // 2],
      "JSON but no cells": json.dumps({"config": None}),
      "a cell without its result": json.dumps({"cells": [{"algorithm": "erm"}]}),
    }[how]
    with open(path, "w") as f:
      f.write(content)


BAD_RESULTS = {
  "empty": "results.json is empty",
  "not JSON": "results.json is not valid JSON (Expecting value at line 1, column 1: truncated?)",
  "truncated": "results.json is not valid JSON (",
  "a directory": "results.json is a directory, not a results file",
  "no results.json": "has no results.json (not a disam-train run directory, or no run has started)",
  "JSON but no cells": 'results.json is not a disam-train results file (no list of "cells")',
  "a cell without its result": "results.json: run 0 of its cells is not a run result (lacks ['held_out', ",
}


@pytest.mark.parametrize("how", list(BAD_RESULTS))
def test_merge_and_report_of_a_bad_results_file_exit_2_in_one_line(tmp_path, capsys, how):
  _write_fake_run(str(tmp_path / "a"), algorithms=("erm",))
  _write_fake_run(str(tmp_path / "b"), algorithms=("disam",))
  _damage(tmp_path / "b", how)
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "a", tmp_path / "b")
  assert code == 2 and err.count("\n") == 1 and BAD_RESULTS[how] in err, err
  assert str(tmp_path / "b") in err and not os.path.exists(tmp_path / "out") and _leftovers(tmp_path) == []
  code = report.main([str(tmp_path / "b"), "--no-plots"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and BAD_RESULTS[how] in err, err


def test_merge_of_one_run_twice_exits_2_in_one_line(tmp_path, capsys):
  _write_fake_run(str(tmp_path / "a"))
  for twice in (tmp_path / "a", f"{tmp_path}/./a", f"{tmp_path / 'a'}/=_again"):
    code, err = _merge(capsys, tmp_path / "out", tmp_path / "a", twice)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path / 'a'} is given twice" in err or "is given twice (as " in err, err
  shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the same runs under another name
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "a", tmp_path / "copy")
  assert code == 2 and err.count("\n") == 1 and "the report would keep only one of them" in err, err
  assert not os.path.exists(tmp_path / "out")


def _data_json(run_dir, domains=("0", "15", "75")):
  with open(os.path.join(run_dir, "data.json"), "w") as f:
    json.dump(
      {
        "dataset": "rotated_digits",
        "domains": {d: 100 for d in domains},
        "classes": 10,
        "unreadable_files": [],
        "warnings": [],
      },
      f,
    )


def test_report_of_an_interrupted_run_lists_the_missing_runs_and_averages_only_complete_seeds(tmp_path, capsys):
  run = str(tmp_path / "run")
  _write_fake_run(run, algorithms=("erm",), held_outs=("0",), config=_config(seeds=[0, 1, 2]))  # seeds 0, 1
  _data_json(run)  # 3 domains x 3 algorithms x 3 seeds configured, 2 runs finished
  assert report.main([run, "--no-plots"]) == 0
  err = capsys.readouterr().err
  assert "warning: incomplete: 25 of the 27 runs configured have no result (e.g. sam held-out 0 seed 0)" in err
  text = open(os.path.join(run, "results.md")).read()
  assert (
    "**Incomplete: 25 of the 27 runs configured have no result** (interrupted, failed or not started): sam "
    "held-out 0 seed 0, disam held-out 0 seed 0, erm held-out 15 seed 0" in text
  )
  assert "and 13 more (all in results.json)" in text
  assert "| Algorithm | 0 | 15 | 75 | Avg |" in text
  assert "| ERM | 80.0 ± 0.0 (2/3 seeds) | – | – | – |" in text  # no Avg from one domain of three
  assert "| SAM | – | – | – | – |" in text and "| DISAM | – | – | – | – |" in text
  saved = json.loads(open(os.path.join(run, "results.json")).read())
  assert saved["runs_configured"] == 27 and len(saved["missing"]) == 25
  assert saved["missing"][0] == {"algorithm": "sam", "held_out": "0", "seed": 0}
  assert saved["tables"]["selected"]["erm"]["Avg"] == {"mean": None, "std": None, "se": None, "n": 0}


def test_a_merge_of_interrupted_runs_lists_the_missing_runs_of_every_source(tmp_path, capsys):
  for name, algorithms in (("a", ("erm", "sam")), ("b", ("disam",))):
    _write_fake_run(
      str(tmp_path / name), algorithms=algorithms, held_outs=("0", "15"), config=_config(algorithms=list(algorithms))
    )
    _data_json(str(tmp_path / name))
  code, err = _merge(capsys, tmp_path / "out", tmp_path / "a", f"{tmp_path / 'b'}=_lam1")
  assert code == 0 and "warning: incomplete: 6 of the 18 runs configured have no result" in err, err
  text = (tmp_path / "out" / "results.md").read_text()
  assert "erm held-out 75 seed 0" in text and "disam_lam1 held-out 75 seed 0" in text
  assert "| DISAM_LAM1 | 80.0 ± 0.0 | 80.0 ± 0.0 | – | – |" in text


def test_a_complete_run_says_nothing_about_missing_runs(tmp_path, capsys):
  run = str(tmp_path / "run")
  _write_fake_run(run, held_outs=("0", "15", "75"), config=_config())
  _data_json(run)
  assert report.main([run, "--no-plots"]) == 0
  assert "incomplete" not in capsys.readouterr().err
  text = open(os.path.join(run, "results.md")).read()
  assert "Incomplete" not in text and "| ERM | 80.0 ± 0.0 | 80.0 ± 0.0 | 80.0 ± 0.0 | 80.0 ± 0.0 |" in text


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_error(tmp_path, monkeypatch):
  """The one atomic writer behind results.json/md, the reports and checkpoint.write_json: text or bytes, mode 0o644,
  fsync'd before the rename; an error leaves the previous file and no temporary one."""
  import json

  from disam_jax.harness import _atomic, checkpoint

  path = tmp_path / "a.txt"
  _atomic.write_atomic(path, "é\n")
  assert path.read_bytes() == "é\n".encode() and (path.stat().st_mode & 0o777) == 0o644
  _atomic.write_atomic(str(path), b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  checkpoint.write_json(str(tmp_path / "r.json"), {"a": [1, 2]})
  assert (tmp_path / "r.json").read_text() == json.dumps({"a": [1, 2]}, indent=1)
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

  def fail(src, dst):
    assert synced and open(src, "rb").read() == b"new"  # complete and synced before the rename
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="No space"):
    _atomic.write_atomic(path, b"new")
  assert path.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "r.json"]


def test_markdown_table_lines_and_alignment():
  from disam_jax.harness.tables import markdown_table

  assert markdown_table(["a", "b", "c"], [[1, "x", 2.5], ("y", None, "")]) == [
    "| a | b | c |",
    "|---|---|---|",
    "| 1 | x | 2.5 |",
    "| y | None |  |",
  ]
  assert markdown_table(["Algorithm", "d"], [], align=":-:") == ["| Algorithm | d |", "|---|:-:|"]
  assert markdown_table(["m", "n", "t"], iter([["r", 1, 2]]), align=["---", "---", "---:"])[1] == "|---|---|---:|"
  with pytest.raises(ValueError, match="2 alignments for 3 columns"):
    markdown_table(["m", "n", "t"], [], align=["---", "---:"])


def test_report_is_byte_identical_to_the_one_before_markdown_table(tmp_path):
  """results.md of the fake run (accuracy tables, training dynamics, run-by-run and paired comparisons), as written
  before the tables went through tables.markdown_table (tests/data/report_fake_run.md)."""
  cells = _write_fake_run(str(tmp_path))
  report.write_report(str(tmp_path), cells, None, plots=False)
  expected = os.path.join(os.path.dirname(__file__), "data", "report_fake_run.md")
  with open(expected, encoding="utf-8") as f:
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == f.read()
