"""The report of a run directory, and its command: ``python -m disam_jax.harness.report RUN_DIR``.

A report is the accuracy tables (results.md, results.json: `tables.py`, one per model-selection method), the
training-dynamics and paired tables appended to results.md (`stats.py`) and the plots (PNG: `plots.py`); those two
cover the runs of draw 0 with one held-out domain (a search's other runs are in the selection tables). This module
owns putting them together: `write_report` regenerates a run directory's report in place; `write_merged_report` writes
the combination of several run directories (`merge.merge_runs`) into a new folder. Every output is first written to a
temporary file or directory and then renamed into place, so an error never leaves a half-written report.

The command: ``python -m disam_jax.harness.report RUN_DIR [--no-plots] [--threshold T]``; ``--merge DIR[=SUFFIX]
...`` combines run directories into RUN_DIR, refusing runs on different data, two copies of one run (same
algorithm, held-out domain and seed) and a row that would mix different settings (the message says which suffix
to add).

The names of tables.py, stats.py, plots.py and merge.py are also re-exported here, for existing imports
(``from disam_jax.harness import report``: tests, scripts, examples).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from disam_jax.harness._atomic import write_atomic
from disam_jax.harness.merge import MergeError, _replaceable, merge_runs
from disam_jax.harness.plots import write_plots
from disam_jax.harness.stats import (  # noqa: F401
  Metrics,
  _partners,
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
  _as_dict,
  _data_summary,
  _ordered,
  _primary,
  expected_runs,
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
  "write_merged_report",
  "write_plots",
  "write_report",
  "write_results",
]


def _render(run_dir: str, out_dir: str, cells, config, data, plots: bool, threshold: float) -> list[str]:
  """Writes every output file into `out_dir`, reading the runs' metrics under `run_dir`; returns the names."""
  write_results(run_dir, cells, config, data=data, out_dir=out_dir)
  written = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")]
  if not cells:  # nothing finished yet: the tables (all –) and what is missing
    return [os.path.basename(p) for p in written]
  # The dynamics tables and the plots compare runs of one configuration: draw 0 with one held-out domain.
  primary = [c for c in cells if _primary(c)]
  if not primary:
    return [os.path.basename(p) for p in written]
  path = os.path.join(out_dir, "results.md")
  with open(path) as f:
    text = f.read()
  write_atomic(path, text + "\n## Training dynamics\n\n" + dynamics_table(run_dir, primary, threshold) + "\n")
  if plots:
    written += write_plots(run_dir, primary, out_dir=out_dir)
  return [os.path.basename(p) for p in written]


def write_report(
  run_dir: str,
  cells: Sequence[Any] | None = None,
  config: Any = None,
  plots: bool = True,
  threshold: float = 0.1,
  data: dict[str, Any] | None = None,
) -> list[str]:
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


def main(argv: Sequence[str] | None = None) -> int:
  """The report command; returns its exit code: 0 written (with a warning on stderr when runs are missing), 2 bad
  input (one line naming the file: an unreadable results.json, a merge that would lose or mix runs)."""
  parser = argparse.ArgumentParser(
    prog="python -m disam_jax.harness.report",
    description="Rewrites results.md, results.json and the plots of a disam-train run directory, or combines "
    "several (--merge) into a new one.",
  )
  parser.add_argument(
    "run_dir",
    help="a run directory written by disam-train (with results.json); with --merge, "
    "the directory to write the combined report to",
  )
  parser.add_argument("--no-plots", action="store_true", help="only the tables")
  parser.add_argument(
    "--threshold", type=float, default=0.1, help="training-loss threshold for the 'steps to loss' column (default: 0.1)"
  )
  parser.add_argument(
    "--merge",
    nargs="+",
    metavar="DIR[=SUFFIX]",
    help="combine the runs of these run directories (trained on the same data), renaming the "
    "algorithms of DIR=SUFFIX to <algorithm><SUFFIX>, e.g. --merge noisy noisy_lam1=_lam1; "
    "two directories holding the same algorithm, held-out domain and seed, or one row mixing "
    "different settings, are refused with the suffix to add",
  )
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
  main_table = _main_table(os.path.join(os.path.dirname(paths[0]), "results.md"))
  if main_table:
    print(main_table + "\n")
  for path in paths:
    print(path)
  saved = load_results(os.path.dirname(paths[0]))
  missing = saved.get("missing") or []
  if missing:
    first = missing[0]
    print(
      f"{parser.prog}: warning: incomplete: {len(missing)} of the {saved['runs_configured']} runs configured "
      f"have no result (e.g. "
      f"{first['algorithm']} held-out {first['held_out']} seed {first['seed']}); results.md lists them, and its "
      "averages cover only complete seeds",
      file=sys.stderr,
    )
  return 0


def _main_table(results_md: str) -> str:
  """The title of results.md and its first section with a table (the held-out accuracies under training-domain
  validation): what the report command shows on the terminal, as disam-train shows the whole file."""
  try:
    with open(results_md) as f:
      lines = f.read().splitlines()
  except OSError:
    return ""
  out, seen_table = [], False
  for line in lines:
    if seen_table and not line.startswith("|"):
      break
    seen_table = seen_table or line.startswith("|")
    out.append(line)
  return "\n".join(out).strip() if seen_table else ""


if __name__ == "__main__":
  sys.exit(main())
