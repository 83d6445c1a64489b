"""Image folders streamed through grain from ArrayRecord: the conversion cache, DomainBed's transforms, the feeds.

* **Cache** (`convert_folder`): an image folder is converted once into ArrayRecord shards holding every readable
  image file's *original encoded bytes* (JPEG / PNG as on disk, checked decodable at conversion; nothing is
  re-encoded, so DomainBed's crops see the original image) plus ``index.npz`` (int32 label and domain of every
  record, in record order: the few bytes per image a run holds) and ``meta.json``. The conversion runs on all cores
  (one shard per task, `concurrent.futures` with spawned workers), behind an `fcntl.flock` on a file in the cache
  folder (several processes or runs: one converts, the others wait and then read), into a temporary folder renamed
  atomically when complete: a killed conversion leaves only a temporary folder, removed by the next conversion.
* **Transforms**: `eval_transform` is DomainBed's ``Resize((s, s))``; `train_transform` is DomainBed's training
  augmentation ``RandomResizedCrop(s, scale=(0.7, 1)), RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3),
  RandomGrayscale(0.1)`` written with Pillow as torchvision's PIL backend does it, drawing from a NumPy generator
  seeded by ``(seed, step, domain, position in the global batch)``, so every example's augmentation is fixed by the
  step and does not depend on the process count or the worker that reads it. Pixels stay **uint8** ``[s, s, 3]``;
  `feeds.as_model_input` casts them on the device.
* **Feeds**: `StreamedTrainFeed` (`feeds.TrainFeed`) maps each step to this process's slice of its per-domain
  balanced batch (indices drawn with replacement from a generator seeded by ``(seed, step)``: a pure function of the
  step, so the feed's state is the step), and `StreamedEvalFeed` (`feeds.EvalFeed`) maps each evaluation batch to
  this process's rows. Both are grain `MapDataset` pipelines over step / batch numbers, read ahead by grain worker
  processes (`IterDataset.mp_prefetch`; with 0 workers, by a background thread): decoding and augmentation never
  run on the thread that drives the device.

Imports only numpy and the standard library at module level (grain, array_record and Pillow where used): grain's
worker processes import this module.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
  "CacheError",
  "RecordSet",
  "StreamedEvalFeed",
  "StreamedTrainFeed",
  "convert_folder",
  "decode",
  "default_workers",
  "eval_transform",
  "read_images",
  "train_transform",
]

_EXTRA = "pip install 'disam_jax[harness]'"
# Bump when the stored format changes so that older conversions are not reused.
FORMAT_VERSION = "2"
# Files per conversion task (one ArrayRecord shard each) at least: small enough to spread a PACS-size folder over
# every core. Larger folders get larger shards (`_shard_files`): every open shard's reader holds ~128 KiB plus 8 bytes
# per record in each reading process (measured: 136 KiB per open 1,024-record shard, 638 KiB at 65,536 records).
_SHARD_FILES = 1024
# Conversion tasks per worker when shards grow past _SHARD_FILES (some slack for uneven tasks).
_TASKS_PER_WORKER = 4
# Folders smaller than this are converted in the calling process: spawning workers costs more than it saves.
_INLINE_FILES = 256


class CacheError(ValueError):
  """The conversion cache cannot be read or written (a cache problem, not a run-directory problem)."""


def _require(module: str, purpose: str):
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"{purpose} needs the {module!r} package: {_EXTRA}") from e


def default_workers() -> int:
  """Grain worker processes when none are asked for: the machine's cores, one left to the device thread, at most 16."""
  return max(1, min(16, (os.cpu_count() or 2) - 1))


