"""The accuracy tables of an experiment and its results files (results.md, results.json).

Tables, as DomainBed's ``collect_results``: rows are algorithms, columns the held-out domains and their average,
cells the held-out accuracy in % as mean ± standard error over trial seeds (DomainBed's: ``std(ddof=0) /
sqrt(n)``; a single seed shows the mean alone). The "Avg" column averages each seed's accuracies over the held-out
domains first, then takes mean ± s.e. of those per-seed averages over the seeds that have every domain. One table
per model-selection method (`SELECTIONS`, `select`: DomainBed's ``model_selection.py``), each choosing per
algorithm, held-out domain and trial seed a hyperparameter draw of the search (and a checkpoint), then the last
checkpoint of draw 0 (no selection). Every method's test accuracy is on the held-out domain's 80% that no method
selects on (`experiment.held_out_parts`); with a search, a table of the draw each method chose follows each.

Each row's settings (model, steps, optimizer and algorithm hyperparameters) and the data warnings of the run
(unreadable images skipped, class folders missing from a domain; `data.json`, written by
`experiment.run_experiment`) are in results.json and results.md on every run. Owns what "complete" means
(`expected_runs`, `missing_runs`) and reading a results.json back (`load_results`); files are written with
`_atomic.write_atomic`. The training-dynamics tables are `stats.py`'s, the plots `plots.py`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from disam_jax.harness._atomic import write_atomic

__all__ = [
  "BadResults",
  "OUT_SUFFIX",
  "SELECTIONS",
  "chosen_table",
  "format_mean_se",
  "planned_runs",
  "select",
  "expected_runs",
  "load_results",
  "markdown_table",
  "missing_runs",
  "results_markdown",
  "results_table",
  "row_settings",
  "summarize",
  "write_results",
]


def markdown_table(
  header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | Sequence[str] = "---"
) -> list[str]:
  """The lines of a Markdown table: the `header` cells, the rule, then one line per row of `rows`.

  Args:
    header: the column titles (``str()``'d, like every cell).
    rows: one sequence of cells per row.
    align: the rule's cell under every column but the first (which gets ``---``): ``"---"`` plain, ``":-:"``
      centred, ``"---:"`` right-aligned; or a list of one rule cell per column.

  Every line is ``"| " + " | ".join(cells) + " |"``; the report's and the benchmarks' tables are built with it.
  """

  def line(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"

  rule = ["---"] + [align] * (len(header) - 1) if isinstance(align, str) else list(align)
  if len(rule) != len(header):
    raise ValueError(f"markdown_table: {len(rule)} alignments for {len(header)} columns")
  return [line(header), "|" + "|".join(rule) + "|", *(line(r) for r in rows)]


# (key, title): DomainBed's three model-selection methods (`select`), then the last checkpoint of draw 0.
SELECTIONS = (
  ("selected", "training-domain validation (best validation accuracy)"),
  ("leave_one_out", "leave-one-domain-out validation"),
  ("oracle", "test-domain validation (oracle)"),
  ("last", "last checkpoint"),
)

# The name of a held-out domain's 20% part in an evaluation's "test_accs" (`experiment.OUT_SUFFIX`; kept equal by
# tests/test_harness_search.py: tables.py imports no JAX).
OUT_SUFFIX = " (20%)"


def _primary(c: dict[str, Any]) -> bool:
  """A run of draw 0 with one held-out domain: the runs an experiment without a search has."""
  return int(c.get("sample") or 0) == 0 and c.get("val_domain") is None


def _test_in(record: dict[str, Any], domain: str) -> float | None:
  """An evaluation's accuracy on `domain`'s 80% (its `test_accs`; `test_acc` for runs from before the split)."""
  accs = record.get("test_accs")
  return float(accs[domain]) if accs and domain in accs else (float(record["test_acc"]) if not accs else None)


def _run_acc(
  method: str, cell: dict[str, Any], domain: str, pair_runs: dict[str, dict[str, Any]], others: Sequence[str]
) -> dict[str, Any] | None:
  """DomainBed's ``run_acc`` of one draw: ``{"val_acc", "test_acc", "step"}`` of its chosen checkpoint, or None.

  selected: the checkpoint with the best mean training-domain validation accuracy (the run's `selected`).
  oracle: the last checkpoint, scored by its accuracy on the held-out domain's 20%.
  leave_one_out: the checkpoint (step) with the best mean over the other domains v of v's 80% accuracy in the run
  that held out both `domain` and v (`pair_runs[v]`, same draw); None unless every such run has that step.
  """
  if method == "selected":
    sel = cell["selected"]
    return {"val_acc": float(sel["val_acc"]), "test_acc": float(sel["test_acc"]), "step": int(sel["step"])}
  evals = cell.get("evals") or []
  if method == "oracle":
    if not evals or domain + OUT_SUFFIX not in (evals[-1].get("test_accs") or {}):
      return None
    last = evals[-1]
    return {
      "val_acc": float(last["test_accs"][domain + OUT_SUFFIX]),
      "test_acc": _test_in(last, domain),
      "step": int(last["step"]),
    }
  if not others or any(v not in pair_runs for v in others):
    return None
  by_step = {v: {int(r["step"]): r for r in pair_runs[v].get("evals") or []} for v in others}
  best = None
  for record in evals:
    step = int(record["step"])
    accs = [(by_step[v].get(step) or {}).get("test_accs", {}).get(v) for v in others]
    if any(a is None for a in accs):
      continue
    val = float(np.mean(accs))
    if best is None or val > best["val_acc"]:
      best = {"val_acc": val, "test_acc": _test_in(record, domain), "step": step}
  return best


def select(cells: Sequence[Any], method: str, domains: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """DomainBed's model selection: per (algorithm, held-out domain, trial seed), the draw (and checkpoint) `method`
  chooses, as DomainBed's ``SelectionMethod.sweep_acc``: each draw's `_run_acc`, then the draw with the highest
  validation accuracy (the lowest draw on ties).

  Args:
    cells: run results (dicts or `CellResult`s) with ``sample`` (draw; 0 when absent) and ``val_domain`` (the second
      held-out domain of a leave-one-domain-out run; None when absent).
    method: a key of `SELECTIONS`: "selected" (training-domain validation), "leave_one_out", "oracle", or "last" (the
      last checkpoint of draw 0, no selection).
    domains: every domain of the dataset (leave-one-domain-out needs the runs with each other domain held out too);
      None: those named by the cells.

  Returns:
    ``[{"algorithm", "held_out", "seed", "sample", "step", "val_acc", "test_acc"}]``, in the cells' order; a group
    where no draw can be scored (e.g. no leave-one-domain-out runs) is left out.
  """
  cells = [_as_dict(c) for c in cells]
  if domains is None:
    domains = _ordered(
      [str(c["held_out"]) for c in cells] + [str(c["val_domain"]) for c in cells if c.get("val_domain") is not None]
    )
  singles: dict[tuple, dict[int, dict[str, Any]]] = {}
  pairs: dict[tuple, dict[str, Any]] = {}
  for c in cells:
    a, d, s, k = c["algorithm"], str(c["held_out"]), int(c["seed"]), int(c.get("sample") or 0)
    if c.get("val_domain") is None:
      singles.setdefault((a, d, s), {})[k] = c
    else:
      v = str(c["val_domain"])
      pairs[(a, d, s, k, v)] = pairs[(a, v, s, k, d)] = c
  out = []
  for (a, d, s), draws in singles.items():
    if method == "last":
      if 0 in draws:
        last = draws[0]["last"]
        out.append(
          {
            "algorithm": a,
            "held_out": d,
            "seed": s,
            "sample": 0,
            "step": int(last["step"]),
            "val_acc": None,
            "test_acc": float(last["test_acc"]),
          }
        )
      continue
    others = [v for v in domains if v != d]
    best = None
    for k in sorted(draws):
      runs = {v: pairs[(a, d, s, k, v)] for v in others if (a, d, s, k, v) in pairs}
      r = _run_acc(method, draws[k], d, runs, others)
      if r is not None and r["test_acc"] is not None and (best is None or r["val_acc"] > best["val_acc"]):
        best = {"algorithm": a, "held_out": d, "seed": s, "sample": k, **r}
    if best is not None:
      out.append(best)
  return out


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


def format_mean_se(values: Sequence[float]) -> str:
  """`'97.3 ± 0.3'` for accuracies in [0, 1] (shown in %): mean ± standard error as DomainBed's
  ``collect_results.format_mean`` (``100 * std(ddof=0) / sqrt(n)``); the mean alone for one value; '–' for none."""
  if len(values) == 0:
    return "–"
  pct = 100.0 * np.asarray(values, np.float64)
  if len(pct) == 1:
    return f"{pct[0]:.1f}"
  return f"{pct.mean():.1f} ± {pct.std() / np.sqrt(len(pct)):.1f}"


def summarize(
  cells: Sequence[Any],
  selection: str = "selected",
  expected: Sequence[tuple[str, str, int]] | None = None,
  domains: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Per algorithm and held-out domain, the held-out accuracies of every seed, plus the per-seed averages.

  Args:
    cells: run results (`loop.CellResult` or their JSON dicts with algorithm, held_out, seed, `selected`, `last`
      and `evals`; with a search, several draws of each).
    selection: a key of `SELECTIONS` (`select` chooses one draw per algorithm, held-out domain and seed).
    domains: every domain of the dataset, for leave-one-domain-out (`select`).
    expected: the (algorithm, held-out domain, seed) runs the configuration asks for (`expected_runs`), when known:
      its algorithms and domains are rows and columns even without a finished run, so an average never covers
      fewer domains than configured.

  Returns:
    ``{"algorithms": [...], "domains": [...], "accuracy": {alg: {domain: {seed: acc}}},
    "average": {alg: {seed: acc}}, "seeds": {alg: {domain: n}}}`` (average only over seeds that have every
    domain; `seeds`: how many seeds each entry should have, 0 when not known).
  """
  cells = [_as_dict(c) for c in cells]
  chosen = select(cells, selection, domains)
  cells = [c for c in cells if c.get("val_domain") is None]
  expected = list(expected or [])
  algorithms = _ordered([a for a, _, _ in expected] + [c["algorithm"] for c in cells])
  domains = _ordered([d for _, d, _ in expected] + [str(c["held_out"]) for c in cells])
  accuracy: dict[str, dict[str, dict[int, float]]] = {a: {d: {} for d in domains} for a in algorithms}
  for c in chosen:
    accuracy[c["algorithm"]][c["held_out"]][int(c["seed"])] = float(c["test_acc"])
  average = {}
  for a in algorithms:
    seeds = set.intersection(*(set(accuracy[a][d]) for d in domains)) if domains else set()
    average[a] = {s: float(np.mean([accuracy[a][d][s] for d in domains])) for s in sorted(seeds)}
  wanted = {a: {d: sum(1 for e in expected if e[:2] == (a, d)) for d in domains} for a in algorithms}
  return {"algorithms": algorithms, "domains": domains, "accuracy": accuracy, "average": average, "seeds": wanted}


def _entry(values: Sequence[float], wanted: int) -> str:
  """`format_mean_se`, marked `(k/n seeds)` when fewer than the `wanted` n seeds finished."""
  text = format_mean_se(values)
  return f"{text} ({len(values)}/{wanted} seeds)" if values and len(values) < wanted else text


def results_table(
  cells: Sequence[Any],
  selection: str = "selected",
  expected: Sequence[tuple[str, str, int]] | None = None,
  domains: Sequence[str] | None = None,
) -> str:
  """A Markdown table: rows algorithms, columns held-out domains + Avg, cells mean ± s.e. (%) over seeds of the
  draw `selection` chose (`select`).

  With `expected` (see `summarize`), an entry with fewer seeds than configured says so, and an algorithm or domain
  without any finished run shows –.
  """
  s = summarize(cells, selection, expected, domains)
  header = ["Algorithm"] + [str(d) for d in s["domains"]] + ["Avg"]
  rows = []
  for a in s["algorithms"]:
    row = [_display(a)]
    row += [_entry(list(s["accuracy"][a][d].values()), s["seeds"][a][d]) for d in s["domains"]]
    row.append(_entry(list(s["average"][a].values()), max(s["seeds"][a].values(), default=0)))
    rows.append(row)
  return "\n".join(markdown_table(header, rows, align=":-:"))


def expected_runs(config: dict[str, Any] | None, data: dict[str, Any] | None) -> list[tuple] | None:
  """The (algorithm, held-out domain, seed) runs `config` asks for, in training order; None when not known.

  Owns what "complete" means for a report: the configuration's algorithms x held-out domains (every domain of
  `data` — data.json — when `held_out` is None) x seeds; for a merged report (`merge_runs`), every source's, with
  its suffix. None without a configuration, or with held_out None and no domains in `data`.
  """
  if not config:
    return None
  if "merged" in config:
    out = []
    for source in config["merged"]:
      directory, _, suffix = source.partition("=")
      runs = expected_runs((config.get("runs") or {}).get(directory), ((data or {}).get("runs") or {}).get(directory))
      if runs is None:
        return None
      out += [(a + suffix, d, s) for a, d, s in runs]
    return out
  domains = config.get("held_out") or list((data or {}).get("domains") or [])
  if not domains or not config.get("algorithms") or not config.get("seeds"):
    return None
  return [(a, str(d), int(s)) for s in config["seeds"] for d in domains for a in config["algorithms"]]


def missing_runs(cells: Sequence[Any], expected: Sequence[tuple] | None) -> list[tuple]:
  """The runs of `expected` that `cells` lacks (none when `expected` is None)."""
  have = {(c["algorithm"], str(c["held_out"]), int(c["seed"])) for c in map(_as_dict, cells) if _primary(c)}
  return [e for e in expected or [] if e not in have]


def chosen_table(cells: Sequence[Any], selection: str, domains: Sequence[str] | None = None) -> str:
  """Which draw `selection` chose, as a Markdown table: rows algorithms, columns held-out domains, each entry the
  chosen draw of every trial seed (``seed: draw @ step``); draw 0 is the defaults (results.json has each draw's
  values: its cells' "hparams")."""
  chosen = select(cells, selection, domains)
  algorithms = _ordered(c["algorithm"] for c in chosen)
  held = _ordered(c["held_out"] for c in chosen)
  rows = []
  for a in algorithms:
    row = [_display(a)]
    for d in held:
      picks = sorted((c["seed"], c["sample"], c["step"]) for c in chosen if (c["algorithm"], c["held_out"]) == (a, d))
      row.append(", ".join(f"{s}: {k} @ {t}" for s, k, t in picks) or "–")
    rows.append(row)
  return "\n".join(markdown_table(["Algorithm", *held], rows, align=":-:"))


def _missing_note(missing: Sequence[tuple], expected: Sequence[tuple]) -> str:
  """The line that says a report is incomplete, and which runs it lacks."""
  shown = ", ".join(f"{a} held-out {d} seed {s}" for a, d, s in missing[:12])
  more = f" and {len(missing) - 12} more (all in results.json)" if len(missing) > 12 else ""
  return (
    f"**Incomplete: {len(missing)} of the {len(expected)} runs configured have no result** (interrupted, "
    f"failed or not started): {shown}{more}. An entry with fewer seeds than configured says k/n seeds; Avg "
    "averages only the seeds that have every held-out domain (– when none has)."
  )


def _seed_note(cells: Sequence[dict[str, Any]]) -> str:
  seeds = sorted({int(c["seed"]) for c in cells})
  if not seeds:
    return "No run has finished yet"
  if len(seeds) == 1:
    return f"1 seed ({seeds[0]}): no standard error"
  return f"mean ± standard error over {len(seeds)} trial seeds ({', '.join(map(str, seeds))})"


# Settings that decide which data a run saw: runs that differ in one of them are not merged.
_SAME_DATA = (
  "dataset",
  "image_size",
  "holdout_fraction",
  "hard_domain",
  "hard_domain_fraction",
  "hard_domain_label_noise",
)


# Settings that describe the run as a whole, not one row.
_NOT_ROW = {"algorithms", "held_out", "seeds", "eval_batch_size", "data_dir", "cache_dir"} | set(_SAME_DATA)


class BadResults(ValueError):
  """A run directory's results.json (or data.json) that cannot be read; the one-line message names the file."""


_CELL_KEYS = ("algorithm", "held_out", "seed", "steps", "selected", "last", "directory")


def load_results(directory: str) -> dict[str, Any]:
  """The saved results.json of a run directory, checked: a dict whose "cells" are run results.

  Raises:
    BadResults: naming the file and what is wrong with it: no such directory, no results.json, a results.json that
      is a directory, empty, not JSON (truncated?) or not a disam-train results file.
  """
  path = os.path.join(directory, "results.json")
  if not os.path.isdir(directory):
    raise BadResults(
      f"{directory}: {'a file' if os.path.exists(directory) else 'no such directory'}, not a run directory"
    )
  if os.path.isdir(path):
    raise BadResults(f"{path} is a directory, not a results file")
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except FileNotFoundError:
    raise BadResults(
      f"{directory} has no results.json (not a disam-train run directory, or no run has started)"
    ) from None
  except OSError as e:
    raise BadResults(f"{path}: cannot read it: {e.strerror}") from None
  try:
    saved = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadResults(
      f"{path} is empty"
      if not text.strip()
      else f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}: truncated?)"
    ) from None
  cells = saved.get("cells") if isinstance(saved, dict) else None
  if not isinstance(cells, list):
    raise BadResults(f'{path} is not a disam-train results file (no list of "cells")')
  for k, c in enumerate(cells):
    lacking = [key for key in _CELL_KEYS if not isinstance(c, dict) or key not in c]
    if lacking or not all(isinstance(c[key], dict) and "test_acc" in c[key] for key in ("selected", "last")):
      raise BadResults(f"{path}: run {k} of its cells is not a run result (lacks {lacking or 'test_acc'})")
  return saved


