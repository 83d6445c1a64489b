"""Paired comparisons and mechanism summaries for docs/results.md, from disam-train run directories.

    python scripts/science.py ROOT            # prints every table of docs/results.md measured under ROOT
    python scripts/science.py ROOT --plot docs/results_mechanism.png

Each comparison pairs runs by (held-out domain, seed): same initialization, same data split and, within one run
directory, the same batches. Intervals are `report.paired_difference`'s t-based 95% intervals. DISAM's perturbation
weights are recomputed from the logged, unperturbed per-domain losses, c_i = (1 - 2 lam (L_i - L)) / M (the
quantity `disam` uses, algorithm.md), or read from the metrics when the run logged them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from disam_jax.harness import report

# (label, run directory, algorithm) pairs: "A - B" rows; run directories relative to ROOT.
COMPARISONS = {
  "baseline (rotated digits)": [("DISAM − SAM", ("base", "disam"), ("base", "sam")),
                                ("SAM − ERM", ("base", "sam"), ("base", "erm"))],
  "noisy 30° domain (50% wrong labels)": [("DISAM − SAM", ("noisy30", "disam"), ("noisy30", "sam")),
                                          ("DISAM lam 0.5 − SAM", ("noisy30_lam05", "disam"), ("noisy30", "sam")),
                                          ("DISAM lam 1 − SAM", ("noisy30_lam1", "disam"), ("noisy30", "sam"))],
  "colored digits (held out agree10)": [("DISAM − SAM", ("colored", "disam"), ("colored", "sam")),
                                        ("SAM − ERM", ("colored", "sam"), ("colored", "erm"))],
  "imbalance 10:1": [("DISAM − SAM", ("imb10", "disam"), ("imb10", "sam"))],
  "20 small domains (4 per rotation)": [("DISAM − SAM", ("sub4", "disam"), ("sub4", "sam"))],
  "noisy 30° + 30% wrong domain labels": [("DISAM − SAM", ("noisy30_dln03", "disam"), ("noisy30_dln03", "sam"))],
  "noisy 30°, 5 inferred domains": [("DISAM − SAM", ("noisy30_infer5", "disam"), ("noisy30_infer5", "sam")),
                                    ("DISAM inferred − DISAM true", ("noisy30_infer5", "disam"), ("noisy30", "disam"))],
  "noisy 30°, CORAL penalty": [("DISAM+CORAL − SAM+CORAL", ("noisy30_coral", "disam+coral"),
                                ("noisy30_coral", "sam+coral"))],
  "rho 1.5": [("DISAM − SAM", ("rho1.5", "disam"), ("rho1.5", "sam"))],
}


def _cells(root, name):
  path = os.path.join(root, name, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  return saved["cells"], saved.get("config") or {}


def _metrics(root, name, cell):
  return report.load_metrics(os.path.join(root, name, "cells", os.path.basename(cell["directory"].rstrip("/")),
                                          "metrics.jsonl"))


def _weights(m, lam):
  """[T, M] perturbation weights times M (1 for SAM)."""
  if m.perturbation_weights is not None:
    return m.perturbation_weights * m.domain_losses.shape[1]
  L = m.domain_losses.mean(axis=1, keepdims=True)
  return 1.0 - 2.0 * lam * (m.domain_losses - L)


def _run_stats(root, name, algorithm, threshold):
  loaded = _cells(root, name)
  if loaded is None:
    return None
  cells, config = loaded
  lam = config.get("hparams", {}).get("lam", 0.1)
  out = {}
  for c in cells:
    if c["algorithm"] != algorithm:
      continue
    m = _metrics(root, name, c)
    window = max(1, len(m.steps) // 50)
    w = _weights(m, lam)
    out[(c["held_out"], int(c["seed"]))] = {
      "acc": 100 * c["selected"]["test_acc"], "acc_last": 100 * c["last"]["test_acc"],
      "logvar": math.log(max(m.variance.mean(), 1e-300)), "final_loss": float(m.loss[-max(1, len(m.loss) // 10):].mean()),
      "steps": report.steps_to_threshold(m.steps, m.loss, threshold, window),
      "w_spread": float((w.max(1) - w.min(1)).mean()), "w_neg": float((w.min(1) < 0).mean()),
      "w_min": float(w.min(1).mean()),
    }
  return out


def _fmt(p, fmt="{:+.2f}", f=lambda v: v):
  if p["mean"] is None:
    return "–"
  if p["low"] is None:
    return fmt.format(f(p["mean"]))
  tag = "" if p["resolved"] else " ns"
  return f"{fmt.format(f(p['mean']))} [{fmt.format(f(p['low']))}, {fmt.format(f(p['high']))}]{tag}"


def tables(root, threshold):
  lines = ["| regime | comparison | pairs | held-out acc (points) | variance ratio | final loss diff | "
           f"steps to loss ≤ {threshold:g} (pairs) | A: spread of M·c_i | A: steps with a c_i < 0 |",
           "|---|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|"]
  for regime, rows in COMPARISONS.items():
    for label, (da, aa), (db, ab) in rows:
      a, b = _run_stats(root, da, aa, threshold), _run_stats(root, db, ab, threshold)
      if not a or not b:
        continue
      keys = sorted(set(a) & set(b))
      acc = report.paired_difference([a[k]["acc"] for k in keys], [b[k]["acc"] for k in keys])
      var = report.paired_difference([a[k]["logvar"] for k in keys], [b[k]["logvar"] for k in keys])
      fl = report.paired_difference([a[k]["final_loss"] for k in keys], [b[k]["final_loss"] for k in keys])
      both = [k for k in keys if a[k]["steps"] is not None and b[k]["steps"] is not None]
      st = report.paired_difference([a[k]["steps"] for k in both], [b[k]["steps"] for k in both])
      spread = np.mean([a[k]["w_spread"] for k in keys])
      neg = np.mean([a[k]["w_neg"] for k in keys])
      lines.append(f"| {regime} | {label} | {len(keys)} | {_fmt(acc)} | {_fmt(var, '{:.3f}', math.exp)} | "
                   f"{_fmt(fl, '{:+.3f}')} | {_fmt(st, '{:+.1f}')} ({len(both)}) | {spread:.3f} | {neg:.0%} |")
  return "\n".join(lines)


def accuracy_table(root):
  lines = ["| run directory | algorithm | runs | held-out acc (selected) | held-out acc (last) | final loss |",
           "|---|---|:-:|:-:|:-:|:-:|"]
  for name in sorted(os.listdir(root)):
    loaded = _cells(root, name)
    if loaded is None:
      continue
    for algorithm in report._ordered(c["algorithm"] for c in loaded[0]):
      s = _run_stats(root, name, algorithm, 0.1)
      v = lambda key: np.asarray([x[key] for x in s.values()])
      sd = lambda x: f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}"
      lines.append(f"| {name} | {algorithm} | {len(s)} | {sd(v('acc'))} | {sd(v('acc_last'))} | "
                   f"{v('final_loss').mean():.3f} |")
  return "\n".join(lines)


PLOTS = [("baseline", "base", "75", 0), ("noisy 30° domain", "noisy30", "75", 0),
         ("noisy 30°, lam 1", "noisy30_lam1", "75", 0), ("colored digits", "colored", "agree10", 0),
         ("imbalance 10:1", "imb10", "75", 0), ("20 small domains", "sub4", "75", 0),
         ("noisy 30°, 30% wrong domain labels", "noisy30_dln03", "75", 0),
         ("noisy 30°, 5 inferred domains", "noisy30_infer5", "75", 0)]


def plot(root, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [p for p in PLOTS if _cells(root, p[1]) is not None]
  cols = 4
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=False)
  for ax, (title, name, held_out, seed) in zip(axes.flat, panels):
    cells, config = _cells(root, name)
    lam = config.get("hparams", {}).get("lam", 0.1)
    cell = next(c for c in cells if c["algorithm"].startswith("disam") and c["held_out"] == held_out
                and int(c["seed"]) == seed)
    m = _metrics(root, name, cell)
    w = report.smooth(_weights(m, lam), max(1, len(m.steps) // 50))
    for j, d in enumerate(m.domains):
      ax.plot(m.steps, w[:, j], lw=1.0, label=d if len(m.domains) <= 6 else None)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_title(f"{title} (lam {lam:g})", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("M · c_i  (SAM: 1)")
    if len(m.domains) <= 6:
      ax.legend(fontsize=6, title="training domain", title_fontsize=6)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(path)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("root")
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--plot")
  args = parser.parse_args(argv)
  print(accuracy_table(args.root))
  print()
  print(tables(args.root, args.threshold))
  if args.plot:
    plot(args.root, args.plot)


if __name__ == "__main__":
  sys.exit(main())
