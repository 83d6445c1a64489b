"""Writes PyTorch checkpoint files without torch, opcode by opcode, for the tests (CI has no torch).

The pickle is the one ``torch.save(state_dict)`` writes (protocol 2): an ``OrderedDict`` filled with SETITEMS, each
tensor a REDUCE of ``torch._utils._rebuild_tensor_v2`` on a persistent storage record. Zip layout (torch >= 1.6):
``archive/data.pkl``, ``archive/byteorder``, ``archive/data/<key>``, ``archive/version``. Legacy layout (torch <
1.6): pickles of the magic number, protocol 1001 and system info, the state dict, the storage keys, then for each
storage an int64 element count and its bytes.
"""

import pickle
import struct
import zipfile

import numpy as np

STORAGES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float64): "DoubleStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.int32): "IntStorage",
  np.dtype(np.uint8): "ByteStorage",
  np.dtype(np.bool_): "BoolStorage",
}


def _global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
  return b"J" + struct.pack("<i", i)


def _tuple(items):
  return b"(" + b"".join(items) + b"t"


def state_dict_pickle(entries, legacy=False, extra=b""):
  """entries: [(name, storage_key, dtype, numel, offset, size, stride)]; `extra` is spliced in as one more item."""
  out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R", b"("]
  for name, key, dtype, numel, offset, size, stride in entries:
    pid = [_str("storage"), _global("torch", STORAGES[np.dtype(dtype)]), _str(key), _str("cpu"), _int(numel)]
    if legacy:
      pid.append(b"N")
    out += [
      _str(name),
      _global("torch._utils", "_rebuild_tensor_v2"),
      b"(",
      _tuple(pid),
      b"Q",
      _int(offset),
      _tuple(_int(s) for s in size),
      _tuple(_int(s) for s in stride),
      b"\x89",
      _global("collections", "OrderedDict"),
      b")R",
      b"tR",
    ]
  out += [extra, b"u."]
  return b"".join(out)


def _entries(arrays):
  """One storage per array, tensors contiguous at offset 0."""
  entries, storages = [], {}
  for i, (name, a) in enumerate(arrays.items()):
    a = np.require(a, requirements="C")  # ascontiguousarray would make 0-d arrays 1-d
    stride = [int(s // a.itemsize) for s in a.strides] if a.size else [1] * a.ndim
    entries.append((name, str(i), a.dtype, a.size, 0, a.shape, stride))
    storages[str(i)] = a
  return entries, storages


def write_zip_pth(path, arrays, extra=b""):
  entries, storages = _entries(arrays)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", state_dict_pickle(entries, extra=extra))
    z.writestr("archive/byteorder", b"little")
    for key, a in storages.items():
      z.writestr(f"archive/data/{key}", a.tobytes())
    z.writestr("archive/version", b"3\n")


def write_legacy_pth(path, arrays, extra=b""):
  entries, storages = _entries(arrays)
  with open(path, "wb") as f:
    f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    f.write(pickle.dumps(1001, protocol=2))
    f.write(
      pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2
      )
    )
    f.write(state_dict_pickle(entries, legacy=True, extra=extra))
    f.write(pickle.dumps(sorted(storages), protocol=2))
    for key in sorted(storages):
      f.write(struct.pack("<q", storages[key].size))
      f.write(storages[key].tobytes())


def system_call_item(command):
  """A state-dict item whose value is ``os.system(command)``: what a malicious checkpoint carries."""
  return _str("evil") + _global("os", "system") + _tuple([_str(command)]) + b"R"


def write_safetensors(path, arrays):
  """The safetensors layout: little-endian u64 header size, JSON header, one data buffer."""
  import json

  names = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.bool_): "BOOL",
  }
  header, chunks, offset = {"__metadata__": {"format": "np"}}, [], 0
  for k, a in arrays.items():
    b = np.require(a, requirements="C").tobytes()
    header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
    chunks.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))