def _flat(config: dict[str, Any] | None) -> dict[str, Any]:
  """A run's configuration with its hyperparameters at the top level."""
  if not config:
    return {}
  out = {k: v for k, v in config.items() if k != "hparams"}
  out.update(config.get("hparams") or {})
  return out


def _row_config(flat: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in flat.items() if k not in _NOT_ROW and not (k == "model_kwargs" and not v)}


def row_settings(cells: Sequence[Any], config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
  """Per row (algorithm), the settings it was trained with: model, steps, optimizer and algorithm hyperparameters.

  For a merged report (`merge_runs`), each row's settings are those of the run directory it came from (``"run"``).
  """
  cells = [_as_dict(c) for c in cells]
  if config is not None and hasattr(config, "to_json"):
    config = config.to_json()
  out = {}
  for c in cells:
    if c["algorithm"] in out:
      continue
    if config and "merged" in config:
      source = c.get("source")
      out[c["algorithm"]] = {"run": source, **_row_config(_flat((config.get("runs") or {}).get(source)))}
    else:
      out[c["algorithm"]] = _row_config(_flat(config))
    out[c["algorithm"]].setdefault("steps", int(c["steps"]))
  return out


def _value(v: Any) -> str:
  return "–" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))


def _settings_table(rows: dict[str, dict[str, Any]]) -> str:
  keys = _ordered(k for settings in rows.values() for k in settings)
  lines = markdown_table(
    ["Algorithm", *keys],
    ([_display(a), *(_value(settings.get(k)) for k in keys)] for a, settings in rows.items()),
    align=":-:",
  )
  return "\n".join(lines)


