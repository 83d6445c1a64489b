"""Tests for disam_jax.harness.data: rotation domains, image folders via TFDS, tfds:<name>, splits, the sampler."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from disam_jax.harness import data, streaming


@pytest.fixture(autouse=True)
def _default_tfds_dir(monkeypatch, tmp_path):
  """The default cache (XDG) inside the test's folder, never the user's ~/.cache."""
  monkeypatch.delenv(data.TFDS_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
  return str(tmp_path / "xdg_cache" / "disam_jax" / "tfds")


# ---------------------------------------------------------------------------------------------------------------------
# Module hygiene and registry
# ---------------------------------------------------------------------------------------------------------------------


def test_import_pulls_in_only_numpy():
  code = (
    "import sys, disam_jax.harness.data\n"
    "heavy = [m for m in ('sklearn', 'tensorflow_datasets', 'PIL', 'animal_mnist', 'scipy') if m in sys.modules]\n"
    "print(heavy)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="rotated_digits.*pacs.*image_folder.*tfds:<name>"):
    data.load_dataset("rotated_mnistt")


@pytest.mark.parametrize(
  "blocked, name, message",
  [
    ("sklearn.datasets", "rotated_digits", r"pip install 'disam_jax\[harness\]'"),
    ("grain", "image_folder", r"pip install 'disam_jax\[harness\]'"),
    ("tensorflow_datasets", "tfds:mnist", r"pip install 'disam_jax\[harness\]'"),
    ("animal_mnist", "rotated_animals", "pip install --no-deps animal-mnist==0.4"),
  ],
)
def test_missing_optional_dependency_names_the_install(monkeypatch, tmp_path, blocked, name, message):
  monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` raise ImportError
  with pytest.raises(ImportError, match=message):
    data.load_dataset(name, data_dir=str(tmp_path))


def test_registry_has_domainbed_domain_tables():
  assert data.DATASETS["pacs"].domains == ("art_painting", "cartoon", "photo", "sketch")
  assert data.DATASETS["office_home"].domains == ("Art", "Clipart", "Product", "Real World")
  assert data.DATASETS["terra_incognita"].folder == "terra_incognita"
  assert len(data.DATASETS["domain_net"].domains) == 6


# ---------------------------------------------------------------------------------------------------------------------
# Rotation domains
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("rotated_digits", seed=0)


@pytest.fixture(scope="module")
def raw_digits():
  from sklearn.datasets import load_digits

  d = load_digits()
  return (d.images / 16.0).astype(np.float32), d.target


def test_rotated_digits_shapes_and_names(digits):
  assert digits.domains == ("0", "15", "30", "45", "60", "75")
  assert digits.classes == tuple(str(i) for i in range(10))
  assert digits.input_shape == (8, 8, 1) and digits.num_classes == 10
  assert sum(len(x) for x in digits.images) == 1797
  assert sorted(len(x) for x in digits.images) == [299, 299, 299, 300, 300, 300]
  for x, y in zip(digits.images, digits.labels):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_rotation_groups_are_disjoint_and_cover_the_pool():
  # Labels carrying each image's index reveal which images went where.
  pool = np.random.default_rng(0).random((120, 6, 6), dtype=np.float32)
  ds = data._rotation_domains("t", pool, np.arange(120), [str(i) for i in range(120)], seed=3, image_size=None)
  indices = np.concatenate(ds.labels)
  assert sorted(indices) == list(range(120))
  np.testing.assert_array_equal(ds.images[0][..., 0], pool[ds.labels[0]])  # 0 degrees: untouched
  for k, degrees in enumerate(data.ROTATION_DEGREES):
    np.testing.assert_allclose(ds.images[k], data._rotate(pool[ds.labels[k]][..., None], degrees))


def test_zero_degree_domain_is_raw_digits(digits, raw_digits):
  images, targets = raw_digits
  flat = {x.tobytes(): t for x, t in zip(images, targets)}
  for x, y in zip(digits.images[0][..., 0], digits.labels[0]):
    assert flat[x.tobytes()] == y


def test_class_balance_roughly_preserved(digits):
  overall = np.bincount(np.concatenate(digits.labels), minlength=10) / 1797
  for y in digits.labels:
    share = np.bincount(y, minlength=10) / len(y)
    assert np.all(np.abs(share - overall) < 0.5 * overall)


def test_rotated_digits_deterministic_per_seed(digits):
  again = data.load_dataset("rotated_digits", seed=0)
  other = data.load_dataset("rotated_digits", seed=1)
  for a, b in zip(digits.images, again.images):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(digits.labels, other.labels))


@pytest.mark.parametrize("size", [7, 8])
def test_rotate_90_equals_rot90(size):
  image = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
  np.testing.assert_allclose(data._rotate(image, 90), np.rot90(image, axes=(1, 2)), atol=1e-6)
  np.testing.assert_allclose(data._rotate(image, -90), np.rot90(image, k=-1, axes=(1, 2)), atol=1e-6)


def test_rotate_matches_scipy_bilinear():
  ndimage = pytest.importorskip("scipy.ndimage")
  image = np.random.default_rng(1).random((8, 8), dtype=np.float32)
  for degrees in (15, 45, 75):
    expected = ndimage.rotate(image, degrees, reshape=False, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(data._rotate(image[None, ..., None], degrees)[0, ..., 0], expected, atol=1e-5)


def test_rotated_digits_image_size_resizes():
  ds = data.load_dataset("rotated_digits", image_size=16)
  assert ds.input_shape == (16, 16, 1)
  assert all(x.min() >= 0 and x.max() <= 1 for x in ds.images)


def test_rotated_animals():
  pytest.importorskip("animal_mnist", reason="animal-mnist not installed: pip install --no-deps animal-mnist==0.4")
  ds = data.load_dataset("rotated_animals", seed=0)
  assert ds.domains == ("0", "15", "30", "45", "60", "75")
  assert ds.num_classes == 10 and ds.classes[0] == "bear" and ds.classes[-1] == "zebra"
  assert ds.input_shape == (28, 28, 1)
  assert all(x.shape[1:] == (28, 28, 1) for x in ds.images)
  assert sum(len(x) for x in ds.images) == 10_000
  assert sorted(np.unique(np.concatenate(ds.labels))) == list(range(10))
  assert ds.images[0].max() == 1.0 and ds.images[0].min() == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Image folders via TFDS
# ---------------------------------------------------------------------------------------------------------------------


def _write_folder(root, domains=("d1", "d2", "d3"), classes=("cat", "dog", "fox"), per_class=2, size=8, seed=0):
  """Writes random PNGs root/<domain>/<class>/<i>.png; returns {relative path: uint8 pixels}."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  pixels = {}
  for d in domains:
    for c in classes:
      os.makedirs(os.path.join(root, d, c), exist_ok=True)
      for i in range(per_class):
        rel = os.path.join(d, c, f"{i}.png")
        pixels[rel] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels[rel]).save(os.path.join(root, rel))
  return pixels


