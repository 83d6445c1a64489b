"""`python -m benchmarks.step_cost --quick` end to end, so the benchmark cannot rot.

Runs in a subprocess (the benchmark reads XLA_FLAGS before importing jax, and starts its own multi-device
subprocess), writes into tmp_path, and checks the results JSON and Markdown. Timings are not asserted: this is a
smoke test, not a timed test. The PyTorch cases are skipped when torch is not importable (CI does not install it).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
JAX_CASES = ("erm", "sam", "disam_lam0", "disam", "disam_adaptive")


def _run_quick(out_dir, *extra):
  env = dict(os.environ)
  # A fresh process with 1 device in the main run (conftest's 8-device flag is for the test process), and XLA's
  # cheapest backend optimization level: the tiny model's steps are compiled, run once and checked, not studied.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "benchmarks.step_cost", "--quick", "--out-dir", str(out_dir), *extra]
  if not HAS_TORCH:
    cmd.append("--no-torch")
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow  # default tier: test_sam_family_quick_smoke (a benchmark's --quick run and results writer),
# test_disam's FLOP ratios, test_disam_distributed's multi-device equality
def test_quick_smoke_writes_results(tmp_path):
  _run_quick(tmp_path)
  results = json.loads((tmp_path / "step_cost_quick.json").read_text())
  markdown = (tmp_path / "step_cost_quick.md").read_text()

  for key in (
    "name",
    "command",
    "date",
    "machine",
    "versions",
    "threads",
    "settings",
    "load",
    "wall_time_s",
    "step_time",
    "domains",
    "multi_device",
    "targets",
    "harness_loop",
    "peak",
  ):
    assert key in results, key
  assert results["quick"] is True
  assert {"cpu", "cores", "platform", "python"} <= set(results["machine"])
  assert {"jax", "jaxlib", "flax", "optax", "disam_jax", "torch"} <= set(results["versions"])
  assert {"before", "after", "rounds"} <= set(results["load"])

  ((model, res),) = results["step_time"].items()
  cases = res["cases"]
  for kind in JAX_CASES + ("erm/fast", "disam/fast"):
    c = cases[kind]
    assert c["min_ms"] > 0 and c["median_ms"] >= c["min_ms"] and len(c["times_ms"]) == 1
    assert c["compile_s"] > 0 and c["gflops"] > 0
    assert {"temp", "argument", "output", "alias", "peak"} <= set(c["memory"])
  # Two gradient evaluations: XLA's FLOP count of a DISAM step is about twice ERM's, and SAM's.
  assert 1.5 < cases["disam"]["gflops"] / cases["erm"]["gflops"] < 2.5
  assert 0.9 < cases["disam"]["gflops"] / cases["sam"]["gflops"] < 1.1
  for ratio in ("disam/sam", "disam/erm", "disam_lam0/sam"):
    assert res["ratios"][ratio] > 0
  assert res["memory"]["disam_minus_erm_in_param_copies"] <= 1.5
  if HAS_TORCH:
    for label in ("torch_erm", "torch_sam", "torch_disam", "torch_disam_per_sample"):
      assert cases[label]["framework"] == "torch" and cases[label]["min_ms"] > 0
    assert "jax_disam/torch_disam" in res["ratios"] and "torch_disam/torch_erm" in res["ratios"]

  sweep = results["domains"][model]
  assert sweep["num_domains"] == [2, 4] and {"disam_M2", "disam_M4", "sam"} <= set(sweep["cases"])

  md = results["multi_device"]
  assert "error" not in md, md.get("error")
  md_cases = md["models"][model]["cases"]
  assert {"single_device_jit", "pmap_2", "sharded_jit_2"} <= set(md_cases)
  for c in md_cases.values():  # same parameters as one device on the whole batch
    assert c["max_abs_diff_vs_single"] < 1e-5

  assert results["peak"]["measured_gemm_gflops"] > 0 and cases["disam/fast"]["gflop_per_s"] > 0
  assert results["targets"] and all({"target", "value", "threshold", "met"} <= set(t) for t in results["targets"])
  for algorithm in ("erm", "disam"):
    loop = results["harness_loop"]["algorithms"][algorithm]
    assert loop["harness"]["min_ms"] > 0 and loop["bare"]["min_ms"] > 0 and loop["harness/bare"] > 0
  for heading in (
    "## Harness loop",
    "## Step time per case",
    "## Ratios",
    "## Compile time, FLOPs and memory",
    "## Number of domains",
    "## Multi-device",
    "## Targets",
  ):
    assert heading in markdown, heading


def test_sam_family_quick_smoke(tmp_path):
  """benchmarks/sam_family.py --quick runs and its FLOP ratios say what the rules cost (timings not asserted)."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import sam_family

  results = sam_family.main(["--quick", "--rounds", "1", "--out-dir", str(tmp_path)])
  flops = {r["case"]: r["flops_ratio"] for r in results["mlp"]}
  assert flops["disam"] == 1.0 and abs(flops["optax.contrib.sam"] - 1) < 0.02
  assert abs(flops["disam rule='gsam'"] - 1) < 0.05 and abs(flops["disam rule='sagm'"] - 1) < 0.05  # tiny model
  assert flops["disam diagnostics=True"] > 1.1  # one more backward pass
  assert "| disam diagnostics=True |" in (tmp_path / "sam_family_quick.md").read_text()


