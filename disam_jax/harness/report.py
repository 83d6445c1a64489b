"""Results of an experiment: DomainBed-style tables (results.md, results.json) and plots (PNG).

Tables: rows are algorithms, columns the held-out domains and their average, cells the held-out accuracy in %
as mean ± std over seeds (sample standard deviation, ddof=1; a single seed shows the mean alone). The "Avg" column
averages each seed's accuracies over the held-out domains first, then takes mean ± std of those per-seed averages
over the seeds that have every domain. Two tables: model selection by training-domain validation (the evaluation
with the best mean validation accuracy on the training domains' held-back 20%), and the last evaluation.

Plots (matplotlib, imported only when plotting, drawn without pyplot so no GUI backend is touched):

* ``training_curves.png``: training loss and variance of the per-domain training losses over steps, one line per
  algorithm, averaged over every held-out domain and seed;
* ``domain_losses.png``: one row per held-out domain; per algorithm, the training loss of each training domain over
  steps, and in the last column the variance of the domain losses, algorithms compared (means over seeds);
* ``heldout_accuracy.png``: held-out accuracy at every evaluation, one panel per held-out domain, mean ± std over
  seeds.

Curves are smoothed with a trailing moving average over 2% of the steps. Regenerate everything for a run
directory with ``python -m disam_jax.harness.report RUN_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

__all__ = [
  "SELECTIONS",
  "format_mean_std",
  "dynamics_table",
  "load_metrics",
  "merge_runs",
  "results_table",
  "steps_to_threshold",
  "summarize",
  "write_plots",
  "write_report",
  "write_results",
]

# (key in a cell's result, title)
SELECTIONS = (
  ("selected", "training-domain validation (best validation accuracy)"),
  ("last", "last checkpoint"),
)
_COLORS = {"erm": "tab:gray", "sam": "tab:blue", "disam": "tab:red"}
_STYLES = {"sam": "--"}  # SAM and DISAM often overlap: SAM dashed stays visible under DISAM


def _as_dict(cell: Any) -> dict[str, Any]:
  return cell.to_json() if hasattr(cell, "to_json") else dict(cell)


def _display(algorithm: str) -> str:
  return algorithm.upper()


def _ordered(values) -> list:
  out = []
  for v in values:
    if v not in out:
      out.append(v)
  return out


def format_mean_std(values: Sequence[float]) -> str:
  """`'97.3 ± 0.4'` for accuracies in [0, 1] (shown in %); the mean alone for one value; '–' for none."""
  if len(values) == 0:
    return "–"
  pct = 100.0 * np.asarray(values, np.float64)
  if len(pct) == 1:
    return f"{pct[0]:.1f}"
  return f"{pct.mean():.1f} ± {pct.std(ddof=1):.1f}"


def summarize(cells: Sequence[Any], selection: str = "selected") -> dict[str, Any]:
  """Per algorithm and held-out domain, the held-out accuracies of every seed, plus the per-seed averages.

  Args:
    cells: run results (`train.CellResult` or their JSON dicts with algorithm, held_out, seed and
      `selection` -> {"test_acc"}).
    selection: "selected" (training-domain validation) or "last".

  Returns:
    ``{"algorithms": [...], "domains": [...], "accuracy": {alg: {domain: {seed: acc}}},
    "average": {alg: {seed: acc}}}`` (average only over seeds that have every domain).
  """
  cells = [_as_dict(c) for c in cells]
  algorithms = _ordered(c["algorithm"] for c in cells)
  domains = _ordered(c["held_out"] for c in cells)
  accuracy: dict[str, dict[str, dict[int, float]]] = {a: {d: {} for d in domains} for a in algorithms}
  for c in cells:
    accuracy[c["algorithm"]][c["held_out"]][int(c["seed"])] = float(c[selection]["test_acc"])
  average = {}
  for a in algorithms:
    seeds = set.intersection(*(set(accuracy[a][d]) for d in domains)) if domains else set()
    average[a] = {s: float(np.mean([accuracy[a][d][s] for d in domains])) for s in sorted(seeds)}
  return {"algorithms": algorithms, "domains": domains, "accuracy": accuracy, "average": average}


def results_table(cells: Sequence[Any], selection: str = "selected") -> str:
  """A Markdown table: rows algorithms, columns held-out domains + Avg, cells mean ± std (%) over seeds."""
  s = summarize(cells, selection)
  header = ["Algorithm"] + [str(d) for d in s["domains"]] + ["Avg"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
  for a in s["algorithms"]:
    row = [_display(a)]
    row += [format_mean_std(list(s["accuracy"][a][d].values())) for d in s["domains"]]
    row.append(format_mean_std(list(s["average"][a].values())))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _seed_note(cells: Sequence[dict[str, Any]]) -> str:
  seeds = sorted({int(c["seed"]) for c in cells})
  if len(seeds) == 1:
    return f"1 seed ({seeds[0]}): no standard deviation"
  return f"mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"


def results_markdown(cells: Sequence[Any], config: Optional[dict[str, Any]] = None) -> str:
  """Both tables (training-domain validation and last checkpoint) as one Markdown document."""
  cells = [_as_dict(c) for c in cells]
  title = "# Held-out accuracy (%)"
  if config and "merged" in config:
    title += "\n\nRuns merged from " + ", ".join(f"`{d}`" for d in config["merged"])
  elif config:
    hp = config.get("hparams", {})
    title += (
      f"\n\n{config.get('dataset')} · model {config.get('model')} · {config.get('steps')} steps · "
      f"{hp.get('optimizer')} lr {hp.get('lr')} · batch {hp.get('batch_size')}/domain · rho {hp.get('rho')} · "
      f"lam {hp.get('lam')}" + (" · adaptive" if hp.get("adaptive") else "")
    )
    if config.get("hard_domain") is not None:
      title += (
        f" · hard domain {config['hard_domain']} (fraction {config.get('hard_domain_fraction')}, label noise "
        f"{config.get('hard_domain_label_noise')})"
      )
  parts = [title, ""]
  for key, name in SELECTIONS:
    parts += [f"## Model selection: {name}", "", _seed_note(cells) + ".", "", results_table(cells, key), ""]
  return "\n".join(parts)


def write_results(run_dir: str, cells: Sequence[Any], config: Any = None) -> None:
  """Writes `run_dir/results.json` (every run's result and the table numbers) and `run_dir/results.md`."""
  cells = [_as_dict(c) for c in cells]
  if config is not None and hasattr(config, "to_json"):
    config = config.to_json()
  tables = {}
  for key, _ in SELECTIONS:
    s = summarize(cells, key)
    tables[key] = {
      a: {
        **{d: _stats(list(s["accuracy"][a][d].values())) for d in s["domains"]},
        "Avg": _stats(list(s["average"][a].values())),
      }
      for a in s["algorithms"]
    }
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump({"config": config, "tables": tables, "cells": cells}, f, indent=1)
  with open(os.path.join(run_dir, "results.md"), "w") as f:
    f.write(results_markdown(cells, config))


def _stats(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {
    "mean": float(v.mean()) if len(v) else None,
    "std": float(v.std(ddof=1)) if len(v) > 1 else None,
    "n": int(len(v)),
  }


# ---------------------------------------------------------------------------------------------------------------------
# Per-step metrics
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Metrics:
  """One run's metrics.jsonl as arrays.

  Attributes:
    steps: `[T]` training steps (1-based).
    loss: `[T]` training loss.
    domain_losses: `[T, M]` per-domain training losses; `domains` names the columns.
    variance: `[T]` variance of the domain losses.
    perturbation_norm, grad_norm, time: `[T]`.
    eval_steps: `[E]` evaluation steps (0 = initialization); val_acc_mean, test_acc: `[E]`.
  """

  steps: np.ndarray
  loss: np.ndarray
  domains: list[str]
  domain_losses: np.ndarray
  variance: np.ndarray
  perturbation_norm: np.ndarray
  grad_norm: np.ndarray
  time: np.ndarray
  eval_steps: np.ndarray
  val_acc_mean: np.ndarray
  test_acc: np.ndarray


def load_metrics(path: str) -> Metrics:
  """Reads a run's metrics.jsonl."""
  train, evals = [], []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      if "loss" in record:
        train.append(record)
      if "eval" in record:
        evals.append(record)
  domains = list(train[0]["domain_losses"]) if train else []
  col = lambda key: np.asarray([r[key] for r in train], np.float64)
  return Metrics(
    steps=np.asarray([r["step"] for r in train], np.int64),
    loss=col("loss"),
    domains=domains,
    domain_losses=np.asarray([[r["domain_losses"][d] for d in domains] for r in train], np.float64).reshape(
      len(train), len(domains)
    ),
    variance=col("variance"),
    perturbation_norm=col("perturbation_norm"),
    grad_norm=col("grad_norm"),
    time=col("time"),
    eval_steps=np.asarray([r["step"] for r in evals], np.int64),
    val_acc_mean=np.asarray([r["eval"]["val_acc_mean"] for r in evals], np.float64),
    test_acc=np.asarray([next(iter(r["eval"]["test_acc"].values())) for r in evals], np.float64),
  )


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (the first points average what exists so far); works along axis 0."""
  values = np.asarray(values, np.float64)
  if window <= 1 or len(values) == 0:
    return values
  cumsum = np.cumsum(np.concatenate([np.zeros((1,) + values.shape[1:]), values]), axis=0)
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(0, idx - window)
  counts = (idx - lo).reshape((-1,) + (1,) * (values.ndim - 1))
  return (cumsum[idx] - cumsum[lo]) / counts


def steps_to_threshold(steps: np.ndarray, loss: np.ndarray, threshold: float, window: int = 1) -> Optional[int]:
  """The first step at which the (moving-average) training loss is at or below `threshold`; None if never."""
  below = np.flatnonzero(smooth(loss, window) <= threshold)
  return int(steps[below[0]]) if len(below) else None


def _mean_std(values: Sequence[float], fmt: str = "{:.3g}") -> str:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if len(v) == 0:
    return "–"
  if len(v) == 1:
    return fmt.format(v[0])
  return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def dynamics_table(run_dir: str, cells: Optional[Sequence[Any]] = None, threshold: float = 0.1,
                   window: Optional[int] = None) -> str:
  """Training dynamics per algorithm, mean ± std over every run (held-out domain x seed), as Markdown.

  Columns: steps until the moving-average training loss first reaches `threshold` (runs that never do are counted
  in "reached"), the final training loss (mean of the last 10% of steps), the domain-loss variance averaged over
  all steps and over the last 10%, the mean perturbation norm and the median wall time per step. When the runs
  include SAM and DISAM (or ERM and DISAM) with the same held-out domains and seeds, a second table compares them
  run by run: how often DISAM's mean variance is lower, its held-out accuracy (training-domain validation) at least
  as high, and the mean paired differences.
  """
  cells = [_as_dict(c) for c in (cells if cells is not None else _cells_from_run(run_dir))]
  metrics = _metrics_by_cell(run_dir, cells)
  algorithms = _ordered(c["algorithm"] for c in cells)
  steps = max(int(c["steps"]) for c in cells)
  window = window or max(1, steps // 50)
  rows = [
    f"Moving average over {window} steps; each entry is mean ± std over runs (held-out domains x seeds).",
    "",
    f"| Algorithm | steps to loss ≤ {threshold:g} | reached | final loss | variance (all steps) | "
    "variance (last 10%) | perturbation norm | ms / step |",
    "|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|",
  ]
  per_cell: dict[tuple, dict[str, float]] = {}
  for a in algorithms:
    reached, hit, final, var_all, var_end, pnorm, ms = [], 0, [], [], [], [], []
    group = [c for c in cells if c["algorithm"] == a]
    for c in group:
      m = metrics[(a, c["held_out"], int(c["seed"]))]
      tail = max(1, len(m.steps) // 10)
      t = steps_to_threshold(m.steps, m.loss, threshold, window)
      hit += t is not None
      reached.append(t)
      final.append(float(m.loss[-tail:].mean()))
      var_all.append(float(m.variance.mean()))
      var_end.append(float(m.variance[-tail:].mean()))
      pnorm.append(float(m.perturbation_norm.mean()))
      ms.append(1000 * float(np.median(np.diff(m.time))) if len(m.time) > 1 else None)
      per_cell[(a, c["held_out"], int(c["seed"]))] = {
        "variance": var_all[-1], "test_acc": float(c["selected"]["test_acc"]), "steps": t,
      }
    rows.append(
      f"| {_display(a)} | {_mean_std(reached, '{:.0f}')} | {hit}/{len(group)} | {_mean_std(final)} | "
      f"{_mean_std(var_all, '{:.2e}')} | {_mean_std(var_end, '{:.2e}')} | {_mean_std(pnorm)} | {_mean_std(ms, '{:.1f}')} |"
    )
  pairs = [(b, a) for a in algorithms if a.startswith("disam") for b in ("sam", "erm") if b in algorithms]
  if pairs:
    rows += ["", "Run-by-run comparison with DISAM (same held-out domain and seed):", "",
             "| pair | runs | DISAM variance lower | mean variance ratio DISAM / other | DISAM held-out acc ≥ other "
             "| mean acc difference (points) | DISAM reaches the loss threshold first or together |",
             "|---|:-:|:-:|:-:|:-:|:-:|:-:|"]
    for other, mine in pairs:
      keys = [(h, s) for (a, h, s) in per_cell if a == mine and (other, h, s) in per_cell]
      if not keys:
        continue
      ours = [per_cell[(mine, h, s)] for h, s in keys]
      theirs = [per_cell[(other, h, s)] for h, s in keys]
      lower = sum(o["variance"] < t["variance"] for o, t in zip(ours, theirs))
      ratio = np.mean([o["variance"] / t["variance"] for o, t in zip(ours, theirs) if t["variance"] > 0])
      acc = sum(o["test_acc"] >= t["test_acc"] for o, t in zip(ours, theirs))
      diff = 100 * np.mean([o["test_acc"] - t["test_acc"] for o, t in zip(ours, theirs)])
      inf = float("inf")
      first = sum((o["steps"] or inf) <= (t["steps"] or inf) for o, t in zip(ours, theirs))
      rows.append(f"| {_display(mine)} vs {_display(other)} | {len(keys)} | {lower}/{len(keys)} | {ratio:.3f} | "
                  f"{acc}/{len(keys)} | {diff:+.2f} | {first}/{len(keys)} |")
  return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _cells_from_run(run_dir: str) -> list[dict[str, Any]]:
  with open(os.path.join(run_dir, "results.json")) as f:
    return json.load(f)["cells"]


def _metrics_by_cell(run_dir: str, cells: Sequence[dict[str, Any]]):
  out = {}
  for c in cells:
    # The standard layout first (valid after the run directory is moved), then the path recorded at training time.
    path = os.path.join(run_dir, "cells", os.path.basename(c["directory"].rstrip("/")), "metrics.jsonl")
    if not os.path.exists(path):
      path = os.path.join(c["directory"], "metrics.jsonl")
    out[(c["algorithm"], c["held_out"], int(c["seed"]))] = load_metrics(path)
  return out


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


def write_plots(run_dir: str, cells: Optional[Sequence[Any]] = None) -> list[str]:
  """Draws the PNGs described in the module docstring into `run_dir`; returns their paths."""
  cells = [_as_dict(c) for c in (cells if cells is not None else _cells_from_run(run_dir))]
  if not cells:
    return []
  metrics = _metrics_by_cell(run_dir, cells)
  algorithms = _ordered(c["algorithm"] for c in cells)
  domains = _ordered(c["held_out"] for c in cells)
  seeds = _ordered(int(c["seed"]) for c in cells)
  steps = max(int(c["steps"]) for c in cells)
  window = max(1, steps // 50)
  extra = iter(["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4)
  colors = {a: _COLORS.get(a) or next(extra) for a in algorithms}
  color = lambda a: colors[a]
  style = lambda a: _STYLES.get(a, "-")
  runs = lambda a, d: [metrics[(a, d, s)] for s in seeds if (a, d, s) in metrics]
  paths = []

  # Training loss and variance, averaged over everything.
  fig, axes = _figure(1, 2, 5.0, 3.6)
  for a in algorithms:
    every = [m for d in domains for m in runs(a, d)]
    for ax, field in zip(axes[0], ("loss", "variance")):
      x, y = _mean_over(every, field)
      ax.plot(x, smooth(y, window), label=_display(a), color=color(a), ls=style(a), lw=1.5)
  axes[0][0].set(title="training loss (mean of domain losses)", xlabel="step", yscale="log")
  axes[0][1].set(title="variance of the domain losses", xlabel="step", yscale="log")
  axes[0][0].legend()
  fig.suptitle(f"means over {len(domains)} held-out domain(s) x {len(seeds)} seed(s); "
               f"moving average over {window} steps", fontsize=9)
  paths.append(os.path.join(run_dir, "training_curves.png"))
  fig.savefig(paths[-1], dpi=110)

  # Per-domain losses per algorithm, and the variance compared, one row per held-out domain. A training domain has
  # the same color in every row.
  every_domain = _ordered([d for m in metrics.values() for d in m.domains] + list(domains))
  domain_color = {d: f"C{k % 10}" for k, d in enumerate(every_domain)}
  fig, axes = _figure(len(domains), len(algorithms) + 1, 3.6, 2.8)
  for row, d in enumerate(domains):
    for col, a in enumerate(algorithms):
      ax = axes[row][col]
      group = runs(a, d)
      length = min(len(m.steps) for m in group)
      mean_losses = np.stack([m.domain_losses[:length] for m in group]).mean(axis=0)
      for k, name in enumerate(group[0].domains):
        ax.plot(group[0].steps[:length], smooth(mean_losses[:, k], window), lw=1.0, label=f"domain {name}",
                color=domain_color[name])
      ax.set(yscale="log", title=f"{_display(a)}, held-out {d}", xlabel="step", ylabel="domain losses")
      if col == 0:
        ax.legend(fontsize=6)
    ax = axes[row][len(algorithms)]
    for a in algorithms:
      x, y = _mean_over(runs(a, d), "variance")
      ax.plot(x, smooth(y, window), label=_display(a), color=color(a), ls=style(a), lw=1.2)
    ax.set(yscale="log", title=f"held-out {d}: variance", xlabel="step")
    ax.legend(fontsize=7)
  paths.append(os.path.join(run_dir, "domain_losses.png"))
  fig.savefig(paths[-1], dpi=90)

  # Held-out accuracy over steps.
  cols = min(3, len(domains))
  rows = math.ceil(len(domains) / cols)
  fig, axes = _figure(rows, cols, 4.0, 3.0)
  for k, d in enumerate(domains):
    ax = axes[k // cols][k % cols]
    for a in algorithms:
      group = runs(a, d)
      length = min(len(m.eval_steps) for m in group)
      acc = 100 * np.stack([m.test_acc[:length] for m in group])
      x = group[0].eval_steps[:length]
      ax.plot(x, acc.mean(axis=0), label=_display(a), color=color(a), ls=style(a), lw=1.3, marker=".", ms=3)
      if len(group) > 1:
        ax.fill_between(x, acc.mean(0) - acc.std(0, ddof=1), acc.mean(0) + acc.std(0, ddof=1),
                        color=color(a), alpha=0.15, lw=0)
    ax.set(title=f"held-out domain {d}", xlabel="step", ylabel="accuracy (%)")
    ax.legend(fontsize=7)
  for k in range(len(domains), rows * cols):
    axes[k // cols][k % cols].set_visible(False)
  paths.append(os.path.join(run_dir, "heldout_accuracy.png"))
  fig.savefig(paths[-1], dpi=100)
  return paths


def write_report(run_dir: str, cells: Optional[Sequence[Any]] = None, config: Any = None,
                 plots: bool = True, threshold: float = 0.1) -> list[str]:
  """Tables (accuracy, and training dynamics with `threshold` for the loss) and plots; returns the paths written."""
  if cells is None:
    with open(os.path.join(run_dir, "results.json")) as f:
      saved = json.load(f)
    cells, config = saved["cells"], config or saved.get("config")
  write_results(run_dir, cells, config)
  with open(os.path.join(run_dir, "results.md"), "a") as f:
    f.write("\n## Training dynamics\n\n" + dynamics_table(run_dir, cells, threshold) + "\n")
  written = [os.path.join(run_dir, "results.md"), os.path.join(run_dir, "results.json")]
  if plots:
    written += write_plots(run_dir, cells)
  return written


def merge_runs(sources: Sequence[str]) -> list[dict[str, Any]]:
  """The runs of several run directories, `"DIR"` or `"DIR=SUFFIX"` (algorithms renamed `<algorithm><SUFFIX>`)."""
  cells = []
  for source in sources:
    directory, _, suffix = source.partition("=")
    for c in _cells_from_run(directory):
      c = dict(c)
      c["algorithm"] += suffix
      c["directory"] = os.path.abspath(os.path.join(directory, "cells", os.path.basename(c["directory"].rstrip("/"))))
      cells.append(c)
  return cells


def main(argv: Optional[Sequence[str]] = None) -> int:
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
                      help="combine the runs of these run directories (same data and seeds), renaming the "
                           "algorithms of DIR=SUFFIX to <algorithm><SUFFIX>, e.g. --merge noisy noisy_lam1=_lam1")
  args = parser.parse_args(argv)
  if args.merge:
    missing = [d for d in args.merge if not os.path.exists(os.path.join(d.partition("=")[0], "results.json"))]
    if missing:
      print(f"{parser.prog}: error: no results.json in {missing}", file=sys.stderr)
      return 2
    os.makedirs(args.run_dir, exist_ok=True)
    cells = merge_runs(args.merge)
    for path in write_report(args.run_dir, cells, {"merged": list(args.merge)}, plots=not args.no_plots,
                             threshold=args.threshold):
      print(path)
    return 0
  if not os.path.exists(os.path.join(args.run_dir, "results.json")):
    print(f"{parser.prog}: error: {args.run_dir} has no results.json (not a finished disam-train run?)",
          file=sys.stderr)
    return 2
  for path in write_report(args.run_dir, plots=not args.no_plots, threshold=args.threshold):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
