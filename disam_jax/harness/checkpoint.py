"""Checkpoints of a training run with orbax: the latest and the best, enough to resume bit for bit, on any mesh.

A checkpoint is one orbax step directory holding two items:

* ``state``: the leaves of the training state pytree (parameters, model state with BatchNorm statistics and dropout
  RNG keys, optimizer state, step), as a list of `jax.Array`s in `jax.tree.leaves` order, saved where they are:
  each process writes the shards its devices hold (nothing is gathered to a host). PRNG key arrays are stored as
  their raw key data and re-wrapped on restore. The caller restores into a template state of the same structure
  (the freshly initialized, placed state of the same configuration): each array is read straight into the
  template's sharding, each process reading only its shards, whatever mesh or process count wrote it. A mismatch
  of structure or shapes is reported (from ``meta``'s layout, before any array is read), not silently reshaped.
* ``meta``: JSON: the step, the training feed's state (opaque JSON), model-selection bookkeeping, the arrays'
  layout and checksums.

`CheckpointStore` keeps the latest checkpoint and the one with the best validation accuracy (one directory when
they coincide) by orbax's own preservation policy. Saves are asynchronous: `save` returns once orbax has the state
off the devices; orbax writes in a background thread and, once the new checkpoint is complete, deletes the one it
no longer keeps, there too. The next `save`, `restore` or `close` waits for it. A checkpoint is only visible once
completely written, so a run killed mid-save resumes from the previous one.

Faults (docs/harness.md, "Faults"): the temporary folder of a save killed in flight is removed when the store is
opened again; `meta` records per array two uint32 digests computed on the devices that hold it (`_digest`: the
same however the array is sharded, nothing gathered) and a CRC-32 of itself, so a checkpoint whose files were
truncated, removed or overwritten, or hold other values, is detected on restore (orbax restores such files
silently) and `restore_latest` falls back to the previous one, saying so, on every process alike; a save that
fails (disk full, read-only) raises one `CheckpointError` line and never deletes the previous checkpoint; SIGINT
and SIGTERM wait until an orbax call is done (`deferred_signals`), so an interrupt never leaves a save
half-abandoned or orbax printing tracebacks.
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
from typing import Any

import jax
import numpy as np

from disam_jax.harness._atomic import write_atomic

__all__ = [
  "CheckpointError",
  "CheckpointStore",
  "UnreadableCheckpoint",
  "deferred_signals",
  "state_from_leaves",
  "state_to_leaves",
  "write_json",
]


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read. The message is one line naming the directory and the reason."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint's files are missing, truncated or overwritten (not a failure to write)."""


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON (``indent=1``) to `path` atomically (`_atomic.write_atomic`): a kill or a full disk leaves
  the previous file or the new one, never half of one."""
  write_atomic(path, json.dumps(obj, indent=1))


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

  last: BaseException | None = None

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


_GOLDEN = 0x9E3779B9


def _fmix32(h):
  """MurmurHash3's 32-bit finalizer (an invertible mix of uint32 words); jnp or np uint32 arrays alike."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _words(x):
  """The bits of array `x` as uint32 words: `x`'s shape, plus a trailing 2 for 64-bit types (inside jit)."""
  import jax.numpy as jnp

  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: [..., 2]


def _digest(x):
  """Two uint32 sums over the elements of `x`: `sum_i fmix(w_i ^ fmix(i ^ golden))` and the same of that mix mixed
  again, where `w_i` is the i-th uint32 word of `x` in row-major order (`_words`). Sums modulo 2^32 are exact in any
  order, so the digest is the same however `x` is sharded: each device sums its shard, XLA adds the partial sums;
  nothing is gathered. The position term makes a permutation of the values count (tests/test_checkpoint.py checks
  it against a NumPy transcription)."""
  import jax.numpy as jnp

  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):  # the row-major index, built per dimension: no reshape of a sharded array
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  h1 = _fmix32(w ^ _fmix32(index ^ jnp.uint32(_GOLDEN)))
  h2 = _fmix32(h1 ^ jnp.uint32(0x7F4A7C15))
  return jnp.stack([jnp.sum(h1, dtype=jnp.uint32), jnp.sum(h2, dtype=jnp.uint32)])