# ---------------------------------------------------------------------------------------------------------------------
# The cache: ArrayRecord shards of the original image files
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordSet:
  """A converted image folder: record ``i`` is the i-th readable image file's original bytes.

  Attributes:
    directory: the conversion's folder.
    shards: the ArrayRecord files, in record order.
    image_size: the side length every transform outputs (``[image_size, image_size, 3]`` uint8).
  """

  directory: str
  shards: tuple[str, ...]
  image_size: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  # DomainBed augments image folders in training (`train_transform`); False for record sets it never augments.
  augmentable = True

  def source(self):
    """The grain random-access source of the records (bytes)."""
    grain = _require("grain", "Streaming image folders")
    return grain.sources.ArrayRecordDataSource(list(self.shards))

  def pixels(self, raw: bytes, index: int) -> np.ndarray:
    """Record `index` (read as `raw`) through DomainBed's evaluation transform: uint8 `image_shape`."""
    del index
    return eval_transform(decode(raw), self.image_size)

  def augmented(self, raw: bytes, index: int, rng: np.random.Generator) -> np.ndarray:
    """Record `index` (read as `raw`) through DomainBed's training augmentation: uint8 `image_shape`."""
    del index
    return train_transform(decode(raw), self.image_size, rng)


def _validated(raw: bytes) -> bool:
  """Whether `raw` decodes completely to an RGB image (truncated and corrupt files do not)."""
  from PIL import Image

  try:
    with Image.open(io.BytesIO(raw)) as im:
      im.load()
      im.convert("RGB")
    return True
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return False


def _convert_shard(root: str, rels: Sequence[str], path: str) -> list[bool]:
  """Writes the readable files of `rels` (under `root`) to the ArrayRecord file `path`; which were kept."""
  from array_record.python.array_record_module import ArrayRecordWriter

  kept = []
  writer = ArrayRecordWriter(path, "group_size:1")
  try:
    for rel in rels:
      with open(os.path.join(root, rel), "rb") as f:
        raw = f.read()
      ok = _validated(raw)
      if ok:
        writer.write(raw)
      kept.append(ok)
  finally:
    writer.close()
  return kept


def _lock(path: str):
  """An exclusive `fcntl.flock` on `path` (created), held until the returned file is closed."""
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX)
  except BaseException:
    f.close()
    raise
  return f


def _read_meta(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, "meta.json")) as f:
    return json.load(f)


def convert_folder(
  root: str,
  files: Sequence[tuple[str, int, int]],
  *,
  domains: Sequence[str],
  classes: Sequence[str],
  cache_dir: str,
  key: str,
  workers: int | None = None,
  on_convert=None,
) -> tuple[str, dict[str, Any]]:
  """The conversion of `files` (``(relative path, domain index, class index)``, in record order) under
  ``cache_dir/<key>``, made now unless it exists; returns ``(folder, meta)``.

  Several processes may call this at once on the same cache: one converts (holding the lock file
  ``cache_dir/.<key>.lock``) while the others wait for the lock and then find the finished folder. The conversion is
  written to ``cache_dir/.<key>.incomplete-*`` and renamed to ``cache_dir/<key>`` when complete (``meta.json`` last),
  so a folder under the final name is always complete; incomplete folders of killed conversions are removed by the
  next conversion.

  Args:
    workers: conversion processes (default: every core); 0 converts in this process.
    on_convert: called with the number of files before a conversion starts (e.g. to log it).

  Raises:
    CacheError: the cache folder cannot be created, locked, written or read.
  """
  final = os.path.join(cache_dir, key)
  try:
    if os.path.isfile(os.path.join(final, "meta.json")):
      return final, _read_meta(final)  # the common case: converted before, no lock taken
    os.makedirs(cache_dir, exist_ok=True)
    with contextlib.closing(_lock(os.path.join(cache_dir, f".{key}.lock"))):
      if os.path.isfile(os.path.join(final, "meta.json")):  # converted by another process while this one waited
        return final, _read_meta(final)
      for name in os.listdir(cache_dir):  # left by killed conversions of this key (the lock says none is running)
        if name.startswith(f".{key}.incomplete-"):
          shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
      if on_convert is not None:
        on_convert(len(files))
      scratch = os.path.join(cache_dir, f".{key}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}")
      os.makedirs(scratch)
      try:
        meta = _convert_into(scratch, root, files, domains, classes, workers)
        os.replace(scratch, final)
      except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
      return final, meta
  except OSError as e:
    raise CacheError(
      f"cannot use the conversion cache {final}: {e.strerror or e} ({type(e).__name__}); choose "
      "another with --cache-dir or $DISAM_JAX_TFDS_DIR"
    ) from e
  except json.JSONDecodeError as e:
    raise CacheError(f"the conversion cache {final} is damaged ({e}); delete that folder to convert again") from e


