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
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np

__all__ = ["CheckpointStore", "state_from_leaves", "state_to_leaves"]


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
  """

  def __init__(self, directory: str, *, asynchronous: bool = True):
    import orbax.checkpoint as ocp  # imported here: only training needs orbax

    # orbax logs every save at INFO through absl; the harness reports progress itself.
    logging.getLogger("absl").setLevel(logging.WARNING)
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=asynchronous
      ),
    )

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
    """
    ocp = self._ocp
    # Deleting needs the previous asynchronous write to have finished; by now it almost always has.
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():  # re-saving a step (e.g. a resumed run's last eval): replace it
      self._manager.delete(step)
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_to_leaves(state)), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
    )
    for old in self._manager.all_steps():
      if old != step and old not in keep:
        self._manager.wait_until_finished()
        self._manager.delete(old)

  def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """Returns `(state, meta)` of the checkpoint at `step`; `template` gives the state's structure and dtypes."""
    ocp = self._ocp
    self._manager.wait_until_finished()
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory} (steps: {self.steps()}).")
    target = [np.zeros(np.shape(x), np.asarray(x).dtype) for x in state_to_leaves(template)]
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    return state_from_leaves(list(restored["state"]), template), dict(restored["meta"])

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
