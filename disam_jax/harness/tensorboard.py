"""TensorBoard event files of a run (`disam-train --tensorboard`): each run's metrics.jsonl lines as scalars.

Owns the mapping of a metrics.jsonl line to TensorBoard scalar tags (`scalars`), the writer of one run's events
(`CellWriter`, fed the lines `run_cell` already produces: no extra device-to-host reads) and the rule that keeps a
resumed run's events free of duplicated steps. The events are written with tensorboardX (`pip install
'disam_jax[tensorboard]'`: pure Python, numpy and protobuf; no TensorFlow), imported only when a writer is made.

Every run (cell) writes into its own directory, `cells/<algorithm>_heldout-<domain>_seed-<seed>/`, so
`tensorboard --logdir RUN_DIR` shows one curve per run. The events are a view of that directory's metrics.jsonl:
on a run's first step in this process (a fresh run's step 1, or a resumed run's first step after its checkpoint)
the run's older event files are deleted and the metrics lines before that step are written again, so a resumed
run has each step once, as its metrics.jsonl has.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
  "CellWriter",
  "EVENTS_GLOB",
  "cell_events",
  "has_events",
  "require",
  "run_has_events",
  "scalars",
  "wanted",
  "write_cell",
]


EVENTS_GLOB = "events.out.tfevents.*"

# Written every this many seconds while a run trains (and when it ends), so a TensorBoard open on the run
# directory follows it.
_FLUSH_SECONDS = 10

_MISSING = (
  "TensorBoard event files need the tensorboardX package (pure Python, no TensorFlow): "
  "pip install 'disam_jax[tensorboard]'"
)


def require() -> Any:
  """The `tensorboardX` module; ImportError naming the extra to install when it is missing."""
  try:
    import tensorboardX
  except ImportError:
    raise ImportError(_MISSING) from None
  return tensorboardX


def has_events(directory: str) -> bool:
  """Whether a run's directory holds TensorBoard event files."""
  return bool(glob.glob(os.path.join(glob.escape(directory), EVENTS_GLOB)))


def run_has_events(run_dir: str) -> bool:
  """Whether any run of the run directory `run_dir` has TensorBoard event files (it was trained with them)."""
  return bool(glob.glob(os.path.join(glob.escape(run_dir), "cells", "*", EVENTS_GLOB)))


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def scalars(line: dict[str, Any]) -> dict[str, float]:
  """The scalars of a metrics.jsonl line by TensorBoard tag.

  A number `key` is `train/<key>` (`train/loss`, `train/variance`, `train/perturbation_norm`, `train/grad_norm`,
  `train/sam_cosine`, `train/penalty`, `train/objective`), a per-domain value `<key>/<domain>`
  (`domain_losses/<d>`, `perturbation_weights/<d>`: DISAM's c_i), and an evaluation's accuracies
  `val_acc/<training domain>`, `eval/val_acc_mean` and `test_acc/<held-out domain>`. `step` and `time` are the
  event's step and wall time instead; a missing value (`sam_cosine` null without --diagnostics) has no scalar.
  """
  out = {}

  def add(prefix: str, items: Iterator[tuple[str, Any]], skip=()):
    for key, value in items:
      if key in skip:
        continue
      if isinstance(value, dict):
        for name, v in value.items():
          if (v := _number(v)) is not None:
            out[f"{key}/{name}"] = v
      elif (v := _number(value)) is not None:
        out[f"{prefix}/{key}"] = v

  add("train", line.items(), skip=("step", "time", "eval"))
  add("eval", (line.get("eval") or {}).items())
  return out


def _read_lines(path: str, before: int | None = None) -> list[dict[str, Any]]:
  """The metrics lines of `path` (steps below `before`, if given), up to the first unreadable one."""
  lines = []
  if not os.path.exists(path):
    return lines
  with open(path, errors="replace") as f:
    for text in f:
      try:
        line = json.loads(text)
        step = int(line["step"])
      except (ValueError, KeyError, TypeError):
        break
      if before is not None and step >= before:
        break
      lines.append(line)
  return lines


