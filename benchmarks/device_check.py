"""The prepared accelerator check: correctness and speed of disam_jax on one device, in one command.

    python -m benchmarks.device_check --out DIR           # one GPU: sections start while they fit in 420 s
    python -m benchmarks.device_check --out DIR --smoke   # CPU, tiny sizes, under a minute: the test suite runs it

Run from the repository root with the repository on PYTHONPATH (no install, no network). Writes
DIR/device_check.json and DIR/device_check.md and prints the targets table last. Sections, in order:

  environment    device kind and memory, jax / jaxlib / flax / optax / torch versions, nominal and measured peaks
  correctness    the shared conformance vectors (../shared/conformance, else the tracked copy
                 tests/data/disam_reference_v1.json) on the device at float32 with HIGHEST matmul precision, and
                 the relative error of the bf16 compute path (bf16 forward, float32 parameters) against them
  step_times     per model (ResNet-50 @224 and ViT-S/16 @224 with 4 domains x 32, the MNIST CNN @28 with 4 x 32):
                 JAX ERM, optax SAM, DISAM and DISAM with perturb_when=VarianceTrigger() in float32 and bf16
                 compute, and the eager PyTorch peers (benchmarks/torch_disam.py), all interleaved in one process
                 (time_round_robin: median of repeats after warm-up, every sample ends in a device sync); XLA's
                 compiled memory per JAX step, PyTorch's peak allocation per step, achieved TFLOP/s from XLA's cost
                 analysis and its share of the device's nominal and measured (GEMM) peak
  harness        disam-train's loop end to end (run_experiment: sampler, prefetch, metrics, evaluation,
                 checkpoints) on a synthetic image folder written here (224 px, 100 DISAM steps on ResNet-50):
                 steps/s, and the device's idle share (1 - the same compiled step's time in a bare loop / the
                 harness's time per step: an upper bound on its wait for input) beside the host's sampling time
  torch_compile  last (its compile time is the least predictable): PyTorch DISAM bf16 under torch.compile on
                 ResNet-50 and ViT-S/16, interleaved with the JAX and eager DISAM bf16 steps kept from step_times

Device time is scarce, so every section (and every model) first checks the time left of `--budget-s` against its
estimate and is skipped with a reason when it would not fit (a section once started runs to its end: the estimates
are guesses, as this script has not yet run on a GPU), and a section that raises records its error and the next
one runs (`--strict` re-raises: the tests use it). A model's JAX steps compile in parallel threads
(`--compile-threads`). Without torch (not installed, or `--no-torch`) the PyTorch rows say so. The harness section
reads the folder with the harness's own streaming loader (`data.load_dataset('image_folder')`: grain over an
ArrayRecord conversion, uint8, augmented in grain's workers) where grain is installed, else with a Pillow reader here
into memory (the device image has no grain unless its wheel travels with the command); the JSON says which.

Precision: the timed float32 rows run at the frameworks' default precision, which on NVIDIA GPUs uses TF32 tensor
cores for float32 matmuls and convolutions in XLA; PyTorch is given the same (`set_float32_matmul_precision('high')`,
cuDNN TF32 is its default). bf16 rows: bf16 compute with float32 parameters and optimizer (JAX: Flax
`dtype=bfloat16`, the classifier head and the loss in float32; PyTorch: `torch.autocast(bfloat16)`, which runs the
head in bf16 and the loss in float32). Both run the harness's configuration
(`fast_conv` models and `fast_conv.compiler_options()`: CPU-only work-arounds, XLA's own kernels on a GPU).

Targets written next to the figures: DISAM / SAM <= 1.02 (median step time, per model and dtype); JAX DISAM <=
PyTorch DISAM in bf16 on ResNet-50 and ViT-S/16; device idle waiting for input < 5%.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.step_cost.cases import JaxCase

_REPO = pathlib.Path(__file__).resolve().parent.parent
_CONFORMANCE = (
  _REPO.parent / "shared" / "conformance" / "disam_reference_v1.json",
  _REPO / "shared" / "conformance" / "disam_reference_v1.json",
  _REPO / "tests" / "data" / "disam_reference_v1.json",
)
KINDS = ("erm", "sam", "disam", "disam_trigger")
TORCH_KINDS = ("erm", "sam", "disam")
DTYPES = ("float32", "bf16")
SECTIONS = ("correctness", "step_times", "harness", "torch_compile")  # in the order they run, after environment
TARGETS = {"disam_over_sam": 1.02, "jax_over_torch_disam_bf16": 1.0, "input_wait_share": 0.05}
TORCH_TARGET_MODELS = ("resnet50", "vit_s16")
# Nominal dense peaks in TFLOP/s (NVIDIA data sheets): bf16 tensor cores, TF32 tensor cores (XLA's float32 default).
_NOMINAL_TFLOPS = {  # matched against jax's device_kind in this order
  "H100 PCIe": {"bf16": 756.0, "float32": 378.0},
  "H100 NVL": {"bf16": 835.0, "float32": 418.0},
  "H100": {"bf16": 989.4, "float32": 494.7},  # SXM5 ('NVIDIA H100 80GB HBM3')
  "H200": {"bf16": 989.4, "float32": 494.7},
  "A100": {"bf16": 312.0, "float32": 156.0},
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A timed model: registry `name` (disam_jax.harness.models and benchmarks.torch_disam), NHWC input `shape`,
  model `kwargs` (the same names on both sides), the batch `[domains, per_domain]`, the `dtypes` and `kinds` timed
  (the PyTorch peers: those of `TORCH_KINDS` among them) and whether DISAM bf16 is also timed under torch.compile."""

  name: str
  shape: tuple[int, int, int]
  kwargs: dict
  domains: int
  per_domain: int
  dtypes: tuple[str, ...] = DTYPES
  kinds: tuple[str, ...] = KINDS
  torch_compile: bool = True