@pytest.fixture
def folder(tmp_path):
  """d1..d3 x cat/dog/fox with 2 PNGs each, plus a JPEG, a grayscale PNG, a corrupt file, an empty class folder."""
  from PIL import Image

  root = str(tmp_path / "root")
  pixels = _write_folder(root)
  for rel in [os.path.join("d2", "fox", f"{i}.png") for i in range(2)]:
    os.remove(os.path.join(root, rel))
    del pixels[rel]  # d2/fox stays as an empty class folder
  jpeg = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  Image.fromarray(jpeg).save(os.path.join(root, "d1", "dog", "z.jpeg"), quality=95)
  with Image.open(os.path.join(root, "d1", "dog", "z.jpeg")) as im:
    pixels[os.path.join("d1", "dog", "z.jpeg")] = np.asarray(im.convert("RGB"))
  gray = np.random.default_rng(6).integers(0, 256, (8, 8), dtype=np.uint8)
  Image.fromarray(gray, mode="L").save(os.path.join(root, "d3", "cat", "g.png"))
  pixels[os.path.join("d3", "cat", "g.png")] = np.repeat(gray[..., None], 3, axis=-1)
  with open(os.path.join(root, "d3", "dog", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
  with open(os.path.join(root, "d1", "notes.txt"), "w") as f:
    f.write("ignored: not a folder")
  return root, pixels


def _pixels(ds, k):
  """Domain k's images as stored (uint8, through the evaluation transform): a streamed dataset holds indices."""
  from disam_jax.harness import streaming

  return streaming.read_images(ds.records, ds.images[k])


def _expected(pixels, domain, classes):
  rels = sorted(r for r in pixels if r.split(os.sep)[0] == domain)
  images = np.stack([pixels[r] for r in rels])
  labels = np.asarray([classes.index(r.split(os.sep)[1]) for r in rels])
  return images, labels


def _build_files(tfds_dir):
  return {
    os.path.join(dirpath, f): os.stat(os.path.join(dirpath, f)).st_mtime_ns
    for dirpath, _, files in os.walk(tfds_dir)
    for f in files
  }


def test_image_folder_end_to_end(folder, _default_tfds_dir):
  root, pixels = folder
  with pytest.warns(UserWarning, match="skipped 1 unreadable image file.*broken.jpg"):
    ds = data.load_dataset("image_folder", data_dir=root, image_size=8)
  assert ds.domains == ("d1", "d2", "d3")
  assert ds.classes == ("cat", "dog", "fox")
  assert ds.input_shape == (8, 8, 3)
  assert [len(x) for x in ds.images] == [7, 4, 7]  # d1 +jpeg, d2 without fox, d3 +gray -broken
  for k, domain in enumerate(ds.domains):
    images, labels = _expected(pixels, domain, list(ds.classes))
    np.testing.assert_array_equal(ds.labels[k], labels)
    np.testing.assert_array_equal(_pixels(ds, k), images)  # the original files are stored
  assert 2 not in ds.labels[1]

  assert ds.unreadable_files == (os.path.join("d3", "dog", "broken.jpg"),)
  # The second load reuses the conversion (nothing in the cache is rewritten) and reports the skipped file again.
  tfds_dir = _default_tfds_dir
  before = _build_files(tfds_dir)
  assert any(p.endswith(".array_record") for p in before)
  with pytest.warns(UserWarning, match="skipped 1 unreadable image file.*broken.jpg"):
    again = data.load_dataset("image_folder", data_dir=root, image_size=8)
  assert again.unreadable_files == ds.unreadable_files
  assert _build_files(tfds_dir) == before
  for k in range(len(ds.domains)):
    np.testing.assert_array_equal(_pixels(ds, k), _pixels(again, k))


def test_image_folder_changes_trigger_a_new_conversion(tmp_path):
  root = str(tmp_path / "r")
  _write_folder(root, domains=("a", "b"), classes=("x", "y"), per_class=1)
  first = data.load_dataset("image_folder", data_dir=root, image_size=4)
  assert first.input_shape == (4, 4, 3) and [len(x) for x in first.images] == [2, 2]
  _write_folder(str(tmp_path / "extra"), domains=("a",), classes=("x",), per_class=1, seed=9)
  os.replace(str(tmp_path / "extra" / "a" / "x" / "0.png"), os.path.join(root, "a", "x", "new.png"))
  second = data.load_dataset("image_folder", data_dir=root, image_size=4)
  assert [len(x) for x in second.images] == [3, 2]


def test_named_dataset_in_domainbed_layout(tmp_path):
  domains = data.DATASETS["office_home"].domains  # includes "Real World", with a space
  pixels = _write_folder(str(tmp_path / "office_home"), domains=domains, classes=("Alarm_Clock", "Bike"))
  os.makedirs(tmp_path / "office_home" / "stray_folder" / "x")  # not a domain of office_home: ignored
  ds = data.load_dataset("office_home", data_dir=str(tmp_path), image_size=8)
  assert ds.domains == domains and ds.classes == ("Alarm_Clock", "Bike")
  assert [len(x) for x in ds.images] == [4] * 4
  np.testing.assert_array_equal(_pixels(ds, 3), _expected(pixels, "Real World", list(ds.classes))[0])
  assert not os.path.exists(tmp_path / "tfds")  # nothing beside or inside the dataset folder
  assert os.path.isdir(tmp_path / "xdg_cache" / "disam_jax" / "tfds" / "disam_domain_image_folder")
  # data_dir may also be the dataset folder itself.
  same = data.load_dataset("office_home", data_dir=str(tmp_path / "office_home"), image_size=8)
  np.testing.assert_array_equal(_pixels(same, 0), _pixels(ds, 0))


def test_tfds_dir_can_be_redirected(tmp_path, monkeypatch):
  root = str(tmp_path / "r")
  _write_folder(root, domains=("a", "b"), classes=("x",), per_class=1)
  monkeypatch.setenv(data.TFDS_DIR_ENV, str(tmp_path / "cache"))
  data.load_dataset("image_folder", data_dir=root, image_size=8)
  assert os.path.isdir(tmp_path / "cache" / "disam_domain_image_folder")
  data.load_dataset("image_folder", data_dir=root, image_size=8, cache_dir=str(tmp_path / "chosen"))
  assert os.path.isdir(tmp_path / "chosen" / "disam_domain_image_folder")
  assert os.listdir(root) == ["a", "b"] or sorted(os.listdir(root)) == ["a", "b"]


def test_class_missing_from_a_domain_is_warned_and_classes_are_the_union(tmp_path):
  root = str(tmp_path / "r")
  _write_folder(root, domains=("a",), classes=("x", "y"), per_class=1)
  _write_folder(root, domains=("b",), classes=("x", "z"), per_class=1)
  with pytest.warns(UserWarning) as record:
    ds = data.load_dataset("image_folder", data_dir=root, image_size=8)
  messages = " ".join(str(w.message) for w in record)
  assert "domain 'a' has no folder for class(es) ['z']" in messages
  assert "domain 'b' has no folder for class(es) ['y']" in messages
  assert len(ds.warnings) == 2 and data.describe(ds)["warnings"] == list(ds.warnings)
  assert ds.classes == ("x", "y", "z")
  np.testing.assert_array_equal(ds.labels[0], [0, 1])
  np.testing.assert_array_equal(ds.labels[1], [0, 2])


def test_image_folder_leaves_the_dataset_folder_and_the_console_alone(tmp_path, capfd, monkeypatch, _default_tfds_dir):
  """Nothing written into the dataset folder, no TFDS chatter (download lines, progress bars, absl/OpenCV warnings),
  no scratch folder left in the temporary directory."""
  import tempfile

  root = str(tmp_path / "r")
  _write_folder(root, domains=("a", "b"), classes=("x",), per_class=2)
  listing = lambda: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs + [""])
  before = listing()
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  capfd.readouterr()
  for _ in range(2):  # converting, then reading the conversion back
    data.load_dataset("image_folder", data_dir=root, image_size=8)
  out, err = capfd.readouterr()
  assert out == "" and err == "", (out, err)
  assert listing() == before
  assert os.listdir(scratch) == []
  assert os.path.isdir(_default_tfds_dir)


def test_dataset_domains_lists_domains_without_converting(tmp_path, _default_tfds_dir):
  root = str(tmp_path / "r")
  _write_folder(root, domains=("only",), classes=("x",), per_class=1)
  assert data.dataset_domains("image_folder", root) == ("only",)
  assert data.dataset_domains("rotated_digits") == tuple(map(str, data.ROTATION_DEGREES))
  assert not os.path.exists(_default_tfds_dir)


def test_bad_layouts_give_clear_errors(tmp_path):
  layout = r"root/<domain>/<class>/\*\.jpg"
  with pytest.raises(FileNotFoundError, match=f"does not exist(.|\n)*{layout}(.|\n)*No download is attempted"):
    data.load_dataset("image_folder", data_dir=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="needs data_dir"):
    data.load_dataset("pacs")

  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "img.png").write_bytes(b"")
  with pytest.raises(ValueError, match=f"no domain folders(.|\n)*{layout}"):
    data.load_dataset("image_folder", data_dir=str(tmp_path / "flat"))

  (tmp_path / "noclass" / "d1").mkdir(parents=True)
  (tmp_path / "noclass" / "d1" / "img.png").write_bytes(b"")
  with pytest.raises(ValueError, match="has no class folders"):
    data.load_dataset("image_folder", data_dir=str(tmp_path / "noclass"))

  (tmp_path / "empty" / "d1" / "c1").mkdir(parents=True)
  with pytest.raises(ValueError, match="'d1'.*has no .jpg/.jpeg/.png images"):
    data.load_dataset("image_folder", data_dir=str(tmp_path / "empty"))

  _write_folder(str(tmp_path / "PACS"), domains=("art_painting", "cartoon", "photo"), classes=("dog",), per_class=1)
  with pytest.raises(FileNotFoundError, match=r"\['sketch'\] missing(.|\n)*No download is attempted"):
    data.load_dataset("pacs", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="VLCS"):
    data.load_dataset("vlcs", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# tfds:<name>
# ---------------------------------------------------------------------------------------------------------------------


def test_tfds_catalog_dataset_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  # Under mock_data the splits of an unprepared dataset are unknown, so they are named explicitly.
  with tfds.testing.mock_data(num_examples=30):
    ds = data.load_dataset("tfds:mnist:train,test", data_dir=str(tmp_path), seed=0)
  assert ds.domains == ("0", "15", "30", "45", "60", "75")
  assert ds.classes == tuple(str(i) for i in range(10))
  assert ds.input_shape == (28, 28, 1)
  assert [len(x) for x in ds.images] == [10] * 6
  # Streamed: each domain holds int64 indices into the splits' examples (train's 30, then test's 30), read in-process
  # (mock_data's source lives in this process: workers=0), rotated and rounded to uint8.
  assert ds.streamed and all(x.dtype == np.int64 for x in ds.images)
  assert sorted(np.concatenate(ds.images).tolist()) == list(range(60))
  with tfds.testing.mock_data(num_examples=30):
    pixels = streaming.read_images(ds.records, ds.images[2])
  assert pixels.shape == (10, 28, 28, 1) and pixels.dtype == np.uint8


def test_tfds_missing_dataset_errors_without_downloading(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  for name in ("tfds:mnist", "tfds:mnist:train"):
    with pytest.raises(FileNotFoundError, match="not prepared under(.|\n)*No download is attempted"):
      data.load_dataset(name, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="neither in the TFDS catalog"):
    data.load_dataset("tfds:no_such_dataset_anywhere", data_dir=str(tmp_path))


def _prepare_shapes(tmp_path):
  """A real (unmocked) array_record TFDS dataset ``disam_test_shapes`` prepared under `tmp_path`: 24 random 6x6x1
  uint8 images (train 18, test 6), label i % 2. Returns `(images, builder)`."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import io

  from PIL import Image

  images = np.random.default_rng(0).integers(0, 256, (24, 6, 6, 1), dtype=np.uint8)

  class DisamTestShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see data.py: tfds 4.9.10 needs importlib_resources otherwise

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(6, 6, 1)), "label": tfds.features.ClassLabel(names=["a", "b"])}
        ),
        supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 18), "test": self._generate_examples(18, 24)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        buffer = io.BytesIO()
        Image.fromarray(images[i, ..., 0], mode="L").save(buffer, format="PNG")
        yield i, {"image": buffer.getvalue(), "label": i % 2}

  builder = DisamTestShapes(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  return images, builder


def test_tfds_locally_prepared_dataset(tmp_path):
  """A real (unmocked) array_record dataset prepared under data_dir, read back by name from its files."""
  images, builder = _prepare_shapes(tmp_path)
  # The examples in stored order (TFDS shuffles them when preparing): train's, then test's, as the old in-memory
  # construction read them.
  stored = [example for source in builder.as_data_source(split=["train", "test"]) for example in source]
  stored_images = np.stack([e["image"] for e in stored])
  stored_labels = np.asarray([e["label"] for e in stored])
  ds = data.load_dataset("tfds:disam_test_shapes", data_dir=str(tmp_path), seed=0)
  assert ds.classes == ("a", "b") and ds.input_shape == (6, 6, 1)
  assert [len(x) for x in ds.images] == [4] * 6
  assert ds.streamed and all(x.dtype == np.int64 for x in ds.images)
  zero = {x.tobytes() for x in streaming.read_images(ds.records, ds.images[0])}
  assert zero <= {x.tobytes() for x in images}
  for size in (None, 4, 9):
    ds = data.load_dataset("tfds:disam_test_shapes", data_dir=str(tmp_path), seed=3, image_size=size)
    side = size or 6
    assert ds.input_shape == (side, side, 1)
    reference = _in_memory_rotation_domains(stored_images, stored_labels, 3, size)
    for k in range(6):
      streamed = streaming.read_images(ds.records, ds.images[k]).astype(np.float32) / 255.0
      np.testing.assert_array_equal(ds.labels[k], reference.labels[k])
      # uint8 rounding of the float32 rotation: at most half a grey level, and exact for the unrotated domain.
      np.testing.assert_allclose(streamed, reference.images[k], rtol=0, atol=0.5 / 255 + 1e-6)
      if k == 0:
        np.testing.assert_array_equal(streamed, reference.images[k])
  # The same pixels through the streamed feeds (grain, read-ahead thread), uint8, never augmented.
  feed = streaming.StreamedTrainFeed(ds.records, [(ds.images[1], ds.labels[1])], 4, seed=0, augment=True)
  try:
    x, y = feed.next()
  finally:
    feed.close()
  assert x.dtype == np.uint8 and x.shape == (1, 4, 9, 9, 1) and not feed.state()["augment"]
  picks = ds.images[1][streaming.step_picks(0, 0, [4], 4)[0]]
  np.testing.assert_array_equal(x[0], streaming.read_images(ds.records, picks))


def test_tfds_streamed_through_worker_processes(tmp_path):
  """grain's worker processes open the TFDS source again by name (it is not sent to them) and read the same
  pixels as this process; the record set pickles to the group array and names only."""
  import pickle

  _prepare_shapes(tmp_path)
  ds = data.load_dataset("tfds:disam_test_shapes", data_dir=str(tmp_path), seed=1, image_size=8)
  assert len(pickle.dumps(ds.records)) < 2000  # names, shape, 24 one-byte groups: no source, no pixels
  split = data.split_dataset(ds, held_out="75", seed=0)
  make = lambda workers: streaming.StreamedTrainFeed(ds.records, split.train, 2, seed=5, workers=workers)
  inline, spawned = make(0), make(1)
  try:
    for _ in range(3):
      a, b = inline.next(), spawned.next()
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_array_equal(a[1], b[1])
  finally:
    inline.close()
    spawned.close()
  assert a[0].shape == (5, 2, 8, 8, 1) and a[0].dtype == np.uint8


def _in_memory_rotation_domains(images, labels, seed, size):
  """The construction `tfds:<name>` had before it was streamed: every image resized on uint8 (Pillow bilinear),
  divided by 255 as float32, the seeded permutation cut into six groups, group k rotated by `data._rotate`."""
  from PIL import Image

  if size is not None:
    images = np.stack(
      [np.asarray(Image.fromarray(x[..., 0]).resize((size, size), Image.BILINEAR))[..., None] for x in images]
    )
  pixels = images.astype(np.float32) / np.float32(255.0)
  order = np.random.default_rng(seed).permutation(len(pixels))
  groups = [order[k::6] for k in range(6)]
  return data.DomainDataset(
    "reference",
    tuple(map(str, data.ROTATION_DEGREES)),
    ("a", "b"),
    tuple(data._rotate(pixels[g], d) for g, d in zip(groups, data.ROTATION_DEGREES)),
    tuple(np.asarray(labels[g], np.int32) for g in groups),
  )


# ---------------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------------


def _indexed_dataset(sizes=(50, 40, 30, 20)):
  """A dataset whose image values identify (domain, index) and whose labels are the index."""
  images = tuple(
    np.full((n, 2, 2, 1), d * 1000 + np.arange(n)[:, None, None, None], np.float32) for d, n in enumerate(sizes)
  )
  labels = tuple(np.arange(n, dtype=np.int32) for n in sizes)
  return data.DomainDataset("idx", tuple(f"dom{d}" for d in range(len(sizes))), ("c",), images, labels)


def test_split_holds_out_and_splits_80_20():
  ds = _indexed_dataset()
  split = data.split_dataset(ds, "dom1", seed=0)
  assert split.train_domains == ("dom0", "dom2", "dom3") and split.test_domains == ("dom1",)
  assert [len(x) for x, _ in split.train] == [40, 24, 16]
  assert [len(x) for x, _ in split.val] == [10, 6, 4]
  assert len(split.test[0][0]) == 40
  for (xt, yt), (xv, _yv), d in zip(split.train, split.val, (0, 2, 3)):
    ids = np.concatenate([xt[:, 0, 0, 0], xv[:, 0, 0, 0]])
    assert sorted(ids) == list(d * 1000 + np.arange(len(ds.images[d])))  # a partition of its own domain
    assert not np.any((ids >= 1000) & (ids < 2000))  # never the held-out domain
    np.testing.assert_array_equal(xt[:, 0, 0, 0] - d * 1000, yt)


def test_split_is_deterministic_and_independent_of_the_held_out_choice():
  ds = _indexed_dataset()
  a = data.split_dataset(ds, 1, seed=3)
  b = data.split_dataset(ds, "dom1", seed=3)
  c = data.split_dataset(ds, "dom3", seed=3)
  d = data.split_dataset(ds, 1, seed=4)
  for (x1, _), (x2, _) in zip(a.train, b.train):
    np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(a.train[0][0], c.train[0][0])  # dom0 splits the same either way
  assert not np.array_equal(a.train[0][0], d.train[0][0])


def test_split_several_held_out_and_fraction():
  ds = _indexed_dataset()
  split = data.split_dataset(ds, ["dom0", 3], holdout_fraction=0.5)
  assert split.train_domains == ("dom1", "dom2") and split.test_domains == ("dom0", "dom3")
  assert [len(x) for x, _ in split.val] == [20, 15]


def test_split_errors_list_valid_domains(digits):
  with pytest.raises(ValueError, match=r"valid domains: \['0', '15', '30', '45', '60', '75'\]"):
    data.split_dataset(digits, "90")
  with pytest.raises(ValueError, match=r"pass '15' for the domain named so"):
    data.split_dataset(digits, 15)
  with pytest.raises(ValueError, match="leaves no training domain"):
    data.split_dataset(digits, list(digits.domains))
  with pytest.raises(ValueError, match="twice"):
    data.split_dataset(digits, ["0", 0])
  with pytest.raises(ValueError, match="holdout_fraction"):
    data.split_dataset(digits, "0", holdout_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------------


def test_sampler_shapes_and_rows_from_own_domain():
  split = data.split_dataset(_indexed_dataset(), "dom3")
  sampler = data.DomainBatchSampler(split.train, batch_size_per_domain=8, seed=0)
  for _ in range(5):
    x, y = sampler.next()
    assert x.shape == (3, 8, 2, 2, 1) and x.dtype == np.float32
    assert y.shape == (3, 8) and y.dtype == np.int32
    for m, d in enumerate((0, 1, 2)):
      ids = x[m, :, 0, 0, 0]
      assert np.all(ids // 1000 == d)
      np.testing.assert_array_equal(ids - d * 1000, y[m])  # image and label stay paired


def test_sampler_deterministic_per_seed():
  split = data.split_dataset(_indexed_dataset(), "dom3")
  a = data.DomainBatchSampler(split.train, 4, seed=1)
  b = data.DomainBatchSampler(split.train, 4, seed=1)
  c = data.DomainBatchSampler(split.train, 4, seed=2)
  ya, yb, yc = ([s.next()[1] for _ in range(3)] for s in (a, b, c))
  np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(ya, yc)


def test_sampler_state_restore_continues_the_stream():
  split = data.split_dataset(_indexed_dataset(), "dom3")
  run = data.DomainBatchSampler(split.train, 4, seed=7)
  for _ in range(3):
    run.next()
  saved = json.loads(json.dumps(run.state()))  # survives a JSON checkpoint
  expected = [run.next()[1] for _ in range(4)]
  resumed = data.DomainBatchSampler(split.train, 4, seed=123)
  resumed.restore(saved)
  np.testing.assert_array_equal([resumed.next()[1] for _ in range(4)], expected)
  assert resumed.state()["steps"] == 7
  with pytest.raises(ValueError, match="batch size 4"):
    data.DomainBatchSampler(split.train, 5, seed=0).restore(saved)


def test_sampler_rejects_batch_larger_than_a_domain():
  split = data.split_dataset(_indexed_dataset(), "dom0")  # dom3 keeps 16 training examples
  with pytest.raises(ValueError, match=r"batch_size_per_domain=17 exceeds the 16 .* dom3(.|\n)*with replacement"):
    data.DomainBatchSampler(split.train, 17, seed=0, domain_names=split.train_domains)
  with pytest.raises(ValueError, match=r"#2"):
    data.DomainBatchSampler(split.train, 17, seed=0)
  data.DomainBatchSampler(split.train, 16, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# Colored digits (DomainBed's ColoredMNIST construction)
# ---------------------------------------------------------------------------------------------------------------------


def test_colored_digits_statistics_match_coloredmnist():
  from sklearn.datasets import load_digits

  digits = load_digits()
  grey = {img.astype(np.float32).tobytes(): int(t) for img, t in zip(digits.images / 16.0, digits.target)}
  ds = data.load_dataset("colored_digits", seed=0)
  assert ds.domains == ("agree90", "agree80", "agree10") and ds.num_classes == 2
  assert sum(len(y) for y in ds.labels) == len(digits.target)
  targets = {"agree90": 0.9, "agree80": 0.8, "agree10": 0.1}
  for name, x, y in zip(ds.domains, ds.images, ds.labels):
    assert x.shape[1:] == (8, 8, 2) and x.dtype == np.float32
    red, green = x[..., 0].reshape(len(x), -1), x[..., 1].reshape(len(x), -1)
    assert not np.any((red.max(1) > 0) & (green.max(1) > 0)), "one channel per image, the other zero"
    color = (green.max(1) > 0).astype(np.int32)  # channel 1 holds the image when colour = 1
    digit = np.asarray([grey[(r + g).reshape(8, 8).astype(np.float32).tobytes()] for r, g in zip(red, green)])
    n = len(y)
    for observed, target in (((color == y).mean(), targets[name]), ((y == (digit < 5)).mean(), 0.75)):
      sd = np.sqrt(target * (1 - target) / n)  # binomial standard error
      assert abs(observed - target) < 4 * sd, (name, observed, target)
  same = data.load_dataset("colored_digits", seed=0)
  other = data.load_dataset("colored_digits", seed=1)
  assert np.array_equal(same.images[0], ds.images[0]) and not np.array_equal(other.labels[0], ds.labels[0])
