"""The documentation's promises: every docstring `>>>` example runs, the API reference lists every public name, and
every relative link of README.md, CONTRIBUTING.md, CHANGELOG.md and docs/*.md names an existing file (and heading).

The HTML build itself (Sphinx, warnings as errors) is .ci/run's last step; it needs the `docs` extra.
"""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import disam_jax

ROOT = pathlib.Path(__file__).parents[1]
LINKED_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"] + sorted(
  (ROOT / "docs").glob("*.md")
)


def _modules():
  """Every module of the package, the harness's included (the test extra installs what they import)."""
  names = ["disam_jax"]
  names += [m.name for m in pkgutil.walk_packages(disam_jax.__path__, "disam_jax.")]
  return sorted(names)


def _doctests(module_name):
  module = importlib.import_module(module_name)
  return [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, module_name) if t.examples]


MODULES_WITH_EXAMPLES = [name for name in _modules() if _doctests(name)]


@pytest.mark.parametrize("module_name", MODULES_WITH_EXAMPLES)
def test_docstring_examples_run(module_name):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in _doctests(module_name):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0 and result.attempted > 0, result


def test_the_examples_found_include_disam_and_the_harness_ones():
  """The finder sees what it should (a slip in the module walk would silently test nothing)."""
  found = {t.name for name in MODULES_WITH_EXAMPLES for t in _doctests(name)}
  core = {
    "disam_jax._disam.disam",
    "disam_jax._disam.domain_objective",
    "disam_jax._domain_losses.as_domain_losses",
    "disam_jax._accumulation.accumulate_domain_losses",
    "disam_jax._flax.nnx_update",
  }
  assert core | {"disam_jax.harness.models", "disam_jax.harness.fast_conv"} <= found, found


def test_no_core_docstring_keeps_an_example_that_does_not_run():
  """An `Example` of the core is a `>>>` doctest (run above), not a literal block that nothing executes."""
  for path in sorted((ROOT / "disam_jax").glob("*.py")):
    for m in re.finditer(r"Example[^\n]*::\n\n(.*?)\n", path.read_text(), re.S):
      assert m.group(1).lstrip().startswith(">>>"), (path.name, m.group(1))


def test_the_api_reference_lists_every_public_name():
  """docs/api.md documents each name of `disam_jax.__all__` once, through autodoc."""
  api = (ROOT / "docs" / "api.md").read_text()
  documented = re.findall(r"^\.\. auto(?:function|class|data):: disam_jax\.(\w+)$", api, re.M)
  assert sorted(documented) == sorted(disam_jax.__all__)


def test_each_option_of_disam_is_documented_in_its_docstring_and_nowhere_else_at_length():
  """One place documents the options: `disam`'s Args names every keyword; the README and DisamState link there."""
  import inspect

  doc = disam_jax.disam.__doc__
  args = doc[doc.index("\n  Args:\n") : doc.index("\n  Returns:\n")]
  for name in inspect.signature(disam_jax.disam).parameters:
    assert re.search(rf"^    {name}: ", args, re.M), name
  readme = (ROOT / "README.md").read_text()
  assert "](docs/api.md)" in readme and "## Options" not in readme
  for phrase in ("LookSAM", "ASAM", "m-sharpness", "aux_example", "VarianceTrigger(", "reuse_weight"):
    assert phrase not in readme, phrase  # what the options' explanations say lives in the docstring alone
  state_doc = disam_jax.DisamState.__doc__
  assert "documented there" in state_doc and len(state_doc.split()) < 450
  assert "LookSAM" not in state_doc.replace("(LookSAM)", "") and "m-sharpness" not in state_doc


def _slug(heading):
  """The anchor GitHub and MyST (myst_heading_anchors) give a heading: lower case, punctuation dropped, spaces -."""
  text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # a '# comment' in a block is no heading
  slugs, seen = set(), {}
  for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
    slug = _slug(heading)
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    slugs.add(slug if n == 0 else f"{slug}-{n}")
  return slugs


def _relative_links(path):
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
      yield target


@pytest.mark.parametrize("doc", [p.relative_to(ROOT).as_posix() for p in LINKED_FILES])
def test_relative_links_name_existing_files_and_headings(doc):
  path = ROOT / doc
  broken = []
  for target in _relative_links(path):
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(target)
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      broken.append(target)
  assert not broken, broken


def test_the_link_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
  page = tmp_path / "page.md"
  page.write_text(
    "# A `code` heading (x)\n\n[ok](#a-code-heading-x) [bad](#nope) [gone](missing.md) [web](https://x.y)\n"
  )
  assert list(_relative_links(page)) == ["#a-code-heading-x", "#nope", "missing.md"]
  assert _anchors(page) == {"a-code-heading-x"}