class CellWriter:
  """The event file of one run, fed the run's metrics lines.

  `hook(on_step)` wraps `run_cell`'s `on_step(step, line)`: each line is written as one event of the step, then
  `on_step` is called. On the first line, the run's older event files are deleted and the metrics.jsonl lines
  before it written again (a resumed run: every step once). `finish()` after the run, `close()` in any case.
  """

  def __init__(self, directory: str):
    require()
    from tensorboardX import FileWriter
    from tensorboardX.proto.summary_pb2 import Summary

    self.directory = directory
    self._file_writer, self._summary = FileWriter, Summary
    self._writer = None

  def _open(self, first_step: int) -> None:
    lines = _read_lines(os.path.join(self.directory, "metrics.jsonl"), before=first_step)
    for path in glob.glob(os.path.join(glob.escape(self.directory), EVENTS_GLOB)):
      os.remove(path)
    self._writer = self._file_writer(self.directory, flush_secs=_FLUSH_SECONDS)
    for line in lines:
      self._add(int(line["step"]), line)

  def _add(self, step: int, line: dict[str, Any]) -> None:
    values = scalars(line)
    if values:
      summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
      self._writer.add_summary(summary, global_step=step)

  def write(self, step: int, line: dict[str, Any]) -> None:
    """Writes the metrics line of `step`."""
    if self._writer is None:
      self._open(step)
    self._add(step, line)

  def hook(self, on_step: Callable[[int, dict[str, Any]], None] | None) -> Callable[[int, dict[str, Any]], None]:
    """`on_step` (may be None) with every line written first."""

    def step_hook(step: int, line: dict[str, Any]) -> None:
      self.write(step, line)
      if on_step is not None:
        on_step(step, line)

    return step_hook

  def finish(self) -> None:
    """After a run: a run that trained no step here (it ended at its checkpoint, or had finished before) and has no
    event files gets them from its metrics.jsonl; then the file is closed."""
    if self._writer is None and not has_events(self.directory):
      self._open(first_step=2**62)
    self.close()

  def close(self) -> None:
    """Writes what is pending and closes the file, if one is open (also when a run was interrupted)."""
    if self._writer is not None:
      writer, self._writer = self._writer, None
      writer.close()


def write_cell(directory: str) -> None:
  """Writes the events of a finished run from its metrics.jsonl unless it has event files already (it was trained
  with them): `--resume --tensorboard` of runs that had finished without."""
  CellWriter(directory).finish()


class _NoEvents:
  """`cell_events` when TensorBoard is off: the hook unchanged."""

  def __call__(self, on_step):
    return on_step

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    return None


class _Events(_NoEvents):
  def __init__(self, directory: str):
    self._writer = CellWriter(directory)

  def __call__(self, on_step):
    return self._writer.hook(on_step)

  def __exit__(self, kind, *exc) -> None:
    if kind is None:
      self._writer.finish()
    else:
      self._writer.close()


def cell_events(directory: str, enabled: bool) -> _NoEvents:
  """`with cell_events(directory, enabled) as events: run_cell(..., on_step=events(on_step))`: the run's events
  written from its metrics lines (`CellWriter`), finished when the run ends and closed if it raises; nothing when
  not `enabled`."""
  return _Events(directory) if enabled else _NoEvents()


def wanted(flag: bool, run_dir: str, *, resume: bool) -> bool:
  """Whether `disam-train` writes events: with `--tensorboard`, and on `--resume` of a run that has event files
  (its runs keep them up to date; `disam-train --resume --output-dir DIR`, the command printed after an interruption,
  does not repeat the flag). ImportError naming the extra when they are wanted and tensorboardX is missing."""
  inherited = not flag and resume and run_has_events(run_dir)
  if flag or inherited:
    try:
      require()
    except ImportError as e:
      if inherited:
        raise ImportError(
          f"{run_dir} holds TensorBoard event files, which --resume keeps writing. {e} (or delete "
          f"its cells/*/{EVENTS_GLOB} files to resume without them)"
        ) from None
      raise ImportError(f"--tensorboard: {e}") from None
    return True
  return False
