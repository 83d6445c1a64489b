"""Per-step metrics of the runs and the statistics over them: training dynamics and paired differences.

Owns reading a run's metrics.jsonl (`load_metrics`, `Metrics`), smoothing and the steps to a loss threshold, the
training-dynamics table (`dynamics_table`: per algorithm, and DISAM against SAM or ERM on the same loss run by run)
and the paired statistics (`paired_difference`, a t-interval of the differences of runs with the same held-out domain
and seed; `paired_table`), and which rows a DISAM variant is compared with (`_sam_of`, `_partners`, `_baselines`):
always rows on the same training loss, so DISAM on a penalty's loss (``disam+coral``) meets SAM or ERM on that loss
(``sam+coral``, ``coral``), never plain SAM or ERM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from disam_jax.harness.tables import _as_dict, _display, _ordered, markdown_table

__all__ = [
  "Metrics",
  "dynamics_table",
  "load_metrics",
  "paired_difference",
  "paired_table",
  "smooth",
  "steps_to_threshold",
]


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
    perturbation_weights: `[T, M]` the weights c_i of DISAM's perturbation direction, or None when not logged.
    sam_cosine: `[T]` cosine between DISAM's and SAM's perturbation directions (NaN where not computed).
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
  perturbation_weights: np.ndarray | None = None
  sam_cosine: np.ndarray | None = None


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
  optional = lambda r, key: np.nan if r.get(key) is None else r[key]
  weights = None
  if train and all("perturbation_weights" in r for r in train):
    weights = np.asarray([[r["perturbation_weights"][d] for d in domains] for r in train], np.float64)
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
    perturbation_weights=weights,
    sam_cosine=np.asarray([optional(r, "sam_cosine") for r in train], np.float64),
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


def steps_to_threshold(steps: np.ndarray, loss: np.ndarray, threshold: float, window: int = 1) -> int | None:
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


def dynamics_table(
  run_dir: str, cells: Sequence[Any] | None = None, threshold: float = 0.1, window: int | None = None
) -> str:
  """Training dynamics per algorithm, mean ± std over every run (held-out domain x seed), as Markdown.

  Columns: steps until the moving-average training loss first reaches `threshold` (runs that never do are counted
  in "reached"), the final training loss (mean of the last 10% of steps), the domain-loss variance averaged over
  all steps and over the last 10%, the mean perturbation norm and the median wall time per step. When the runs
  include SAM and DISAM (or ERM and DISAM; for DISAM on a penalty's loss, ``disam+coral``, SAM and ERM on the same
  loss: ``sam+coral`` and ``coral``) with the same held-out domains and seeds, a second table compares them run by
  run: how often DISAM's mean variance is lower, its held-out accuracy (training-domain validation) at least
  as high, and the mean paired differences.
  """
  cells, metrics, algorithms, window = _runs(run_dir, cells, window)
  rows = [
    f"Moving average over {window} steps; each entry is mean ± std over runs (held-out domains x seeds).",
    "",
  ]
  table = []
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
        "variance": var_all[-1],
        "test_acc": float(c["selected"]["test_acc"]),
        "steps": t,
      }
    table.append(
      [
        _display(a),
        _mean_std(reached, "{:.0f}"),
        f"{hit}/{len(group)}",
        _mean_std(final),
        _mean_std(var_all, "{:.2e}"),
        _mean_std(var_end, "{:.2e}"),
        _mean_std(pnorm),
        _mean_std(ms, "{:.1f}"),
      ]
    )
  rows += markdown_table(
    [
      "Algorithm",
      f"steps to loss ≤ {threshold:g}",
      "reached",
      "final loss",
      "variance (all steps)",
      "variance (last 10%)",
      "perturbation norm",
      "ms / step",
    ],
    table,
    align=":-:",
  )
  pairs = [
    (b, a)
    for a in algorithms
    if a.startswith("disam")
    for b in _ordered([_sam_of(a, algorithms), *_baselines(a)])
    if b in algorithms
  ]
  if pairs:
    rows += ["", "Run-by-run comparison with DISAM (same held-out domain and seed):", ""]
    table = []
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
      # Only pairs in which at least one run reached the threshold say who got there first.
      decided = [(o["steps"], t["steps"]) for o, t in zip(ours, theirs) if (o["steps"], t["steps"]) != (None, None)]
      first = sum(o is not None and (t is None or o <= t) for o, t in decided)
      first_cell = f"{first}/{len(decided)}" if decided else "– (neither reached it)"
      table.append(
        [
          f"{_display(mine)} vs {_display(other)}",
          len(keys),
          f"{lower}/{len(keys)}",
          f"{ratio:.3f}",
          f"{acc}/{len(keys)}",
          f"{diff:+.2f}",
          first_cell,
        ]
      )
    rows += markdown_table(
      [
        "pair",
        "runs",
        "DISAM variance lower",
        "mean variance ratio DISAM / other",
        "DISAM held-out acc ≥ other",
        "mean acc difference (points)",
        "DISAM reaches the loss threshold first or together (of the runs where either reached it)",
      ],
      table,
      align=":-:",
    )
  paired = paired_table(run_dir, cells, threshold, window)
  if paired:
    rows += ["", paired]
  return "\n".join(rows)


def paired_difference(mine: Sequence[float], theirs: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
  """Mean of the paired differences `mine - theirs` (same held-out domain and seed) with a t-based confidence
  interval: ``mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n)`` (sd with ddof=1). `resolved` is False when the
  interval covers 0 (or n < 2: no interval): then no difference is resolved, whatever the sign of the mean.

  Returns:
    ``{"n", "mean", "low", "high", "resolved"}`` (low/high None when n < 2).
  """
  from scipy import stats  # scikit-learn's dependency, in the harness extra

  d = np.asarray(mine, np.float64) - np.asarray(theirs, np.float64)
  n = len(d)
  if n == 0:
    return {"n": 0, "mean": None, "low": None, "high": None, "resolved": False}
  mean = float(d.mean())
  if n < 2:
    return {"n": 1, "mean": mean, "low": None, "high": None, "resolved": False}
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
  low, high = mean - half, mean + half
  return {"n": n, "mean": mean, "low": low, "high": high, "resolved": bool(low > 0 or high < 0)}


def _interval(p: dict[str, Any], fmt: str, scale: float = 1.0, transform=None) -> str:
  if p["mean"] is None:
    return "–"
  f = transform or (lambda v: v * scale)
  if p["low"] is None:
    return f"{fmt.format(f(p['mean']))} (n=1)"
  verdict = "" if p["resolved"] else ", no difference resolved"
  return f"{fmt.format(f(p['mean']))} [{fmt.format(f(p['low']))}, {fmt.format(f(p['high']))}]{verdict}"


def _partners(algorithm: str, algorithms: Sequence[str]) -> list[str]:
  """What a DISAM row is compared with, those present of: its SAM counterpart (`_sam_of`), the unsuffixed rule on
  the same loss for a suffixed one (``disam_sagm`` -> ``disam``, ``disam_sagm+coral`` -> ``disam+coral``), then SAM
  and ERM on the same loss (`_baselines`: ``sam``, ``erm``; ``sam+coral``, ``coral``). A row on a penalty's loss is
  never compared with a row on another loss (``disam+fishr`` with ``sam``)."""
  candidates = [_sam_of(algorithm, algorithms)] if algorithm.startswith("disam") else []
  rule, plus, penalty = algorithm.partition("+")
  if "_" in rule:
    candidates.append(rule.split("_", 1)[0] + plus + penalty)
  candidates += _baselines(algorithm)
  out = []
  for c in candidates:
    if c != algorithm and c in algorithms and c not in out:
      out.append(c)
  return out


def _baselines(algorithm: str) -> list[str]:
  """SAM and ERM on `algorithm`'s training loss: ``sam``, ``erm``; ``sam+coral``, ``coral`` (ERM on CORAL's loss)
  for ``disam+coral``."""
  _, plus, penalty = algorithm.partition("+")
  return ["sam" + plus + penalty, penalty if plus else "erm"]


def paired_table(
  run_dir: str,
  cells: Sequence[Any] | None = None,
  threshold: float = 0.1,
  window: int | None = None,
  confidence: float = 0.95,
) -> str:
  """Paired differences, DISAM rows against their partners (`_partners`), matched by held-out domain and seed
  (same initialization and batches), as Markdown: mean difference [confidence interval] (`paired_difference`) of
  the held-out accuracy (training-domain validation; points), of the log of the mean domain-loss variance (shown
  as the ratio DISAM / other, exp of the interval ends), and of the steps to the loss threshold (pairs in which
  both reached it). "no difference resolved" marks intervals that cover 0."""
  cells, metrics, algorithms, window = _runs(run_dir, cells, window)
  per = {}
  for c in cells:
    key = (c["algorithm"], c["held_out"], int(c["seed"]))
    m = metrics[key]
    per[key] = {
      "acc": 100 * float(c["selected"]["test_acc"]),
      "logvar": math.log(max(float(m.variance.mean()), 1e-300)),
      "steps": steps_to_threshold(m.steps, m.loss, threshold, window),
    }
  rows = []
  for mine in algorithms:
    if not mine.startswith("disam"):
      continue
    for other in _partners(mine, algorithms):
      keys = sorted((h, s) for (a, h, s) in per if a == mine and (other, h, s) in per)
      if not keys:
        continue
      a = [per[(mine, h, s)] for h, s in keys]
      b = [per[(other, h, s)] for h, s in keys]
      acc = paired_difference([x["acc"] for x in a], [x["acc"] for x in b], confidence)
      var = paired_difference([x["logvar"] for x in a], [x["logvar"] for x in b], confidence)
      both = [(x["steps"], y["steps"]) for x, y in zip(a, b) if x["steps"] is not None and y["steps"] is not None]
      st = paired_difference([x for x, _ in both], [y for _, y in both], confidence)
      rows.append(
        [
          f"{_display(mine)} − {_display(other)}",
          len(keys),
          _interval(acc, "{:+.2f}"),
          _interval(var, "{:.3f}", transform=math.exp),
          f"{_interval(st, '{:+.1f}')} ({len(both)})",
        ]
      )
  if not rows:
    return ""
  head = [
    f"Paired differences (same held-out domain and seed), mean [{confidence:.0%} t-interval]; "
    '"no difference resolved" when the interval covers 0 (ratio: 1):',
    "",
  ]
  return "\n".join(
    head
    + markdown_table(
      [
        "pair",
        "pairs",
        "held-out accuracy (points)",
        "variance ratio (all steps)",
        f"steps to loss ≤ {threshold:g} (pairs where both reached it)",
      ],
      rows,
      align=":-:",
    )
  )


def _sam_of(algorithm: str, algorithms: Sequence[str]) -> str:
  """The SAM counterpart of a DISAM variant, on the same training loss: the first present of ``sam`` + the rest
  (``disam+coral`` -> ``sam+coral``, ``disam_lam1`` -> ``sam_lam1``), the rule it modifies (``disam_gsam`` ->
  ``gsam``, ``disam_gsam+coral`` -> ``gsam+coral``); otherwise ``sam`` for a plain loss and, for a penalty's loss,
  ``sam+PENALTY`` if present, else the penalty alone (``disam+fishr`` -> ``fishr``: ERM on Fishr's loss; never
  ``sam``, which optimizes another objective). Callers skip a counterpart that is not among `algorithms`."""
  rest = algorithm[len("disam") :]
  for twin in ("sam" + rest, rest[1:] if rest.startswith("_") else None):
    if twin and twin in algorithms:
      return twin
  _, plus, penalty = algorithm.partition("+")
  if not plus:
    return "sam"
  return "sam+" + penalty if "sam+" + penalty in algorithms else penalty


def _runs(run_dir: str, cells: Sequence[Any] | None, window: int | None):
  """`(cells, metrics, algorithms, window)` of the tables over runs: the cells as dicts (default: the run's
  results.json), their metrics by (algorithm, held-out domain, seed), the algorithms in order, and the smoothing
  window (default: 2% of the longest run's steps)."""
  cells = [_as_dict(c) for c in (cells if cells is not None else _cells_from_run(run_dir))]
  metrics = _metrics_by_cell(run_dir, cells)
  algorithms = _ordered(c["algorithm"] for c in cells)
  steps = max(int(c["steps"]) for c in cells)
  return cells, metrics, algorithms, window or max(1, steps // 50)


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
