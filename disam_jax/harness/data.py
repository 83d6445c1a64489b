"""Domain-generalization datasets: a registry, a train/val/test split, and a DomainBed batch sampler.

Every dataset is loaded into one `DomainDataset`: per-domain float32 images in [0, 1] (small bundled datasets) or
int64 record indices (streamed ones) and int32 labels, with the domain and class names. Three mechanisms cover all
registered names:

* rotation domains (``rotated_digits``, ``rotated_animals``, ``tfds:<name>``): one pool of images split into six
  disjoint groups by a seeded permutation, group k rotated by (0, 15, 30, 45, 60, 75)[k] degrees, as DomainBed's
  RotatedMNIST does. ``rotated_digits`` uses scikit-learn's bundled 8x8 digits and needs no download.
* image folders in DomainBed layout ``root/<domain>/<class>/*.jpg|jpeg|png`` (``pacs``, ``vlcs``, ``office_home``,
  ``terra_incognita``, ``domain_net``, and the generic ``image_folder``) are **streamed**, never held: the folder is
  converted once into ArrayRecord shards of its original image files (`streaming.convert_folder`: all cores, behind a
  lock, renamed into place when complete) and the `DomainDataset` holds, per domain, only the int64 record indices
  and int32 labels of its images, with `DomainDataset.records` to read them through (`streaming.StreamedTrainFeed`,
  `streaming.StreamedEvalFeed`: grain workers decode, augment and resize to uint8). Splits and the regimes work on
  these index arrays as on pixels. The conversion is a cache outside the dataset folder (`default_cache_dir`:
  ``$XDG_CACHE_HOME/disam_jax/tfds``, else ``~/.cache/disam_jax/tfds``; ``cache_dir=`` or ``$DISAM_JAX_TFDS_DIR`` to
  choose), so shared and read-only datasets stay untouched. Nothing is ever downloaded.
* ``tfds:<name>`` reads a TFDS catalog dataset the user has already prepared (array_record) under ``data_dir``,
  **streamed** as well: each rotation domain holds int64 indices into TFDS's random-access source of the requested
  splits and `records` is a `tfds_records.TfdsRecords`, which resizes and rotates each image in grain's workers.

Only numpy, the standard library and the JAX-free name table `_choices` are imported here; scikit-learn,
tensorflow-datasets, Pillow and animal-mnist are imported by the functions that need them
(``pip install 'disam_jax[harness]'``).

Example::

  ds = load_dataset("rotated_digits", seed=0)
  split = split_dataset(ds, held_out="75", seed=0)
  sampler = DomainBatchSampler(split.train, batch_size_per_domain=32, seed=0)
  x, y = sampler.next()   # x: [5, 32, 8, 8, 1], y: [5, 32]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from disam_jax.harness import _choices

__all__ = [
  "COLOR_DOMAINS",
  "DATASETS",
  "DatasetSpec",
  "DomainBatchSampler",
  "MergedBatchSampler",
  "DomainDataset",
  "DomainSplit",
  "ROTATION_DEGREES",
  "dataset_domains",
  "default_cache_dir",
  "describe",
  "load_dataset",
  "split_dataset",
]

_log = logging.getLogger(__name__)

_HARNESS_EXTRA = "pip install 'disam_jax[harness]'"
ROTATION_DEGREES = (0, 15, 30, 45, 60, 75)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Where image-folder datasets are converted to TFDS when no cache_dir is given; overrides `default_cache_dir()`.
TFDS_DIR_ENV = "DISAM_JAX_TFDS_DIR"
# The subfolder of the cache holding image-folder conversions (`streaming.convert_folder`).
_FOLDER_CACHE = "disam_domain_image_folder"
_LAYOUT = "root/<domain>/<class>/*.jpg|*.jpeg|*.png"
_NO_DOWNLOAD = (
  "No download is attempted: these datasets must be placed on local disk by the user "
  "(e.g. with DomainBed's download script)."
)


# ---------------------------------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DomainDataset:
  """All images of a dataset, grouped by domain.

  Attributes:
    name: registry name the dataset was loaded under.
    domains: domain names, e.g. ``("0", "15", ...)`` for rotations, ``("art_painting", ...)`` for PACS.
    classes: class names; a label ``k`` means ``classes[k]``.
    images: one float32 array ``[n_i, H, W, C]`` with values in [0, 1] per domain; for a streamed dataset
      (`records` set), one int64 array ``[n_i]`` of record indices per domain.
    labels: one int32 array ``[n_i]`` per domain.
    unreadable_files: image files that could not be decoded and were skipped (paths relative to the folder).
    warnings: other problems found in the data (e.g. a class folder missing from a domain), one message each.
    records: the `streaming.RecordSet` (image folders) or `tfds_records.TfdsRecords` (``tfds:<name>``) the record
      indices of a streamed dataset point into; None: in memory.
  """

  name: str
  domains: tuple[str, ...]
  classes: tuple[str, ...]
  images: tuple[np.ndarray, ...]
  labels: tuple[np.ndarray, ...]
  unreadable_files: tuple[str, ...] = ()
  warnings: tuple[str, ...] = ()
  records: Any = None

  def __post_init__(self):
    if not (len(self.domains) == len(self.images) == len(self.labels)):
      raise ValueError(
        f"{self.name}: {len(self.domains)} domain names but {len(self.images)} image arrays and "
        f"{len(self.labels)} label arrays."
      )
    if self.records is not None:
      for domain, x, y in zip(self.domains, self.images, self.labels):
        if x.ndim != 1 or x.dtype != np.int64 or y.dtype != np.int32 or len(x) != len(y):
          raise ValueError(
            f"{self.name}/{domain}: a streamed dataset needs int64 record indices [n] and int32 "
            f"labels [n], got {x.dtype}{list(x.shape)} and {y.dtype}{list(y.shape)}."
          )
      return
    shapes = {x.shape[1:] for x in self.images}
    if len(shapes) > 1:
      raise ValueError(f"{self.name}: domains have different image shapes {sorted(shapes)}.")
    for domain, x, y in zip(self.domains, self.images, self.labels):
      if x.ndim != 4 or x.dtype != np.float32 or y.dtype != np.int32 or len(x) != len(y):
        raise ValueError(
          f"{self.name}/{domain}: expected float32 images [n, H, W, C] and int32 labels [n], got "
          f"{x.dtype}{list(x.shape)} and {y.dtype}{list(y.shape)}."
        )

  @property
  def input_shape(self) -> tuple[int, int, int]:
    if self.records is not None:
      return tuple(self.records.image_shape)
    return tuple(self.images[0].shape[1:])

  @property
  def streamed(self) -> bool:
    return self.records is not None

  @property
  def num_classes(self) -> int:
    return len(self.classes)


@dataclasses.dataclass(frozen=True)
class DomainSplit:
  """A leave-domains-out split in DomainBed's protocol.

  Attributes:
    train_domains: names of the training domains.
    test_domains: names of the held-out domains.
    train: ``(x, y)`` per training domain: the part used for training (``1 - holdout_fraction``).
    val: ``(x, y)`` per training domain: the rest, for training-domain validation (model selection).
    test: ``(x, y)`` per held-out domain: all of its data.
    val_domains: names of the `val` parts when the training part was regrouped into other domains
      (`harness.regimes`); empty: the same as `train_domains`.
    records: the dataset's `streaming.RecordSet` when `x` are record indices (a streamed dataset); None: pixels.
  """

  train_domains: tuple[str, ...]
  test_domains: tuple[str, ...]
  train: tuple[tuple[np.ndarray, np.ndarray], ...]
  val: tuple[tuple[np.ndarray, np.ndarray], ...]
  test: tuple[tuple[np.ndarray, np.ndarray], ...]
  val_domains: tuple[str, ...] = ()
  records: Any = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One registry entry.

  Attributes:
    name: the registry name.
    load: ``load(spec, data_dir, seed, image_size) -> DomainDataset``.
    domains: the domain names (for image folders: the folder names that must exist); empty when discovered.
    classes: class names when fixed by the source; empty when read from the class folders.
    folder: the DomainBed folder name under ``data_dir`` (image folders only).
    default_image_size: side length images are resized to when ``image_size`` is None (None: native size).
    description: one line for listings and errors.
  """

  name: str
  load: Callable[..., DomainDataset]
  domains: tuple[str, ...] = ()
  classes: tuple[str, ...] = ()
  folder: str | None = None
  default_image_size: int | None = None
  description: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Optional dependencies
