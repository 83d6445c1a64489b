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
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

from disam_jax.harness.merge import MergeError, _replaceable, merge_runs
from disam_jax.harness.plots import write_plots
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
