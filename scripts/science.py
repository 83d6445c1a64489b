"""Paired comparisons and mechanism summaries for docs/results.md, from disam-train run directories.

    python scripts/science.py ROOT            # prints every table of docs/results.md measured under ROOT
    python scripts/science.py ROOT --plot docs/results_mechanism.png

Each comparison pairs runs by (held-out domain, seed): same initialization, same data split and, within one run
directory, the same batches. Intervals are `report.paired_difference`'s t-based 95% intervals. A row may also be a
difference of two paired differences, (A - B) - (C - D). The last table gives each comparison's power: the smallest
accuracy difference it detects at 80% power (two-sided paired t-test, alpha 0.05) given the s.d. of its paired
differences and its number of pairs. DISAM's perturbation
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
from disam_jax.harness.tables import markdown_table

# regime: (loss threshold for "steps to loss", [(label, (run directory, algorithm) A, B)]): rows "A - B"; a row
# (label, A, B, C, D) is the difference of two paired differences, "(A - B) - (C - D)", paired by (held-out, seed).
# A run directory "a,b" joins directories that hold different seeds (or algorithms) of one configuration.
_NOISY = 0.5
_SGD_FROZEN, _SGD_TRAIN = "sgd_frozen_s0,sgd_frozen_sam_s1", "sgd_train_s0,sgd_train_sam_s1"  # seed 1: SAM only
_BAL6, _MER6, _CNT6 = (f"{d},{d}_s10" for d in ("bal_b6", "merged_b6", "merged_count_b6"))  # seeds 0-9, 10-29
COMPARISONS = {
  "rotated digits (baseline)": (
    0.1,
    [
      ("DISAM − SAM", ("base", "disam"), ("base", "sam")),
      ("SAM − ERM", ("base", "sam"), ("base", "erm")),
      ("DISAM, 5 inferred domains − SAM", ("base_infer5", "disam"), ("base_infer5", "sam")),
    ],
  ),
  "noisy 30° domain (50% wrong class labels)": (
    _NOISY,
    [
      ("DISAM − SAM", ("noisy30", "disam"), ("noisy30", "sam")),
      ("DISAM lam 0.5 − SAM", ("noisy30_lam05", "disam"), ("noisy30", "sam")),
      ("DISAM lam 1 − SAM", ("noisy30_lam1", "disam"), ("noisy30", "sam")),
      ("DISAM+CORAL − SAM+CORAL", ("noisy30_coral", "disam+coral"), ("noisy30_coral", "sam+coral")),
      ("SAM+CORAL − SAM", ("noisy30_coral", "sam+coral"), ("noisy30", "sam")),
    ],
  ),
  "noisy 30° + 30% wrong domain labels": (
    _NOISY,
    [("DISAM − SAM", ("noisy30_dln03", "disam"), ("noisy30_dln03", "sam"))],
  ),
  "noisy 30°, 5 inferred pseudo-domains": (
    _NOISY,
    [
      ("DISAM − SAM", ("noisy30_infer5", "disam"), ("noisy30_infer5", "sam")),
      ("DISAM inferred − DISAM true labels", ("noisy30_infer5", "disam"), ("noisy30", "disam")),
    ],
  ),
  "noisy 30°, GSAM / SAGM (held out 75; alpha: rule defaults)": (
    _NOISY,
    [
      (
        "DISAM-GSAM − GSAM",
        ("noisy30_gsam_sagm,noisy30_gsam_sagm_b", "disam_gsam"),
        ("noisy30_gsam_sagm,noisy30_gsam_sagm_b", "gsam"),
      ),
      (
        "DISAM-SAGM − SAGM",
        ("noisy30_gsam_sagm,noisy30_gsam_sagm_b", "disam_sagm"),
        ("noisy30_gsam_sagm,noisy30_gsam_sagm_b", "sagm"),
      ),
    ],
  ),
  "colored digits (held out agree10)": (
    0.2,
    [
      ("DISAM − SAM", ("colored", "disam"), ("colored", "sam")),
      ("DISAM lam 1 − SAM", ("colored_lam1", "disam"), ("colored", "sam")),
      ("SAM − ERM", ("colored", "sam"), ("colored", "erm")),
    ],
  ),
  "imbalance 10:1": (0.1, [("DISAM − SAM", ("imb10", "disam"), ("imb10", "sam"))]),
  "20 small domains (4 per rotation)": (0.1, [("DISAM − SAM", ("sub4", "disam"), ("sub4", "sam"))]),
  "rotated animals, MLP (held out 75)": (
    0.5,
    [
      ("DISAM − SAM", ("animals", "disam"), ("animals", "sam")),
      ("DISAM lam 1 − SAM", ("animals_lam1", "disam"), ("animals", "sam")),
    ],
  ),
  "rotated animals, DomainBed MNIST CNN (held out 75, 16 per domain)": (
    0.5,
    [
      ("DISAM − SAM", ("animals_cnn", "disam"), ("animals_cnn", "sam")),
      ("DISAM perturb_every 4 − DISAM", ("animals_cnn_k4", "disam"), ("animals_cnn", "disam")),
      ("DISAM perturb_every 4, reuse weight 0 − DISAM", ("animals_cnn_k4_r0", "disam"), ("animals_cnn", "disam")),
    ],
  ),
  "pretrained MobileNetV2, head + adapters, VLCS mini (held out SUN09)": (
    0.5,
    [("DISAM − SAM", ("peft", "disam"), ("peft", "sam"))],
  ),
  "rotated digits, amortized DISAM (held out 75)": (
    0.1,
    [
      *[(f"DISAM perturb_every {k} − DISAM", (f"k{k}", "disam"), ("k1", "disam")) for k in (2, 4, 8)],
      ("DISAM perturb_every 4, reuse weight 0 − DISAM", ("k4_r0", "disam"), ("k1", "disam")),
    ],
  ),
  "rho 1.25 (held out 75)": (0.5, [("DISAM − SAM", ("rho1.25", "disam"), ("rho1.25", "sam"))]),
  "rho 1.5 (held out 75)": (0.5, [("DISAM − SAM", ("rho1.5", "disam"), ("rho1.5", "sam"))]),
  "rho 1.75 (held out 75)": (0.5, [("DISAM − SAM", ("rho1.75", "disam"), ("rho1.75", "sam"))]),
  "noisy 30°, rho 1.5 (held out 75)": (
    1.0,
    [
      ("DISAM − SAM", ("noisy30_rho1.5", "disam"), ("noisy30_rho1.5", "sam")),
      ("DISAM lam 1 − SAM", ("noisy30_rho1.5_lam1", "disam"), ("noisy30_rho1.5", "sam")),
    ],
  ),
  # Issue 31: the released code's SAM trains in model.eval() (frozen BatchNorm), its DISAM in model.train().
  "MobileNetV2, full fine-tuning, VLCS mini (held out SUN09), SGD lr 0.002 (released): BatchNorm mode": (
    0.5,
    [
      ("DISAM train BN − SAM frozen BN (the released pairing)", (_SGD_TRAIN, "disam"), (_SGD_FROZEN, "sam")),
      ("SAM train BN − SAM frozen BN (the mode alone)", (_SGD_TRAIN, "sam"), (_SGD_FROZEN, "sam")),
      ("DISAM train BN − DISAM frozen BN (the mode alone)", (_SGD_TRAIN, "disam"), (_SGD_FROZEN, "disam")),
      ("DISAM − SAM, both frozen BN", (_SGD_FROZEN, "disam"), (_SGD_FROZEN, "sam")),
      ("DISAM − SAM, both train BN", (_SGD_TRAIN, "disam"), (_SGD_TRAIN, "sam")),
      (
        "(DISAM − SAM) train BN − (DISAM − SAM) frozen BN",
        (_SGD_TRAIN, "disam"),
        (_SGD_TRAIN, "sam"),
        (_SGD_FROZEN, "disam"),
        (_SGD_FROZEN, "sam"),
      ),
      ("ERM frozen BN − SAM frozen BN", ("sgd_frozen_erm_s0", "erm"), (_SGD_FROZEN, "sam")),
    ],
  ),
  "MobileNetV2, full fine-tuning, VLCS mini (held out SUN09), Adam lr 1e-3: BatchNorm mode": (
    0.5,
    [
      ("SAM train BN − SAM frozen BN (the mode alone)", ("ft_train_sam_s0", "sam"), ("ft_frozen_s0", "sam")),
      ("DISAM − SAM, both frozen BN", ("ft_frozen_s0", "disam"), ("ft_frozen_s0", "sam")),
    ],
  ),
  # Issue 31: the same pairing where both BatchNorm modes train (the backbone frozen; section "Pretrained MobileNetV2").
  "MobileNetV2, head + adapters, VLCS mini (held out SUN09), Adam lr 1e-3: BatchNorm mode": (
    0.5,
    [
      ("DISAM train BN − SAM frozen BN (the released pairing)", ("peft_train", "disam"), ("peft_frozen", "sam")),
      ("SAM train BN − SAM frozen BN (the mode alone)", ("peft_train", "sam"), ("peft_frozen", "sam")),
      ("DISAM train BN − DISAM frozen BN (the mode alone)", ("peft_train", "disam"), ("peft_frozen", "disam")),
      ("DISAM − SAM, both frozen BN", ("peft_frozen", "disam"), ("peft_frozen", "sam")),
      ("DISAM − SAM, both train BN", ("peft_train", "disam"), ("peft_train", "sam")),
      (
        "(DISAM − SAM) train BN − (DISAM − SAM) frozen BN",
        ("peft_train", "disam"),
        ("peft_train", "sam"),
        ("peft_frozen", "disam"),
        ("peft_frozen", "sam"),
      ),
    ],
  ),
  # Issue 31: the released code's batches (one shuffled stream over the training domains) vs DomainBed's balanced ones.
  "rotated digits, balanced vs merged batches": (
    0.1,
    [
      ("DISAM − SAM, balanced batches", ("bal", "disam"), ("bal", "sam")),
      ("DISAM − SAM, merged batches", ("merged", "disam"), ("merged", "sam")),
      ("DISAM − SAM, merged, count weights", ("merged_count", "disam"), ("merged_count", "sam")),
      (
        "(DISAM − SAM) merged − (DISAM − SAM) balanced",
        ("merged", "disam"),
        ("merged", "sam"),
        ("bal", "disam"),
        ("bal", "sam"),
      ),
      (
        "(DISAM − SAM) merged count − (DISAM − SAM) balanced",
        ("merged_count", "disam"),
        ("merged_count", "sam"),
        ("bal", "disam"),
        ("bal", "sam"),
      ),
    ],
  ),
  "rotated digits, 6 per domain (30 per step; released: 32): balanced vs merged batches": (
    0.25,
    [
      ("DISAM − SAM, balanced batches", (_BAL6, "disam"), (_BAL6, "sam")),
      ("DISAM − SAM, merged batches", (_MER6, "disam"), (_MER6, "sam")),
      ("DISAM − SAM, merged, count weights", (_CNT6, "disam"), (_CNT6, "sam")),
      (
        "(DISAM − SAM) merged − (DISAM − SAM) balanced",
        (_MER6, "disam"),
        (_MER6, "sam"),
        (_BAL6, "disam"),
        (_BAL6, "sam"),
      ),
      (
        "(DISAM − SAM) merged count − (DISAM − SAM) balanced",
        (_CNT6, "disam"),
        (_CNT6, "sam"),
        (_BAL6, "disam"),
        (_BAL6, "sam"),
      ),
    ],
  ),
}


def _cells(root, name):
  path = os.path.join(root, name, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  return saved["cells"], saved.get("config") or {}


def _metrics(root, name, cell):
  return report.load_metrics(
    os.path.join(root, name, "cells", os.path.basename(cell["directory"].rstrip("/")), "metrics.jsonl")
  )


def _weights(m, lam):
  """[T, M] perturbation weights times M (1 for SAM)."""
  if m.perturbation_weights is not None:
    return m.perturbation_weights * m.domain_losses.shape[1]
  L = m.domain_losses.mean(axis=1, keepdims=True)
  return 1.0 - 2.0 * lam * (m.domain_losses - L)


def _run_stats(root, name, algorithm, threshold):
  if "," in name:  # several run directories holding different seeds of one configuration
    out = {}
    for part in name.split(","):
      out.update(_run_stats(root, part, algorithm, threshold) or {})
    return out or None
  loaded = _cells(root, name)
  if loaded is None:
    return None
  cells, config = loaded
  lam = config.get("hparams", {}).get("lam", 0.1) if algorithm.startswith("disam") else 0.0
  out = {}
  for c in cells:
    if c["algorithm"] != algorithm:
      continue
    m = _metrics(root, name, c)
    window = max(1, len(m.steps) // 50)
    w = _weights(m, lam)
    out[(c["held_out"], int(c["seed"]))] = {
      "acc": 100 * c["selected"]["test_acc"],
      "acc_last": 100 * c["last"]["test_acc"],
      "logvar": math.log(max(m.variance.mean(), 1e-300)),
      "final_loss": float(m.loss[-max(1, len(m.loss) // 10) :].mean()),
      "steps": report.steps_to_threshold(m.steps, m.loss, threshold, window),
      "w_spread": float((w.max(1) - w.min(1)).mean()),
      "w_neg": float((w.min(1) < 0).mean()),
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


_PAIRED = ("acc", "logvar", "final_loss", "steps")  # the per-run quantities compared pair by pair


def _row_runs(root, spec, threshold):
  """Per (held-out, seed) statistics of one side of a row: `spec` is (directory, algorithm), or two of them,
  (A, B), whose paired difference A - B it then gives (None where a run or its `steps` is missing)."""
  if len(spec) == 2 and isinstance(spec[0], str):
    return _run_stats(root, spec[0], spec[1], threshold)
  a, b = (_run_stats(root, d, alg, threshold) for d, alg in spec)
  if not a or not b:
    return None
  sub = lambda x, y: None if x is None or y is None else x - y
  return {k: {q: sub(a[k][q], b[k][q]) for q in _PAIRED} for k in sorted(set(a) & set(b))}


def _row(root, threshold, row):
  """(label, A runs, B runs, A's own runs or None) of a COMPARISONS row: 'A - B' or '(A - B) - (C - D)'."""
  label, *specs = row
  if len(specs) == 2:
    a, b = (_row_runs(root, s, threshold) for s in specs)
    return label, a, b, a
  if len(specs) == 4:
    return label, _row_runs(root, specs[:2], threshold), _row_runs(root, specs[2:], threshold), None
  raise ValueError(
    f"COMPARISONS row {label!r}: give A, B or A, B, C, D as (run directory, algorithm), not {len(specs)} of them"
  )


def detectable_difference(sd, n, alpha=0.05, power=0.8):
  """Smallest true mean difference that a two-sided paired t-test at level `alpha` finds with probability `power`
  from `n` pairs whose differences have standard deviation `sd` (noncentral t; None when n < 2 or sd is 0).
  The usual normal approximation is (z_{1-alpha/2} + z_power) sd / sqrt(n); the t version is larger for small n."""
  from scipy import integrate, optimize, stats

  if n < 2 or not sd > 0:
    return None
  df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

  def reach(nc):  # P(|T| > crit), T = (Z + nc) / sqrt(V / df), V ~ chi2(df), integrated over V's quantiles u
    # (scipy's nct is NaN at large nc for small df)
    s = lambda u: crit * math.sqrt(stats.chi2.ppf(u, df) / df)
    return integrate.quad(lambda u: stats.norm.cdf(nc - s(u)) + stats.norm.cdf(-nc - s(u)), 0.0, 1.0, limit=200)[0]

  nc = optimize.brentq(lambda nc: reach(nc) - power, 0.0, 10.0 * (crit + 3.0))
  return float(nc * sd / math.sqrt(n))


def tables(root):
  header = [
    "regime",
    "A − B",
    "pairs",
    "held-out acc (points)",
    "variance ratio A / B",
    "final loss A − B",
    "steps to loss ≤ t: A − B (pairs)",
    "A: mean spread of M·c_i",
    "A: steps with a c_i < 0",
  ]
  rows_out = []
  for regime, (threshold, rows) in COMPARISONS.items():
    for row in rows:
      label, a, b, own = _row(root, threshold, row)
      if not a or not b:
        continue
      keys = sorted(set(a) & set(b))
      acc = report.paired_difference([a[k]["acc"] for k in keys], [b[k]["acc"] for k in keys])
      var = report.paired_difference([a[k]["logvar"] for k in keys], [b[k]["logvar"] for k in keys])
      fl = report.paired_difference([a[k]["final_loss"] for k in keys], [b[k]["final_loss"] for k in keys])
      both = [k for k in keys if a[k]["steps"] is not None and b[k]["steps"] is not None]
      st = report.paired_difference([a[k]["steps"] for k in both], [b[k]["steps"] for k in both])
      spread = f"{np.mean([own[k]['w_spread'] for k in keys]):.3f}" if own else "–"
      neg = f"{np.mean([own[k]['w_neg'] for k in keys]):.0%}" if own else "–"
      rows_out.append(
        [
          regime,
          label,
          len(keys),
          _fmt(acc),
          _fmt(var, "{:.3f}", math.exp),
          _fmt(fl, "{:+.3f}"),
          f"t={threshold:g}: {_fmt(st, '{:+.1f}')} ({len(both)})",
          spread,
          neg,
        ]
      )
  return "\n".join(markdown_table(header, rows_out, ["---", "---"] + [":-:"] * 7))


def power_table(root):
  """Per comparison: the s.d. of the paired accuracy differences and the smallest difference the comparison
  detects at 80% power (alpha 0.05, two-sided), from that s.d. and the number of pairs."""
  header = [
    "regime",
    "A − B",
    "pairs",
    "held-out acc A − B (points)",
    "s.d. of the paired differences",
    "detectable at 80% power (points)",
  ]
  rows_out = []
  for regime, (threshold, rows) in COMPARISONS.items():
    for row in rows:
      label, a, b, _ = _row(root, threshold, row)
      if not a or not b:
        continue
      keys = sorted(set(a) & set(b))
      d = np.asarray([a[k]["acc"] - b[k]["acc"] for k in keys])
      sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
      mde = detectable_difference(sd, len(d))
      acc = report.paired_difference([a[k]["acc"] for k in keys], [b[k]["acc"] for k in keys])
      rows_out.append(
        [regime, label, len(keys), _fmt(acc), "–" if len(d) < 2 else f"{sd:.2f}", "–" if mde is None else f"{mde:.2f}"]
      )
  return "\n".join(markdown_table(header, rows_out, ["---", "---"] + [":-:"] * 4))


def accuracy_table(root):
  header = ["run directory", "algorithm", "runs", "held-out acc (selected)", "held-out acc (last)", "final loss"]
  rows_out = []
  for name in sorted(os.listdir(root)):
    loaded = _cells(root, name)
    if loaded is None:
      continue
    for algorithm in report._ordered(c["algorithm"] for c in loaded[0]):
      s = _run_stats(root, name, algorithm, 0.1)
      v = lambda key: np.asarray([x[key] for x in s.values()])
      sd = lambda x: f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}"
      rows_out.append([name, algorithm, len(s), sd(v("acc")), sd(v("acc_last")), f"{v('final_loss').mean():.3f}"])
  return "\n".join(markdown_table(header, rows_out, ["---", "---"] + [":-:"] * 4))