# ---------------------------------------------------------------------------------------------------------------------


def _require(module: str, purpose: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"{purpose} needs the {module!r} package: {_HARNESS_EXTRA}") from e


def _require_tfds():
  tfds = _require("tensorflow_datasets", "Reading image folders and TFDS datasets")
  _require("array_record", "Reading TFDS datasets in array_record format")
  _require("PIL", "Decoding images stored in TFDS datasets")
  return tfds


# ---------------------------------------------------------------------------------------------------------------------
# Rotation domains (RotatedMNIST construction)
# ---------------------------------------------------------------------------------------------------------------------


def _rotate(images: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates ``[n, H, W, C]`` images counter-clockwise about their centre; bilinear, zero outside the image.

  Matches torchvision's ``rotate(..., interpolation=BILINEAR, fill=0)`` used by DomainBed's RotatedMNIST: each
  output pixel samples the input at the inversely rotated position, with pixel centres at integer coordinates
  and the rotation centre at ((H - 1) / 2, (W - 1) / 2).
  """
  images = np.asarray(images, np.float32)
  if degrees % 360 == 0:
    return images.copy()
  _, h, w, _ = images.shape
  theta = np.deg2rad(degrees)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  x, y = cols - cx, cy - rows  # y points up, so positive angles turn counter-clockwise on screen
  src_x = np.cos(theta) * x + np.sin(theta) * y
  src_y = -np.sin(theta) * x + np.cos(theta) * y
  src_r, src_c = cy - src_y, src_x + cx
  r0, c0 = np.floor(src_r).astype(np.int64), np.floor(src_c).astype(np.int64)
  fr, fc = (src_r - r0)[..., None], (src_c - c0)[..., None]
  # One ring of zeros lets samples within a pixel of the border blend with the fill instead of being cut off.
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  top, bottom = np.clip(r0 + 1, 0, h + 1), np.clip(r0 + 2, 0, h + 1)
  left, right = np.clip(c0 + 1, 0, w + 1), np.clip(c0 + 2, 0, w + 1)
  out = (
    (1 - fr) * (1 - fc) * padded[:, top, left]
    + (1 - fr) * fc * padded[:, top, right]
    + fr * (1 - fc) * padded[:, bottom, left]
    + fr * fc * padded[:, bottom, right]
  )
  inside = (src_r > -1) & (src_r < h) & (src_c > -1) & (src_c < w)
  return (out * inside[None, :, :, None]).astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of float ``[n, H, W, C]`` images to ``[n, size, size, C]`` with Pillow."""
  if images.shape[1:3] == (size, size):
    return images
  pil = _require("PIL.Image", "Resizing images")
  out = np.empty((len(images), size, size, images.shape[3]), np.float32)
  for i, image in enumerate(images):
    for ch in range(images.shape[3]):
      resized = pil.fromarray(np.ascontiguousarray(image[..., ch]), mode="F").resize((size, size), pil.BILINEAR)
      out[i, ..., ch] = np.asarray(resized)
  return np.clip(out, 0.0, 1.0)


def _rotation_domains(
  name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], seed: int, image_size: int | None
) -> DomainDataset:
  """Disjoint groups of one image pool, group k rotated by ROTATION_DEGREES[k] (DomainBed's RotatedMNIST)."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[..., None]
  if image_size is not None:
    images = _resize(images, image_size)
  order = np.random.default_rng(seed).permutation(len(images))
  groups = [order[k :: len(ROTATION_DEGREES)] for k in range(len(ROTATION_DEGREES))]
  return DomainDataset(
    name=name,
    domains=tuple(str(d) for d in ROTATION_DEGREES),
    classes=tuple(classes),
    images=tuple(_rotate(images[g], d) for g, d in zip(groups, ROTATION_DEGREES)),
    labels=tuple(np.asarray(labels[g], np.int32) for g in groups),
  )


def _sklearn_digits(dataset: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits as `(images [n, 8, 8] float32 in [0, 1], labels [n])`, for `dataset`."""
  datasets = _require("sklearn.datasets", f"{dataset} (scikit-learn's bundled digits)")
  digits = datasets.load_digits()
  return (digits.images / 16.0).astype(np.float32), digits.target  # pixel values are counts 0..16


