"""Packaging promises: `import disam_jax` needs only jax, optax and flax."""

import subprocess
import sys

import disam_jax


def test_import_pulls_in_no_optional_dependency():
  code = (
    "import sys, disam_jax\n"
    "heavy = ['sklearn', 'tensorflow_datasets', 'orbax', 'matplotlib', 'torch', 'tqdm', 'PIL', 'tensorflow']\n"
    'print(",".join(m for m in heavy if m in sys.modules))\n'
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == ""


def test_public_api():
  for name in disam_jax.__all__:
    assert getattr(disam_jax, name).__doc__, name
  assert isinstance(disam_jax.disam(__import__("optax").sgd(0.1)), __import__("optax").GradientTransformationExtraArgs)


def test_every_program_a_help_text_names_is_installed_by_pyproject():
  """`disam-launch --help` calls itself disam-launch: pyproject installs that command, pointing at its main."""
  import importlib
  import pathlib

  import tomllib

  scripts = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
  assert set(scripts) >= {"disam-train", "disam-launch"}
  for name, target in scripts.items():
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), name
  out = subprocess.run(
    [sys.executable, "-m", "disam_jax.harness.launch", "--help"], capture_output=True, text=True, check=True
  )
  assert out.stdout.startswith("usage: disam-launch")


def test_the_core_runs_without_chex_and_pyproject_does_not_declare_it():
  """chex was dropped (jax.Array and optax's types replace its alias): the core imports without it."""
  import pathlib

  import tomllib

  code = (
    "import sys, optax, disam_jax\n"
    "disam_jax.disam(optax.sgd(0.1)); disam_jax.nnx_optimizer; disam_jax.accumulate_domain_losses\n"
    "print('chex' in sys.modules)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
  project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
  assert not [d for d in project["dependencies"] if d.startswith("chex")]


def test_one_version_source():
  """pyproject's version is dynamic, read by setuptools from disam_jax.__version__ (no second copy to drift)."""
  import pathlib

  import tomllib

  pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
  assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
  assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "disam_jax.__version__"}
  assert disam_jax.__version__.count(".") == 2


def test_the_declared_minimum_versions_are_the_tested_ones():
  """CI installs under .ci/floor.txt's pins (.ci/run exports PIP_CONSTRAINT), which must be pyproject's floors; in CI
  (CI=true) the installed versions are those floors, so the declared minimum is what the suite runs on, whatever
  newer releases the registry has."""
  import importlib.metadata
  import os
  import pathlib
  import re

  import tomllib

  root = pathlib.Path(__file__).parents[1]
  project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
  floors = dict(re.fullmatch(r"([a-z]+)>=([0-9.]+)", d).groups() for d in project["dependencies"])
  assert set(floors) == {"jax", "jaxlib", "optax", "flax"}
  pins = dict(
    re.fullmatch(r"([a-z]+)==([0-9.]+)", line).groups()
    for line in (root / ".ci" / "floor.txt").read_text().splitlines()
    if line and not line.startswith("#")
  )
  assert pins == floors, f".ci/floor.txt pins {pins} but pyproject declares the floors {floors}: make them equal."
  assert 'PIP_CONSTRAINT="$PWD/.ci/floor.txt"' in (root / ".ci" / "run").read_text()
  if os.environ.get("CI") == "true":
    for name, floor in floors.items():
      installed = importlib.metadata.version(name)
      assert installed == floor, f"{name} {installed} is installed in CI but the floor {floor} is what CI must test."


def test_the_harness_benchmarks_and_examples_use_only_the_public_core():
  """The core's private modules (disam_jax/_*.py) are imported by the core alone: whatever the harness needs from
  it is a public, documented name of `disam_jax`."""
  import pathlib
  import re

  root = pathlib.Path(__file__).parents[1]
  private = re.compile(r"^\s*(from disam_jax\._\w+ import|import disam_jax\._\w+|from disam_jax import _\w+)", re.M)
  files = [
    *(root / "disam_jax" / "harness").rglob("*.py"),
    *(root / "benchmarks").rglob("*.py"),
    *(root / "examples").rglob("*.py"),
  ]
  offenders = [str(f.relative_to(root)) for f in files if private.search(f.read_text())]
  assert len(files) > 20 and not offenders, offenders
