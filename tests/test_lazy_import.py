"""`import disam_jax` and `disam-train`'s parser (--help, usage errors, --list) import no JAX, Optax or Flax.

The package's public names are resolved on first use (PEP 562 `__getattr__`), and the CLI's parser reads its
choices and defaults from the JAX-free `disam_jax.harness._choices`, which the registries of `algorithms`, `data`
and `models` must agree with. Wall times are not asserted (shared machines); the modules loaded are.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

HEAVY = ("jax", "jaxlib", "optax", "flax")


def _python(code: str) -> dict:
  """Runs `code` in a fresh interpreter; it prints one JSON object as its last line of stdout."""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


_PARSER_CODE = f"""
import contextlib, io, json, sys
heavy = {HEAVY!r}
loaded = lambda: [m for m in heavy if m in sys.modules]
result = {{}}
import disam_jax
result["after_import"] = loaded()
result["version"] = disam_jax.__version__
from disam_jax.harness import cli
result["after_cli_import"] = loaded()
errors = {{}}
for argv in (["--bogus"], ["--held-ot", "75"], ["--perturb-when", "sometimes"], ["--steps", "ten"], ["--help"]):
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      cli.build_parser().parse_args(argv)
      code = None
    except SystemExit as e:
      code = e.code
  errors[argv[0]] = (code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else out.getvalue())
result["errors"] = errors
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
  result["main_bogus"] = cli.main(["--bogus"])
  result["main_list"] = cli.main(["--list"])
result["listing"] = out.getvalue()
result["after_parser"] = loaded()
result["disam"] = disam_jax.disam.__name__
result["after_disam"] = loaded()
print(json.dumps(result))
"""


def test_import_and_the_parser_load_no_jax_and_disam_then_does():
  result = _python(_PARSER_CODE)
  assert result["after_import"] == [] and result["after_cli_import"] == []
  assert result["version"] == "0.1.0"
  errors = result["errors"]
  assert errors["--bogus"] == [2, "disam-train: error: unrecognized arguments: --bogus"]
  assert errors["--held-ot"][0] == 2 and "did you mean --held-out?" in errors["--held-ot"][1]
  assert errors["--perturb-when"][0] == 2 and "invalid choice: 'sometimes'" in errors["--perturb-when"][1]
  assert errors["--steps"][0] == 2 and "expected an integer, got 'ten'" in errors["--steps"][1]
  assert errors["--help"][0] == 0 and errors["--help"][1].startswith("usage: disam-train")
  assert result["main_bogus"] == 2 and result["main_list"] == 0
  assert "rotated_digits" in result["listing"] and "disam+coral" in result["listing"]
  assert result["after_parser"] == []  # --help, four usage errors and --list, all without JAX
  assert result["disam"] == "disam"
  assert "jax" in result["after_disam"] and "optax" in result["after_disam"]


def test_python_dash_m_cli_bogus_flag_loads_no_jax():
  """The console script's path: `python -m disam_jax.harness.cli --bogus` exits 2 before importing JAX."""
  code = (
    "import json, runpy, sys\n"
    "sys.argv = ['disam-train', '--bogus']\n"
    "try:\n"
    "  runpy.run_module('disam_jax.harness.cli', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "  code = e.code\n"
    f"print(json.dumps({{'code': code, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
  )
  assert _python(code) == {"code": 2, "loaded": []}


def test_lazy_module_keeps_the_public_names():
  import disam_jax
  from disam_jax import _disam, disam

  assert disam is _disam.disam and disam_jax.disam is disam
  assert set(disam_jax.__all__) <= set(dir(disam_jax)) and "__version__" in dir(disam_jax)
  for name in disam_jax.__all__:
    assert getattr(disam_jax, name) is not None, name
  with pytest.raises(AttributeError, match=r"^module 'disam_jax' has no attribute 'no_such_name'$"):
    _ = disam_jax.no_such_name
  with pytest.raises(ImportError, match="cannot import name 'no_such_name' from 'disam_jax'"):
    from disam_jax import no_such_name  # noqa: F401


def test_type_checking_block_imports_exactly_the_lazy_names():
  """What IDEs see (the `if TYPE_CHECKING:` imports) is what `__getattr__` resolves, from the same modules."""
  import disam_jax

  tree = ast.parse(pathlib.Path(disam_jax.__file__).read_text())
  block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
  seen = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
  assert seen == disam_jax._LAZY
  assert set(disam_jax.__all__) == set(disam_jax._LAZY)


def test_registries_take_their_names_from_the_jax_free_table():
  from disam_jax.harness import _choices, algorithms, data, models

  assert list(algorithms.RULES) == list(_choices.RULES)
  assert {n: text for n, (_, text) in algorithms.RULES.items()} == _choices.RULES
  assert list(algorithms.PENALTIES) == list(_choices.PENALTIES)
  assert {n: text for n, (_, text) in algorithms.PENALTIES.items()} == _choices.PENALTIES
  assert tuple(algorithms.BASE_OPTIMIZERS) == _choices.BASE_OPTIMIZERS
  assert {n: (s.rule, s.penalty, s.description) for n, s in algorithms.ALGORITHMS.items()} == _choices.ALGORITHMS
  assert list(algorithms.ALGORITHMS) == list(_choices.ALGORITHMS)
  assert list(data.DATASETS) == list(_choices.DATASETS)
  assert {n: s.description for n, s in data.DATASETS.items()} == _choices.DATASETS
  assert tuple(models.MODELS) == _choices.MODELS  # models.py keeps its own dict; --list and --help read _choices
  assert algorithms.HParams is _choices.HParams and algorithms.default_hparams is _choices.default_hparams