def _load_rotated_digits(spec: DatasetSpec, data_dir, seed, image_size) -> DomainDataset:
  del data_dir  # bundled with scikit-learn
  images, labels = _sklearn_digits("rotated_digits")
  return _rotation_domains(spec.name, images, labels, spec.classes, seed, image_size)


def _load_rotated_animals(spec: DatasetSpec, data_dir, seed, image_size) -> DomainDataset:
  del data_dir  # bundled with the animal-mnist package
  import gzip
  import importlib.resources

  from disam_jax.harness.weight_files import load_numpy_pickle

  try:
    package = importlib.resources.files("animal_mnist")
  except ImportError as e:  # ModuleNotFoundError
    raise ImportError(
      "rotated_animals needs the animal-mnist package: pip install --no-deps animal-mnist==0.4 "
      "(--no-deps because it declares TensorFlow, which is not needed to read its data)"
    ) from e
  folder = package / "data" / "Animal_MNIST"
  # Pickles shipped inside the installed package (a numpy uint8 [10000, 28, 28] and an int64 [10000] array), read
  # by an unpickler that admits plain numpy arrays only.
  with (folder / "animal_data_version_3.gz").open("rb") as raw, gzip.open(raw) as f:
    images = np.asarray(load_numpy_pickle(f, where="animal_data_version_3.gz"))
  with (folder / "animal_label_version_3.gz").open("rb") as raw, gzip.open(raw) as f:
    labels = np.asarray(load_numpy_pickle(f, where="animal_label_version_3.gz"))
  return _rotation_domains(spec.name, images / np.float32(255.0), labels, spec.classes, seed, image_size)


# ---------------------------------------------------------------------------------------------------------------------
# Colored digits (ColoredMNIST construction)
# ---------------------------------------------------------------------------------------------------------------------

# Domain name -> probability that the colour disagrees with the (noisy) label; DomainBed's '+90%', '+80%', '-90%'.
COLOR_DOMAINS = (("agree90", 0.1), ("agree80", 0.2), ("agree10", 0.9))
COLOR_LABEL_NOISE = 0.25


def _color_domains(name: str, images: np.ndarray, digits: np.ndarray, seed: int) -> DomainDataset:
  """DomainBed's ColoredMNIST construction on any grey digit images ``[n, H, W]`` in [0, 1].

  The pool is shuffled by a seeded permutation and dealt into the three domains of `COLOR_DOMAINS` (example k to
  domain k mod 3). In each domain: label = (digit < 5), flipped with probability 0.25; colour = label, flipped with
  the domain's probability e (0.1, 0.2, 0.9); the image is put in channel `colour` of a 2-channel image and the
  other channel is zero. Colour agrees with the label with probability 1 - e (0.9, 0.8, 0.1): a shortcut that
  predicts the label better than the shape (0.75) in the first two domains and is reversed in the third.
  """
  rng = np.random.default_rng((seed, 31337))
  order = rng.permutation(len(images))
  xs, ys = [], []
  for k, (_, flip_color) in enumerate(COLOR_DOMAINS):
    idx = order[k :: len(COLOR_DOMAINS)]
    labels = (digits[idx] < 5).astype(np.int32) ^ (rng.random(len(idx)) < COLOR_LABEL_NOISE).astype(np.int32)
    colors = labels ^ (rng.random(len(idx)) < flip_color).astype(np.int32)
    x = np.zeros(images[idx].shape + (2,), np.float32)
    x[np.arange(len(idx)), ..., colors] = images[idx]
    xs.append(x)
    ys.append(labels)
  return DomainDataset(
    name=name,
    domains=tuple(d for d, _ in COLOR_DOMAINS),
    classes=("digit>=5", "digit<5"),
    images=tuple(xs),
    labels=tuple(ys),
  )


def _load_colored_digits(spec: DatasetSpec, data_dir, seed, image_size) -> DomainDataset:
  del data_dir  # bundled with scikit-learn
  images, labels = _sklearn_digits("colored_digits")
  if image_size is not None:
    images = _resize(images[..., None], image_size)[..., 0]
  return _color_domains(spec.name, images, labels, seed)


# ---------------------------------------------------------------------------------------------------------------------
# Image folders -> TFDS (array_record) -> NumPy
# ---------------------------------------------------------------------------------------------------------------------


def _layout_error(cls, message: str):
  return cls(f"{message}\nExpected layout: {_LAYOUT} (class folders may be empty). {_NO_DOWNLOAD}")


