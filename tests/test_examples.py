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
