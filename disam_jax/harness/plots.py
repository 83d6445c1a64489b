"""The plots of an experiment (PNG): training curves, per-domain losses, held-out accuracy and DISAM's mechanism.

Plots (matplotlib, imported only when plotting, drawn without pyplot so no GUI backend is touched). Every algorithm
has its own color, line style and markers (placed at different steps), so curves that coincide stay visible; where
a DISAM variant and its SAM counterpart on the same training loss (`stats._sam_of`: ``sam`` for ``disam``,
``gsam`` for ``disam_gsam``, ``sam+coral`` or else ``coral`` for ``disam+coral``) are both present, a panel shows
DISAM minus that counterpart paired run by run (same held-out domain and seed: same initialization and batches):

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

Curves are smoothed with a trailing moving average over 2% of the steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from disam_jax.harness.stats import Metrics, _cells_from_run, _metrics_by_cell, _sam_of, smooth
from disam_jax.harness.tables import _as_dict, _display, _ordered

__all__ = ["write_plots"]


# (color, line style, marker) per algorithm; the others get the extra ones in the order they are shown. The lists
# are at least as long as the registry (`algorithms.ALGORITHMS`, 28 names) beyond these three, and `_extra` goes on
# past them, so all three differ between any two algorithms however many are plotted together (a test enumerates
# the registry).
_STYLES = {"erm": ("tab:gray", ":", "s"), "sam": ("tab:blue", "--", "o"), "disam": ("tab:red", "-", "^")}


_EXTRA_COLORS = (
  # tab10 without gray, blue and red, then black, tab20's light shades and tab20b
  "tab:orange",
  "tab:green",
  "tab:purple",
  "tab:brown",
  "tab:pink",
  "tab:olive",
  "tab:cyan",
  "black",
  "#aec7e8",
  "#ffbb78",
  "#98df8a",
  "#ff9896",
  "#c5b0d5",
  "#c49c94",
  "#f7b6d2",
  "#c7c7c7",
  "#dbdb8d",
  "#9edae5",
  "#393b79",
  "#6b6ecf",
  "#637939",
  "#b5cf6b",
  "#8c6d31",
  "#e7ba52",
  "#843c39",
  "#d6616b",
  "#7b4173",
  "#ce6dbd",
)


_EXTRA_LINES = (  # dash patterns (in line widths) with whole-number gaps; `_extra` makes more with 1.5 gaps
  "-.",
  (0, (5, 1)),
  (0, (3, 1, 1, 1, 1, 1)),
  (0, (1, 3)),
  (0, (8, 2)),
  (0, (2, 2)),
  (0, (6, 2, 2, 2)),
  (0, (10, 3)),
  (0, (4, 1, 1, 1)),
  (0, (1, 1)),
  (0, (8, 2, 1, 2)),
  (0, (3, 3)),
  (0, (6, 1, 1, 1, 1, 1)),
  (0, (12, 2, 2, 2)),
  (0, (2, 1)),
  (0, (5, 3, 1, 3)),
  (0, (8, 1)),
  (0, (1, 2)),
  (0, (4, 4)),
  (0, (10, 2, 1, 2, 1, 2)),
  (0, (6, 3)),
  (0, (3, 1)),
  (0, (7, 2, 3, 2)),
  (0, (1, 4)),
  (0, (12, 4)),
  (0, (2, 3, 2, 3, 6, 3)),
)


_EXTRA_MARKERS = (  # filled, then line markers, then stars (n, 1, 0) and asterisks (n, 2, 0) of 5 to 8 points
  "D",
  "v",
  "P",
  "X",
  "*",
  "h",
  "<",
  ">",
  "p",
  "H",
  "d",
  "8",
  "+",
  "x",
  "1",
  "2",
  "3",
  "4",
  (6, 1, 0),
  (7, 1, 0),
  (8, 1, 0),
  (5, 2, 0),
  (6, 2, 0),
  (7, 2, 0),
  (8, 2, 0),
)


def _extra(k: int) -> tuple[Any, Any, Any]:
  """The k-th extra (color, line style, marker): from the lists, then made up so none repeats (colors around the
  hue circle by the golden angle, dashes with 1.5 gaps, stars and asterisks of 9 and more points)."""
  import colorsys

  def pick(values, make):
    return values[k] if k < len(values) else make(k - len(values))

  def color(j):
    r, g, b = colorsys.hsv_to_rgb((0.61803398875 * j) % 1.0, (0.9, 0.6)[j % 2], (0.75, 0.95, 0.55)[j % 3])
    return (round(r, 4), round(g, 4), round(b, 4))

  return (
    pick(_EXTRA_COLORS, color),
    pick(_EXTRA_LINES, lambda j: (0, (2 + j, 1.5))),
    pick(_EXTRA_MARKERS, lambda j: (9 + j // 2, 1 + j % 2, 0)),
  )


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
  fig.legend(
    [handles[name] for name in names],
    [f"training domain {name}" for name in names],
    loc=loc,
    ncols=max(1, min(len(names), int(width / 1.6))),
    fontsize=8,
  )


def _styles(algorithms: Sequence[str]) -> dict[str, tuple[Any, Any, str]]:
  """(color, line style, marker) per algorithm, all three different between any two algorithms shown."""
  out, k = {}, 0
  for a in algorithms:
    if a in _STYLES:
      out[a] = _STYLES[a]
    else:
      out[a] = _extra(k)
      k += 1
  return out


def _line(ax, x, y, style, k: int, n: int, lw: float = 1.4, **kwargs):
  """One algorithm's curve: its color and line style, markers every ~1/8 of the curve, offset by algorithm `k` of
  `n` so that the markers of coinciding curves fall at different steps."""
  color, ls, marker = style
  every = max(1, len(x) // 8)
  return ax.plot(
    x, y, color=color, ls=ls, lw=lw, marker=marker, ms=4.5, markevery=(k * every // max(n, 1), every), **kwargs
  )


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
  values = np.stack(
    [op(smooth(getattr(m, field)[:length], window), smooth(getattr(o, field)[:length], window)) for m, o, _ in pairs]
  )
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


def write_plots(run_dir: str, cells: Sequence[Any] | None = None, out_dir: str | None = None) -> list[str]:
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
      _difference_panel(
        axes[1][0], x, diff, color, f"{_display(mine)} − {_display(other)} (mean of {len(pairs)} pairs; band: range)"
      )
      x, ratio = _paired(pairs, "variance", window, lambda p, q: np.maximum(p, 1e-30) / np.maximum(q, 1e-30))
      _difference_panel(axes[1][1], x, ratio, color, f"{_display(mine)} / {_display(other)}", log=True)
    axes[1][0].set(title="training loss: DISAM − SAM (paired runs)", xlabel="step")
    axes[1][1].set(title="variance: DISAM / SAM (paired runs)", xlabel="step")
    for ax in axes[1]:
      ax.legend(fontsize=8)
  fig.suptitle(
    f"means over {len(domains)} held-out domain(s) x {len(seeds)} seed(s); moving average over {window} steps",
    fontsize=9,
  )
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
      x, mean_losses = _mean_over(group, "domain_losses")
      for k, name in enumerate(group[0].domains):
        (handles[name],) = ax.plot(
          x, smooth(mean_losses[:, k], window), lw=1.0, color=domain_color[name], label=f"domain {name}"
        )
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
      ax.plot(
        x,
        mean,
        label=_display(a),
        color=color,
        ls=ls,
        lw=1.3,
        marker=marker,
        ms=5 - j * 0.8,
        mfc="none" if j % 2 else color,
      )
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
    ax.set(
      title=f"{_display(mine)} − {_display(other)}, paired by seed",
      xlabel="step",
      ylabel="held-out accuracy difference (points)",
    )
    ax.legend(fontsize=6, ncols=2)
  for k in range(len(comparisons), extra * cols):
    axes[rows + k // cols][k % cols].set_visible(False)
  fig.suptitle("mean ± std over seeds; y axes zoomed on the evaluations after step 0 (the initialization)", fontsize=9)
  path = os.path.join(out_dir, "heldout_accuracy.png")
  fig.savefig(path, dpi=100)
  return path


def _plot_mechanism(out_dir, algorithms, domains, window, styles, runs, domain_color) -> str | None:
  """DISAM's perturbation weights c_i per training domain (and the cosine with SAM's direction, when logged)."""
  variants = [
    a
    for a in algorithms
    if a.startswith("disam") and any(m.perturbation_weights is not None for d in domains for m in runs(a, d))
  ]
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
      x, weights = _mean_over(group, "perturbation_weights")
      smoothed = smooth(weights, window)
      for k, name in enumerate(group[0].domains):
        (handles[name],) = ax.plot(x, smoothed[:, k], lw=1.1, color=domain_color[name])
      uniform = 1.0 / len(group[0].domains)
      ax.axhline(uniform, color="black", lw=0.8, ls=":")
      ax.annotate(
        f"SAM: 1/{len(group[0].domains)}", (0.01, uniform), xycoords=("axes fraction", "data"), fontsize=7, va="bottom"
      )
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
  fig.suptitle(
    "DISAM's perturbation g_p = Σ c_i ∇L_i, c_i = a_i (1 − 2 lam (L_i − L)): domains behind the mean "
    f"are perturbed less\n(means over seeds, moving average over {window} steps{note})",
    fontsize=9,
  )
  path = os.path.join(out_dir, "mechanism.png")
  fig.savefig(path, dpi=90)
  return path