@jax.jit
def _digests_jit(leaves: list[jax.Array]) -> jax.Array:
  import jax.numpy as jnp

  return jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros([0, 2], jnp.uint32)


def _digests(leaves: list[jax.Array]) -> list[list[int]]:
  """`[[d1, d2], ...]`: each leaf's `_digest`, computed where the leaf lives (a replicated `[n, 2]` result: every
  process reads the same numbers from its own device)."""
  out = _digests_jit(list(leaves))
  if not out.is_fully_addressable:
    out = out.addressable_data(0)
  return np.asarray(out).tolist()


def _meta_crc(meta: dict[str, Any]) -> int:
  return zlib.crc32(json.dumps(meta, sort_keys=True).encode())


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_to_leaves(state: Any) -> list[jax.Array]:
  """The leaves of `state` as arrays where they are (PRNG keys as their key data): nothing is copied to the host,
  a sharded leaf stays sharded."""
  import jax.numpy as jnp

  return [
    jax.random.key_data(x) if _is_key(x) else x if isinstance(x, jax.Array) else jnp.asarray(x)
    for x in jax.tree.leaves(state)
  ]


def _describe(leaves: list[Any]) -> list[list[Any]]:
  """`[[shape, dtype name], ...]`, recorded in `meta` to refuse a checkpoint of another configuration up front."""
  return [[list(np.shape(x)), np.dtype(x.dtype).name] for x in leaves]