def _data_lines(data: dict[str, Any] | None) -> list[str]:
  """What the data layer warned about (`data.json` of each run), counted."""
  if not data:
    return []
  sources = data.get("runs") if "runs" in data else {None: data}
  lines = []
  for source, summary in sources.items():
    where = f" (`{source}`)" if source is not None else ""
    unreadable = list(summary.get("unreadable_files") or [])
    other = list(summary.get("warnings") or [])
    if not unreadable and not other:
      lines.append(f"Data{where}: no warnings.")
      continue
    parts = []
    if unreadable:
      shown = ", ".join(unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
      parts.append(f"{len(unreadable)} unreadable image file(s) skipped ({shown})")
    if other:
      parts.append(f"{len(other)} other warning(s): " + "; ".join(other))
    lines.append(f"Data{where}: " + "; ".join(parts) + ".")
  return lines


def results_markdown(
  cells: Sequence[Any], config: dict[str, Any] | None = None, data: dict[str, Any] | None = None
) -> str:
  """Both tables (training-domain validation and last checkpoint) as one Markdown document.

  The header gives the run's settings (for a merged report: the runs merged, the settings that differ between them,
  and a table of every row's settings) and the data warnings (`data`, as `data.json`).
  """
  cells = [_as_dict(c) for c in cells]
  if config is not None and hasattr(config, "to_json"):
    config = config.to_json()
  title = "# Held-out accuracy (%)"
  settings = ""
  if config and "merged" in config:
    title += "\n\nRuns merged from " + ", ".join(f"`{d}`" for d in config["merged"]) + "."
    differences = config.get("differences") or {}
    if differences:
      title += (
        "\nSettings that differ between them: "
        + "; ".join(
          f"{key} (" + ", ".join(f"`{run}`: {_value(v)}" for run, v in values.items()) + ")"
          for key, values in differences.items()
        )
        + "."
      )
    settings = "\n## Settings of each row\n\n" + _settings_table(row_settings(cells, config)) + "\n"
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
  data_lines = _data_lines(data)
  parts = [title, ""] + ([*data_lines, ""] if data_lines else [])
  expected = expected_runs(config, data)
  missing = missing_runs(cells, expected)
  if missing:
    parts += [_missing_note(missing, expected), ""]
  search = _search_missing(cells, config, data)
  if search:
    parts += [search, ""]
  domains = _domains(data)
  searched = any(not _primary(c) and c.get("val_domain") is None for c in cells)
  primary = [c for c in cells if _primary(c)]
  for key, name in SELECTIONS:
    parts += [f"## Model selection: {name}", "", _METHOD_NOTES[key] + " " + _seed_note(primary) + ".", ""]
    if key == "leave_one_out" and not any(c.get("val_domain") is not None for c in cells):
      parts += ["No leave-one-domain-out runs (train with `--leave-one-domain-out`).", ""]
    parts += [results_table(cells, key, expected, domains), ""]
    if searched and key != "last":
      parts += [
        "Draw chosen (trial seed: draw @ step; draw 0 = the defaults):",
        "",
        chosen_table(cells, key, domains),
        "",
      ]
  return "\n".join(parts) + settings


_METHOD_NOTES = {
  "selected": "Per draw, the checkpoint with the best mean accuracy on the training domains' held-back 20%; then the "
  "draw with the best such accuracy.",
  "leave_one_out": "Per draw and checkpoint, the mean over the other domains v of v's 80% accuracy in the run that "
  "also held out v; the best checkpoint, then the best draw.",
  "oracle": "Per draw, the last checkpoint, scored on the held-out domain's 20%; the best draw.",
  "last": "The last checkpoint of draw 0 (the defaults), no selection.",
}


def _domains(data: dict[str, Any] | None) -> list[str] | None:
  """Every domain of the dataset (data.json's "domains"), None when not known (a merged report: from the cells)."""
  domains = (data or {}).get("domains")
  return [str(d) for d in domains] if domains else None


def planned_runs(config: dict[str, Any] | None, data: dict[str, Any] | None) -> list[tuple] | None:
  """Every run of a search or leave-one-domain-out experiment, ``(algorithm, held-out, seed, draw, val domain or
  None)``, as `experiment.planned_runs` trains them; None without one (or when not known)."""
  if (
    not config
    or "merged" in config
    or (int(config.get("hparams_samples") or 1) == 1 and not config.get("leave_one_out"))
  ):
    return None
  domains = _domains(data)
  held = [str(d) for d in (config.get("held_out") or domains or [])]
  if not domains or not held:
    return None
  sets = [(d, None) for d in held]
  if config.get("leave_one_out"):
    pairs = {tuple(sorted((t, v), key=domains.index)) for t in held for v in domains if v != t}
    sets += sorted(pairs, key=lambda p: (domains.index(p[0]), domains.index(p[1])))
  return [
    (a, d, int(s), k, v)
    for s in config["seeds"]
    for d, v in sets
    for k in range(int(config.get("hparams_samples") or 1))
    for a in config["algorithms"]
  ]


def _search_missing(cells: Sequence[dict[str, Any]], config: dict[str, Any] | None, data: dict[str, Any] | None) -> str:
  """The line saying how many runs of the search (other draws, leave-one-domain-out runs) have no result yet."""
  planned = planned_runs(config, data)
  if not planned:
    return ""
  have = {
    (c["algorithm"], str(c["held_out"]), int(c["seed"]), int(c.get("sample") or 0), c.get("val_domain")) for c in cells
  }
  missing = [p for p in planned if p not in have]
  if not missing:
    return f"Search: all {len(planned)} runs finished."
  return (
    f"**Search incomplete: {len(missing)} of its {len(planned)} runs have no result** (resume with "
    "`--resume`); each selection chooses among the draws that finished."
  )


def _data_summary(run_dir: str) -> dict[str, Any] | None:
  """The run's data.json, None if it has none; BadResults naming it if it is unreadable."""
  path = os.path.join(run_dir, "data.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, errors="replace") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise BadResults(
      f"{path} is unreadable ({' '.join(str(e).split())[:100]}): delete it to report without the data warnings"
    ) from None


def _warning_count(data: dict[str, Any] | None) -> int | None:
  if not data:
    return None
  sources = data["runs"].values() if "runs" in data else [data]
  return sum(len(s.get("unreadable_files") or []) + len(s.get("warnings") or []) for s in sources)


def write_results(
  run_dir: str,
  cells: Sequence[Any],
  config: Any = None,
  *,
  data: dict[str, Any] | None = None,
  out_dir: str | None = None,
) -> None:
  """Writes `results.json` (every run's result, each row's settings, the data warnings and the table numbers) and
  `results.md` into `out_dir` (default `run_dir`), each atomically. `data` defaults to `run_dir/data.json`."""
  cells = [_as_dict(c) for c in cells]
  if config is not None and hasattr(config, "to_json"):
    config = config.to_json()
  if data is None:
    data = _data_summary(run_dir)
  out_dir = out_dir or run_dir
  expected = expected_runs(config, data)
  tables, selections = {}, {}
  domains = _domains(data)
  for key, _ in SELECTIONS:
    s = summarize(cells, key, expected, domains)
    tables[key] = {
      a: {
        **{d: _stats(list(s["accuracy"][a][d].values())) for d in s["domains"]},
        "Avg": _stats(list(s["average"][a].values())),
      }
      for a in s["algorithms"]
    }
    selections[key] = select(cells, key, domains)
  saved = {
    "config": config,
    "rows": row_settings(cells, config),
    "data": data,
    "data_warnings": _warning_count(data),
    "tables": tables,
    "selections": selections,
    "cells": cells,
    "runs_configured": None if expected is None else len(expected),
    "missing": [{"algorithm": a, "held_out": d, "seed": seed} for a, d, seed in missing_runs(cells, expected)],
  }
  write_atomic(os.path.join(out_dir, "results.json"), json.dumps(saved, indent=1))
  write_atomic(os.path.join(out_dir, "results.md"), results_markdown(cells, config, data))


def _stats(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {
    "mean": float(v.mean()) if len(v) else None,
    "std": float(v.std(ddof=1)) if len(v) > 1 else None,
    "se": float(v.std() / np.sqrt(len(v))) if len(v) > 1 else None,  # DomainBed's, as the tables show
    "n": int(len(v)),
  }
