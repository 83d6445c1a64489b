"""Sphinx configuration: the API reference from the docstrings (autodoc + napoleon), the docs/*.md pages via MyST.

Built by .ci/run with warnings as errors: `sphinx-build -W --keep-going -b html docs <out>` (the `docs` extra).
"""

import logging
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's disam_jax, installed or not

import disam_jax  # noqa: E402

project = "disam_jax"
author = "the disam_jax authors"
copyright = "2026, the disam_jax authors"
release = version = disam_jax.__version__

extensions = [
  "myst_parser",  # docs/*.md
  "sphinx.ext.autodoc",  # the API reference, from the docstrings
  "sphinx.ext.napoleon",  # their Google-style Args / Returns / Attributes sections
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# The docstrings write code in single backticks (`rho`, `[M]`), as Markdown does: render it as code, not as
# reST's default "interpreted text" (italics).
default_role = "literal"
# Signatures with their defaults as written (`rho=0.05`) and without type hints: optax's aliases expand to whole
# unions there (ScalarOrSchedule is 150 characters); the Args sections say what each argument takes.
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # DisamState's fields: the docstring says each one's shape, not optax's unions

myst_heading_anchors = 3  # README-style links to sections (`page.md#a-heading`) resolve
html_theme = "alabaster"
html_title = f"disam_jax {release}"


class _LinkOutOfTheDocs(logging.Filter):
  """Drops MyST's "Unknown source document" warning for a link to an existing file outside docs/ (e.g.
  ../benchmarks/results/*.md, which GitHub renders and Sphinx does not build); every other warning stays an error.
  tests/test_docs.py checks that every relative link of README.md and docs/*.md names an existing file."""

  def filter(self, record: logging.LogRecord) -> bool:
    found = re.match(r"Unknown source document '(.+)'", str(record.msg % record.args if record.args else record.msg))
    if found is None:
      return True
    target = pathlib.Path(found.group(1))
    outside = not target.is_relative_to(DOCS)
    return not (outside and (target.exists() or target.with_name(target.name + ".md").exists()))


def setup(app):
  for handler in logging.getLogger("sphinx").handlers:  # sphinx.util.logging.setup installed them before conf.py
    if handler.level >= logging.WARNING:
      handler.filters.insert(0, _LinkOutOfTheDocs())  # before Sphinx's own filters count the warning
