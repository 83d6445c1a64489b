"""benchmarks/device_check.py: its --smoke run end to end (so the prepared accelerator check never rots), with torch
absent (what CI sees) and, in the slow tier, with torch; and the pieces it rests on, checked independently:
conformance errors against NumPy, targets, the synthetic image folder, the PyTorch ResNet-50 peer, and that the
CPU-only convolution gradients are not what a GPU compiles."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import device_check as dc

REPO = pathlib.Path(__file__).resolve().parent.parent
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run_smoke(out, *extra, block_torch=False):
  """The smoke run in a fresh process (as on the device: repository on PYTHONPATH, run from its root)."""
  block = "import sys; sys.modules['torch'] = None; " if block_torch else ""
  argv = ["--out", str(out), "--smoke", "--strict", *extra]
  code = f"{block}from benchmarks.device_check import main; main({argv!r})"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc, json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text()


def _check_common(proc, results, markdown):
  assert results["smoke"] is True
  env = results["environment"]
  assert env["backend"] == "cpu" and set(env["versions"]) >= {"jax", "jaxlib", "flax", "optax", "torch"}
  assert all(v > 0 for v in env["measured_peak_tflops"].values())
  corr = results["correctness"]
  assert corr["all_float32_pass"] and corr["float32_max_abs"] <= 2e-5 and len(corr["cases"]) == 2
  assert 0 < corr["bf16_max_rel_after_10"] < 0.1  # bf16 differs from the float32 reference, but not wildly
  for key, spec in dc.SMOKE.items():
    cases = results["step_times"][key]["cases"]
    for dtype in spec.dtypes:
      for kind in spec.kinds:
        row = cases[f"{kind}/{dtype}"]
        assert row["median_ms"] > 0 and row["peak_bytes"] > 0 and row["gflop"] > 0
    assert f"disam/sam {spec.dtypes[0]}" in results["step_times"][key]["ratios"]
  h = results["harness"]
  assert h["steps"] == 6 and h["steps_per_s"] > 0 and 0 <= h["device_idle_share"] < 1
  figures = [r["figure"] for r in results["targets"]]
  assert "harness: device idle share (upper bound of input wait)" in figures
  assert "## Targets" in markdown and "| figure | measured | target | met |" in markdown
  assert proc.stdout.strip().splitlines()[-1].startswith("| conformance float32")  # the table is printed last


def test_smoke_without_torch(tmp_path):
  """Where torch is absent the check still runs every other section, and its PyTorch rows say why."""
  proc, results, markdown = _run_smoke(tmp_path, "--folder-loader", "pillow", block_torch=True)
  _check_common(proc, results, markdown)
  assert results["environment"]["torch"].startswith("torch absent")
  assert results["environment"]["versions"]["torch"] is None
  for res in results["step_times"].values():
    assert res["notes"]["torch"].startswith("torch absent")
    assert not any(label.startswith("torch") for label in res["cases"])
  assert results["torch_compile"]["status"].startswith("torch absent")
  assert results["harness"]["loader"].startswith("Pillow")
  rows = {r["figure"]: r for r in results["targets"]}
  assert rows["vit_s16 JAX DISAM / PyTorch eager DISAM, bf16"]["met"] is None
  assert "| vit_s16 JAX DISAM / PyTorch eager DISAM, bf16 | - | <= 1.0 | not measured |" in markdown


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_smoke_with_torch(tmp_path):
  """With torch: the eager peers beside every JAX case, torch.compile (aot_eager) on the ViT, the harness's own
  streaming folder loader when grain is installed."""
  proc, results, markdown = _run_smoke(tmp_path)
  _check_common(proc, results, markdown)
  for key, spec in dc.SMOKE.items():
    cases = results["step_times"][key]["cases"]
    for dtype in spec.dtypes:
      for kind in set(spec.kinds) & set(dc.TORCH_KINDS):
        assert cases[f"torch_{kind}/{dtype}"]["median_ms"] > 0
  compiled = results["torch_compile"]["vit_s16"]
  assert compiled["backend"] == "aot_eager" and compiled["ratios"]["jax_disam/torch_compile_disam bf16"] > 0
  assert list(results["torch_compile"]) == ["vit_s16"]


def test_full_run_refuses_a_cpu(tmp_path):
  """Without an accelerator the full sizes would run for hours: refused at once, naming --smoke."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.device_check", "--out", str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1 and "run with --smoke" in proc.stderr.strip().splitlines()[-1]
  assert not list(tmp_path.iterdir())


