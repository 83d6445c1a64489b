"""The two inputs of a run, as the loop consumes them: the training feed and the evaluation feed.

This is the one interface between the input pipeline (`data`: in-memory arrays, or image folders streamed through
grain) and the loop and evaluator (`loop`, `distributed`: one device, a mesh, several processes). Both sides agree
on these shapes; nothing else crosses.

* Images cross as **uint8** ``[..., H, W, C]`` (0-255, stored and streamed so) or **float32** in [0, 1] (small
  in-memory datasets whose pixels are not bytes, e.g. rotated digits). `as_model_input` turns either into the float32
  the models take, on the device, inside the jitted train and evaluation steps.
* `TrainFeed`: the per-domain balanced training batches, ``next(local) -> (x [M, b_local, H, W, C], y [M, b_local]
  int32)``, this process's slice `local` of the per-domain batch axis (every process draws the same global batch,
  each reads only its slice); `state()` / `restore()` capture the stream (JSON) so a resumed run sees the same
  batches. `data.DomainBatchSampler` is the in-memory one. With ``--batching merged`` the feed is
  `data.MergedBatchSampler` instead (in memory only): one shuffled stream over all training domains,
  ``next(local) -> (x [B_local, H, W, C], y [B_local] int32, domain ids [B_local] int32)``, the slice `local` of
  the flat batch axis; the train step takes either form.
* `EvalFeed`: the evaluation sets (the validation part of every training domain, then the held-out domains) as
  fixed-size global batches, each process yielding its slice of every batch: ``(x [n_local, H, W, C],
  y [n_local] int32, part [n_local] int32)`` where ``part`` indexes `parts` and is -1 on padding. Every process
  yields the same number of batches of the same shape (``global_batch_size // process_count`` rows), so the batches
  assemble into global arrays with `jax.make_array_from_process_local_data` and the evaluator can count correct
  predictions per part on the device. `ArrayEvalFeed` is the in-memory one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

__all__ = ["ArrayEvalFeed", "EvalBatch", "EvalFeed", "TrainFeed", "as_model_input"]

# (x [n_local, H, W, C] uint8 or float32, y [n_local] int32, part [n_local] int32; -1 marks padding)
EvalBatch = tuple[np.ndarray, np.ndarray, np.ndarray]


class TrainFeed(Protocol):
  """Per-domain balanced training batches (DomainBed): every training domain gives `b` examples per step."""

  def next(self, local: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(x [M, b_local, H, W, C], y [M, b_local] int32)`: this process's slice of the next global batch."""

  def state(self) -> dict[str, Any]:
    """A JSON-serializable snapshot of the stream before the next batch."""

  def restore(self, state: dict[str, Any]) -> None:
    """Continues the stream captured by `state()`."""


class EvalFeed(Protocol):
  """The evaluation sets as fixed-size global batches, each process reading its slice."""

  parts: tuple[tuple[str, str], ...]  # ("val", training domain) ... then ("test", held-out domain) ...
  global_batch_size: int  # rows of every global batch: a multiple of the process count

  def batches(self) -> Iterator[EvalBatch]:
    """This process's slice of each global batch, in order; the same count and shapes on every process."""


def as_model_input(x):
  """The float32 model input of a batch crossing the feeds: uint8 pixels / 255, float pixels as they are.

  Called inside the jitted steps, so uint8 batches travel to the device at a quarter of float32's bytes.
  """
  import jax.numpy as jnp

  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32) / jnp.float32(255.0)
  return x


@dataclasses.dataclass(frozen=True)
class ArrayEvalFeed:
  """`EvalFeed` over in-memory arrays: `sets[k] = (x, y)` is part `parts[k]`.

  Every process holds every array (they are small) and gathers only its rows of each global batch: global batch
  ``j`` is rows ``[j * G, (j + 1) * G)`` of the parts laid end to end, padded with part -1 at the end; process
  ``p`` of ``P`` yields rows ``[p * G / P, (p + 1) * G / P)`` of it.
  """

  parts: tuple[tuple[str, str], ...]
  sets: tuple[tuple[np.ndarray, np.ndarray], ...]
  global_batch_size: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if len(self.parts) != len(self.sets):
      raise ValueError(f"{len(self.parts)} evaluation parts but {len(self.sets)} (x, y) sets.")
    if self.global_batch_size < 1 or self.global_batch_size % self.process_count:
      raise ValueError(
        f"The evaluation batch {self.global_batch_size} must be a positive multiple of the "
        f"process count {self.process_count}."
      )

  @property
  def size(self) -> int:
    return sum(len(y) for _, y in self.sets)

  def _rows(self, start: int, stop: int) -> EvalBatch:
    """Rows [start, stop) of the parts laid end to end, padded (part -1) past the end."""
    xs, ys, ps = [], [], []
    offset = 0
    for k, (x, y) in enumerate(self.sets):
      lo, hi = max(start - offset, 0), min(stop - offset, len(y))
      if lo < hi:
        xs.append(np.asarray(x[lo:hi]))
        ys.append(np.asarray(y[lo:hi], np.int32))
        ps.append(np.full(hi - lo, k, np.int32))
      offset += len(y)
    pad = (stop - start) - sum(len(y) for y in ys)
    shape, dtype = self.sets[0][0].shape[1:], self.sets[0][0].dtype
    if pad:
      xs.append(np.zeros((pad,) + shape, dtype))
      ys.append(np.zeros(pad, np.int32))
      ps.append(np.full(pad, -1, np.int32))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ps)

  def batches(self) -> Iterator[EvalBatch]:
    g, n_local = self.global_batch_size, self.global_batch_size // self.process_count
    for start in range(0, self.size, g):
      lo = start + self.process_index * n_local
      yield self._rows(lo, lo + n_local)
