"""Tests for disam_jax.harness.streaming: image folders converted once into ArrayRecord and streamed through grain.

References are independent of the pipeline: pixels read with Pillow straight from the files, batches recomputed
from `step_picks` by hand, torchvision's own transforms for the augmentation statistics, and processes
(two converting at once, one killed mid-conversion, one measuring its memory) run as separate Python processes.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from disam_jax.harness import data, regimes, streaming
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import run_experiment
from tests._runs import metrics_lines, run_killed_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root, domains=("a", "b", "c"), classes=("x", "y"), per_class=6, size=(20, 14), seed=0, fmt="png"):
  """Random images root/<domain>/<class>/<i>.<fmt> of `size` (W, H); returns the root."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for d in domains:
    for c in classes:
      os.makedirs(os.path.join(root, d, c), exist_ok=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, d, c, f"{i}.{fmt}"))
  return str(root)


@pytest.fixture
def streamed(tmp_path):
  root = _folder(tmp_path / "data")
  ds = data.load_dataset("image_folder", data_dir=root, image_size=12, cache_dir=str(tmp_path / "cache"))
  return ds, data.split_dataset(ds, "c", seed=0)


def _env():
  return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------------------------------------------------
# The streamed dataset and its feeds
# ---------------------------------------------------------------------------------------------------------------------


def test_streamed_dataset_holds_indices_and_labels_only(streamed):
  ds, split = streamed
  assert ds.streamed and ds.input_shape == (12, 12, 3)
  assert [x.dtype for x in ds.images] == [np.int64] * 3 and [x.ndim for x in ds.images] == [1] * 3
  assert split.records is ds.records and [len(x) for x, _ in split.train] == [10, 10]
  # record k of the conversion is the k-th file in scan order, its bytes unchanged
  raw = ds.records.source()[int(ds.images[1][7])]
  with open(
    os.path.join(json.load(open(os.path.join(ds.records.directory, "meta.json")))["root"], "b", "y", "1.png"), "rb"
  ) as f:
    assert raw == f.read()


def test_train_batches_are_the_steps_picks_decoded_by_hand(streamed):
  """Without augmentation a batch is the eval transform of the records `step_picks` names (PIL by hand)."""
  from PIL import Image

  ds, split = streamed
  feed = streaming.StreamedTrainFeed(split.records, split.train, 4, seed=3, augment=False, workers=0)
  try:
    for step in range(2):
      x, y = feed.next()
      picks = streaming.step_picks(3, step, [len(m) for m, _ in split.train], 4)
      for d, ((members, labels), pick) in enumerate(zip(split.train, picks)):
        np.testing.assert_array_equal(y[d], labels[pick])
        for k, p in enumerate(pick):
          with Image.open(__import__("io").BytesIO(split.records.source()[int(members[p])])) as im:
            expected = np.asarray(im.convert("RGB").resize((12, 12), Image.BILINEAR))
          np.testing.assert_array_equal(x[d, k], expected)
  finally:
    feed.close()
  assert x.dtype == np.uint8 and x.shape == (2, 4, 12, 12, 3) and y.dtype == np.int32


def test_per_process_slices_are_disjoint_and_cover_the_global_batch(streamed):
  """Two processes' `local` slices of every step, augmentation included, concatenate to the one-process batch."""
  _, split = streamed
  make = lambda: streaming.StreamedTrainFeed(split.records, split.train, 6, seed=1, augment=True, workers=0)
  whole, first, second = make(), make(), make()
  try:
    for _ in range(3):
      xw, yw = whole.next()
      x0, y0 = first.next(slice(0, 3))
      x1, y1 = second.next(slice(3, 6))
      np.testing.assert_array_equal(np.concatenate([x0, x1], axis=1), xw)
      np.testing.assert_array_equal(np.concatenate([y0, y1], axis=1), yw)
  finally:
    for f in (whole, first, second):
      f.close()