def _visible_dirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _folder_root(spec: DatasetSpec, data_dir: str | None) -> str:
  """The folder holding the domain folders: ``data_dir/<spec.folder>``, or ``data_dir`` itself."""
  what = f"{spec.name}" + (f" (DomainBed folder {spec.folder}/)" if spec.folder else "")
  if data_dir is None:
    raise ValueError(
      f"{what} needs data_dir: "
      + ("the folder holding its domain folders." if not spec.folder else f"the folder that contains {spec.folder}/.")
    )
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if not os.path.isdir(data_dir):
    raise _layout_error(FileNotFoundError, f"{what}: data_dir {data_dir} does not exist.")
  if spec.folder is None:
    return data_dir
  root = os.path.join(data_dir, spec.folder)
  if os.path.isdir(root):
    return root
  if all(os.path.isdir(os.path.join(data_dir, d)) for d in spec.domains):
    return data_dir  # data_dir already is the dataset folder
  raise _layout_error(
    FileNotFoundError, f"{what}: {root} does not exist (domains expected there: {', '.join(spec.domains)})."
  )


def _folder_domains(spec: DatasetSpec, root: str) -> list[str]:
  """The domain folders of `root` (the registered ones, which must all exist, or every visible subfolder)."""
  if spec.domains:
    missing = [d for d in spec.domains if not os.path.isdir(os.path.join(root, d))]
    if missing:
      raise _layout_error(
        FileNotFoundError,
        f"{spec.name}: domain folder(s) {missing} missing in {root}, which has {_visible_dirs(root)}; "
        f"{spec.name} needs all of {list(spec.domains)}.",
      )
    return list(spec.domains)
  domains = _visible_dirs(root)
  if not domains:
    raise _layout_error(ValueError, f"{spec.name}: {root} contains no domain folders.")
  return domains


def _scan_folder(spec: DatasetSpec, root: str):
  """Lists domains, classes (sorted union over domains), image files and warnings; validates the layout."""
  domains = _folder_domains(spec, root)
  classes_by_domain = {}
  for d in domains:
    classes_by_domain[d] = _visible_dirs(os.path.join(root, d))
    if not classes_by_domain[d]:
      raise _layout_error(ValueError, f"{spec.name}: domain folder {os.path.join(root, d)} has no class folders.")
  # Classes are the union over domains so that a label means the same class everywhere; a class folder missing
  # from a domain only means that domain has no images of it (warned, as it often signals an incomplete copy).
  classes = sorted(set().union(*classes_by_domain.values()))
  notes = []
  for d in domains:
    absent = sorted(set(classes) - set(classes_by_domain[d]))
    if absent:
      notes.append(f"{spec.name}: domain {d!r} has no folder for class(es) {absent}; it has no images of them.")
  files = []  # (relative path, domain, class)
  for d in domains:
    count = 0
    for c in classes_by_domain[d]:
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, d, c)):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for f in sorted(filenames):
          if f.lower().endswith(_IMAGE_SUFFIXES) and not f.startswith("."):
            files.append((os.path.relpath(os.path.join(dirpath, f), root), d, c))
            count += 1
    if count == 0:
      raise _layout_error(ValueError, f"{spec.name}: domain {d!r} in {root} has no .jpg/.jpeg/.png images.")
  return domains, classes, files, notes


def default_cache_dir() -> str:
  """Where image folders are converted to TFDS by default: ``$DISAM_JAX_TFDS_DIR`` if set, else
  ``$XDG_CACHE_HOME/disam_jax/tfds`` (``~/.cache/disam_jax/tfds`` when XDG_CACHE_HOME is unset)."""
  if os.environ.get(TFDS_DIR_ENV):
    return os.path.abspath(os.path.expanduser(os.environ[TFDS_DIR_ENV]))
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(os.path.abspath(xdg), "disam_jax", "tfds")


@contextlib.contextmanager
def _quiet_tfds(tfds):
  """Silences TFDS while it converts or reads: its stdout lines ("Downloading and preparing dataset", although
  nothing is downloaded), progress bars and absl warnings (OpenCV missing, custom configuration), and removes the
  scratch folders it makes with `tempfile` (one empty /tmp/tmp*tfds per new builder otherwise)."""
  from tensorflow_datasets.core.utils import tqdm_utils

  absl = logging.getLogger("absl")
  level, progress, tempdir = absl.level, getattr(tqdm_utils, "_active", True), tempfile.tempdir
  scratch = tempfile.mkdtemp(prefix="disam_jax-tfds-")
  absl.setLevel(logging.ERROR)
  tfds.display_progress_bar(False)
  tempfile.tempdir = scratch
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tempfile.tempdir = tempdir
    tfds.display_progress_bar(progress)
    absl.setLevel(level)
    shutil.rmtree(scratch, ignore_errors=True)