def _convert_into(scratch: str, root: str, files, domains, classes, workers: int | None) -> dict[str, Any]:
  """Converts `files` into `scratch`: the shards, then index.npz, then meta.json (last: it marks completeness)."""
  _require("array_record", "Converting image folders to ArrayRecord")
  _require("PIL", "Decoding image files")
  rels = [rel for rel, _, _ in files]
  workers = (os.cpu_count() or 1) if workers is None else int(workers)
  per = _shard_files(len(rels), workers)
  chunks = [rels[i : i + per] for i in range(0, len(rels), per)]
  shards = [f"shard-{k:05d}.array_record" for k in range(len(chunks))]
  start = time.perf_counter()
  if workers <= 0 or len(rels) < _INLINE_FILES or len(chunks) == 1:
    kept = [_convert_shard(root, chunk, os.path.join(scratch, s)) for chunk, s in zip(chunks, shards)]
  else:
    # Spawned, not forked: the caller may hold JAX's threads, which a fork would copy in an undefined state.
    with concurrent.futures.ProcessPoolExecutor(
      min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
      kept = list(pool.map(_convert_shard, [root] * len(chunks), chunks, [os.path.join(scratch, s) for s in shards]))
  seconds = time.perf_counter() - start
  mask = np.concatenate([np.asarray(k, bool) for k in kept]) if kept else np.zeros(0, bool)
  domain_of = np.asarray([d for _, d, _ in files], np.int32)[mask]
  label_of = np.asarray([c for _, _, c in files], np.int32)[mask]
  with open(os.path.join(scratch, "index.npz"), "wb") as f:
    np.savez(f, label=label_of, domain=domain_of)
  meta = {
    "format": FORMAT_VERSION,
    "root": root,
    "domains": list(domains),
    "classes": list(classes),
    "records": int(mask.sum()),
    "shards": shards,
    "shard_records": [int(np.sum(k)) for k in kept],
    "skipped_files": [rel for rel, ok in zip(rels, mask) if not ok],
    "convert_seconds": round(seconds, 3),
    "workers": workers,
  }
  with open(os.path.join(scratch, "meta.json"), "w") as f:
    json.dump(meta, f)
  return meta


def _shard_files(files: int, workers: int) -> int:
  """Files per shard: `_SHARD_FILES`, or more when the folder gives every worker more than `_TASKS_PER_WORKER`
  shards, so that the number of open shards (and their readers' memory) stops growing with the folder: DomainNet's
  586k files on 16 cores make 64 shards of 9,166 (~13 MiB of readers per process) instead of 573 of 1,024 (~76 MiB)."""
  return max(_SHARD_FILES, -(-int(files) // (_TASKS_PER_WORKER * max(1, int(workers)))))


def read_index(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """`(label [n] int32, domain [n] int32)` of a conversion's records (no pickle: plain arrays only)."""
  with np.load(os.path.join(directory, "index.npz"), allow_pickle=False) as index:
    return np.asarray(index["label"], np.int32), np.asarray(index["domain"], np.int32)


def fingerprint(root: str, rels: Sequence[str], settings: Any) -> str:
  """Identifies a folder's content: every file's name, size and modification time (one `os.stat` each: 0.2 s for
  20,000 files on a local disk, measured by benchmarks/input_pipeline.py) plus `settings`."""
  h = hashlib.sha256(repr((FORMAT_VERSION, settings)).encode())
  for rel in rels:
    st = os.stat(os.path.join(root, rel))
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# DomainBed's transforms (Pillow, as torchvision's PIL backend)
# ---------------------------------------------------------------------------------------------------------------------


def decode(raw: bytes):
  """The RGB `PIL.Image` of an encoded image file (DomainBed's ImageFolder loader: ``.convert("RGB")``)."""
  from PIL import Image

  with Image.open(io.BytesIO(raw)) as im:
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")  # an RGB file: its decoded image, not a copy of it


def eval_transform(image, size: int) -> np.ndarray:
  """DomainBed's evaluation transform ``Resize((size, size))`` (bilinear): uint8 ``[size, size, 3]``."""
  from PIL import Image

  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def _crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's ``RandomResizedCrop.get_params``: `(left, top, w, h)` of a crop of random area and aspect."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height  # fallback: the central crop of the closest allowed aspect
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _adjust_hue(image, factor: float):
  """torchvision's PIL ``adjust_hue``: the HSV hue channel shifted by ``factor * 255`` (mod 256)."""
  from PIL import Image

  h, s, v = image.convert("HSV").split()
  shifted = (np.asarray(h, np.uint8) + np.uint8(int(factor * 255) % 256)).astype(np.uint8)
  return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


def train_transform(image, size: int, rng: np.random.Generator) -> np.ndarray:
  """DomainBed's training augmentation of one RGB `PIL.Image`: uint8 ``[size, size, 3]``.

  ``RandomResizedCrop(size, scale=(0.7, 1.0))`` (bilinear), ``RandomHorizontalFlip()``,
  ``ColorJitter(0.3, 0.3, 0.3, 0.3)`` (brightness, contrast, saturation factors in [0.7, 1.3], hue in [-0.3, 0.3],
  applied in a random order), ``RandomGrayscale(p=0.1)``, each as torchvision's PIL backend does it (the same Pillow
  operations, pixel for pixel; brightness and contrast through a lookup table that Pillow's own blend fills),
  drawing from `rng` (torchvision draws from torch's global generator; the distributions are the same).
  """
  image = _random_resized_crop(image, size, rng)
  image = _random_flip(image, rng)
  image = _color_jitter(image, rng)
  return _random_grayscale(image, rng)


def _random_resized_crop(image, size: int, rng: np.random.Generator):
  from PIL import Image

  left, top, w, h = _crop_box(image.width, image.height, rng)
  return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def _random_flip(image, rng: np.random.Generator):
  from PIL import Image

  return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _color_jitter(image, rng: np.random.Generator):
  """torchvision's ``ColorJitter(0.3, 0.3, 0.3, 0.3)`` (PIL backend): the four adjustments in a random order."""
  from PIL import ImageEnhance

  order = rng.permutation(4)
  factors = (rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(-0.3, 0.3))
  for k in order:
    if k == 0:
      image = _blend_with_constant(image, 0, factors[0])  # ImageEnhance.Brightness: blend with black
    elif k == 1:
      image = _blend_with_constant(image, _gray_mean(image), factors[1])  # ImageEnhance.Contrast
    elif k == 2:
      image = ImageEnhance.Color(image).enhance(factors[2])
    else:
      image = _adjust_hue(image, factors[3])
  return image


def _random_grayscale(image, rng: np.random.Generator) -> np.ndarray:
  """torchvision's ``RandomGrayscale(p=0.1)`` (3 equal channels), and the image's uint8 ``[h, w, 3]`` pixels."""
  if rng.random() < 0.1:
    return np.repeat(np.asarray(image.convert("L"), np.uint8)[..., None], 3, axis=-1)
  return np.asarray(image, np.uint8)


def _gray_mean(image) -> int:
  """`ImageEnhance.Contrast`'s degenerate level: the rounded mean of the image's ``L`` conversion (as Pillow)."""
  from PIL import ImageStat

  return int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)


_RAMP = None


def _blend_with_constant(image, level: int, factor: float):
  """``Image.blend(constant level, image, factor)`` (Pillow's `ImageEnhance.Brightness` with level 0, `Contrast` with
  the gray mean), computed as a per-value lookup table that `Image.blend` itself fills from a 0..255 ramp: the same
  bytes as the blend (tests: every value), at one table lookup per byte instead of a float blend per byte."""
  from PIL import Image

  global _RAMP
  if _RAMP is None:
    _RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))
  table = Image.blend(Image.new("L", (256, 1), int(level)), _RAMP, float(factor)).tobytes()
  return image.point(list(table) * len(image.getbands()))


def _read_each(source, indices: Sequence[int]) -> list:
  """``[source[i] for i in indices]``, one record at a time.

  Not ``source.__getitems__``: array_record's batched read starts a new thread pool on every call, and the memory
  glibc then keeps in those threads' malloc arenas grew the reading process by 550-1,000 bytes per record read in a
  pass (and more on every later pass), against 25 bytes per record, flat, one at a time (RssAnon, 3,000 32 px JPEGs,
  /tmp probes of this change). Decoding dominates a read from local disk, so nothing is lost by it.
  """
  return [source[int(i)] for i in indices]


def read_images(records, indices: Sequence[int]) -> np.ndarray:
  """uint8 ``[n, *records.image_shape]``: records `indices` (of a `RecordSet` or `tfds_records.TfdsRecords`)
  through the evaluation transform (for tests and small sets)."""
  source = records.source()
  indices = [int(i) for i in indices]
  raws = _read_each(source, indices)
  return (
    np.stack([records.pixels(r, i) for r, i in zip(raws, indices)])
    if len(raws)
    else np.zeros((0,) + tuple(records.image_shape), np.uint8)
  )


# ---------------------------------------------------------------------------------------------------------------------
# The per-step and per-batch functions grain's workers run (picklable; the data source opened lazily in each worker)
# ---------------------------------------------------------------------------------------------------------------------


class _Reader:
  """Holds a `RecordSet` and opens its source on first use in each process (sources are not sent to workers)."""

  def __init__(self, records: RecordSet):
    self.records = records
    self._source = None

  def __getstate__(self):
    return {"records": self.records, "_source": None}

  def read(self, indices: Sequence[int]) -> list:
    if self._source is None:
      self._source = self.records.source()
    return _read_each(self._source, indices)


def step_picks(seed: int, step: int, sizes: Sequence[int], batch: int) -> list[np.ndarray]:
  """The global batch of `step`: per domain, `batch` positions drawn with replacement from a generator seeded by
  ``(seed, step)`` (a pure function of the step, the same on every process)."""
  rng = np.random.default_rng([int(seed), int(step)])
  return [rng.integers(0, n, size=batch) for n in sizes]


class _StepBatch(_Reader):
  """``step -> (x [M, b_local, s, s, 3] uint8, y [M, b_local] int32)``: this process's slice of step's batch."""

  def __init__(
    self,
    records: RecordSet,
    members: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    batch: int,
    seed: int,
    local: slice,
    augment: bool,
  ):
    super().__init__(records)
    self.members, self.labels, self.batch, self.seed = list(members), list(labels), batch, seed
    self.local, self.augment = local, augment

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    picks = step_picks(self.seed, step, [len(m) for m in self.members], self.batch)
    positions = np.arange(self.batch)[self.local]
    xs, ys = [], []
    for d, (members, labels, pick) in enumerate(zip(self.members, self.labels, picks)):
      chosen = pick[positions]
      raws = self.read(members[chosen])
      images = []
      for pos, index, raw in zip(positions, members[chosen], raws):
        if self.augment:
          rng = np.random.default_rng([self.seed, int(step), d, int(pos)])
          images.append(self.records.augmented(raw, int(index), rng))
        else:
          images.append(self.records.pixels(raw, int(index)))
      xs.append(np.stack(images))
      ys.append(labels[chosen])
    return np.stack(xs), np.stack(ys).astype(np.int32)


# glibc's mallopt parameter and the threshold set in grain's workers (`_worker_init`).
_M_MMAP_THRESHOLD = -3
_WORKER_MMAP_THRESHOLD = 1 << 20


def _worker_init(worker_index: int, worker_count: int) -> bool:
  """Run first in each grain worker: on glibc, allocations from 1 MiB up (every batch array) are mapped and
  unmapped on free instead of kept in the heap. glibc's default threshold grows to the largest freed mapping (up to
  32 MiB), after which freed batches stay in the worker's heap: the 4 workers of a training and an evaluation feed
  (2 each) grew with the number of batches they had made (+31 MiB at 4,000 images over 400, 224 px, after one
  evaluation pass; /tmp probe). With this threshold the whole process tree measured 511 MiB at 400 images and 508
  at 4,000 after the evaluation pass (benchmarks/results/input_pipeline.md; 530 and 564 before). Per-image buffers
  (a 224 px image is 150 KiB) stay below it and are reused from the heap. Elsewhere (not glibc) nothing changes.
  Returns whether the threshold was set."""
  del worker_index, worker_count
  import ctypes
  import ctypes.util

  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None) if libc is not None and hasattr(libc, "gnu_get_libc_version") else None
  except OSError:
    mallopt = None
  # mallopt returns 1 when it set the parameter; whether it did is returned (for the tests)
  return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _WORKER_MMAP_THRESHOLD) == 1