FULL = {
  "resnet50": ModelSpec("resnet50", (224, 224, 3), {}, 4, 32),
  "vit_s16": ModelSpec("vit_tiny", (224, 224, 3), {"patch_size": 16, "dim": 384, "depth": 12, "heads": 6}, 4, 32),
  "mnist_cnn": ModelSpec("mnist_cnn", (28, 28, 1), {}, 4, 32, torch_compile=False),
}
# The same code paths at tiny sizes, within a minute of a 2-core CPU (where one XLA compilation of a step takes
# seconds): every kind in float32 on the MNIST CNN; SAM and DISAM in bf16 on a one-stage bottleneck ResNet (ImageNet
# stem) and a one-block ViT, torch.compile (backend aot_eager: no C++ build) on the ViT.
SMOKE = {
  "resnet50": ModelSpec(
    "resnet50",
    (32, 32, 3),
    {"width": 4, "stage_sizes": (1,), "small_input_stem": False},
    2,
    2,
    dtypes=("bf16",),
    kinds=("sam", "disam"),
    torch_compile=False,
  ),
  "vit_s16": ModelSpec(
    "vit_tiny",
    (16, 16, 3),
    {"patch_size": 8, "dim": 12, "depth": 1, "heads": 2},
    2,
    2,
    dtypes=("bf16",),
    kinds=("sam", "disam"),
  ),
  "mnist_cnn": ModelSpec("mnist_cnn", (8, 8, 1), {}, 2, 2, dtypes=("float32",), torch_compile=False),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much of everything: the full device run or the CPU smoke run."""

  models: dict
  conformance_cases: tuple[int, ...] | None  # indices into the vectors' cases; None: all
  timing_s: dict | None  # model -> seconds of timed rounds (between 2 and `repeats` rounds); None: `repeats`
  repeats: int
  min_sample_s: float
  gemm_size: int
  harness_image: int
  harness_steps: int
  harness_per_domain_images: int
  harness_model: str
  harness_model_kwargs: dict
  harness_batch: int
  estimate_s: dict  # section (or model) -> seconds it needs at least; skipped with a reason below that
  torch_compile_backend: str  # 'inductor' on the device; 'aot_eager' in the smoke run (no C++ build on CPU)


def settings(smoke: bool) -> Settings:
  if smoke:
    return Settings(
      SMOKE,
      conformance_cases=(0, 5),
      timing_s=None,
      repeats=2,
      min_sample_s=0.0,
      gemm_size=128,
      harness_image=16,
      harness_steps=6,
      harness_per_domain_images=8,
      harness_model="mnist_cnn",
      harness_model_kwargs={},
      harness_batch=2,
      estimate_s={"correctness": 1, "resnet50": 1, "vit_s16": 1, "mnist_cnn": 1, "harness": 1, "torch_compile": 1},
      torch_compile_backend="aot_eager",
    )
  return Settings(
    FULL,
    conformance_cases=None,
    timing_s={"resnet50": 60, "vit_s16": 40, "mnist_cnn": 20},
    repeats=7,
    min_sample_s=0.25,
    gemm_size=8192,
    harness_image=224,
    harness_steps=100,
    harness_per_domain_images=48,
    harness_model="resnet50",
    harness_model_kwargs={},
    harness_batch=32,
    estimate_s={
      "correctness": 15,
      "resnet50": 120,
      "vit_s16": 60,
      "mnist_cnn": 25,
      "harness": 90,
      "torch_compile": 100,
    },
    torch_compile_backend="inductor",
  )


class Budget:
  """Seconds left of `total` since construction; `fits(s)` says whether a section needing `s` seconds fits."""

  def __init__(self, total: float):
    self.total, self.t0 = float(total), time.perf_counter()

  def left(self) -> float:
    return self.total - (time.perf_counter() - self.t0)

  def fits(self, seconds: float) -> bool:
    return self.left() >= seconds

  def skip_reason(self, seconds: float) -> str:
    return f"skipped: needs ~{seconds:.0f} s, {max(0.0, self.left()):.0f} s of the {self.total:.0f} s budget left"


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ torch


def import_torch(no_torch: bool):
  """`(torch module or None, reason)`: absent, refused by --no-torch, or failing to import, the rows say why."""
  if no_torch:
    return None, "torch not used (--no-torch)"
  try:
    import torch
  except Exception as e:  # noqa: BLE001 (an ImportError, or a broken install: either way the rows say so)
    return None, f"torch absent: {type(e).__name__}: {e}".splitlines()[0]
  return torch, ""


def _torch_device(torch) -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ environment


def measured_peak_tflops(dtype: str, size: int) -> float:
  """The best of 10 jitted `size`^3 matmuls in `dtype` at default precision, in TFLOP/s (2 size^3 FLOP each)."""
  import jax
  import jax.numpy as jnp

  dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (size, size), dt)
  matmul = jax.jit(jnp.dot)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(10):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return round(2 * size**3 / best / 1e12, 3)


def nominal_peak_tflops(device_kind: str) -> dict | None:
  for key, peaks in _NOMINAL_TFLOPS.items():
    if key in device_kind:
      return dict(peaks)
  return None


def section_environment(s: Settings, torch, torch_reason: str) -> dict:
  """Device, memory, versions, and the peaks the achieved TFLOP/s are compared with."""
  import flax
  import jax
  import jaxlib
  import optax

  import disam_jax

  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  env = {
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "device_memory_gb": round(stats["bytes_limit"] / 2**30, 2) if "bytes_limit" in stats else None,
    "host": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    "versions": {
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "disam_jax": disam_jax.__version__,
      "torch": getattr(torch, "__version__", None),
    },
    "torch": torch_reason or f"torch {torch.__version__} on {_torch_device(torch)}",
    "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    "nominal_peak_tflops": nominal_peak_tflops(dev.device_kind),
    "measured_peak_tflops": {d: measured_peak_tflops(d, s.gemm_size) for d in DTYPES},
  }
  if torch is not None and torch.cuda.is_available():
    env["torch_device"] = torch.cuda.get_device_name(0)
  return env


# ------------------------------------------------------------------------------------------------ correctness


def conformance_path() -> pathlib.Path:
  for path in _CONFORMANCE:
    if path.is_file():
      return path
  raise FileNotFoundError(f"no conformance vectors at any of {', '.join(map(str, _CONFORMANCE))}")


def _conformance_loss(x, y, compute_dtype):
  """The vectors' model (tanh MLP, per-domain mean CE `[M]`); forward in `compute_dtype`, logits and loss float32."""
  import jax
  import jax.numpy as jnp
  import optax

  def loss(p):
    q = jax.tree.map(lambda a: a.astype(compute_dtype), p)
    xc = x.astype(compute_dtype)
    logits = (jnp.tanh(xc @ q["w1"].T + q["b1"]) @ q["w2"].T + q["b2"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)

  return loss


def _trajectory(case: dict, params, loss) -> tuple[Any, Any]:
  """Params after 1 and after 10 jitted DISAM steps of `case` (SGD with momentum and coupled weight decay)."""
  import jax
  import optax

  import disam_jax

  b = case["base"]
  if b["kind"] != "sgd":
    raise ValueError(f"conformance case with base {b['kind']!r}: only sgd is known to this check")
  base = optax.chain(
    optax.add_decayed_weights(b["weight_decay_coupled"]),
    optax.sgd(b["learning_rate"], b["momentum"], nesterov=b["nesterov"]),
  )
  tx = disam_jax.disam(base, rho=case["rho"], lam=case["lam"], adaptive=case["adaptive"])

  @jax.jit
  def step(p, state):
    updates, state = tx.update(None, state, p, domain_loss_fn=loss)
    return optax.apply_updates(p, updates), state

  state, after = tx.init(params), []
  for _ in range(10):
    params, state = step(params, state)
    after.append(params)
  return jax.device_get(after[0]), jax.device_get(after[9])


def _errors(got: dict, want: dict, init: dict) -> dict:
  """Max abs error, and relative errors: to the reference's norm and to its displacement from the start."""
  keys = sorted(want)
  g = np.concatenate([np.ravel(np.asarray(got[k], np.float64)) for k in keys])
  w = np.concatenate([np.ravel(np.asarray(want[k], np.float64)) for k in keys])
  i = np.concatenate([np.ravel(np.asarray(init[k], np.float64)) for k in keys])
  return {
    "max_abs": float(np.max(np.abs(g - w))),
    "rel": float(np.linalg.norm(g - w) / np.linalg.norm(w)),
    "rel_to_displacement": float(np.linalg.norm(g - w) / np.linalg.norm(w - i)),
  }


def section_correctness(s: Settings) -> dict:
  """Every conformance case at float32 (HIGHEST matmul precision; tolerance 2e-5 as in tests/test_disam.py) and
  with a bf16 forward (relative error reported, no target: bf16 keeps 8 significant bits, unit roundoff 3.9e-3)."""
  import jax
  import jax.numpy as jnp

  path = conformance_path()
  d = json.loads(path.read_text())
  x, y = jnp.asarray(d["x"], jnp.float32), jnp.asarray(d["y"], jnp.int32)
  init = {k: np.asarray(v, np.float32) for k, v in d["params_init"].items()}
  cases = []
  chosen = s.conformance_cases if s.conformance_cases is not None else range(len(d["cases"]))
  for c in (d["cases"][i] for i in chosen):
    row = {"rho": c["rho"], "lam": c["lam"], "adaptive": c["adaptive"]}
    for dtype, compute in (("float32", jnp.float32), ("bf16", jnp.bfloat16)):
      with jax.default_matmul_precision("highest"):
        one, ten = _trajectory(c, jax.tree.map(jnp.asarray, init), _conformance_loss(x, y, compute))
      row[dtype] = {
        "after_1": _errors(one, c["params_after_1_step"], init),
        "after_10": _errors(ten, c["params_after_10_steps"], init),
      }
    row["float32_pass"] = max(row["float32"][k]["max_abs"] for k in ("after_1", "after_10")) <= 2e-5
    cases.append(row)
  return {
    "vectors": str(path.relative_to(_REPO.parent) if _REPO.parent in path.parents else path),
    "tolerance_float32": 2e-5,
    "all_float32_pass": all(r["float32_pass"] for r in cases),
    "float32_max_abs": max(r["float32"][k]["max_abs"] for r in cases for k in ("after_1", "after_10")),
    "bf16_max_rel_after_10": max(r["bf16"]["after_10"]["rel"] for r in cases),
    "cases": cases,
  }


# ------------------------------------------------------------------------------------------------- step times


def _jax_model(spec: ModelSpec, dtype: str):
  """`(graphdef, params, model_state)` on the host; bf16: Flax `dtype=bfloat16` with the head in float32."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks.step_cost.config import NUM_CLASSES
  from disam_jax.harness.models import create_model, functional_model

  kwargs = dict(spec.kwargs, dtype=jnp.bfloat16) if dtype == "bf16" else dict(spec.kwargs)
  model = create_model(
    spec.name, num_classes=NUM_CLASSES, input_shape=spec.shape, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **kwargs
  )
  if dtype == "bf16":
    model.classifier.dtype = jnp.float32  # logits and the loss in float32, the usual mixed-precision head
  graphdef, params, model_state = functional_model(model)
  return graphdef, jax.device_get(params), jax.device_get(model_state)


class JaxStep(JaxCase):
  """One jitted, donated step of `kind` (benchmarks.step_cost.make_jax_step; 'disam_trigger' is DISAM with
  `perturb_when=VarianceTrigger()`), lowered now and compiled by `compile()` (thread-safe: XLA releases the GIL);
  `run` and `final_loss` are step_cost's `JaxCase`'s."""

  framework = "jax"

  def __init__(self, label: str, kind: str, model, x, y):
    import jax
    import jax.numpy as jnp

    import disam_jax
    from benchmarks.step_cost import make_jax_step

    graphdef, params, model_state = model
    extra = {"perturb_when": disam_jax.VarianceTrigger()} if kind == "disam_trigger" else None
    tx, step = make_jax_step(
      "disam" if kind == "disam_trigger" else kind, graphdef, model_state, x.shape[0], disam_kwargs=extra
    )
    fresh = lambda t: jax.tree.map(jnp.array, t)
    self.label, self.kind = label, kind
    self.state = (fresh(params), tx.init(fresh(params)), fresh(model_state))
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    self.lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*self.state, self.x, self.y)
    self.compiled, self.compile_s, self.loss, self.times = None, None, None, []

  def compile(self) -> JaxStep:
    from disam_jax.harness import fast_conv

    t0 = time.perf_counter()
    self.compiled = self.lowered.compile(compiler_options=fast_conv.compiler_options())
    self.compile_s = round(time.perf_counter() - t0, 2)
    return self

  def analysis(self) -> dict:
    """XLA's compiled memory plan (temp + arguments + outputs, bytes) and FLOP count of one step."""
    out: dict[str, Any] = {"compile_s": self.compile_s}
    mem = self.compiled.memory_analysis()
    if mem is not None:
      out["peak_bytes"] = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
      out["peak_source"] = "XLA memory_analysis: temp + arguments + outputs"
    cost = self.compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0] if cost else None
    if cost and cost.get("flops"):
      out["gflop"] = round(float(cost["flops"]) / 1e9, 3)
    return out


class TorchStep:
  """benchmarks/torch_disam.py's step of `kind` on the same model and batch, on the GPU if there is one;
  bf16 under `torch.autocast`; `compile_backend`: the model under `torch.compile(backend=...)`. `run` ends in
  `torch.cuda.synchronize()`."""

  framework = "torch"

  def __init__(
    self, torch, label: str, kind: str, spec: ModelSpec, x, y, dtype: str, compile_backend: str | None = None
  ):
    from benchmarks import torch_disam as td
    from benchmarks.step_cost.config import LAM, LR, MOMENTUM, NUM_CLASSES, RHO

    self.torch, self.label, self.kind = torch, label, kind
    self.device = _torch_device(torch)
    torch.manual_seed(0)
    model = td.build_model(spec.name, num_classes=NUM_CLASSES, input_shape=spec.shape, **spec.kwargs).to(self.device)
    if self.device == "cuda":
      model = model.to(memory_format=torch.channels_last)  # NHWC inputs permuted to NCHW are channels-last already
    if compile_backend:
      model = torch.compile(model, backend=compile_backend)
    self.step, _ = td.make_train_step(
      model, kind, num_domains=spec.domains, rho=RHO, lam=LAM, base="sgd", lr=LR, momentum=MOMENTUM
    )
    n = spec.domains * spec.per_domain
    self.x = torch.from_numpy(np.ascontiguousarray(x.reshape(n, *spec.shape))).to(self.device)
    self.y = torch.from_numpy(y.reshape(n).astype(np.int64)).to(self.device)
    self.domain_ids = torch.arange(spec.domains, device=self.device).repeat_interleave(spec.per_domain)
    self.autocast = (
      (lambda: torch.autocast(self.device, dtype=torch.bfloat16)) if dtype == "bf16" else (contextlib.nullcontext)
    )
    self.loss, self.times = None, []

  def run(self, steps: int) -> None:
    with self.autocast():
      for _ in range(steps):
        self.loss = self.step(self.x, self.y, self.domain_ids)
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def final_loss(self) -> float:
    return float(self.loss)

  def peak_bytes(self) -> int | None:
    """Peak allocation of one step on the GPU (None on CPU)."""
    if self.device != "cuda":
      return None
    self.torch.cuda.synchronize()
    self.torch.cuda.reset_peak_memory_stats()
    self.run(1)
    return int(self.torch.cuda.max_memory_allocated())


def _build_jax_cases(spec: ModelSpec, x, y, threads: int) -> list:
  """Every (kind, dtype) step, traced one after another and compiled in `threads` threads."""
  cases = []
  for dtype in spec.dtypes:
    model = _jax_model(spec, dtype)
    cases += [JaxStep(f"{kind}/{dtype}", kind, model, x, y) for kind in spec.kinds]
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    list(pool.map(JaxStep.compile, cases))
  return cases


def _build_torch_cases(torch, spec: ModelSpec, x, y) -> list:
  """Eager PyTorch peers of the spec's torch kinds and dtypes, with the GPU's settings matched to XLA's."""
  if torch.cuda.is_available():
    torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on the same GPU
    torch.backends.cudnn.benchmark = True  # convolution algorithms autotuned, as XLA's are
  return [
    TorchStep(torch, f"torch_{kind}/{dtype}", kind, spec, x, y, dtype)
    for dtype in spec.dtypes
    for kind in TORCH_KINDS
    if kind in spec.kinds
  ]


def _ratios(timed: dict, torch_done: bool) -> dict:
  r = lambda a, b: round(timed[a]["median_ms"] / timed[b]["median_ms"], 4) if a in timed and b in timed else None
  out = {}
  for dtype in DTYPES:
    out[f"disam/sam {dtype}"] = r(f"disam/{dtype}", f"sam/{dtype}")
    out[f"disam/erm {dtype}"] = r(f"disam/{dtype}", f"erm/{dtype}")
    out[f"disam_trigger/erm {dtype}"] = r(f"disam_trigger/{dtype}", f"erm/{dtype}")
    if torch_done:
      out[f"jax_disam/torch_disam {dtype}"] = r(f"disam/{dtype}", f"torch_disam/{dtype}")
      out[f"jax_erm/torch_erm {dtype}"] = r(f"erm/{dtype}", f"torch_erm/{dtype}")
  out["disam bf16/float32"] = r("disam/bf16", "disam/float32")
  return {k: v for k, v in out.items() if v is not None}


def _throughput(timed: dict, peaks: dict) -> None:
  """TFLOP/s of every case: the JAX step's XLA FLOP count of its kind and dtype over the median time (PyTorch
  cases: the JAX count of the same kind), and its share of the device's nominal and measured peaks."""
  for label, row in timed.items():
    kind, dtype = label.split("/")
    kind = kind.replace("torch_compile_", "").replace("torch_", "")
    work = timed.get(f"{kind}/{dtype}", {}).get("gflop")
    if work is None or kind == "disam_trigger":  # the trigger's cond: XLA counts both branches
      continue
    row["tflop_per_s"] = round(work / 1e3 / (row["median_ms"] / 1e3), 3)
    for source in ("nominal", "measured"):
      peak = (peaks.get(source) or {}).get(dtype)
      if peak:
        row[f"share_of_{source}_peak"] = round(row["tflop_per_s"] / peak, 4)


def _device_peak_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _clean(row: dict) -> dict:
  for k in ("times_ms", "cpu_min_ms", "cpu_median_ms", "page_faults_per_step", "other_processes_cores"):
    row.pop(k, None)
  return row


def time_model(
  key: str,
  spec: ModelSpec,
  s: Settings,
  torch,
  torch_reason: str,
  budget: Budget,
  threads: int,
  peaks: dict,
  keep: dict,
) -> dict:
  """One model's JAX and PyTorch cases, interleaved; ratios, memory and throughput. The JAX and eager PyTorch
  DISAM bf16 cases of a `spec.torch_compile` model go into `keep[key]` for `section_torch_compile`."""
  from benchmarks.step_cost import make_batch, time_round_robin

  x, y = make_batch(spec.domains, spec.per_domain, spec.shape)
  t0 = time.perf_counter()
  cases: list = _build_jax_cases(spec, x, y, threads)
  compile_wall = round(time.perf_counter() - t0, 1)
  notes: dict[str, Any] = {"jax_build_and_compile_wall_s": compile_wall}
  if torch is None:
    notes["torch"] = torch_reason
  else:
    try:
      cases += _build_torch_cases(torch, spec, x, y)
    except Exception as e:  # noqa: BLE001 (PyTorch failing on the device must not cost the JAX rows)
      notes["torch"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      traceback.print_exc()
  timing_s = None if s.timing_s is None else min(s.timing_s[key], max(10.0, budget.left() / 4))
  timed = time_round_robin(
    cases,
    repeats=s.repeats if timing_s is None else None,
    min_sample_s=s.min_sample_s,
    budget_s=timing_s,
    load_samples=[],
    log=_log,
    max_rounds=s.repeats,
  )
  for case in cases:
    if isinstance(case, JaxStep):
      timed[case.label].update(case.analysis())
    else:
      peak = case.peak_bytes()
      if peak is not None:
        timed[case.label].update(peak_bytes=peak, peak_source="torch.cuda.max_memory_allocated over one step")
    _clean(timed[case.label])
  _throughput(timed, peaks)
  kept = [c for c in cases if c.label in ("disam/bf16", "torch_disam/bf16")]
  if spec.torch_compile and len(kept) == 2:
    keep[key] = (spec, x, y, kept)
  out = {
    "model": spec.name,
    "wall_s": round(time.perf_counter() - t0, 1),
    "input_shape": list(spec.shape),
    "model_kwargs": spec.kwargs,
    "batch": [spec.domains, spec.per_domain],
    "cases": timed,
    "ratios": _ratios(timed, torch is not None),
    "process_peak_device_bytes": _device_peak_bytes(),
    "notes": notes,
  }
  _log(f"  {key}: " + ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in timed.items()) + " ms (median)")
  return out


def section_step_times(
  s: Settings, torch, torch_reason: str, budget: Budget, threads: int, peaks: dict, keep: dict, strict: bool
) -> dict:
  """Every model in order, each while its estimate fits in the budget left."""
  out = {}
  for key, spec in s.models.items():
    need = s.estimate_s[key]
    if not budget.fits(need):
      out[key] = {"status": budget.skip_reason(need)}
      continue
    _log(f"step times: {key} {spec.shape}, {spec.domains} x {spec.per_domain}")
    out[key] = _guarded(lambda: time_model(key, spec, s, torch, torch_reason, budget, threads, peaks, keep), strict)
  return out


def compile_model(key: str, s: Settings, torch, kept: tuple) -> dict:
  """DISAM bf16 under torch.compile, its compilation timed, then interleaved with the kept JAX and eager cases."""
  from benchmarks.step_cost import time_round_robin

  spec, x, y, cases = kept
  case = TorchStep(torch, "torch_compile_disam/bf16", "disam", spec, x, y, "bf16", s.torch_compile_backend)
  t0 = time.perf_counter()
  case.run(2)  # the first call compiles the passes, the second what its guards ask for (BatchNorm's momentum)
  compile_s = round(time.perf_counter() - t0, 1)
  timed = time_round_robin(
    cases + [case],
    repeats=s.repeats,
    min_sample_s=s.min_sample_s,
    budget_s=None,
    load_samples=[],
    log=_log,
    max_rounds=s.repeats,
  )
  r = lambda a, b: round(timed[a]["median_ms"] / timed[b]["median_ms"], 4)
  return {
    "backend": s.torch_compile_backend,
    "compile_s": compile_s,
    "cases": {k: _clean(v) for k, v in timed.items()},
    "ratios": {
      "jax_disam/torch_compile_disam bf16": r("disam/bf16", "torch_compile_disam/bf16"),
      "torch_disam/torch_compile_disam bf16": r("torch_disam/bf16", "torch_compile_disam/bf16"),
    },
  }


def section_torch_compile(s: Settings, torch, torch_reason: str, budget: Budget, keep: dict, strict: bool) -> dict:
  """Last, as its compilations are the least predictable cost: each kept model while its estimate fits."""
  if torch is None:
    return {"status": torch_reason}
  out = {}
  for key, kept in keep.items():
    if not budget.fits(s.estimate_s["torch_compile"]):
      out[key] = {"status": budget.skip_reason(s.estimate_s["torch_compile"])}
      continue
    _log(f"torch.compile: {key}")
    out[key] = _guarded(lambda: compile_model(key, s, torch, kept), strict)
  keep.clear()
  return out


# ---------------------------------------------------------------------------------------------------- harness


def write_image_folder(root: pathlib.Path, size: int, per_domain: int, domains: int = 5, classes: int = 2) -> None:
  """`root/d<k>/c<j>/<i>.png`: `per_domain` random RGB images per domain (classes alternate), `size` px."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for k in range(domains):
    for i in range(per_domain):
      folder = root / f"d{k}" / f"c{i % classes}"
      folder.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def read_image_folder(root: pathlib.Path):
  """The folder as a `data.DomainDataset` read with Pillow (sorted names; float32 in [0, 1]): the harness's
  `image_folder` loader streams through grain, which the device image lacks."""
  from PIL import Image

  from disam_jax.harness import data

  domains = sorted(p.name for p in root.iterdir() if p.is_dir())
  classes = sorted(p.name for p in (root / domains[0]).iterdir() if p.is_dir())
  images, labels = [], []
  for d in domains:
    files = [(c, f) for c, name in enumerate(classes) for f in sorted((root / d / name).iterdir())]
    images.append(np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / np.float32(255) for _, f in files]))
    labels.append(np.asarray([c for c, _ in files], np.int32))
  return data.DomainDataset("image_folder", tuple(domains), tuple(classes), tuple(images), tuple(labels))


def _load_folder(root: pathlib.Path, image_size: int, loader: str, cache_dir: str):
  """`(dataset, how)`: through the harness's own streaming loader when grain is there (or `loader='stream'`)."""
  from disam_jax.harness import data

  if loader == "stream" or (loader == "auto" and importlib.util.find_spec("grain") is not None):
    ds = data.load_dataset("image_folder", data_dir=str(root), image_size=image_size, cache_dir=cache_dir)
    return ds, 'data.load_dataset("image_folder") (streamed through grain)'
  return read_image_folder(root), "Pillow reader in this script (grain absent)"


def _train_feed(config, split, seed: int):
  """The run's own training feed (`loop._batch_source`: streamed for a folder's record indices, else in memory)."""
  from disam_jax.harness import loop

  return loop._batch_source(config, split, seed, None)[0]


def _bare_step_s(config, ds, held_out: str, steps: int) -> float:
  """Seconds per step of the harness's own compiled loop step (`loop._LoopStep`, the function `run_cell` runs)
  in a bare loop: one batch already on the device, no metrics read, one sync at the end."""
  import jax

  from disam_jax.harness.experiment import _cell_split
  from disam_jax.harness.loop import _compile
  from disam_jax.harness.steps import init_model, init_train_state

  split = _cell_split(config, ds, held_out, 0)
  graphdef, params, model_state = init_model(
    config.model, num_classes=ds.num_classes, input_shape=ds.input_shape, seed=0, model_kwargs=config.model_kwargs
  )
  compiled = _compile(config, graphdef, model_state, len(split.train))
  algorithm = config.algorithms[0]
  state = init_train_state(params, model_state, compiled.txs[algorithm], (compiled.penalties or {}).get(algorithm))
  leaves, treedef = jax.tree.flatten(state)
  run = compiled.loop_steps[algorithm].for_tree(treedef)
  sampler = _train_feed(config, split, 0)
  try:
    batch = jax.device_put(sampler.next())
  finally:
    getattr(sampler, "close", lambda: None)()
  leaves, packed = run(leaves, batch)
  jax.block_until_ready((leaves, packed))
  t0 = time.perf_counter()
  for _ in range(steps):
    leaves, packed = run(leaves, batch)
  jax.block_until_ready((leaves, packed))
  return (time.perf_counter() - t0) / steps


def _sampling_s(ds, config, held_out: str, draws: int = 10) -> float:
  """Host seconds per batch of the harness's sampler (what the loop's prefetch overlaps with the device's step)."""
  from disam_jax.harness.experiment import _cell_split

  split = _cell_split(config, ds, held_out, 0)
  sampler = _train_feed(config, split, 1)
  try:
    sampler.next()
    t0 = time.perf_counter()
    for _ in range(draws):
      sampler.next()
    return (time.perf_counter() - t0) / draws
  finally:
    getattr(sampler, "close", lambda: None)()


def section_harness(s: Settings, loader: str, work: pathlib.Path) -> dict:
  """disam-train's loop end to end on a synthetic image folder: steps/s and the device's idle share."""
  from disam_jax.harness._choices import HParams
  from disam_jax.harness.config import ExperimentConfig
  from disam_jax.harness.experiment import run_experiment

  root = work / "images"
  t0 = time.perf_counter()
  write_image_folder(root, s.harness_image, s.harness_per_domain_images)
  ds, how = _load_folder(root, s.harness_image, loader, str(work / "cache"))
  load_s = round(time.perf_counter() - t0, 2)
  held_out = ds.domains[-1]
  config = ExperimentConfig(
    dataset="image_folder",
    data_dir=str(root),
    image_size=s.harness_image,
    model=s.harness_model,
    model_kwargs=dict(s.harness_model_kwargs),
    algorithms=("disam",),
    held_out=(held_out,),
    seeds=(0,),
    steps=s.harness_steps,
    eval_every=s.harness_steps,
    hparams=HParams(batch_size=s.harness_batch),
  )
  stamps: dict[int, float] = {}
  t0 = time.perf_counter()
  run_experiment(
    config,
    str(work / "run"),
    progress=False,
    prepared=(ds, (held_out,)),
    on_step=lambda a, d, seed, k, line: stamps.__setitem__(k, time.perf_counter()),
  )
  total_s = time.perf_counter() - t0
  first, last = 2, s.harness_steps - 1  # compilation before step 2; the final evaluation after the last step
  harness_s = (stamps[last] - stamps[first]) / (last - first)
  bare_s = _bare_step_s(config, ds, held_out, max(5, s.harness_steps // 3))
  sampling_s = _sampling_s(ds, config, held_out)
  idle = max(0.0, 1.0 - bare_s / harness_s)
  return {
    "loader": how,
    "model": s.harness_model,
    "image_size": s.harness_image,
    "algorithm": "disam",
    "domains": len(ds.domains),
    "train_domains": len(ds.domains) - 1,
    "per_domain_batch": s.harness_batch,
    "steps": s.harness_steps,
    "folder_write_and_load_s": load_s,
    "run_experiment_s": round(total_s, 2),
    "harness_ms_per_step": round(1e3 * harness_s, 3),
    "steps_per_s": round(1 / harness_s, 3),
    "bare_ms_per_step": round(1e3 * bare_s, 3),
    "device_idle_share": round(idle, 4),
    "host_sampling_ms_per_batch": round(1e3 * sampling_s, 3),
    "host_sampling_share_of_step": round(sampling_s / harness_s, 4),
  }


# ----------------------------------------------------------------------------------------------------- report


def _guarded(fn: Callable[[], dict], strict: bool) -> dict:
  """`fn()`, or `{'status': 'failed: ...', 'traceback': ...}` when it raises (re-raised with `strict`)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 (one section's failure must not cost the other sections' device time)
    if strict:
      raise
    traceback.print_exc()
    return {
      "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
      "traceback": traceback.format_exc(),
    }


def targets(results: dict) -> list[dict]:
  """Each target with its measured figure (None when its section did not run) and whether it is met."""
  rows = []
  steps = results.get("step_times") or {}
  compiled = results.get("torch_compile") or {}
  for key in steps:
    ratios = dict(steps[key].get("ratios", {}), **(compiled.get(key) or {}).get("ratios", {}))
    for dtype in DTYPES:
      rows.append(
        {
          "figure": f"{key} DISAM / SAM median step, {dtype}",
          "value": ratios.get(f"disam/sam {dtype}"),
          "target": f"<= {TARGETS['disam_over_sam']}",
          "limit": TARGETS["disam_over_sam"],
        }
      )
    if key in TORCH_TARGET_MODELS:
      for peer in ("torch_disam", "torch_compile_disam"):
        rows.append(
          {
            "figure": f"{key} JAX DISAM / PyTorch {'eager' if peer == 'torch_disam' else 'compiled'} DISAM, bf16",
            "value": ratios.get(f"jax_disam/{peer} bf16"),
            "target": f"<= {TARGETS['jax_over_torch_disam_bf16']}",
            "limit": TARGETS["jax_over_torch_disam_bf16"],
          }
        )
  harness = results.get("harness") or {}
  rows.append(
    {
      "figure": "harness: device idle share (upper bound of input wait)",
      "value": harness.get("device_idle_share"),
      "target": f"< {TARGETS['input_wait_share']}",
      "limit": TARGETS["input_wait_share"],
    }
  )
  corr = results.get("correctness") or {}
  rows.append(
    {
      "figure": "conformance float32 (HIGHEST) max abs error",
      "value": corr.get("float32_max_abs"),
      "target": "<= 2e-05",
      "limit": 2e-5,
    }
  )
  for row in rows:
    row["met"] = None if row["value"] is None else row["value"] <= row.pop("limit")
    row.pop("limit", None)
  return rows


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
  return str(v)


def targets_table(rows: list[dict]) -> str:
  from disam_jax.harness.tables import markdown_table  # imports JAX: not at the top of this module

  met = {True: "yes", False: "NO", None: "not measured"}
  return "\n".join(
    markdown_table(
      ["figure", "measured", "target", "met"],
      ([r["figure"], _fmt(r["value"]), r["target"], met[r["met"]]] for r in rows),
    )
  )


def _step_table(key: str, res: dict) -> list[str]:
  from disam_jax.harness.tables import markdown_table  # imports JAX: not at the top of this module

  if "cases" not in res:
    return [f"### {key}", "", res.get("status", "not run"), ""]
  lines = [
    f"### {key}: {res['model']} {res['input_shape']}, {res['batch'][0]} domains x {res['batch'][1]}",
    "",
    f"notes: {json.dumps(res['notes'])}",
    "",
  ]
  rows = []
  for label, r in res["cases"].items():
    mb = r.get("peak_bytes") and round(r["peak_bytes"] / 2**20, 1)
    rows.append(
      [
        label,
        _fmt(r["median_ms"]),
        _fmt(r["min_ms"]),
        _fmt(mb),
        _fmt(r.get("gflop")),
        _fmt(r.get("tflop_per_s")),
        _fmt(r.get("share_of_nominal_peak")),
        _fmt(r.get("share_of_measured_peak")),
      ]
    )
  lines += markdown_table(
    ["case", "median ms", "min ms", "peak MB", "GFLOP", "TFLOP/s", "share of nominal peak", "of measured GEMM"], rows
  )
  lines += ["", "ratios (median step times): " + ", ".join(f"{k} {v}" for k, v in res["ratios"].items()), ""]
  return lines


def markdown(results: dict) -> str:
  from disam_jax.harness.tables import markdown_table  # imports JAX: not at the top of this module

  env = results.get("environment", {})
  lines = [
    f"# Device check ({'smoke, CPU tiny sizes' if results['smoke'] else 'full'})",
    "",
    f"{results['started']}; {env.get('device_kind', '?')} ({env.get('backend', '?')}), "
    f"{env.get('device_memory_gb', '?')} GB; {json.dumps(env.get('versions', {}))}; {env.get('torch', '')}",
    f"nominal peak TFLOP/s {env.get('nominal_peak_tflops')}, measured GEMM {env.get('measured_peak_tflops')}; "
    f"wall {results.get('wall_s')} s of a {results['budget_s']} s budget.",
    "",
    *(
      ["Smoke run: tiny models on a CPU, to keep the code paths working; its times say nothing about any device.", ""]
      if results["smoke"]
      else []
    ),
    "## Targets",
    "",
    targets_table(results["targets"]),
    "",
    "## Correctness",
    "",
  ]
  corr = results.get("correctness", {})
  if "cases" in corr:
    lines += [
      f"vectors {corr['vectors']}: float32 (HIGHEST) max abs error {_fmt(corr['float32_max_abs'])} "
      f"(tolerance 2e-5, all pass: {corr['all_float32_pass']}); bf16 compute, relative error after 10 steps "
      f"<= {_fmt(corr['bf16_max_rel_after_10'])}.",
      "",
    ]
    lines += markdown_table(
      ["rho", "lam", "adaptive", "float32 max abs (10 steps)", "bf16 rel (1 step)", "bf16 rel (10 steps)"],
      (
        [
          c["rho"],
          c["lam"],
          c["adaptive"],
          _fmt(c["float32"]["after_10"]["max_abs"]),
          _fmt(c["bf16"]["after_1"]["rel"]),
          _fmt(c["bf16"]["after_10"]["rel"]),
        ]
        for c in corr["cases"]
      ),
    )
  else:
    lines.append(corr.get("status", "not run"))
  lines += ["", "## Step times", ""]
  for key, res in (results.get("step_times") or {}).items():
    lines += _step_table(key, res)
  lines += [
    "## Harness end to end",
    "",
    json.dumps(results.get("harness", {}), indent=1),
    "",
    "## torch.compile (DISAM bf16, interleaved with the JAX and eager steps)",
    "",
  ]
  for key, res in (results.get("torch_compile") or {}).items():
    lines.append(
      f"- {key}: "
      + (json.dumps({k: res[k] for k in ("backend", "compile_s", "ratios")}) if "ratios" in res else str(res))
    )
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- main


def _warm_up_jax() -> None:
  """A convolution and a matmul on the default device: the libraries behind them are loaded now."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  a = jnp.ones((1, 4, 4, 1))
  jax.jit(
    lambda a: (
      lax.conv_general_dilated(a, jnp.ones((3, 3, 1, 1)), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      @ jnp.ones((1, 2))
    )
  )(a).block_until_ready()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="directory for device_check.json and device_check.md")
  ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, every code path: under a minute")
  ap.add_argument(
    "--budget-s",
    type=float,
    default=None,
    help="seconds the sections may take (default 420; smoke 300); a section that would not fit is "
    "skipped with a reason",
  )
  ap.add_argument("--models", nargs="+", default=None, choices=tuple(FULL), help="step-time models (default all)")
  ap.add_argument(
    "--sections",
    nargs="+",
    default=None,
    choices=SECTIONS,
    help="sections to run (default all; the environment always)",
  )
  ap.add_argument("--no-torch", action="store_true", help="no PyTorch rows (as where torch is absent)")
  ap.add_argument(
    "--folder-loader",
    choices=("auto", "stream", "pillow"),
    default="auto",
    help="the harness section's image-folder reader (auto: the harness's streaming loader if grain is installed)",
  )
  ap.add_argument(
    "--compile-threads",
    type=int,
    default=min(8, os.cpu_count() or 1),
    help="JAX steps of one model compiled in parallel",
  )
  ap.add_argument("--strict", action="store_true", help="re-raise a failing section instead of recording it")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  # JAX would take 75% of the GPU's memory at its first allocation, leaving PyTorch's peers none.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  _warm_up_jax()  # JAX's CUDA libraries (cuDNN, cuBLAS) load before PyTorch's, which may bring other versions
  if not args.smoke and jax.default_backend() == "cpu":  # full sizes on a CPU would run for hours
    raise SystemExit(
      "device_check: JAX sees no accelerator (backend cpu): the full check is for a GPU; "
      "run with --smoke for the CPU smoke run"
    )
  s = settings(args.smoke)
  if args.models:
    s = dataclasses.replace(s, models={k: v for k, v in s.models.items() if k in args.models})
  sections = set(args.sections or SECTIONS)
  keep: dict = {}  # step_times -> torch_compile: the cases the compiled PyTorch step is interleaved with
  budget = Budget(args.budget_s if args.budget_s is not None else (300 if args.smoke else 420))
  torch, torch_reason = import_torch(args.no_torch)
  results: dict[str, Any] = {
    "smoke": args.smoke,
    "budget_s": budget.total,
    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "command": " ".join(["python -m benchmarks.device_check", *(argv or sys.argv[1:])]),
  }
  section_s: dict[str, float] = {}
  mark = lambda name, t0: section_s.__setitem__(name, round(time.perf_counter() - t0, 1))
  t0 = time.perf_counter()
  _log("environment")
  results["environment"] = _guarded(lambda: section_environment(s, torch, torch_reason), args.strict)
  mark("environment", t0)
  peaks = {
    "nominal": results["environment"].get("nominal_peak_tflops"),
    "measured": results["environment"].get("measured_peak_tflops"),
  }
  if "correctness" in sections:
    t0 = time.perf_counter()
    _log("correctness")
    results["correctness"] = (
      _guarded(lambda: section_correctness(s), args.strict)
      if budget.fits(s.estimate_s["correctness"])
      else {"status": budget.skip_reason(s.estimate_s["correctness"])}
    )
    mark("correctness", t0)
  if "step_times" in sections:
    t0 = time.perf_counter()
    results["step_times"] = section_step_times(
      s, torch, torch_reason, budget, args.compile_threads, peaks, keep, args.strict
    )
    mark("step_times", t0)
  if "harness" in sections:
    t0 = time.perf_counter()
    _log("harness end to end")
    work = pathlib.Path(tempfile.mkdtemp(prefix="device_check_"))
    try:
      results["harness"] = (
        _guarded(lambda: section_harness(s, args.folder_loader, work), args.strict)
        if budget.fits(s.estimate_s["harness"])
        else {"status": budget.skip_reason(s.estimate_s["harness"])}
      )
    finally:
      shutil.rmtree(work, ignore_errors=True)
    mark("harness", t0)
  if "torch_compile" in sections:
    t0 = time.perf_counter()
    results["torch_compile"] = section_torch_compile(s, torch, torch_reason, budget, keep, args.strict)
    mark("torch_compile", t0)
  results["wall_s"] = round(budget.total - budget.left(), 1)
  results["section_s"] = section_s
  results["targets"] = targets(results)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "device_check.json").write_text(json.dumps(results, indent=1, default=str))
  (out / "device_check.md").write_text(markdown(results))
  print(
    f"device check: {results['environment'].get('device_kind', '?')}, {results['wall_s']} s; {out / 'device_check.md'}"
  )
  print(targets_table(results["targets"]))
  return results


if __name__ == "__main__":
  main()