def test_eval_feed_slices_cover_every_example_once(streamed):
  _, split = streamed
  parts, sets = [("val", "a"), ("val", "b"), ("test", "c")], list(split.val) + list(split.test)
  feeds = [
    streaming.StreamedEvalFeed(split.records, parts, sets, 4, process_index=p, process_count=2, workers=0)
    for p in range(2)
  ]
  whole = streaming.StreamedEvalFeed(split.records, parts, sets, 4, workers=0)
  try:
    for _ in range(2):  # the pipeline cycles: a second pass yields the same batches
      pairs = list(zip(*(f.batches() for f in feeds)))
      one = list(whole.batches())
      assert len(pairs) == len(one) == -(-whole.size // 4)
      for (a, b), full in zip(pairs, one):
        for k in range(3):
          np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), full[k])
    part = np.concatenate([p for _, _, p in one])
    assert [int((part == k).sum()) for k in range(3)] == [len(y) for _, y in sets] and (part == -1).sum() == 4 * len(
      one
    ) - whole.size
    expected = np.concatenate([streaming.read_images(split.records, x) for x, _ in sets])
    np.testing.assert_array_equal(np.concatenate([x for x, _, _ in one])[part >= 0], expected)
  finally:
    for f in feeds + [whole]:
      f.close()


def test_resumed_feed_continues_bit_exactly_and_workers_do_not_change_batches(streamed):
  _, split = streamed
  make = lambda workers: streaming.StreamedTrainFeed(
    split.records, split.train, 4, seed=2, augment=True, workers=workers
  )
  a, b = make(0), make(1)
  try:
    batches = [a.next() for _ in range(4)]
    state = json.loads(json.dumps(a.state()))  # as the checkpoint's meta stores it
    later = [a.next() for _ in range(2)]
    b.restore(state)  # a grain worker process reads it, from step 4
    for (x, y), (x2, y2) in zip(later, [b.next() for _ in range(2)]):
      np.testing.assert_array_equal(x, x2)
      np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(batches[0][0], batches[1][0])
    with pytest.raises(ValueError, match="Feed state is for"):
      make(0).restore({**state, "seed": 3})
  finally:
    a.close()
    b.close()


def test_infer_domains_is_refused_for_streamed_data_with_what_to_write(streamed):
  _, split = streamed
  with pytest.raises(ValueError, match="image folders and tfds:<name> are streamed.*--sub-domains"):
    regimes.infer_domains(split, 2, seed=0)
  # the other regimes regroup index arrays as they regroup pixels
  out = regimes.apply_regimes(split, seed=0, imbalance_ratio=2.0, domain_label_noise=0.3, sub_domains=2)
  assert out.records is split.records and len(out.train) == 4
  assert sum(len(x) for x, _ in out.train) == 15 and all(x.dtype == np.int64 for x, _ in out.train)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------------


def test_augmentation_matches_torchvision_statistics(tmp_path):
  """DomainBed's transforms as torchvision runs them vs ours on the same image: the same distribution of crops,
  flips, colours and grayscale (means and spreads of per-sample statistics over 600 draws each)."""
  from benchmarks.input_pipeline import import_torchvision

  try:
    torch, torchvision = import_torchvision()
  except ImportError:
    pytest.skip("torchvision (pip install 'disam_jax[bench]') is the reference of the augmentation statistics")
  from PIL import Image

  T = torchvision.transforms

  yy, xx = np.mgrid[0:60, 0:80]
  base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)  # a gradient: crops show
  image = Image.fromarray(base)
  reference = T.Compose(
    [
      T.RandomResizedCrop(32, scale=(0.7, 1.0)),
      T.RandomHorizontalFlip(),
      T.ColorJitter(0.3, 0.3, 0.3, 0.3),
      T.RandomGrayscale(),
    ]
  )
  torch.manual_seed(0)
  n = 600
  theirs = np.stack([np.asarray(reference(image)) for _ in range(n)]).astype(np.float64)
  ours = np.stack([streaming.train_transform(image, 32, np.random.default_rng([0, k])) for k in range(n)]).astype(
    np.float64
  )
  assert ours.shape == theirs.shape == (n, 32, 32, 3)

  def stats(x):
    gray = (np.abs(x[..., 0] - x[..., 1]).max(axis=(1, 2)) == 0) & (np.abs(x[..., 1] - x[..., 2]).max(axis=(1, 2)) == 0)
    channel = x.mean(axis=(1, 2))  # [n, 3]
    left_right = x[:, :, :8].mean(axis=(1, 2, 3)) - x[:, :, -8:].mean(axis=(1, 2, 3))  # red gradient: the flip
    return {
      "gray": gray.mean(),
      "mean": channel.mean(0),
      "spread": channel.std(0),
      "flipped": (left_right > 0).mean(),
      "contrast": x.std(axis=(1, 2, 3)).mean(),
    }

  a, b = stats(ours), stats(theirs)
  assert abs(a["gray"] - b["gray"]) < 0.05 and abs(a["gray"] - 0.1) < 0.04
  assert abs(a["flipped"] - b["flipped"]) < 0.1
  np.testing.assert_allclose(a["mean"], b["mean"], atol=6)
  np.testing.assert_allclose(a["spread"], b["spread"], rtol=0.2)
  assert abs(a["contrast"] - b["contrast"]) < 0.1 * b["contrast"]


