"""Combining the runs of several run directories into one report (`merge_runs`, `disam-train`'s `--merge`).

Owns the refusals: runs on different data, two copies of one run (same algorithm, held-out domain and seed), a row
that would mix different settings (the message says which suffix to add); the settings that differ between the
directories are listed in the merged configuration. Writing the merged report is `report.write_merged_report`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from disam_jax.harness.tables import (
  _SAME_DATA,
  _data_summary,
  _display,
  _flat,
  _ordered,
  _row_config,
  _value,
  load_results,
)

__all__ = ["MergeError", "merge_runs"]


class MergeError(ValueError):
  """Run directories that cannot be combined into one report; the message says why and what to do."""


def _suffix_hint(sources: Sequence[str], label: str) -> str:
  others = [s for s in sources if s.partition("=")[0] != label]
  suggestion = "_" + "".join(
    ch if ch.isalnum() or ch in "_-." else "_" for ch in os.path.basename(os.path.normpath(label))
  )
  return "--merge " + " ".join(others + [f"{label}={suggestion}"])


def merge_runs(sources: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
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
      raise MergeError(
        f"{directory} is given twice{f' (as {same})' if same != directory else ''}; give it once "
        "(with a suffix if you want it renamed)."
      )
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
  for c in cells:  # a search's draws and leave-one-domain-out runs are runs of their own
    key = (c["algorithm"], c["held_out"], int(c["seed"]), int(c.get("sample") or 0), c.get("val_domain"))
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
    settings = {
      label: {
        "steps": next(int(c["steps"]) for c in cells if c["source"] == label),
        **_row_config(flats.get(label, {})),
      }
      for label in members
    }
    keys = _ordered(k for s in settings.values() for k in s)
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s in settings.values()}) > 1]
    if differ:
      listing = "; ".join(
        f"{k}: " + ", ".join(f"{_value(s.get(k))} in {label}" for label, s in settings.items()) for k in differ
      )
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