def _check_fits(layout: list[list[Any]], template_leaves: list[Any]) -> None:
  """ValueError naming the first leaf of `layout` (a checkpoint's `_describe`) that `template_leaves` does not fit."""
  if len(layout) != len(template_leaves):
    raise ValueError(
      f"Checkpoint holds {len(layout)} arrays but this configuration's training state has {len(template_leaves)}: "
      "it was written by a different model, algorithm or optimizer."
    )
  for i, ((shape, _), like) in enumerate(zip(layout, template_leaves)):
    expected = list(_stored_shape(like))
    if list(shape) != expected:
      what = "PRNG key data" if _is_key(template_leaves[i]) else "shape"
      raise ValueError(
        f"Checkpoint array {i} has {what} {tuple(shape)} but the training state expects {tuple(expected)}: "
        "it was written by a different model or configuration."
      )


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape `state_to_leaves` stores a template leaf as (a PRNG key's key data has trailing dimensions)."""
  return jax.eval_shape(jax.random.key_data, leaf).shape if _is_key(leaf) else np.shape(leaf)


def _target(leaf: Any) -> jax.ShapeDtypeStruct:
  """The abstract restore target of one template leaf (as `state_to_leaves` stores it), with the leaf's sharding:
  orbax reads into it only the shards this process's devices hold."""
  stored = jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(np.shape(stored), stored.dtype, sharding=sharding)


def state_from_leaves(leaves: list[Any], template: Any) -> Any:
  """Rebuilds a pytree shaped like `template` from `state_to_leaves` output (exact values, template dtypes; arrays
  stay where they are)."""
  import jax.numpy as jnp

  template_leaves, treedef = jax.tree.flatten(template)
  _check_fits([[list(np.shape(x)), None] for x in leaves], template_leaves)
  out = []
  for saved, like in zip(leaves, template_leaves):
    if _is_key(like):
      out.append(jax.random.wrap_key_data(saved, impl=jax.random.key_impl(like)))
    else:
      out.append(saved if saved.dtype == like.dtype else jnp.asarray(saved, dtype=like.dtype))
  return jax.tree.unflatten(treedef, out)


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` on every process (a collective: every process calls it), so that all of them fall back to
  the same checkpoint, or none."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def _best_key(metrics: dict[str, Any]) -> tuple[float, int]:
  """The ranking of a checkpoint by orbax's `BestN`: the mean training-domain validation accuracy, the earlier
  step first among equal ones (as `loop.select_best`)."""
  return float(metrics["val_acc_mean"]), -int(metrics["step"])


class CheckpointStore:
  """The latest and the best checkpoint of one training run, under `directory` (orbax step folders).

  Args:
    directory: where the step folders go (created if missing).
    asynchronous: write in a background thread (default); `close()` and the next save wait for it.

  Every orbax call runs under `deferred_signals`; orbax failures are raised as `CheckpointError`. In a
  multi-process run every process creates the store and calls `save`, `restore` and `close` with the same
  arguments (each writes and reads its own shards).
  """

  def __init__(self, directory: str, *, asynchronous: bool = True):
    import orbax.checkpoint as ocp  # imported here: only training needs orbax
    from orbax.checkpoint import checkpoint_managers as policies

    # orbax logs every save at INFO through absl; the harness reports progress itself, and failures as one line.
    absl = logging.getLogger("absl")
    absl.setLevel(logging.WARNING)
    for log in (absl, logging.getLogger("asyncio")):
      if not any(isinstance(f, _QuietOrbax) for f in log.filters):
        log.addFilter(_QuietOrbax())
    _quiet_abandoned_callbacks()
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self._pending: int | None = None  # the step of a save that may still be in flight
    self._failed = False  # a CheckpointError was raised: `close` then adds no second one
    # Retention by orbax's own policy: the latest, and the best by training-domain validation. orbax decides what
    # goes when a save starts and deletes it in its background thread once the new checkpoint is complete, so a
    # save never waits on a deletion and an older checkpoint never goes before the newer one is whole.
    keep = policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=1),
        policies.BestN(get_metric_fn=_best_key, n=1, keep_checkpoints_without_metrics=False),
      ]
    )
    with deferred_signals(), self._failure("open the checkpoints"):
      self._remove_temporary()  # of a save killed in flight: never a checkpoint, and it may be large
      self._manager = ocp.CheckpointManager(
        self.directory,
        # best_fn only makes orbax record each step's metrics (and read them back when reopened) for `keep`
        options=ocp.CheckpointManagerOptions(
          preservation_policy=keep,
          best_fn=_best_key,
          best_mode="max",
          create=True,
          enable_async_checkpointing=asynchronous,
        ),
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
      steps = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit()) if os.path.isdir(self.directory) else []
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

  def _remove_temporary(self, step: int | None = None) -> None:
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

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any], *, val_acc_mean: float | None = None) -> None:
    """Starts writing the checkpoint of `step` and returns once the state is copied off the devices (orbax writes
    in the background; the next save, `restore` or `close` waits for it). When it is complete, orbax deletes every
    other checkpoint but the best by `val_acc_mean` (earliest on ties) and the latest.

    Every process writes the shards its devices hold; the checksums (`_digests`) are computed on the devices.

    Args:
      step: the training step the state is at.
      state: the training state pytree (in a multi-process run, every leaf a global array on the mesh).
      meta: JSON-serializable dictionary.
      val_acc_mean: the mean training-domain validation accuracy at `step` (None: the checkpoint is kept only
        while it is the latest).

    Raises:
      CheckpointError: this save or the one before failed (disk full, read-only directory...); no older checkpoint
        has been deleted.
    """
    ocp = self._ocp
    leaves = state_to_leaves(state)
    if jax.process_count() > 1:
      local = [i for i, x in enumerate(leaves) if x.is_fully_addressable]
      if local:
        raise CheckpointError(
          f"could not write the checkpoint of step {step} in {self.directory}: array {local[0]} of the training "
          f"state is held by this process alone; in a multi-process run every array must be placed on the global "
          f"mesh (distributed.place_state or distributed.init_sharded)"
        )
    # A copy: orbax serializes `meta` in its background thread, after the caller may have changed what it refers to
    # (the loop appends the next evaluation to the list it passed), which would then not match the checksum.
    meta = {**json.loads(json.dumps(meta)), "layout": _describe(leaves)}
    meta["checksums"] = {"digests": _digests(leaves), "meta": _meta_crc(meta)}
    metrics = None if val_acc_mean is None else {"val_acc_mean": float(val_acc_mean), "step": int(step)}
    with deferred_signals():
      self._wait()  # the previous write (and the deletions after it) are done; its failure is raised here
      with self._failure(f"write the checkpoint of step {step}"):
        # Re-saving a step (a resumed run's next evaluation), or steps after it (unreadable ones a resumed run fell
        # back from): they go first, or orbax's retention would count them as the latest.
        for newer in [s for s in self._manager.all_steps() if s >= step]:
          self._manager.delete(newer)
        _QuietOrbax.last = None
        try:
          self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
          )
        except BaseException:
          self._remove_temporary(step)
          raise
        self._pending = step

  def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """Returns `(state, meta)` of the checkpoint at `step`, each array placed like `template`'s (its sharding: the
    checkpoint may have been written on another mesh or by another number of processes; each process reads only
    the shards it holds). `template` gives the state's structure, dtypes and shardings.

    Raises:
      FileNotFoundError: no checkpoint of `step`.
      UnreadableCheckpoint: its files are unreadable, missing, or do not match the checksums written with them
        (on every process, when on one).
      ValueError: the checkpoint is of another configuration.
    """
    ocp = self._ocp
    template_leaves = jax.tree.leaves(template)
    with deferred_signals():
      self._wait()
      if step not in self._manager.all_steps():
        raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory} (steps: {self.steps()}).")
      reason, leaves, meta = None, None, {}
      try:
        with self._failure(f"read the checkpoint of step {step}", UnreadableCheckpoint):
          meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
      except UnreadableCheckpoint as e:
        reason = str(e)
      if reason is None and "layout" in meta:
        _check_fits(meta["layout"], template_leaves)  # ValueError before reading any array (the same everywhere)
      try:
        if reason is None:
          target = [_target(x) for x in template_leaves]
          with self._failure(f"read the checkpoint of step {step}", UnreadableCheckpoint):
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            leaves = list(restored["state"])
      except UnreadableCheckpoint as e:
        reason = str(e)
      if not _all_processes_agree(reason is None):
        raise UnreadableCheckpoint(
          reason
          or f"could not read the checkpoint of step {step} in {self.directory}: "
          "another process could not read its part"
        )
    stored = meta.pop("checksums", None)  # absent in checkpoints written before checksums were
    if stored is not None and not self._matches(stored, leaves, meta):
      raise UnreadableCheckpoint(
        f"the checkpoint of step {step} in {self.directory} does not match its checksums: "
        "its files were truncated or overwritten"
      )
    meta.pop("layout", None)
    return state_from_leaves(leaves, template), meta

  @staticmethod
  def _matches(stored: dict[str, Any], leaves: list[jax.Array], meta: dict[str, Any]) -> bool:
    """Whether `leaves` and `meta` (without its checksums) are what `save` recorded in `stored`."""
    if "digests" in stored:
      return stored == {"digests": _digests(leaves), "meta": _meta_crc(meta)}
    # Written before the digests: CRC-32s of the host bytes of every array (single-process checkpoints).
    crc = [zlib.crc32(np.ascontiguousarray(jax.device_get(x)).reshape(-1).view(np.uint8)) for x in leaves]
    return stored == {"leaves": crc, "meta": _meta_crc(meta)}

  def restore_latest(self, template: Any) -> tuple[int, Any, dict[str, Any], list[str]] | None:
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
