"""Results of an experiment: DomainBed-style tables (results.md, results.json) and plots (PNG).

Tables: rows are algorithms, columns the held-out domains and their average, cells the held-out accuracy in %
as mean ± std over seeds (sample standard deviation, ddof=1; a single seed shows the mean alone). The "Avg" column
averages each seed's accuracies over the held-out domains first, then takes mean ± std of those per-seed averages
over the seeds that have every domain. Two tables: model selection by training-domain validation (the evaluation
with the best mean validation accuracy on the training domains' held-back 20%), and the last evaluation.

Each row's settings (model, steps, optimizer and algorithm hyperparameters) and the data warnings of the run
(unreadable images skipped, class folders missing from a domain; `data.json`, written by `train.run_experiment`)
are in results.json and results.md on every run.

Plots (matplotlib, imported only when plotting, drawn without pyplot so no GUI backend is touched). Every algorithm
has its own color, line style and markers (placed at different steps), so curves that coincide stay visible; where
SAM and a DISAM variant are both present, a panel shows DISAM minus SAM paired run by run (same held-out domain
and seed: same initialization and batches):

* ``training_curves.png``: training loss and variance of the per-domain training losses over steps, one line per
  algorithm, averaged over every held-out domain and seed; below, DISAM minus SAM of the training loss and
  DISAM / SAM of the variance, mean over pairs with their range;
* ``domain_losses.png``: one row per held-out domain; per algorithm, the training loss of each training domain over
  steps, and in the last column the variance of the domain losses, algorithms compared (means over seeds);
* ``heldout_accuracy.png``: held-out accuracy at every evaluation, one panel per held-out domain, mean ± std over
  seeds, the y axis zoomed on the evaluations after step 0 (the initialization's chance-level point lies below it);
  and DISAM minus SAM in points per held-out domain;
* ``mechanism.png`` (when the metrics hold DISAM's perturbation weights): the weights ``c_i`` of
  ``g_p = sum_i c_i grad L_i`` per training domain over steps (SAM's are all ``1/M``), and, for runs with
  ``--diagnostics``, the cosine between DISAM's and SAM's perturbation directions.

Curves are smoothed with a trailing moving average over 2% of the steps. Regenerate everything for a run
directory with ``python -m disam_jax.harness.report RUN_DIR``; ``--merge`` combines run directories into a new
one, refusing runs on different data, two copies of one run (same algorithm, held-out domain and seed) and a row
that would mix different settings (the message says which suffix to add). Every output is first written to a
temporary file or directory and then renamed into place, so an error never leaves a half-written report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from disam_jax.harness.stats import (  # noqa: F401
  Metrics,
  _cells_from_run,
  _metrics_by_cell,
  _sam_of,
  dynamics_table,
  load_metrics,
  paired_difference,
  paired_table,
  smooth,
  steps_to_threshold,
)
from disam_jax.harness.tables import (  # noqa: F401
  SELECTIONS,
  BadResults,
  _SAME_DATA,
  _as_dict,
  _data_summary,
  _display,
  _flat,
  _ordered,
  _row_config,
  _value,
  _write_text,
  expected_runs,
  format_mean_std,
  load_results,
  missing_runs,
  results_markdown,
  results_table,
  row_settings,
  summarize,
  write_results,
)

__all__ = [
  "BadResults",
  "MergeError",
  "SELECTIONS",
  "format_mean_std",
  "dynamics_table",
  "expected_runs",
  "load_metrics",
  "load_results",
  "missing_runs",
  "merge_runs",
  "paired_difference",
  "paired_table",
  "results_table",
  "row_settings",
  "steps_to_threshold",
  "summarize",
  "write_plots",
  "write_report",
  "write_results",
]

# (color, line style, marker) per algorithm; others get the extra ones in order.
_STYLES = {"erm": ("tab:gray", ":", "s"), "sam": ("tab:blue", "--", "o"), "disam": ("tab:red", "-", "^")}
_EXTRA_COLORS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_EXTRA_LINES = ("-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))
_EXTRA_MARKERS = ("D", "v", "P", "X", "*", "h", "<", ">")


class MergeError(ValueError):
  """Run directories that cannot be combined into one report; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _mean_over(metrics: Sequence[Metrics], field: str) -> tuple[np.ndarray, np.ndarray]:
  """Mean of a per-step field over runs, on the steps they all have."""
  length = min(len(getattr(m, field)) for m in metrics)
  stacked = np.stack([getattr(m, field)[:length] for m in metrics])
  return metrics[0].steps[:length], stacked.mean(axis=0)