def test_errors_against_numpy():
  got = {"a": np.array([1.0, 2.0]), "b": np.array([[3.0]])}
  want = {"a": np.array([1.0, 2.5]), "b": np.array([[2.0]])}
  init = {"a": np.zeros(2), "b": np.zeros((1, 1))}
  e = dc._errors(got, want, init)
  assert e["max_abs"] == 1.0
  np.testing.assert_allclose(e["rel"], np.sqrt(0.25 + 1.0) / np.sqrt(1 + 6.25 + 4), rtol=1e-12)
  np.testing.assert_allclose(e["rel_to_displacement"], e["rel"], rtol=1e-12)  # init is zero


def test_correctness_fails_on_a_wrong_reference(tmp_path, monkeypatch):
  """The device's conformance verdict comes from the vectors: one perturbed reference value turns it red."""
  d = json.loads(dc.conformance_path().read_text())
  d["cases"][5]["params_after_10_steps"]["b2"][0] += 1e-3
  path = tmp_path / "vectors.json"
  path.write_text(json.dumps(d))
  monkeypatch.setattr(dc, "_CONFORMANCE", (path,))
  res = dc.section_correctness(dc.settings(smoke=True))
  assert [c["float32_pass"] for c in res["cases"]] == [True, False] and not res["all_float32_pass"]
  np.testing.assert_allclose(res["cases"][1]["float32"]["after_10"]["max_abs"], 1e-3, rtol=0.05)


def test_conformance_vectors_copy_is_the_shared_one():
  """The device gets the repository's tracked files only: the copy in tests/data must equal ../shared's."""
  shared = REPO.parent / "shared" / "conformance" / "disam_reference_v1.json"
  if not shared.is_file():
    pytest.skip("no ../shared checkout here")
  assert (REPO / "tests" / "data" / "disam_reference_v1.json").read_bytes() == shared.read_bytes()


def test_targets_and_table():
  results = {
    "step_times": {
      "resnet50": {"ratios": {"disam/sam float32": 1.01, "disam/sam bf16": 1.05, "jax_disam/torch_disam bf16": 0.9}},
      "mnist_cnn": {"status": "skipped: ..."},
    },
    "torch_compile": {"resnet50": {"ratios": {"jax_disam/torch_compile_disam bf16": 1.2}}},
    "harness": {"device_idle_share": 0.04},
    "correctness": {"float32_max_abs": 3e-7},
  }
  rows = {r["figure"]: r["met"] for r in dc.targets(results)}
  assert rows["resnet50 DISAM / SAM median step, float32"] is True
  assert rows["resnet50 DISAM / SAM median step, bf16"] is False
  assert rows["resnet50 JAX DISAM / PyTorch eager DISAM, bf16"] is True
  assert rows["resnet50 JAX DISAM / PyTorch compiled DISAM, bf16"] is False
  assert rows["mnist_cnn DISAM / SAM median step, float32"] is None
  assert rows["harness: device idle share (upper bound of input wait)"] is True
  assert rows["conformance float32 (HIGHEST) max abs error"] is True
  table = dc.targets_table(dc.targets(results))
  assert "| resnet50 DISAM / SAM median step, bf16 | 1.05 | <= 1.02 | NO |" in table
  assert "| mnist_cnn DISAM / SAM median step, bf16 | - | <= 1.02 | not measured |" in table


def test_budget_skips_with_a_reason():
  budget = dc.Budget(10)
  assert budget.fits(5) and not budget.fits(60)
  assert budget.skip_reason(60).startswith("skipped: needs ~60 s, ")