def test_brightness_and_contrast_tables_give_pillows_bytes():
  """The lookup tables of `_color_jitter` against Pillow's `ImageEnhance` (what torchvision's PIL backend calls): the
  same bytes for every value 0..255 in every channel, over the factors ColorJitter(0.3) draws and past 1 (clipping)."""
  from PIL import Image, ImageEnhance

  rng = np.random.default_rng(0)
  values = np.arange(256, dtype=np.uint8)
  for k in range(40):
    pixels = np.stack([rng.permutation(values), rng.permutation(values), rng.permutation(values)], -1)
    image = Image.fromarray(pixels.reshape(16, 16, 3) if k % 2 else np.roll(pixels, k, 0).reshape(8, 32, 3))
    factor = float(rng.uniform(0.7, 1.3)) if k < 30 else float(rng.uniform(0, 3))
    np.testing.assert_array_equal(
      np.asarray(streaming._blend_with_constant(image, 0, factor)),
      np.asarray(ImageEnhance.Brightness(image).enhance(factor)),
    )
    np.testing.assert_array_equal(
      np.asarray(streaming._blend_with_constant(image, streaming._gray_mean(image), factor)),
      np.asarray(ImageEnhance.Contrast(image).enhance(factor)),
    )


def test_augmentation_is_a_function_of_seed_step_domain_and_position(tmp_path):
  from PIL import Image

  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
  draw = lambda *key: streaming.train_transform(image, 16, np.random.default_rng(list(key)))
  np.testing.assert_array_equal(draw(0, 5, 1, 2), draw(0, 5, 1, 2))
  assert not np.array_equal(draw(0, 5, 1, 2), draw(0, 5, 1, 3))
  assert not np.array_equal(draw(0, 5, 1, 2), draw(1, 5, 1, 2))
  assert draw(0, 1, 0, 0).shape == (16, 16, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Training on a streamed folder: exact resume with augmentation
# ---------------------------------------------------------------------------------------------------------------------


def _metrics(run_dir):
  return metrics_lines(run_dir, "c")


def _disam_folder_run(tmp_path, steps, eval_batch_size):
  """DISAM with a small MLP on a 3-domain folder under tmp_path/data (held out c), streamed in-process (0 workers)."""
  return ExperimentConfig(
    dataset="image_folder",
    data_dir=_folder(tmp_path / "data"),
    image_size=12,
    cache_dir=str(tmp_path / "cache"),
    algorithms=("disam",),
    held_out=("c",),
    steps=steps,
    eval_every=2,
    model="mlp",
    model_kwargs={"hidden": 16},
    hparams=HParams(batch_size=4),
    eval_batch_size=eval_batch_size,
    data_workers=0,
  )


def test_resume_with_augmentation_is_bit_exact(tmp_path):
  config = _disam_folder_run(tmp_path, steps=6, eval_batch_size=8)
  full = run_experiment(config, str(tmp_path / "full"), progress=False)

  interrupted = str(tmp_path / "interrupted")
  run_killed_at(config, interrupted, 3)
  resumed = run_experiment(config, interrupted, progress=False, resume=True)
  assert _metrics(str(tmp_path / "full")) == _metrics(interrupted)  # every step's losses, bit for bit
  assert full[0].evals == resumed[0].evals
  # augmentation is on: the same run without it trains on other pixels
  plain = run_experiment(dataclasses.replace(config, augment=False), str(tmp_path / "plain"), progress=False)
  assert _metrics(str(tmp_path / "plain"))[1]["loss"] != _metrics(str(tmp_path / "full"))[1]["loss"]
  assert plain[0].evals[0] == full[0].evals[0]  # step 0: the same initialization, the same eval transform


# ---------------------------------------------------------------------------------------------------------------------
# The conversion: one per cache, in parallel, never mistaken when killed; cache errors named so
# ---------------------------------------------------------------------------------------------------------------------


_LOAD = textwrap.dedent("""
  import logging, sys
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  from disam_jax.harness import data
  ds = data.load_dataset("image_folder", data_dir=sys.argv[1], image_size=8, cache_dir=sys.argv[2])
  print("LOADED", [len(x) for x in ds.images], ds.records.directory, flush=True)
""")


def test_two_processes_on_a_fresh_cache_convert_once(tmp_path):
  root = _folder(tmp_path / "data", per_class=150, size=(8, 8))  # 900 files: a parallel conversion
  cache = str(tmp_path / "cache")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _LOAD, root, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert sum("converting" in err for _, err in outs) == 1, outs  # one converted, the other waited and read
  loaded = [out.strip().splitlines()[-1] for out, _ in outs]
  assert loaded[0] == loaded[1] and "[300, 300, 300]" in loaded[0]
  folder = os.path.join(cache, "disam_domain_image_folder")
  assert [n for n in os.listdir(folder) if not n.endswith(".lock")] == [os.path.basename(loaded[0].split()[-1])]
  meta = json.load(open(os.path.join(loaded[0].split()[-1], "meta.json")))
  assert meta["records"] == 900


def test_a_killed_conversion_is_never_taken_for_a_cache(tmp_path):
  root = _folder(tmp_path / "data", per_class=150, size=(8, 8))
  cache = str(tmp_path / "cache")
  slow = (
    "from disam_jax.harness import streaming\n"
    "import time\n_convert = streaming._convert_shard\n"
    "def slow(*a):\n  time.sleep(60)\n  return _convert(*a)\n"
    "streaming._convert_shard = slow\nstreaming._INLINE_FILES = 10**9\n"
  ) + _LOAD
  proc = subprocess.Popen(
    [sys.executable, "-c", slow, root, cache],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=_env(),
    start_new_session=True,
  )
  folder = os.path.join(cache, "disam_domain_image_folder")
  deadline = time.time() + 60
  while time.time() < deadline and not (os.path.isdir(folder) and any(".incomplete-" in n for n in os.listdir(folder))):
    time.sleep(0.1)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  names = os.listdir(folder)
  assert any(".incomplete-" in n for n in names), names
  assert all(n.startswith(".") for n in names), names  # no folder under a final name
  out = subprocess.run([sys.executable, "-c", _LOAD, root, cache], capture_output=True, text=True, env=_env())
  assert out.returncode == 0 and "converting" in out.stderr, out.stderr
  assert not any(".incomplete-" in n for n in os.listdir(folder))  # the leftover was removed


def test_an_unwritable_cache_is_reported_as_a_cache_error(tmp_path):
  root = _folder(tmp_path / "data", per_class=1)
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(streaming.CacheError, match=r"cannot use the conversion cache .*file.*--cache-dir"):
    data.load_dataset("image_folder", data_dir=root, image_size=8, cache_dir=str(blocker))


# ---------------------------------------------------------------------------------------------------------------------
# Memory: a run holds a few bytes per image
# ---------------------------------------------------------------------------------------------------------------------


_MEMORY = textwrap.dedent("""
  import json, sys, tracemalloc
  from disam_jax.harness import data, streaming

  def rss_anon():
    for line in open("/proc/self/status"):
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024

  root, cache = sys.argv[1], sys.argv[2]
  tracemalloc.start()
  before, live_before = rss_anon(), tracemalloc.get_traced_memory()[0]
  ds = data.load_dataset("image_folder", data_dir=root, image_size=32, cache_dir=cache)
  split = data.split_dataset(ds, "c")
  feed = streaming.StreamedTrainFeed(split.records, split.train, 8, 0, workers=0)
  [feed.next() for _ in range(3)]
  evals = streaming.StreamedEvalFeed(split.records, [("val", "a"), ("val", "b"), ("test", "c")],
                                     list(split.val) + list(split.test), 64, workers=0)
  n = sum(1 for _ in evals.batches())
  feed.close(); evals.close()
  print(json.dumps({"rss_anon": rss_anon() - before, "live": tracemalloc.get_traced_memory()[0] - live_before}))
""")


def _growth(root, cache):
  """`{"rss_anon", "live"}`: bytes the measuring process grew by (RssAnon) and holds in live Python and NumPy
  allocations (tracemalloc), from before loading to after 3 training steps and an evaluation pass."""
  # Converted first in another process: the measured process only reads the cache, as every later run does.
  subprocess.run([sys.executable, "-c", _LOAD, root, cache], check=True, capture_output=True, env=_env())
  out = subprocess.run(
    [sys.executable, "-c", _MEMORY, root, cache], check=True, capture_output=True, text=True, env=_env()
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_host_memory_does_not_grow_with_the_number_of_images(tmp_path):
  small = _folder(tmp_path / "small", per_class=50, size=(32, 32), fmt="jpg")  # 300 images
  large = _folder(tmp_path / "large", per_class=500, size=(32, 32), fmt="jpg")  # 3000 images
  grow_small, grow_large = _growth(small, str(tmp_path / "c1")), _growth(large, str(tmp_path / "c2"))
  live = (grow_large["live"] - grow_small["live"]) / 2700
  rss = (grow_large["rss_anon"] - grow_small["rss_anon"]) / 2700
  # Live data per image: the index arrays of the dataset, the split and the evaluation feed (int32 / int64 record
  # indices and labels). Measured: 62-64 bytes per image (3 runs); one Python object per image kept alive (a path
  # string in a list) made it 195 (seen red). float32 pixels held in memory would be 12 KiB per image (32 x 32 x 3
  # x 4 bytes), uint8 pixels 3 KiB. RssAnon, measured 2,749-2,799 bytes per image (3 runs, tracemalloc's own tables
  # included), adds the freed memory that CPython's and glibc's allocators keep (docs/harness.md): a loose bound.
  assert live < 128, (grow_small, grow_large, live)
  assert rss < 4096, (grow_small, grow_large, rss)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_grain_workers_fix_glibcs_mmap_threshold():
  """The worker init that keeps freed batch arrays out of grain workers' heaps (`streaming._worker_init`, passed to
  grain's `mp_prefetch`) sets glibc's M_MMAP_THRESHOLD; its effect on memory is measured by
  benchmarks/input_pipeline.py (the process tree at 400 and 4,000 images)."""
  import platform

  if platform.libc_ver()[0] != "glibc":
    pytest.skip("not glibc")
  assert streaming._WORKER_MMAP_THRESHOLD == 1 << 20
  assert streaming._worker_init(0, 1) is True


def test_a_streamed_run_on_a_mesh_equals_the_one_device_run(tmp_path):
  """The streamed feeds on a 4-device mesh (FSDP): each device reads its slice of every training and evaluation
  batch (the evaluation batch rounded to the devices), and the run's losses and accuracies are the one-device run's."""
  import jax

  from disam_jax.harness import distributed

  config = _disam_folder_run(tmp_path, steps=4, eval_batch_size=6)
  one = run_experiment(config, str(tmp_path / "one"), progress=False)
  mesh = distributed.parse_mesh("data=2,fsdp=2", jax.devices()[:4])
  sharded = run_experiment(config, str(tmp_path / "mesh"), progress=False, mesh=mesh)
  for a, b in zip(_metrics(str(tmp_path / "one")), _metrics(str(tmp_path / "mesh"))):
    assert a.keys() == b.keys() and a["step"] == b["step"]
    if "loss" in a:  # step 0's line holds only the evaluation of the initialization
      np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a.get("eval") == b.get("eval")  # accuracies: the same counts over the same images
  assert [e["val_acc"] for e in one[0].evals] == [e["val_acc"] for e in sharded[0].evals]


# ---------------------------------------------------------------------------------------------------------------------
# tfds:<name>: the same feeds over a TFDS source's rotation domains
# ---------------------------------------------------------------------------------------------------------------------


def test_tfds_run_is_streamed_end_to_end(tmp_path):
  """A run on ``tfds:<name>`` trains and evaluates through the streamed feeds (no pixel array in the split), and a
  killed and resumed run ends with the same metrics; --infer-domains, which clusters pixels, is refused."""
  from tests.test_harness_data import _prepare_shapes

  _prepare_shapes(tmp_path / "tfds")
  config = ExperimentConfig(
    dataset="tfds:disam_test_shapes",
    data_dir=str(tmp_path / "tfds"),
    image_size=8,
    algorithms=("disam",),
    held_out=("75",),
    steps=4,
    eval_every=2,
    model="mlp",
    model_kwargs={"hidden": 8},
    hparams=HParams(batch_size=2),
    eval_batch_size=4,
    data_workers=0,
  )
  full = run_experiment(config, str(tmp_path / "full"), progress=False)
  interrupted = str(tmp_path / "interrupted")
  run_killed_at(config, interrupted, 2)
  resumed = run_experiment(config, interrupted, progress=False, resume=True)
  assert metrics_lines(interrupted, "75") == metrics_lines(str(tmp_path / "full"), "75")
  assert full[0].evals == resumed[0].evals
  ds = data.load_dataset("tfds:disam_test_shapes", data_dir=str(tmp_path / "tfds"), image_size=8)
  with pytest.raises(ValueError, match="--infer-domains"):
    regimes.infer_domains(data.split_dataset(ds, "75"), 2, seed=0)


def test_records_are_read_one_at_a_time(streamed):
  """The feeds read records by item access, never array_record's batched ``__getitems__`` (a new thread pool per
  call, whose malloc arenas kept 550-1,000 bytes per record read: see `streaming._read_each`)."""
  _, split = streamed

  class OneAtATime:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      return self.source[i]

    def __getitems__(self, indices):
      raise AssertionError("batched read")

  records = split.records
  fn = streaming._StepBatch(records, [x for x, _ in split.train], [y for _, y in split.train], 3, 0, slice(None), False)
  fn._source = OneAtATime(records.source())
  x, _ = fn(0)
  expected = [
    streaming.read_images(records, m[p])
    for (m, _), p in zip(split.train, streaming.step_picks(0, 0, [len(m) for m, _ in split.train], 3))
  ]
  np.testing.assert_array_equal(x, np.stack(expected))


def test_shards_grow_with_the_folder_instead_of_their_number():
  """Each open shard costs its reader ~128 KiB in every reading process: past `_TASKS_PER_WORKER` shards of
  `_SHARD_FILES` per conversion worker, the shards grow instead of multiplying."""
  assert streaming._shard_files(300, 2) == 1024
  assert streaming._shard_files(8 * 1024, 2) == 1024  # 8 shards: 4 per worker
  assert streaming._shard_files(8 * 1024 + 1, 2) == 1025
  per = streaming._shard_files(586_575, 16)  # DomainNet on 16 cores
  assert per == 9166 and -(-586_575 // per) == 64
