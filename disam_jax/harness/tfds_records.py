"""``tfds:<name>`` streamed: a TFDS dataset's random-access data source read through grain as six rotation domains.

A `TfdsRecords` plays the part `streaming.RecordSet` plays for image folders: the `DomainDataset` holds, per rotation
domain, int64 indices into the concatenation of the requested splits' data sources (``builder.as_data_source``)
and int32 labels; `TfdsRecords.pixels` reads an example, resizes it (``image_size``, Pillow bilinear on uint8, as
`data._square_uint8`) and rotates it by its domain's angle with `data._rotate` (the in-memory construction's float
math on ``uint8 / 255``), rounded to **uint8** (at most 0.5/255 from the float32 result; DomainBed's RotatedMNIST
rotates uint8 PIL images, so it rounds as well). The rotation group of every example (one byte each) travels with
the record set; the sources do not: each grain worker opens them again from the builder's name and data_dir.

Imports only numpy and the standard library at module level (grain's worker processes import this module).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np


class _Concatenated:
  """Random access over several sources laid end to end (item access only: tfds's mock sources have no more)."""

  def __init__(self, sources: Sequence[Any]):
    self._sources = list(sources)
    self._starts = list(np.cumsum([0] + [len(s) for s in self._sources]))

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int):
    j = bisect.bisect_right(self._starts, int(i)) - 1
    return self._sources[j][int(i) - int(self._starts[j])]

  def __getitems__(self, indices: Sequence[int]) -> list:
    return [self[i] for i in indices]


class TfdsRecords:
  """The examples of a TFDS dataset's splits (in split order) as rotation-domain records.

  Attributes:
    name, data_dir, splits: what ``tfds.builder(name, data_dir=data_dir).as_data_source(split=splits)`` opens.
    image_key: the Image feature.
    image_shape: ``(H, W, C)`` every record is read as (uint8).
    resize: the side length images are resized to (None: stored size).
    groups: uint8 ``[n]``: the rotation group (index into `data.ROTATION_DEGREES`) of every example.
  """

  augmentable = False  # rotation domains are never augmented (DomainBed's RotatedMNIST)

  def __init__(
    self,
    name: str,
    data_dir: str | None,
    splits: Sequence[str],
    image_key: str,
    image_shape: tuple[int, int, int],
    resize: int | None,
    groups: np.ndarray,
    sources=None,
  ):
    self.name, self.data_dir, self.splits, self.image_key = name, data_dir, tuple(splits), image_key
    self.image_shape, self.resize = tuple(int(s) for s in image_shape), resize
    self.groups = np.asarray(groups, np.uint8)
    self._sources = None if sources is None else _Concatenated(sources)

  @property
  def image_size(self) -> int:
    return self.image_shape[0]

  def __getstate__(self):
    return {**self.__dict__, "_sources": None}  # opened again in each worker: sources are not sent

  def source(self) -> _Concatenated:
    """The random-access source of the examples (dicts of decoded features)."""
    if self._sources is None:
      from disam_jax.harness import data

      tfds = data._require_tfds()
      with data._quiet_tfds(tfds):
        builder = tfds.builder(self.name, data_dir=self.data_dir, try_gcs=False)
        self._sources = _Concatenated(builder.as_data_source(split=list(self.splits)))
    return self._sources

  def pixels(self, example, index: int) -> np.ndarray:
    """Example `index` resized and rotated by its domain's angle: uint8 `image_shape`."""
    from disam_jax.harness import data

    image = np.asarray(example[self.image_key], np.uint8)
    if self.resize is not None:
      image = data._square_uint8(image, self.resize)
    if image.shape != self.image_shape:
      raise ValueError(
        f"tfds:{self.name} example {index} is {list(image.shape)}, not {list(self.image_shape)}: "
        "pass image_size (--image-size N) to resize every image to one square."
      )
    degrees = data.ROTATION_DEGREES[int(self.groups[int(index)])]
    rotated = data._rotate(image[None].astype(np.float32) / np.float32(255.0), degrees)[0]
    return np.rint(np.clip(rotated, 0.0, 1.0) * 255.0).astype(np.uint8)

  def augmented(self, example, index: int, rng: np.random.Generator) -> np.ndarray:
    del rng  # never augmented
    return self.pixels(example, index)