def _load_image_folder(spec: DatasetSpec, data_dir, seed, image_size, cache_dir=None) -> DomainDataset:
  """An image folder as a streamed `DomainDataset`: converted once (`streaming.convert_folder`), its images the
  record indices of the conversion (int64 ``[n_i]`` per domain) with `records` to read them through."""
  from disam_jax.harness import streaming

  del seed  # the folder fixes the domains; splits are seeded in split_dataset
  _require("array_record", "Reading image folders")
  _require("grain", "Streaming image folders")
  _require("PIL", "Decoding image files")
  root = _folder_root(spec, data_dir)
  image_size = int(image_size or spec.default_image_size)
  domains, classes, files, notes = _scan_folder(spec, root)
  for note in notes:
    warnings.warn(note, stacklevel=2)

  cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
  rels = [rel for rel, _, _ in files]
  # The original files are stored: one conversion serves every image size.
  key = f"{spec.name}_{streaming.fingerprint(root, rels, (tuple(domains), tuple(classes)))}"
  numbered = [(rel, domains.index(d), classes.index(c)) for rel, d, c in files]
  directory, meta = streaming.convert_folder(
    root,
    numbered,
    domains=domains,
    classes=classes,
    cache_dir=os.path.join(cache_dir, _FOLDER_CACHE),
    key=key,
    on_convert=lambda n: _log.info(
      "converting %s (%d image files) to ArrayRecord under %s, once: later runs reuse it while the files are unchanged",
      root,
      n,
      cache_dir,
    ),
  )
  skipped = tuple(meta.get("skipped_files", ()))
  if skipped:  # on every load, converted now or earlier
    shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    warnings.warn(f"{root}: skipped {len(skipped)} unreadable image file(s) of {len(files)}: {shown}", stacklevel=2)
  label_of, domain_of = streaming.read_index(directory)
  records = streaming.RecordSet(directory, tuple(os.path.join(directory, s) for s in meta["shards"]), image_size)
  images, labels = [], []
  for k, d in enumerate(domains):
    members = np.flatnonzero(domain_of == k)  # records are in scan order: domain, class, path
    if len(members) == 0:
      raise ValueError(f"{spec.name}: domain {d!r} has no readable images in {root}.")
    images.append(members.astype(np.int64))
    labels.append(label_of[members])
  return DomainDataset(
    spec.name,
    tuple(domains),
    tuple(classes),
    tuple(images),
    tuple(labels),
    unreadable_files=skipped,
    warnings=tuple(notes),
    records=records,
  )


# ---------------------------------------------------------------------------------------------------------------------
# tfds:<name>: a TFDS catalog dataset already prepared locally, made into rotation domains
# ---------------------------------------------------------------------------------------------------------------------


