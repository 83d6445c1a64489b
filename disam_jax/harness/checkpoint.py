"""Checkpoints of a training run with orbax: the latest and the best, enough to resume bit for bit.

A checkpoint is one orbax step directory holding two items:

* ``state``: the leaves of the training state pytree (parameters, model state with BatchNorm statistics and dropout
  RNG keys, optimizer state, step), as a list of arrays in `jax.tree.leaves` order. PRNG key arrays are stored as
  their raw key data and re-wrapped on restore. Storing leaves rather than the pytree keeps the format independent
  of how Flax and optax register their containers; the caller restores into a template state of the same structure
  (the freshly initialized state of the same configuration), and a mismatch is reported, not silently reshaped.
* ``meta``: JSON: the step, the `DomainBatchSampler` state (NumPy bit generator), model-selection bookkeeping and
  anything else the loop needs to continue exactly where it stopped.

`CheckpointStore` keeps two checkpoints at most: the latest and the one with the best validation accuracy (one
directory when they coincide). Saves are asynchronous (orbax writes in a background thread while training
continues); `close()` waits for them. A checkpoint is only visible once completely written, so a run killed
mid-save resumes from the previous one.

Faults (docs/harness.md, "Faults"): the temporary folder of a save killed in flight is removed when the store is
opened again; `meta` records a CRC-32 of every array and of itself, so a checkpoint whose files were truncated,
removed or overwritten is detected on restore (orbax restores overwritten data files silently) and
`restore_latest` falls back to the previous one, saying so; a save that fails (disk full, read-only) raises one
`CheckpointError` line and never deletes the previous checkpoint; SIGINT and SIGTERM wait until an orbax call is
done (`deferred_signals`), so an interrupt never leaves a save half-abandoned or orbax printing tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import zlib
from typing import Any, Optional

import jax
import numpy as np

__all__ = ["CheckpointError", "CheckpointStore", "UnreadableCheckpoint", "deferred_signals", "state_from_leaves",
           "state_to_leaves", "write_json"]


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read. The message is one line naming the directory and the reason."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint's files are missing, truncated or overwritten (not a failure to write)."""


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` through a temporary file in the same folder and a rename: a kill or a full disk
  leaves the previous file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def deferred_signals():
  """Holds SIGINT and SIGTERM until the block is done, then delivers them to the handlers that were installed.

  Owns the guarantee that an interrupt never lands inside an orbax call: there orbax logs a traceback, forgets the
  step being written and returns while its background thread still writes, which then fails at interpreter
  shutdown ("cannot schedule new futures after shutdown"). Outside the main thread (where handlers cannot be
  installed) the block runs as is.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  held: list[int] = []
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  for s in previous:
    signal.signal(s, lambda signum, frame: held.append(signum))
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    if held:
      handler = previous[held[0]]
      if callable(handler):
        handler(held[0], None)
      elif handler == signal.SIG_DFL:
        signal.raise_signal(held[0])


class _QuietOrbax(logging.Filter):
  """Drops orbax's error records (tracebacks of failures `CheckpointStore` re-raises as one `CheckpointError`),
  keeping the last exception they carry: orbax logs, and does not raise, a background write that failed."""

  last: Optional[BaseException] = None

  def filter(self, record: logging.LogRecord) -> bool:
    orbax = f"{os.sep}orbax{os.sep}"
    # asyncio's "Task exception was never retrieved" of orbax's write tasks comes from asyncio, naming orbax's code
    if record.levelno >= logging.ERROR and (orbax in record.pathname or orbax in record.getMessage()):
      if record.exc_info and record.exc_info[1] is not None:
        _QuietOrbax.last = record.exc_info[1]
      return False
    return True


def _quiet_abandoned_callbacks() -> None:
  """Drops, from `sys.unraisablehook`, the RuntimeError("Event loop is closed") of tensorstore callbacks that
  finish after orbax has given up on a read (a corrupt checkpoint: the first failed read closes orbax's event loop,
  the others then print one traceback each, at any time until exit). Everything else goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_disam_quiet", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  hook._disam_quiet = True
  sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
  """One line saying why an orbax/tensorstore call failed: the OS error when there is one, else the message."""
  text = " ".join(str(e).split())
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror} (errno {e.errno})"
  return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _checksums(leaves: list[np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
  """CRC-32 of every array's bytes and of the JSON of `meta`: what `CheckpointStore.restore` verifies."""
  crc = [zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)) for x in leaves]
  return {"leaves": crc, "meta": zlib.crc32(json.dumps(meta, sort_keys=True).encode())}


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_to_leaves(state: Any) -> list[np.ndarray]:
  """The leaves of `state` as host NumPy arrays (PRNG keys as their key data)."""
  leaves = jax.tree.leaves(state)
  return [np.asarray(jax.device_get(jax.random.key_data(x) if _is_key(x) else x)) for x in leaves]


def state_from_leaves(leaves: list[Any], template: Any) -> Any:
  """Rebuilds a pytree shaped like `template` from `state_to_leaves` output (exact values, template dtypes)."""
  template_leaves, treedef = jax.tree.flatten(template)
  if len(leaves) != len(template_leaves):
    raise ValueError(
      f"Checkpoint holds {len(leaves)} arrays but this configuration's training state has {len(template_leaves)}: "
      "it was written by a different model, algorithm or optimizer."
    )
  out = []
  for i, (saved, like) in enumerate(zip(leaves, template_leaves)):
    saved = np.asarray(saved)
    if _is_key(like):
      expected = jax.random.key_data(like).shape
      if saved.shape != expected:
        raise ValueError(f"Checkpoint array {i}: PRNG key data of shape {saved.shape}, expected {expected}.")
      out.append(jax.random.wrap_key_data(saved, impl=jax.random.key_impl(like)))
      continue
    if saved.shape != np.shape(like):
      raise ValueError(
        f"Checkpoint array {i} has shape {saved.shape} but the training state expects {np.shape(like)}: "
        "it was written by a different model or configuration."
      )
    out.append(jax.numpy.asarray(saved, dtype=like.dtype))
  return jax.tree.unflatten(treedef, out)


class CheckpointStore:
  """The latest and the best checkpoint of one training run, under `directory` (orbax step folders).

  Args:
    directory: where the step folders go (created if missing).
    asynchronous: write in a background thread (default); `close()` waits for pending writes.

  Every orbax call runs under `deferred_signals`; orbax failures are raised as `CheckpointError`.
  """

  def __init__(self, directory: str, *, asynchronous: bool = True):
    import orbax.checkpoint as ocp  # imported here: only training needs orbax

    # orbax logs every save at INFO through absl; the harness reports progress itself, and failures as one line.
    absl = logging.getLogger("absl")
    absl.setLevel(logging.WARNING)
    for log in (absl, logging.getLogger("asyncio")):
      if not any(isinstance(f, _QuietOrbax) for f in log.filters):
        log.addFilter(_QuietOrbax())
    _quiet_abandoned_callbacks()
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self._pending: Optional[int] = None  # the step of a save that may still be in flight
    self._failed = False  # a CheckpointError was raised: `close` then adds no second one
    with deferred_signals(), self._failure("open the checkpoints"):
      self._remove_temporary()  # of a save killed in flight: never a checkpoint, and it may be large
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                             enable_async_checkpointing=asynchronous),
      )

  @contextlib.contextmanager
  def _failure(self, what: str, error: type = CheckpointError):
    """Raises orbax's errors inside the block as one `error` line saying what failed and what is kept."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # orbax and tensorstore raise ValueError, OSError, RuntimeError... for I/O failures
      self._failed = self._failed or error is CheckpointError
      steps = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit()) if os.path.isdir(self.directory) \
        else []
      kept = f"; the checkpoint of step {steps[-1]} is kept" if steps and error is CheckpointError else ""
      raise error(f"could not {what} in {self.directory}: {_reason(e)}{kept}") from None

  def _wait(self) -> None:
    """Waits for the save in flight; CheckpointError if it failed (its temporary folder is removed)."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      with self._failure(f"write the checkpoint of step {step}"):
        self._manager.wait_until_finished()
        if not os.path.isdir(os.path.join(self.directory, str(step))):
          raise _QuietOrbax.last or OSError(f"orbax did not finalize step {step}")
    except CheckpointError:
      self._remove_temporary(step)  # free the space the failed save took
      raise

  def _remove_temporary(self, step: Optional[int] = None) -> None:
    """Removes orbax's temporary folders of unfinished saves (of `step`, or all); only process 0, which writes them
    (another process opening its store late must not remove a folder process 0 is writing)."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if ".orbax-checkpoint-tmp" in name and (step is None or name.startswith(f"{step}.")):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any], *, keep: tuple[int, ...] = ()) -> None:
    """Writes the checkpoint of `step`, then deletes every other checkpoint except the steps in `keep`.

    Args:
      step: the training step the state is at.
      state: the training state pytree.
      meta: JSON-serializable dictionary.
      keep: older steps to keep (the best one).

    Raises:
      CheckpointError: this save or the one before failed (disk full, read-only directory...); no older checkpoint
        has been deleted.
    """
    ocp = self._ocp
    leaves = state_to_leaves(state)
    meta = {**meta, "checksums": _checksums(leaves, meta)}
    with deferred_signals():
      # Deleting needs the previous asynchronous write to have finished; by now it almost always has.
      self._wait()
      with self._failure(f"write the checkpoint of step {step}"):
        if step in self._manager.all_steps():  # re-saving a step (e.g. a resumed run's last eval): replace it
          self._manager.delete(step)
        _QuietOrbax.last = None
        try:
          self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
        except BaseException:
          self._remove_temporary(step)
          raise
        self._pending = step
      for old in self._manager.all_steps():
        if old != step and old not in keep:
          self._wait()  # the new checkpoint is complete before an older one goes
          with self._failure(f"delete the checkpoint of step {old}"):
            self._manager.delete(old)

  def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """Returns `(state, meta)` of the checkpoint at `step`; `template` gives the state's structure and dtypes.

    Raises:
      FileNotFoundError: no checkpoint of `step`.
      UnreadableCheckpoint: its files are unreadable, missing, or do not match the checksums written with them.
      ValueError: the checkpoint is of another configuration (`state_from_leaves`).
    """
    ocp = self._ocp
    with deferred_signals():
      self._wait()
      if step not in self._manager.all_steps():
        raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory} (steps: {self.steps()}).")
      target = [np.zeros(np.shape(x), np.asarray(x).dtype) for x in state_to_leaves(template)]
      with self._failure(f"read the checkpoint of step {step}", UnreadableCheckpoint):
        restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
    leaves, meta = [np.asarray(x) for x in restored["state"]], dict(restored["meta"] or {})
    stored = meta.pop("checksums", None)  # absent in checkpoints written before checksums were
    if stored is not None and stored != _checksums(leaves, meta):
      raise UnreadableCheckpoint(f"the checkpoint of step {step} in {self.directory} does not match its checksums: "
                                 "its files were truncated or overwritten")
    return state_from_leaves(leaves, template), meta

  def restore_latest(self, template: Any) -> Optional[tuple[int, Any, dict[str, Any], list[str]]]:
    """`(step, state, meta, notes)` of the latest readable checkpoint, None if there is none at all.

    A checkpoint that cannot be read (`UnreadableCheckpoint`) is skipped for the one before it; `notes` says which
    and why, for the caller to show.

    Raises:
      UnreadableCheckpoint: there are checkpoints but none is readable (the message lists each one's reason).
    """
    notes = []
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, template)
        return step, state, meta, notes
      except UnreadableCheckpoint as e:
        notes.append(str(e))
    if notes:
      raise UnreadableCheckpoint(f"no readable checkpoint in {self.directory}: " + "; ".join(notes))
    return None

  def close(self) -> None:
    """Waits for pending writes and releases the manager.

    Raises:
      CheckpointError: the last save or the release failed, unless a failure was raised before (that first one is
        what to report: after a full disk, orbax's own release fails too).
    """
    errors, earlier = [], self._failed
    with deferred_signals():
      for step in (self._wait, self._manager.close):
        try:
          with self._failure("close the checkpoints"):
            step()
        except CheckpointError as e:
          errors.append(e)
    if errors and not earlier:
      raise errors[0]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