def test_nominal_peaks_by_device_kind():
  assert dc.nominal_peak_tflops("NVIDIA H100 80GB HBM3")["bf16"] == 989.4
  assert dc.nominal_peak_tflops("NVIDIA H100 PCIe")["bf16"] == 756.0
  assert dc.nominal_peak_tflops("cpu") is None


def test_image_folder_round_trip(tmp_path):
  """The synthetic folder read back holds the pixels written (PNG is lossless), domain by domain, class labels
  from the class folders."""
  dc.write_image_folder(tmp_path, size=6, per_domain=4, domains=2, classes=2)
  ds = dc.read_image_folder(tmp_path)
  assert ds.domains == ("d0", "d1") and ds.classes == ("c0", "c1") and ds.input_shape == (6, 6, 3)
  rng = np.random.default_rng(0)  # the writer's stream: domain-major, image i of class i % 2
  for k in range(2):
    written = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(4)]
    order = [0, 2, 1, 3]  # read back class by class, names sorted
    np.testing.assert_array_equal(ds.images[k], np.stack([written[i] for i in order]).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.labels[k], [0, 0, 1, 1])


def test_bf16_model_keeps_float32_params_and_logits():
  spec = dc.SMOKE["vit_s16"]
  graphdef, params, model_state = dc._jax_model(spec, "bf16")
  from disam_jax.harness.models import apply_model

  assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  logits, _ = apply_model(graphdef, params, model_state, jnp.ones((2, *spec.shape)), train=True)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_torch_resnet50_peer_computes_the_jax_resnet50(tmp_path):
  """The PyTorch ResNet-50 peer is the JAX resnet50: its weights (torchvision's key layout, head renamed to `fc`)
  load strictly into the JAX model through the harness's own torchvision converter, and the two give the same
  logits in eval mode (running statistics randomized so that BatchNorm is not the identity)."""
  import torch
  from flax import nnx

  from benchmarks import torch_disam as td
  from disam_jax.harness.models import create_model, load_pretrained

  torch.manual_seed(0)
  peer = td.build_model("resnet50", num_classes=7, input_shape=(72, 72, 3), width=8).eval()
  with torch.no_grad():
    for m in peer.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  state = {k.replace("classifier.", "fc."): v for k, v in peer.state_dict().items() if "num_batches" not in k}
  torch.save(state, tmp_path / "peer.pth")
  model = create_model("resnet50", num_classes=7, input_shape=(72, 72, 3), rngs=nnx.Rngs(0), width=8)
  with pytest.warns(UserWarning, match="ImageNet"):  # the converter's note for real torchvision weights
    load_pretrained(model, tmp_path / "peer.pth", strict=True)
  model.eval()
  x = np.random.default_rng(0).standard_normal((2, 72, 72, 3)).astype(np.float32)
  with torch.no_grad():
    want = peer(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


def test_cpu_convolution_gradients_are_not_lowered_for_a_gpu():
  """fast_conv's CPU-only gradients (phase-split convolutions) must not be what a GPU compiles: lowered for
  CUDA (no GPU needed), the gradient of a fast_conv convolution has lax's convolutions, for CPU it has others."""
  from jax import lax

  from disam_jax.harness import fast_conv

  x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
  dn = ("NHWC", "HWIO", "NHWC")

  def lowered(conv, platform):
    f = lambda x, w: jnp.sum(conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn) ** 2)
    text = jax.jit(jax.grad(f, argnums=(0, 1))).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
    return text.count("stablehlo.convolution")  # platform_dependent's other branch is not lowered at all

  assert lowered(fast_conv.conv_general_dilated, "cuda") == lowered(lax.conv_general_dilated, "cuda")
  assert lowered(fast_conv.conv_general_dilated, "cpu") != lowered(lax.conv_general_dilated, "cpu")
  assert fast_conv.compiler_options("gpu") is None and fast_conv.compiler_options("cuda") is None