def _figure(rows: int, cols: int, width: float = 4.0, height: float = 3.0):
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  return fig, axes


def _domain_order(names: Sequence[str]) -> list[str]:
  """Domain names in the order they appear, or numerically when they are all numbers (rotation angles)."""
  names = _ordered(names)
  try:
    return sorted(names, key=float)
  except ValueError:
    return names


def _domain_legend(fig, handles: dict[str, Any], order: Sequence[str], loc: str) -> None:
  """One figure legend naming every training domain by its color (the same in every panel)."""
  names = [name for name in order if name in handles]
  width = fig.get_size_inches()[0]
  fig.legend([handles[name] for name in names], [f"training domain {name}" for name in names], loc=loc,
             ncols=max(1, min(len(names), int(width / 1.6))), fontsize=8)


def _styles(algorithms: Sequence[str]) -> dict[str, tuple[Any, Any, str]]:
  """(color, line style, marker) per algorithm, all three different between any two algorithms shown."""
  out, k = {}, 0
  for a in algorithms:
    if a in _STYLES:
      out[a] = _STYLES[a]
    else:
      out[a] = (_EXTRA_COLORS[k % len(_EXTRA_COLORS)], _EXTRA_LINES[k % len(_EXTRA_LINES)],
                _EXTRA_MARKERS[k % len(_EXTRA_MARKERS)])
      k += 1
  return out