PLOTS = [
  ("rotated digits", "diag_base"),
  ("noisy 30° domain", "diag_noisy30"),
  ("noisy 30° domain", "diag_noisy30_lam1"),
  ("noisy 30°, 5 inferred domains", "diag_noisy30_infer5"),
  ("colored digits", "diag_colored"),
  ("colored digits", "diag_colored_lam1"),
  ("MobileNetV2 PEFT, VLCS mini", "diag_peft"),
]


def plot(root, path):
  """Top: DISAM's weights M·c_i per training domain (SAM: all 1); bottom: cosine between DISAM's and SAM's
  perturbation directions; one column per single --diagnostics run (seed 0)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [p for p in PLOTS if _cells(root, p[1]) is not None]
  fig, axes = plt.subplots(2, len(panels), figsize=(3.3 * len(panels), 5.6), squeeze=False)
  for k, (title, name) in enumerate(panels):
    cells, config = _cells(root, name)
    lam = config["hparams"]["lam"]
    m = _metrics(root, name, cells[0])
    window = max(1, len(m.steps) // 50)
    w = report.smooth(_weights(m, lam), window)
    ax = axes[0, k]
    for j, d in enumerate(m.domains):
      ax.plot(m.steps, w[:, j], lw=1.0, label=d)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_title(f"{title}\nlam {lam:g}, held out {cells[0]['held_out']}", fontsize=8)
    ax.set_ylabel("M · c_i (SAM: 1)" if k == 0 else None)
    ax.legend(fontsize=5, ncol=2, title="training domain", title_fontsize=5)
    ax = axes[1, k]
    ax.plot(m.steps, report.smooth(m.sam_cosine, window), color="tab:red", lw=1.0)
    ax.set_ylim(min(-0.05, float(np.nanmin(m.sam_cosine)) - 0.05), 1.05)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("cos(DISAM direction, SAM direction)" if k == 0 else None, fontsize=7)
  fig.suptitle(
    "DISAM's mechanism per regime: perturbation weights c_i of g_p = Σ c_i ∇L_i (top) and cosine to "
    "SAM's direction (bottom); seed 0; MLP, 300 steps (MobileNetV2: 60)",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(path)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("root")
  parser.add_argument("--plot")
  args = parser.parse_args(argv)
  print(accuracy_table(args.root))
  print()
  print(tables(args.root))
  print()
  print(power_table(args.root))
  if args.plot:
    plot(args.root, args.plot)


if __name__ == "__main__":
  sys.exit(main())