def _square_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes one uint8 ``[H, W, C]`` image to ``[size, size, C]`` (Pillow, bilinear)."""
  image = np.asarray(image, np.uint8)
  if image.shape[:2] == (size, size):
    return image
  pil = _require("PIL.Image", "Resizing images")
  channels = image.shape[-1]
  resized = pil.fromarray(image[..., 0] if channels == 1 else image).resize((size, size), pil.BILINEAR)
  return np.asarray(resized).reshape(size, size, channels)


def _load_tfds(reference: str, data_dir, seed, image_size) -> DomainDataset:
  """``reference`` is ``<name>[/<config>][/<version>][:<split>,<split>...]``; all splits when none are given."""
  tfds = _require_tfds()
  _require("grain", "Streaming TFDS datasets")
  with _quiet_tfds(tfds):
    return _read_tfds(tfds, reference, data_dir, seed, image_size)


def _read_tfds(tfds, reference: str, data_dir, seed, image_size) -> DomainDataset:
  name, _, split_text = reference.partition(":")
  requested = [s.strip() for s in split_text.split(",") if s.strip()]
  where = data_dir or "TFDS's default data_dir"
  not_prepared = (
    f"TFDS dataset {name!r} is not prepared under {where}. Prepare it there first in array_record format "
    f"(e.g. `tfds build {name} --file_format=array_record --data_dir=...`, on a machine with TensorFlow and "
    "network access). No download is attempted here."
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"TFDS dataset {name!r} is neither in the TFDS catalog nor under {where}.") from None
  splits = requested or list(builder.info.splits)
  if not splits:
    raise FileNotFoundError(not_prepared)
  try:
    sources = builder.as_data_source(split=splits)  # never download_and_prepare: no network, ever
  except Exception as e:
    if not builder.is_prepared():
      raise FileNotFoundError(not_prepared) from e
    if "TFRECORD" in str(e).upper():
      raise ValueError(
        f"TFDS dataset {name!r} under {where} is stored as tfrecord, which needs TensorFlow to read; "
        "prepare it again with file_format='array_record'."
      ) from e
    raise

  features = dict(builder.info.features.items())
  image_key, label_key = (list(builder.info.supervised_keys or ()) + [None, None])[:2]
  if not isinstance(features.get(image_key), tfds.features.Image):
    image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
  if not isinstance(features.get(label_key), tfds.features.ClassLabel):
    label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
  if image_key is None or label_key is None:
    raise ValueError(f"tfds:{name} needs an Image feature and a ClassLabel feature; it has {builder.info.features}.")

  shape = tuple(features[image_key].shape)
  channels = shape[-1] if len(shape) == 3 else None
  if channels is None:
    raise ValueError(
      f"tfds:{name}: its Image feature has no fixed channel count ({shape}); only images with a "
      "declared shape [H, W, C] can be streamed."
    )
  if image_size is None and None in shape[:2]:
    raise ValueError(
      f"tfds:{name} images have no fixed size ({shape}); pass image_size (--image-size N) to resize them to a square."
    )
  image_shape = (int(image_size), int(image_size), channels) if image_size is not None else shape
  labels = _tfds_labels(tfds, builder, splits, sources, image_key, label_key)
  order = np.random.default_rng(seed).permutation(len(labels))  # as `_rotation_domains`
  members = [order[k :: len(ROTATION_DEGREES)].astype(np.int64) for k in range(len(ROTATION_DEGREES))]
  groups = np.zeros(len(labels), np.uint8)
  for k, m in enumerate(members):
    groups[m] = k
  from disam_jax.harness import tfds_records

  records = tfds_records.TfdsRecords(
    name,
    data_dir,
    splits,
    image_key,
    image_shape,
    None if image_size is None else int(image_size),
    groups,
    sources=sources,
  )
  return DomainDataset(
    name=f"tfds:{reference}",
    domains=tuple(str(d) for d in ROTATION_DEGREES),
    classes=tuple(features[label_key].names),
    images=tuple(members),
    labels=tuple(labels[m] for m in members),
    records=records,
  )


def _tfds_labels(tfds, builder, splits, sources, image_key: str, label_key: str) -> np.ndarray:
  """int32 ``[n]``: the label of every example of `sources` (laid end to end), read without decoding the images
  where TFDS allows it (``SkipDecoding``); tfds.testing.mock_data does not (it needs TensorFlow for that), so there
  every example is decoded once and dropped."""
  try:
    plain = builder.as_data_source(split=splits, decoders={image_key: tfds.decode.SkipDecoding()})
    return np.asarray([example[label_key] for source in plain for example in _examples(source)], np.int32)
  except Exception:  # noqa: BLE001 - any failure of the fast path falls back to decoding
    return np.asarray([example[label_key] for source in sources for example in _examples(source)], np.int32)


def _examples(source):
  """Every example of a TFDS random-access source, by item access (all tfds.testing.mock_data supports)."""
  for i in range(len(source)):
    yield source[i]


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


def _folder_spec(name, folder, domains):
  return DatasetSpec(name, _load_image_folder, tuple(domains), (), folder, 224, _choices.DATASETS[name])


# The animal-mnist labels follow the class order of the package's description (checked against the images).
_ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _registry() -> dict[str, DatasetSpec]:
  """The specs, keyed and ordered by `_choices.DATASETS` (the JAX-free table of names and descriptions that
  `disam-train --help` and --list read); an error if the two name sets differ."""
  specs = {
    spec.name: spec
    for spec in (
      DatasetSpec(
        "rotated_digits",
        _load_rotated_digits,
        tuple(map(str, ROTATION_DEGREES)),
        tuple(map(str, range(10))),
        description=_choices.DATASETS["rotated_digits"],
      ),
      DatasetSpec(
        "rotated_animals",
        _load_rotated_animals,
        tuple(map(str, ROTATION_DEGREES)),
        _ANIMAL_CLASSES,
        description=_choices.DATASETS["rotated_animals"],
      ),
      DatasetSpec(
        "colored_digits",
        _load_colored_digits,
        tuple(d for d, _ in COLOR_DOMAINS),
        ("digit>=5", "digit<5"),
        description=_choices.DATASETS["colored_digits"],
      ),
      _folder_spec("pacs", "PACS", ("art_painting", "cartoon", "photo", "sketch")),
      _folder_spec("vlcs", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
      _folder_spec("office_home", "office_home", ("Art", "Clipart", "Product", "Real World")),
      _folder_spec("terra_incognita", "terra_incognita", ("location_100", "location_38", "location_43", "location_46")),
      _folder_spec("domain_net", "domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
      _folder_spec("image_folder", None, ()),
    )
  }
  return _choices.ordered_like(specs, _choices.DATASETS, "DATASETS")


DATASETS: dict[str, DatasetSpec] = _registry()


def load_dataset(
  name: str,
  *,
  data_dir: str | None = None,
  seed: int = 0,
  image_size: int | None = None,
  cache_dir: str | None = None,
) -> DomainDataset:
  """Loads a registered dataset, or ``tfds:<name>`` (a TFDS dataset prepared under ``data_dir``), by domain.

  Args:
    name: a key of `DATASETS`, or ``tfds:<name>[:<split>,...]`` for a TFDS image classification dataset already
      prepared (array_record) under ``data_dir``; its images are split into the six rotation domains.
    data_dir: for the DomainBed image folders, the folder holding ``PACS/``, ``VLCS/``, ... (or the dataset folder
      itself); for ``image_folder``, the root whose subfolders are the domains; for ``tfds:``, the TFDS data_dir.
      Image folders are converted once to TFDS under ``cache_dir`` and reused while the files are unchanged (same
      names, sizes and modification times); a changed folder is converted again beside the old conversion, which
      can be deleted. Nothing is written into ``data_dir``. Corrupt images are skipped, listed in the result's
      ``unreadable_files`` and warned about on every load (the list is kept with the conversion). All images are
      streamed: the result holds record indices and labels (a few bytes per image), `records` reads them.
    seed: seeds the assignment of images to rotation domains (ignored by image folders, whose domains are fixed).
    image_size: resize images to ``image_size x image_size`` (default: 224 for image folders, native otherwise).
    cache_dir: where image folders are converted (default: `default_cache_dir()`, outside the dataset folder).

  Returns:
    A `DomainDataset`.
  """
  if name.startswith("tfds:"):
    return _load_tfds(name[len("tfds:") :], data_dir, seed, image_size)
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or tfds:<name>.")
  spec = DATASETS[name]
  if spec.load is _load_image_folder:
    return spec.load(spec, data_dir, seed, image_size, cache_dir=cache_dir)
  return spec.load(spec, data_dir, seed, image_size)


def dataset_domains(name: str, data_dir: str | None = None) -> tuple[str, ...]:
  """The domain names `load_dataset(name, data_dir=...)` will have, found without loading or converting anything
  (an image folder's layout is checked and its domain folders listed), so that settings can be validated before
  anything is written."""
  if name.startswith("tfds:"):
    return tuple(str(d) for d in ROTATION_DEGREES)
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or tfds:<name>.")
  spec = DATASETS[name]
  if spec.load is _load_image_folder:
    return tuple(_folder_domains(spec, _folder_root(spec, data_dir)))
  return spec.domains


def describe(ds: DomainDataset) -> dict[str, Any]:
  """A JSON summary of a loaded dataset: examples per domain, classes, and every data warning (unreadable files
  skipped, other warnings), as `experiment.run_experiment` writes it to ``data.json`` for the report."""
  return {
    "dataset": ds.name,
    "domains": {d: int(len(y)) for d, y in zip(ds.domains, ds.labels)},
    "classes": len(ds.classes),
    "unreadable_files": list(ds.unreadable_files),
    "warnings": list(ds.warnings),
  }


# ---------------------------------------------------------------------------------------------------------------------
# Splitting and batching
# ---------------------------------------------------------------------------------------------------------------------


def _domain_index(ds: DomainDataset, domain) -> int:
  if isinstance(domain, str):
    if domain in ds.domains:
      return ds.domains.index(domain)
    raise ValueError(f"Unknown domain {domain!r} for {ds.name}; valid domains: {list(ds.domains)}.")
  if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool):
    if 0 <= domain < len(ds.domains):
      return int(domain)
    hint = (
      f" (an int is a domain index; pass {str(domain)!r} for the domain named so)" if str(domain) in ds.domains else ""
    )
    raise ValueError(
      f"Domain index {domain} out of range for {ds.name}{hint}; valid: 0..{len(ds.domains) - 1} "
      f"or the names {list(ds.domains)}."
    )
  raise ValueError(f"held_out entries must be domain names or indices, got {domain!r}; valid: {list(ds.domains)}.")


def split_dataset(
  ds: DomainDataset, held_out: str | int | Sequence[str | int], *, holdout_fraction: float = 0.2, seed: int = 0
) -> DomainSplit:
  """Holds out domains for testing and splits each training domain into train and validation parts.

  Each training domain is shuffled by a generator seeded with ``(seed, domain index)`` so that its split does
  not depend on which other domains are held out; the first ``int(n * holdout_fraction)`` shuffled examples
  become its validation part (DomainBed's training-domain validation), the rest its training part.

  Args:
    ds: the dataset.
    held_out: the test domain(s), by name or index.
    holdout_fraction: fraction of each training domain kept for validation, in [0, 1).
    seed: seeds the shuffles.
  """
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
  entries = [held_out] if isinstance(held_out, (str, int, np.integer)) else list(held_out)
  test_idx = [_domain_index(ds, h) for h in entries]
  if not test_idx:
    raise ValueError(f"held_out is empty; name at least one of {list(ds.domains)}.")
  if len(set(test_idx)) != len(test_idx):
    raise ValueError(f"held_out names a domain twice: {entries}.")
  train_idx = [i for i in range(len(ds.domains)) if i not in test_idx]
  if not train_idx:
    raise ValueError(f"held_out {entries} leaves no training domain in {list(ds.domains)}.")
  train, val = [], []
  for i in train_idx:
    x, y = ds.images[i], ds.labels[i]
    order = np.random.default_rng((seed, i)).permutation(len(x))
    n_val = int(len(x) * holdout_fraction)
    val.append((x[order[:n_val]], y[order[:n_val]]))
    train.append((x[order[n_val:]], y[order[n_val:]]))
  return DomainSplit(
    train_domains=tuple(ds.domains[i] for i in train_idx),
    test_domains=tuple(ds.domains[i] for i in test_idx),
    train=tuple(train),
    val=tuple(val),
    test=tuple((ds.images[i], ds.labels[i]) for i in test_idx),
    records=ds.records,
  )


class DomainBatchSampler:
  """DomainBed batching: each step, every training domain contributes ``batch_size_per_domain`` examples.

  Examples are drawn with replacement (DomainBed's infinite loaders do the same) from one seeded NumPy stream,
  domain after domain. `state()` / `restore()` capture the stream so a resumed run draws the identical batches.

  Args:
    train: ``(x, y)`` per training domain, e.g. ``split.train``.
    batch_size_per_domain: examples per domain per step.
    seed: seeds the stream.
    domain_names: optional names used in error messages.
  """

  def __init__(
    self,
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    batch_size_per_domain: int,
    seed: int,
    *,
    domain_names: Sequence[str] | None = None,
  ):
    if not train:
      raise ValueError("DomainBatchSampler needs at least one training domain.")
    if int(batch_size_per_domain) < 1:
      raise ValueError(f"batch_size_per_domain must be >= 1, got {batch_size_per_domain}.")
    names = list(domain_names) if domain_names is not None else [f"#{i}" for i in range(len(train))]
    self._x = [np.asarray(x, np.float32) for x, _ in train]
    self._y = [np.asarray(y, np.int32) for _, y in train]
    self._batch = int(batch_size_per_domain)
    for name, x, y in zip(names, self._x, self._y):
      if len(x) != len(y):
        raise ValueError(f"Training domain {name}: {len(x)} images but {len(y)} labels.")
      if self._batch > len(x):
        raise ValueError(
          f"batch_size_per_domain={self._batch} exceeds the {len(x)} training examples of domain {name}. "
          "Sampling is with replacement, but a per-domain batch larger than the domain is almost "
          "certainly a mistake."
        )
    if len({x.shape[1:] for x in self._x}) > 1:
      raise ValueError(f"Training domains have different image shapes: {[x.shape[1:] for x in self._x]}.")
    self._rng = np.random.default_rng(seed)
    self._steps = 0

  def next(self, local: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns images ``[M, b, H, W, C]`` float32 and labels ``[M, b]`` int32, one row per training domain.

    With `local`, only that slice of the per-domain batch axis is gathered (``[M, b_local, ...]``): in a
    multi-process run every process draws the same global batch indices from the same stream and loads only its
    own slice of every domain.
    """
    picks = [self._rng.integers(0, len(x), size=self._batch) for x in self._x]
    if local is not None:
      picks = [p[local] for p in picks]
    self._steps += 1
    return (
      np.stack([x[p] for x, p in zip(self._x, picks)]),
      np.stack([y[p] for y, p in zip(self._y, picks)]),
    )

  def __iter__(self):
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    return self.next()

  def state(self) -> dict[str, Any]:
    """A JSON-serializable snapshot: the bit generator state plus what it must be restored into."""
    return {
      "bit_generator": self._rng.bit_generator.state,
      "steps": self._steps,
      "batch_size_per_domain": self._batch,
      "domain_sizes": [len(x) for x in self._x],
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continues the stream captured by `state()` (from a sampler over the same domains and batch size)."""
    if state.get("batching") == "merged":
      raise ValueError(
        "The checkpoint's sampler state is of merged batches; this run draws balanced per-domain "
        "batches: resume with the run's own --batching."
      )
    mine = (self._batch, [len(x) for x in self._x])
    theirs = (state.get("batch_size_per_domain"), list(state.get("domain_sizes", [])))
    if mine != theirs:
      raise ValueError(
        f"Sampler state is for batch size {theirs[0]} over domain sizes {theirs[1]}; this sampler has "
        f"batch size {mine[0]} over {mine[1]}."
      )
    self._rng.bit_generator.state = state["bit_generator"]
    self._steps = int(state.get("steps", 0))


class MergedBatchSampler:
  """The released DISAM code's batches: one shuffled stream over all training domains together.

  As a PyTorch ``DataLoader(ConcatDataset(domains), batch_size, shuffle=True, drop_last=True)``: each epoch is a
  fresh random permutation of the ``N = sum_i n_i`` training examples (domain after domain, as `train` orders them),
  cut into ``N // batch_size`` batches; the tail of fewer than `batch_size` examples is dropped, and the next batch
  starts a new epoch. The domains present in a batch, and their counts, vary from batch to batch. One seeded NumPy
  stream draws the permutations; `state()` / `restore()` capture it (the generator's state before the current
  epoch's permutation, and the batches of it already given), so a resumed run draws the identical batches.

  Args:
    train: ``(x, y)`` per training domain, e.g. ``split.train``.
    batch_size: examples per step, all domains together (the harness uses ``HParams.batch_size * M``).
    seed: seeds the stream.
    domain_names: optional names used in error messages.
  """

  def __init__(
    self,
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    batch_size: int,
    seed: int,
    *,
    domain_names: Sequence[str] | None = None,
  ):
    if not train:
      raise ValueError("MergedBatchSampler needs at least one training domain.")
    names = list(domain_names) if domain_names is not None else [f"#{i}" for i in range(len(train))]
    xs = [np.asarray(x, np.float32) for x, _ in train]
    ys = [np.asarray(y, np.int32) for _, y in train]
    for name, x, y in zip(names, xs, ys):
      if len(x) != len(y):
        raise ValueError(f"Training domain {name}: {len(x)} images but {len(y)} labels.")
    if len({x.shape[1:] for x in xs}) > 1:
      raise ValueError(f"Training domains have different image shapes: {[x.shape[1:] for x in xs]}.")
    self._sizes = [len(y) for y in ys]
    self._batch = int(batch_size)
    if not 1 <= self._batch <= sum(self._sizes):
      raise ValueError(
        f"The merged batch of {batch_size} examples must be between 1 and the {sum(self._sizes)} "
        f"training examples of all domains together; use a smaller --batch-size."
      )
    self._x, self._y = np.concatenate(xs), np.concatenate(ys)
    self._d = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(self._sizes)])
    self._rng = np.random.default_rng(seed)
    self._steps = 0
    self._new_epoch()

  def _new_epoch(self) -> None:
    self._epoch_start = self._rng.bit_generator.state  # what `state()` records: the permutation is drawn again
    self._order = self._rng.permutation(len(self._y))
    self._given = 0  # batches of this epoch handed out

  def next(self, local: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns images ``[B, H, W, C]`` float32, labels ``[B]`` int32 and domain ids ``[B]`` int32 (index into
    `train`).

    With `local`, only that slice of the batch is gathered (``[B_local, ...]``): in a multi-process run every
    process draws the same permutation and loads only its own slice of every batch.
    """
    if (self._given + 1) * self._batch > len(self._order):  # drop_last: the tail starts a new epoch
      self._new_epoch()
    picks = self._order[self._given * self._batch : (self._given + 1) * self._batch]
    self._given += 1
    self._steps += 1
    if local is not None:
      picks = picks[local]
    return self._x[picks], self._y[picks], self._d[picks]

  def __iter__(self):
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return self.next()

  def state(self) -> dict[str, Any]:
    """A JSON-serializable snapshot: the generator's state before this epoch's permutation, the batches of the
    epoch already given, and what it must be restored into."""
    return {
      "batching": "merged",
      "epoch_bit_generator": self._epoch_start,
      "batches_in_epoch": self._given,
      "steps": self._steps,
      "batch_size": self._batch,
      "domain_sizes": list(self._sizes),
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continues the stream captured by `state()` (from a sampler over the same domains and batch size)."""
    if state.get("batching") != "merged":
      raise ValueError(
        "The checkpoint's sampler state is of balanced per-domain batches; this run draws merged "
        "batches: resume with the run's own --batching."
      )
    mine = (self._batch, list(self._sizes))
    theirs = (state.get("batch_size"), list(state.get("domain_sizes", [])))
    if mine != theirs:
      raise ValueError(
        f"Sampler state is for merged batches of {theirs[0]} over domain sizes {theirs[1]}; this sampler has "
        f"{mine[0]} over {mine[1]}."
      )
    self._rng.bit_generator.state = state["epoch_bit_generator"]
    self._new_epoch()
    self._given = int(state["batches_in_epoch"])
    self._steps = int(state.get("steps", 0))