def _line(ax, x, y, style, k: int, n: int, lw: float = 1.4, **kwargs):
  """One algorithm's curve: its color and line style, markers every ~1/8 of the curve, offset by algorithm `k` of
  `n` so that the markers of coinciding curves fall at different steps."""
  color, ls, marker = style
  every = max(1, len(x) // 8)
  return ax.plot(x, y, color=color, ls=ls, lw=lw, marker=marker, ms=4.5, markevery=(k * every // max(n, 1), every),
                 **kwargs)


def _comparisons(metrics, algorithms: Sequence[str]) -> list[tuple[str, str]]:
  """(DISAM variant, its SAM) pairs to draw differences for: those with runs of the same held-out domain and seed."""
  pairs = [(a, _sam_of(a, algorithms)) for a in algorithms if a.startswith("disam")]
  return [(a, b) for a, b in pairs if _pairs(metrics, a, b)]


def _pairs(metrics, mine: str, other: str) -> list[tuple[Metrics, Metrics, str]]:
  """Runs of `mine` and `other` with the same held-out domain and seed (same data, initialization and batches)."""
  return [(m, metrics[(other, d, s)], d) for (a, d, s), m in metrics.items() if a == mine and (other, d, s) in metrics]


def _paired(pairs, field: str, window: int, op) -> tuple[np.ndarray, np.ndarray]:
  """`op(smoothed mine, smoothed other)` per pair, `[P, T]` on the steps all pairs have, and those steps."""
  length = min(min(len(getattr(m, field)), len(getattr(o, field))) for m, o, _ in pairs)
  values = np.stack([op(smooth(getattr(m, field)[:length], window), smooth(getattr(o, field)[:length], window))
                     for m, o, _ in pairs])
  return pairs[0][0].steps[:length], values


def _difference_panel(ax, x, values, color, label, log=False):
  mean = np.exp(np.log(values).mean(0)) if log else values.mean(0)
  ax.plot(x, mean, color=color, lw=1.5, label=label)
  if len(values) > 1:
    ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)
  ax.axhline(1.0 if log else 0.0, color="black", lw=0.8)


def _zoom(ax, lows: list[float], highs: list[float]) -> None:
  """Y limits from the given values only (the evaluations after step 0), with a margin."""
  lo, hi = min(lows), max(highs)
  margin = max(0.5, 0.08 * (hi - lo))
  ax.set_ylim(lo - margin, hi + margin)


def write_plots(run_dir: str, cells: Optional[Sequence[Any]] = None, out_dir: Optional[str] = None) -> list[str]:
  """Draws the PNGs described in the module docstring into `out_dir` (default `run_dir`); returns their paths.

  The runs' metrics are read from `run_dir/cells/...` (or the directories recorded in the cells).
  """
  cells = [_as_dict(c) for c in (cells if cells is not None else _cells_from_run(run_dir))]
  if not cells:
    return []
  out_dir = out_dir or run_dir
  metrics = _metrics_by_cell(run_dir, cells)
  algorithms = _ordered(c["algorithm"] for c in cells)
  domains = _ordered(c["held_out"] for c in cells)
  seeds = _ordered(int(c["seed"]) for c in cells)
  steps = max(int(c["steps"]) for c in cells)
  window = max(1, steps // 50)
  styles = _styles(algorithms)
  runs = lambda a, d: [metrics[(a, d, s)] for s in seeds if (a, d, s) in metrics]
  comparisons = _comparisons(metrics, algorithms)
  every_domain = _domain_order(list(domains) + [d for m in metrics.values() for d in m.domains])
  domain_color = {d: f"C{k % 10}" for k, d in enumerate(every_domain)}
  paths = [
    _plot_training_curves(out_dir, metrics, algorithms, domains, seeds, window, styles, comparisons),
    _plot_domain_losses(out_dir, algorithms, domains, window, styles, runs, domain_color),
    _plot_heldout_accuracy(out_dir, metrics, algorithms, domains, styles, runs, comparisons, domain_color),
  ]
  mechanism = _plot_mechanism(out_dir, algorithms, domains, window, styles, runs, domain_color)
  return paths + ([mechanism] if mechanism else [])


def _plot_training_curves(out_dir, metrics, algorithms, domains, seeds, window, styles, comparisons) -> str:
  fig, axes = _figure(2 if comparisons else 1, 2, 5.0, 3.4)
  for k, a in enumerate(algorithms):
    every = [m for (alg, _, _), m in metrics.items() if alg == a]
    for ax, field in zip(axes[0], ("loss", "variance")):
      x, y = _mean_over(every, field)
      _line(ax, x, smooth(y, window), styles[a], k, len(algorithms), label=_display(a))
  axes[0][0].set(title="training loss (mean of domain losses)", xlabel="step", yscale="log")
  axes[0][1].set(title="variance of the domain losses", xlabel="step", yscale="log")
  for ax in axes[0]:
    ax.legend(fontsize=8)
  if comparisons:
    for mine, other in comparisons:
      pairs = _pairs(metrics, mine, other)
      color = styles[mine][0]
      x, diff = _paired(pairs, "loss", window, lambda p, q: p - q)
      _difference_panel(axes[1][0], x, diff, color,
                        f"{_display(mine)} − {_display(other)} (mean of {len(pairs)} pairs; band: range)")
      x, ratio = _paired(pairs, "variance", window, lambda p, q: np.maximum(p, 1e-30) / np.maximum(q, 1e-30))
      _difference_panel(axes[1][1], x, ratio, color, f"{_display(mine)} / {_display(other)}", log=True)
    axes[1][0].set(title="training loss: DISAM − SAM (paired runs)", xlabel="step")
    axes[1][1].set(title="variance: DISAM / SAM (paired runs)", xlabel="step")
    for ax in axes[1]:
      ax.legend(fontsize=8)
  fig.suptitle(f"means over {len(domains)} held-out domain(s) x {len(seeds)} seed(s); "
               f"moving average over {window} steps", fontsize=9)
  path = os.path.join(out_dir, "training_curves.png")
  fig.savefig(path, dpi=110)
  return path


def _plot_domain_losses(out_dir, algorithms, domains, window, styles, runs, domain_color) -> str:
  """Per held-out domain: each training domain's loss per algorithm, and the variance compared. A training domain
  has the same color everywhere: one legend for the domains, one per variance panel for the algorithms."""
  fig, axes = _figure(len(domains), len(algorithms) + 1, 3.6, 2.8)
  handles = {}
  for row, d in enumerate(domains):
    for col, a in enumerate(algorithms):
      ax = axes[row][col]
      group = runs(a, d)
      if not group:
        ax.set_visible(False)
        continue
      length = min(len(m.steps) for m in group)
      mean_losses = np.stack([m.domain_losses[:length] for m in group]).mean(axis=0)
      for k, name in enumerate(group[0].domains):
        (handles[name],) = ax.plot(group[0].steps[:length], smooth(mean_losses[:, k], window), lw=1.0,
                                   color=domain_color[name], label=f"domain {name}")
      ax.set(yscale="log", title=f"{_display(a)}, held-out {d}", xlabel="step", ylabel="domain losses")
    ax = axes[row][len(algorithms)]
    for k, a in enumerate(algorithms):
      group = runs(a, d)
      if group:
        x, y = _mean_over(group, "variance")
        _line(ax, x, smooth(y, window), styles[a], k, len(algorithms), lw=1.2, label=_display(a))
    ax.set(yscale="log", title=f"held-out {d}: variance", xlabel="step")
    ax.legend(fontsize=7)
  _domain_legend(fig, handles, list(domain_color), "outside upper center")
  path = os.path.join(out_dir, "domain_losses.png")
  fig.savefig(path, dpi=90)
  return path


def _plot_heldout_accuracy(out_dir, metrics, algorithms, domains, styles, runs, comparisons, domain_color) -> str:
  cols = min(3, len(domains))
  rows = math.ceil(len(domains) / cols)
  extra = math.ceil(len(comparisons) / cols) if comparisons else 0
  fig, axes = _figure(rows + extra, cols, 4.0, 3.0)
  for k, d in enumerate(domains):
    ax = axes[k // cols][k % cols]
    lows, highs = [], []
    for j, a in enumerate(algorithms):
      group = runs(a, d)
      if not group:
        continue
      length = min(len(m.eval_steps) for m in group)
      acc = 100 * np.stack([m.test_acc[:length] for m in group])
      x = group[0].eval_steps[:length]
      mean = acc.mean(axis=0)
      std = acc.std(0, ddof=1) if len(group) > 1 else np.zeros_like(mean)
      color, ls, marker = styles[a]
      ax.plot(x, mean, label=_display(a), color=color, ls=ls, lw=1.3, marker=marker, ms=5 - j * 0.8,
              mfc="none" if j % 2 else color)
      if len(group) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
      after = x > 0
      if after.any():
        lows.append(float((mean - std)[after].min()))
        highs.append(float((mean + std)[after].max()))
    if lows:
      _zoom(ax, lows, highs)
    ax.set(title=f"held-out domain {d}", xlabel="step", ylabel="accuracy (%)")
    ax.legend(fontsize=7)
  for k in range(len(domains), rows * cols):
    axes[k // cols][k % cols].set_visible(False)
  for k, (mine, other) in enumerate(comparisons):
    ax = axes[rows + k // cols][k % cols]
    per_domain = []
    for d in domains:
      pairs = [(m, o) for m, o, dd in _pairs(metrics, mine, other) if dd == d]
      if not pairs:
        continue
      length = min(min(len(m.test_acc), len(o.test_acc)) for m, o in pairs)
      diff = 100 * np.stack([m.test_acc[:length] - o.test_acc[:length] for m, o in pairs]).mean(axis=0)
      x = pairs[0][0].eval_steps[:length]
      ax.plot(x, diff, color=domain_color[d], lw=1.0, marker=".", label=f"held-out {d}")
      per_domain.append(diff)
    if per_domain:
      length = min(len(v) for v in per_domain)
      ax.plot(x[:length], np.mean([v[:length] for v in per_domain], axis=0), color="black", lw=2.0, label="mean")
    ax.axhline(0.0, color="black", lw=0.8, ls=":")
    ax.set(title=f"{_display(mine)} − {_display(other)}, paired by seed", xlabel="step",
           ylabel="held-out accuracy difference (points)")
    ax.legend(fontsize=6, ncols=2)
  for k in range(len(comparisons), extra * cols):
    axes[rows + k // cols][k % cols].set_visible(False)
  fig.suptitle("mean ± std over seeds; y axes zoomed on the evaluations after step 0 (the initialization)",
               fontsize=9)
  path = os.path.join(out_dir, "heldout_accuracy.png")
  fig.savefig(path, dpi=100)
  return path


def _plot_mechanism(out_dir, algorithms, domains, window, styles, runs, domain_color) -> Optional[str]:
  """DISAM's perturbation weights c_i per training domain (and the cosine with SAM's direction, when logged)."""
  variants = [a for a in algorithms if a.startswith("disam") and any(
    m.perturbation_weights is not None for d in domains for m in runs(a, d))]
  if not variants:
    return None
  has_cosine = any(np.isfinite(m.sam_cosine).any() for a in variants for d in domains for m in runs(a, d))
  per_domain = len(variants) + (1 if has_cosine else 0)
  if per_domain == 1:  # one panel per held-out domain: a grid, as the accuracy plot
    cols = min(3, len(domains))
    rows = math.ceil(len(domains) / cols)
    place = lambda row, col: (row // cols, row % cols)
  else:  # a row per held-out domain
    rows, cols = len(domains), per_domain
    place = lambda row, col: (row, col)
  from matplotlib.figure import Figure

  fig = Figure(figsize=(max(4.0 * cols, 8.0), 2.8 * rows + 0.6), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for k in range(len(domains), rows * cols if per_domain == 1 else 0):
    axes[k // cols][k % cols].set_visible(False)
  handles = {}
  for row, d in enumerate(domains):
    for col, a in enumerate(variants):
      ax = axes[place(row, col)[0]][place(row, col)[1]]
      group = [m for m in runs(a, d) if m.perturbation_weights is not None]
      if not group:
        ax.set_visible(False)
        continue
      length = min(len(m.steps) for m in group)
      weights = np.stack([m.perturbation_weights[:length] for m in group]).mean(axis=0)
      smoothed = smooth(weights, window)
      for k, name in enumerate(group[0].domains):
        (handles[name],) = ax.plot(group[0].steps[:length], smoothed[:, k], lw=1.1, color=domain_color[name])
      uniform = 1.0 / len(group[0].domains)
      ax.axhline(uniform, color="black", lw=0.8, ls=":")
      ax.annotate(f"SAM: 1/{len(group[0].domains)}", (0.01, uniform), xycoords=("axes fraction", "data"),
                  fontsize=7, va="bottom")
      if smoothed.min() < 0.25 * uniform:  # the axis is not stretched to 0 when nothing comes near it
        ax.axhline(0.0, color="gray", lw=0.5)
      deviation = float(np.max(np.abs(smoothed - uniform))) / uniform
      ax.set(xlabel="step", ylabel="c_i")
      ax.set_title(f"{_display(a)}, held-out {d}: weights c_i\n(up to {deviation:.0%} from SAM's)", fontsize=9)
    if has_cosine:
      ax = axes[row][per_domain - 1]
      for k, a in enumerate(variants):
        group = [m for m in runs(a, d) if np.isfinite(m.sam_cosine).any()]
        if group:
          x, y = _mean_over(group, "sam_cosine")
          _line(ax, x, smooth(y, window), styles[a], k, len(variants), lw=1.2, label=_display(a))
      ax.axhline(1.0, color="black", lw=0.8, ls=":")
      ax.set(xlabel="step", ylabel="cosine")
      ax.set_title(f"held-out {d}: cosine of DISAM's\nand SAM's perturbation directions", fontsize=9)
      ax.legend(fontsize=7)
  _domain_legend(fig, handles, list(domain_color), "outside lower center")
  note = "" if has_cosine else "; the cosine with SAM's direction needs disam-train --diagnostics"
  fig.suptitle("DISAM's perturbation g_p = Σ c_i ∇L_i, c_i = a_i (1 − 2 lam (L_i − L)): domains behind the mean "
               f"are perturbed less\n(means over seeds, moving average over {window} steps{note})", fontsize=9)
  path = os.path.join(out_dir, "mechanism.png")
  fig.savefig(path, dpi=90)
  return path


# ---------------------------------------------------------------------------------------------------------------------
# Reports, merges
# ---------------------------------------------------------------------------------------------------------------------


def _render(run_dir: str, out_dir: str, cells, config, data, plots: bool, threshold: float) -> list[str]:
  """Writes every output file into `out_dir`, reading the runs' metrics under `run_dir`; returns the names."""
  write_results(run_dir, cells, config, data=data, out_dir=out_dir)
  written = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")]
  if not cells:  # nothing finished yet: the tables (all –) and what is missing
    return [os.path.basename(p) for p in written]
  path = os.path.join(out_dir, "results.md")
  with open(path) as f:
    text = f.read()
  _write_text(path, text + "\n## Training dynamics\n\n" + dynamics_table(run_dir, cells, threshold) + "\n")
  if plots:
    written += write_plots(run_dir, cells, out_dir=out_dir)
  return [os.path.basename(p) for p in written]


def write_report(run_dir: str, cells: Optional[Sequence[Any]] = None, config: Any = None,
                 plots: bool = True, threshold: float = 0.1, data: Optional[dict[str, Any]] = None) -> list[str]:
  """Tables (accuracy, and training dynamics with `threshold` for the loss) and plots; returns the paths written.

  Everything is first written to a temporary folder inside `run_dir`, then each file is renamed into place: an
  error leaves the previous report (if any) untouched rather than half of a new one.
  """
  if cells is None:
    saved = load_results(run_dir)
    cells, config = saved["cells"], config or saved.get("config")
    data = data or saved.get("data")
  cells = [_as_dict(c) for c in cells]
  if data is None:
    data = _data_summary(run_dir)
  staging = tempfile.mkdtemp(prefix=".report-", dir=run_dir)
  try:
    names = _render(run_dir, staging, cells, config, data, plots, threshold)
    for name in names:
      os.replace(os.path.join(staging, name), os.path.join(run_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return [os.path.join(run_dir, name) for name in names]


def _suffix_hint(sources: Sequence[str], label: str) -> str:
  others = [s for s in sources if s.partition("=")[0] != label]
  suggestion = "_" + "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in os.path.basename(
    os.path.normpath(label)))
  return "--merge " + " ".join(others + [f"{label}={suggestion}"])


def merge_runs(sources: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any], Optional[dict[str, Any]]]:
  """Combines the runs of several run directories, `"DIR"` or `"DIR=SUFFIX"` (algorithms renamed
  `<algorithm><SUFFIX>`), into `(cells, config, data)` for `write_report` (`data`: each directory's data
  warnings).

  Refuses (`MergeError`, the message names the clash and the fix): runs trained on different data (dataset, image
  size, holdout fraction, hard domain); the same run (algorithm, held-out domain, seed) from two directories, which
  would keep only one of them; and a row that would mix runs of different settings (e.g. the same algorithm name
  with different steps or lam). Other differences between the directories (e.g. another lam for a suffixed row)
  are allowed and listed: `config["differences"]`, and each row's settings in `row_settings`.
  """
  labels, runs, data, cells, real = [], {}, {}, [], {}
  for source in sources:
    directory, _, suffix = source.partition("=")
    same = real.setdefault(os.path.realpath(directory), directory)
    if directory in runs or same != directory:
      raise MergeError(f"{directory} is given twice{f' (as {same})' if same != directory else ''}; give it once "
                       "(with a suffix if you want it renamed).")
    saved = load_results(directory)
    labels.append(directory)
    runs[directory] = saved.get("config")
    summary = saved.get("data") or _data_summary(directory)
    if summary is not None:
      data[directory] = summary
    for c in saved["cells"]:
      c = dict(c)
      c["algorithm"] += suffix
      c["source"] = directory
      c["directory"] = os.path.abspath(os.path.join(directory, "cells", os.path.basename(c["directory"].rstrip("/"))))
      cells.append(c)

  flats = {label: _flat(runs[label]) for label in labels if runs[label]}
  for key in _SAME_DATA:
    values = {label: flat.get(key) for label, flat in flats.items()}
    if len({json.dumps(v) for v in values.values()}) > 1:
      listing = ", ".join(f"{_value(v)} in {label}" for label, v in values.items())
      raise MergeError(
        f"cannot merge runs trained on different data: {key} is {listing}. Rows of one report must be compared on "
        "the same data (dataset, image size, holdout fraction, hard domain); report these runs separately."
      )

  owner: dict[tuple, str] = {}
  for c in cells:
    key = (c["algorithm"], c["held_out"], int(c["seed"]))
    if key in owner:
      raise MergeError(
        f"both {owner[key]} and {c['source']} have a {c['algorithm']!r} run with held-out domain {c['held_out']} "
        f"and seed {c['seed']}: the report would keep only one of them. Rename the algorithms of one directory "
        f"with a suffix, e.g. {_suffix_hint(sources, c['source'])}"
      )
    owner[key] = c["source"]

  by_row: dict[str, list[str]] = {}
  for c in cells:
    by_row.setdefault(c["algorithm"], [])
    if c["source"] not in by_row[c["algorithm"]]:
      by_row[c["algorithm"]].append(c["source"])
  for algorithm, members in by_row.items():
    settings = {label: {"steps": next(int(c["steps"]) for c in cells if c["source"] == label),
                        **_row_config(flats.get(label, {}))} for label in members}
    keys = _ordered(k for s in settings.values() for k in s)
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s in settings.values()}) > 1]
    if differ:
      listing = "; ".join(f"{k}: " + ", ".join(f"{_value(s.get(k))} in {label}" for label, s in settings.items())
                          for k in differ)
      raise MergeError(
        f"row {_display(algorithm)} would mix runs with different settings ({listing}). Give the runs of one "
        f"directory a suffix so that they get their own row, e.g. {_suffix_hint(sources, members[-1])}"
      )

  differences = {}
  for key in _ordered(k for flat in flats.values() for k in flat):
    if key in ("algorithms", "held_out", "seeds"):
      continue
    values = {label: flat.get(key) for label, flat in flats.items()}
    if len({json.dumps(v) for v in values.values()}) > 1:
      differences[key] = values
  config = {"merged": list(sources), "runs": runs, "differences": differences}
  return cells, config, ({"runs": data} if data else None)


def _replaceable(directory: str) -> bool:
  """An output folder --merge may replace: missing, empty, or an earlier merged report."""
  if not os.path.exists(directory):
    return True
  if not os.path.isdir(directory):
    return False
  entries = [e for e in os.listdir(directory) if not e.startswith(".")]
  if not entries:
    return True
  try:
    with open(os.path.join(directory, "results.json")) as f:
      merged = "merged" in (json.load(f).get("config") or {})
  except (OSError, ValueError):
    return False
  return merged and not os.path.exists(os.path.join(directory, "cells"))


def write_merged_report(out_dir: str, sources: Sequence[str], plots: bool = True, threshold: float = 0.1) -> list[str]:
  """`merge_runs(sources)` written to `out_dir` (a new folder, or an earlier merged report, which is replaced).

  The report is written to a temporary sibling folder which is then renamed to `out_dir`: an error leaves no
  partial `out_dir` behind.
  """
  if not _replaceable(out_dir):
    raise MergeError(f"{out_dir} exists and is not an earlier merged report; choose a new output folder.")
  cells, config, data = merge_runs(sources)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-", dir=parent)
  try:
    names = _render(out_dir, staging, cells, config, data, plots, threshold)
    os.chmod(staging, 0o755)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "report"))
      os.rename(staging, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return [os.path.join(out_dir, name) for name in names]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The report command; returns its exit code: 0 written (with a warning on stderr when runs are missing), 2 bad
  input (one line naming the file: an unreadable results.json, a merge that would lose or mix runs)."""
  parser = argparse.ArgumentParser(
    prog="python -m disam_jax.harness.report",
    description="Rewrites results.md, results.json and the plots of a disam-train run directory, or combines "
                "several (--merge) into a new one.",
  )
  parser.add_argument("run_dir", help="a run directory written by disam-train (with results.json); with --merge, "
                                      "the directory to write the combined report to")
  parser.add_argument("--no-plots", action="store_true", help="only the tables")
  parser.add_argument("--threshold", type=float, default=0.1,
                      help="training-loss threshold for the 'steps to loss' column (default: 0.1)")
  parser.add_argument("--merge", nargs="+", metavar="DIR[=SUFFIX]",
                      help="combine the runs of these run directories (trained on the same data), renaming the "
                           "algorithms of DIR=SUFFIX to <algorithm><SUFFIX>, e.g. --merge noisy noisy_lam1=_lam1; "
                           "two directories holding the same algorithm, held-out domain and seed, or one row mixing "
                           "different settings, are refused with the suffix to add")
  args = parser.parse_args(argv)
  try:
    if args.merge:
      paths = write_merged_report(args.run_dir, args.merge, plots=not args.no_plots, threshold=args.threshold)
    else:
      paths = write_report(args.run_dir, plots=not args.no_plots, threshold=args.threshold)
  except (MergeError, BadResults) as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # the output folder: read-only, disk full
    print(f"{parser.prog}: error: cannot write {e.filename or args.run_dir}: {e.strerror or e}", file=sys.stderr)
    return 2
  for path in paths:
    print(path)
  saved = load_results(os.path.dirname(paths[0]))
  missing = saved.get("missing") or []
  if missing:
    first = missing[0]
    print(f"{parser.prog}: warning: incomplete: {len(missing)} of the {saved['runs_configured']} runs configured "
          f"have no result (e.g. "
          f"{first['algorithm']} held-out {first['held_out']} seed {first['seed']}); results.md lists them, and its "
          "averages cover only complete seeds", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