def test_conv_layers_quick_smoke(tmp_path):
  """benchmarks/conv_layers.py --quick times every form of each layer and writes its table (timings not asserted)."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import conv_layers

  results = conv_layers.main(["--quick", "--no-torch", "--out-dir", str(tmp_path)])
  assert [row["layer"] for row in results["rows"]] == ["tiny.s1", "tiny.s2"]
  assert all(set(row["cases"]) == {"xla", "xla_cond", "fast", "fast_cond"} for row in results["rows"])
  assert "| tiny.s2 | 4, 8, 8, 4, 8, 3, 2 |" in (tmp_path / "fast_conv_layers_quick.md").read_text()


def test_algorithm_cost_quick_smoke(tmp_path):
  """benchmarks/algorithm_cost.py --quick measures every harness algorithm; FLOP ratios say what each adds."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import algorithm_cost

  out = tmp_path / "algorithm_cost.md"
  results = algorithm_cost.main(["--quick", "--out", str(out)])["mlp"]
  assert results["erm"]["flops_ratio"] == 1.0
  assert 1.9 < results["sam"]["flops_ratio"] < 2.1 and 1.9 < results["disam"]["flops_ratio"] < 2.1  # two passes
  assert abs(results["vrex"]["flops_ratio"] - 1) < 0.1
  assert "| disam_sagm+coral |" in out.read_text()


def test_algorithm_cost_penalty_memory_section(tmp_path):
  """--penalty-memory compiles CORAL and Fishr in both forms and writes its section after the kept timing table;
  at 8 domains the pair-free CORAL and the closed-form Fishr need less temporary memory than the forms they
  replaced."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import algorithm_cost

  out = tmp_path / "algorithm_cost.md"
  out.write_text("# timing table\n\n| erm | 1.00 |\n")
  rows = algorithm_cost.main(["--penalty-memory", "--domains", "8", "--out", str(out)])["penalty_memory"]
  assert {r["penalty"].split(",")[0] for r in rows} == {"CORAL", "Fishr"}
  assert all(r["M"] == 8 and r["after"] < r["before"] for r in rows)
  algorithm_cost.main(["--penalty-memory", "--domains", "8", "--out", str(out)])  # rewritten, not appended twice
  text = out.read_text()
  assert text.startswith("# timing table") and text.count(algorithm_cost.PENALTY_MARKER) == 1


def test_algorithm_cost_precision_speed_quick(tmp_path):
  """--precision-speed --quick times erm and disam in float32 and bf16 (MLP, one round of 5 steps) into its own
  section, next to the penalty-memory one (ratios not asserted: a shared machine)."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import algorithm_cost

  out = tmp_path / "algorithm_cost.md"
  algorithm_cost.main(["--penalty-memory", "--domains", "2", "--out", str(out)])
  speed = algorithm_cost.main(["--precision-speed", "--quick", "--out", str(out)])["precision_speed"]["mlp"]
  assert set(speed) == {"erm", "disam"} and all(r["float32_ms"] > 0 and r["bf16_ms"] > 0 for r in speed.values())
  text = out.read_text()
  assert text.count(algorithm_cost.PENALTY_MARKER) == 1 and text.count(algorithm_cost.PRECISION_MARKER) == 1