def _iterate(dataset, workers: int):
  """An iterator over a grain `MapDataset`, read ahead by `workers` processes (0: by one background thread)."""
  grain = _require("grain", "Streaming image folders")
  from absl import flags

  if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults) when starting workers
    flags.FLAGS.mark_as_parsed()
  # grain's default ReadOptions read 500 elements ahead on 16 threads, in every worker: 500 batches of 224 px images
  # are gigabytes. Each element here is a whole batch: one thread, two ahead.
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers > 0:
    return iter(
      ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2), worker_init_fn=_worker_init
      )
    )
  return _ThreadAhead(iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))), depth=2)


class _ThreadAhead:
  """Reads `depth` elements of `iterator` ahead on one background thread (in order)."""

  def __init__(self, iterator, depth: int):
    self._iterator, self._depth = iterator, depth
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="disam_jax-read-ahead")
    self._ahead = collections.deque()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._ahead) < self._depth + 1:
      self._ahead.append(self._pool.submit(next, self._iterator))
    return self._ahead.popleft().result()

  def close(self) -> None:
    for future in self._ahead:
      future.cancel()
    self._ahead.clear()
    self._pool.shutdown(wait=True)


def _close(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


# Steps a feed's grain pipeline covers: far more than any run (MapDataset.range is lazy).
_HORIZON = 1 << 40


class StreamedTrainFeed:
  """`feeds.TrainFeed` over a `RecordSet` (or `tfds_records.TfdsRecords`): DomainBed's per-domain balanced batches,
  decoded and augmented by grain workers.

  Args:
    records: the converted folder, or a TFDS dataset's rotation domains.
    train: ``(record indices [n_i], labels [n_i])`` per training domain (e.g. ``split.train`` of a streamed split).
    batch_size_per_domain: examples per domain per step.
    seed: seeds the batches and their augmentation.
    augment: DomainBed's training augmentation (`train_transform`); False: `eval_transform`. Ignored (False) for
      record sets whose ``augmentable`` is False.
    workers: grain worker processes (0: a prefetch thread of this process).
    domain_names: for error messages.
  """

  def __init__(
    self,
    records: RecordSet,
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    batch_size_per_domain: int,
    seed: int,
    *,
    augment: bool = True,
    workers: int = 0,
    domain_names: Sequence[str] | None = None,
  ):
    if not train:
      raise ValueError("StreamedTrainFeed needs at least one training domain.")
    names = list(domain_names) if domain_names is not None else [f"#{i}" for i in range(len(train))]
    self._records, self._batch, self._seed = records, int(batch_size_per_domain), int(seed)
    self._members = [np.asarray(x, np.int64) for x, _ in train]
    self._labels = [np.asarray(y, np.int32) for _, y in train]
    for name, m in zip(names, self._members):
      if self._batch > len(m):
        raise ValueError(
          f"batch_size_per_domain={self._batch} exceeds the {len(m)} training examples of domain "
          f"{name}. Sampling is with replacement, but a per-domain batch larger than the domain is "
          "almost certainly a mistake."
        )
    # Record sets DomainBed never augments (tfds:<name> rotation domains) ignore `augment`.
    self._augment, self._workers = bool(augment) and bool(getattr(records, "augmentable", True)), int(workers)
    self._step = 0
    self._iterator, self._local = None, None

  def _pipeline(self, local: slice):
    grain = _require("grain", "Streaming image folders")
    fn = _StepBatch(self._records, self._members, self._labels, self._batch, self._seed, local, self._augment)
    return _iterate(grain.MapDataset.range(self._step, _HORIZON).map(fn), self._workers)

  def next(self, local: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    local = slice(None) if local is None else local
    key = (local.start, local.stop, local.step)
    if self._iterator is None or self._local != key:
      self.close()
      self._iterator, self._local = self._pipeline(local), key
    batch = next(self._iterator)
    self._step += 1
    return batch

  def state(self) -> dict[str, Any]:
    return {
      "kind": "streamed",
      "step": self._step,
      "seed": self._seed,
      "batch_size_per_domain": self._batch,
      "domain_sizes": [len(m) for m in self._members],
      "augment": self._augment,
    }

  def restore(self, state: dict[str, Any]) -> None:
    mine = self.state()
    keys = ("kind", "seed", "batch_size_per_domain", "domain_sizes", "augment")
    if any(state.get(k) != mine[k] for k in keys):
      raise ValueError(
        f"Feed state is for { ({k: state.get(k) for k in keys}) }; this feed has { ({k: mine[k] for k in keys}) }."
      )
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    if self._iterator is not None:
      _close(self._iterator)
    self._iterator, self._local = None, None


class _EvalBatch(_Reader):
  """``j -> (x [n_local, s, s, 3] uint8, y [n_local], part [n_local])``: this process's rows of global batch
  ``j mod batches`` (rows of the parts laid end to end, part -1 past the end)."""

  def __init__(
    self,
    records: RecordSet,
    members: np.ndarray,
    labels: np.ndarray,
    parts: np.ndarray,
    global_batch: int,
    process_index: int,
    process_count: int,
  ):
    super().__init__(records)
    self.members, self.labels, self.parts = members, labels, parts
    self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __call__(self, j: int):
    n_local = self.global_batch // self.process_count
    batches = max(1, -(-len(self.members) // self.global_batch))
    lo = (j % batches) * self.global_batch + self.process_index * n_local
    hi = min(lo + n_local, len(self.members))
    rows = np.arange(lo, max(lo, hi))
    x = np.zeros((n_local,) + tuple(self.records.image_shape), np.uint8)
    y = np.zeros(n_local, np.int32)
    part = np.full(n_local, -1, np.int32)
    for k, (index, raw) in enumerate(zip(self.members[rows], self.read(self.members[rows]))):
      x[k] = self.records.pixels(raw, int(index))
    y[: len(rows)], part[: len(rows)] = self.labels[rows], self.parts[rows]
    return x, y, part


class StreamedEvalFeed:
  """`feeds.EvalFeed` over a `RecordSet`: the evaluation sets in fixed-size global batches, this process's rows of
  each, through DomainBed's evaluation transform, read ahead by grain.

  One grain pipeline cycles over the batches for the whole run (its workers are started once, not per
  evaluation); each `batches()` call yields exactly one pass.

  Args:
    records: the converted folder.
    parts: ``(kind, domain)`` per set.
    sets: ``(record indices [n_k], labels [n_k])`` per part.
    global_batch_size: rows of every global batch, a multiple of `process_count`.
  """

  def __init__(
    self,
    records: RecordSet,
    parts: Sequence[tuple[str, str]],
    sets: Sequence[tuple[np.ndarray, np.ndarray]],
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
  ):
    if len(parts) != len(sets):
      raise ValueError(f"{len(parts)} evaluation parts but {len(sets)} (indices, labels) sets.")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
        f"The evaluation batch {global_batch_size} must be a positive multiple of the process count {process_count}."
      )
    self.parts = tuple(tuple(p) for p in parts)
    self.global_batch_size = int(global_batch_size)
    self._records, self._workers = records, int(workers)
    self._members = np.concatenate([np.asarray(x, np.int64) for x, _ in sets])
    self._labels = np.concatenate([np.asarray(y, np.int32) for _, y in sets])
    self._part = np.concatenate([np.full(len(y), k, np.int32) for k, (_, y) in enumerate(sets)])
    self._process = (int(process_index), int(process_count))
    self._iterator, self._position = None, 0  # batches taken from the cycling pipeline

  @property
  def size(self) -> int:
    return len(self._members)

  def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if self.size == 0:
      return
    grain = _require("grain", "Streaming image folders")
    if self._iterator is None:
      fn = _EvalBatch(self._records, self._members, self._labels, self._part, self.global_batch_size, *self._process)
      self._iterator = _iterate(grain.MapDataset.range(0, _HORIZON).map(fn), self._workers)
    count = -(-self.size // self.global_batch_size)
    while self._position % count:  # an earlier pass stopped early: skip to the start of the next pass
      next(self._iterator)
      self._position += 1
    for _ in range(count):
      batch = next(self._iterator)
      self._position += 1
      yield batch

  def close(self) -> None:
    if self._iterator is not None:
      _close(self._iterator)
    self._iterator, self._position = None, 0
