"""Packaging promises: `import disam_jax` needs only jax, optax, flax and chex."""

import subprocess
import sys

import disam_jax


def test_import_pulls_in_no_optional_dependency():
  code = (
      'import sys, disam_jax\n'
      "heavy = ['sklearn', 'tensorflow_datasets', 'orbax', 'matplotlib', 'torch', 'tqdm', 'PIL', 'tensorflow']\n"
      'print(",".join(m for m in heavy if m in sys.modules))\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == ''


def test_public_api():
  for name in disam_jax.__all__:
    assert getattr(disam_jax, name).__doc__, name
  assert isinstance(disam_jax.disam(__import__('optax').sgd(0.1)), __import__('optax').GradientTransformationExtraArgs)