def test_amortized_quick_smoke(tmp_path):
  """benchmarks/amortized.py --quick times every amortized case against ERM and fits the trigger's two step kinds
  (timings not asserted: a shared machine)."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import amortized

  data = amortized.main(["--quick", "--rate", "mlp=0.25", "--out-dir", str(tmp_path)])
  res = data["results"]["mlp"]
  assert set(res["cases"]) == {
    "erm",
    "disam",
    "k2 reuse 0",
    "k2 reuse 0.7",
    "k4 reuse 0",
    "k4 reuse 0.7",
    "trigger gap 2",
    "trigger gap 4",
  }
  assert res["cases"]["erm"]["over_erm"] == 1.0 and res["trigger_at_rate"]["rate"] == 0.25
  text = (tmp_path / "amortized_quick.md").read_text()
  assert "| trigger gap 4 |" in text and "At the ascent rate 0.2500" in text


@pytest.mark.skipif(not HAS_TORCH, reason="benchmarks/vit_ops compares with PyTorch: pip install 'disam_jax[bench]'")
def test_vit_ops_times_the_same_computation_in_both_frameworks(tmp_path):
  """benchmarks/vit_ops.py, one round: every layer kind timed in JAX and PyTorch, whose forward outputs agree on the
  same inputs (so the two columns time the same computation)."""
  sys.path.insert(0, str(_ROOT))
  from benchmarks import vit_ops

  data = vit_ops.main(["--rounds", "1", "--calls", "1", "--out-dir", str(tmp_path)])
  assert len(data["rows"]) == 6
  for row in data["rows"]:
    assert row["jax_median_ms"] > 0 and row["torch_median_ms"] > 0
    assert row["max_abs_difference"] < 1e-3, row
  assert "| GELU (tanh) |" in (tmp_path / "vit_ops.md").read_text()


def test_input_pipeline_quick_smoke(tmp_path):
  from benchmarks import input_pipeline

  assert input_pipeline.main(["--quick", "--out", str(tmp_path)]) == 0
  results = json.loads((tmp_path / "input_pipeline_quick.json").read_text())
  assert results["throughput"][0]["images_per_s"] > 0 and len(results["memory"]) == 2
  assert (tmp_path / "input_pipeline_quick.md").read_text().startswith("# Input pipeline")


def test_committed_benchmark_tables_are_regenerated_byte_for_byte():
  """The benchmarks' tables go through tables.markdown_table; results/*.md written before that (step_cost's ViT run:
  step time, ratios, compile and memory, harness loop, targets; sharding's five tables) come out the same."""
  from benchmarks.step_cost.report import to_markdown

  results = _ROOT / "benchmarks" / "results"
  vit = json.loads((results / "step_cost_20261204_vit.json").read_text())
  assert to_markdown(vit) == (results / "step_cost_20261204_vit.md").read_text()
  # sharding sets XLA_FLAGS when imported: in its own process
  code = (
    "import json, sys; from benchmarks import sharding; "
    "sys.exit(sharding.markdown(json.load(open(sys.argv[1]))) != open(sys.argv[2]).read())"
  )
  env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", code, str(results / "sharding.json"), str(results / "sharding.md")],
    cwd=_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:] or "sharding.markdown(sharding.json) != sharding.md"
