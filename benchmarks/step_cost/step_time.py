"""Step cost: every case per model (JAX kinds in each XLA configuration, PyTorch peers), ratios and memory."""

from __future__ import annotations

from typing import Any

from benchmarks.step_cost.cases import JaxCase, build_jax_model, label, make_batch, perturb_every
from benchmarks.step_cost.config import (
  _DEFAULT_SPECS,
  AMORTIZED_CASES,
  JAX_CASES,
  JAX_SPECS_BY_MODEL,
  TORCH_CASES,
  TORCH_CASES_BY_MODEL,
  XLA_CONFIGS,
)
from benchmarks.step_cost.timing import ratio, time_round_robin
from benchmarks.step_cost.torch_side import TorchCase


def _specs(name: str, args) -> tuple[tuple[str, str], ...]:
  if args.all_cases:
    return tuple((k, c) for c in XLA_CONFIGS for k in JAX_CASES)
  if args.quick:  # every kind once, and ERM / DISAM in the harness's configuration (compiler options, fast_conv)
    return tuple((k, "") for k in JAX_CASES) + (("erm", "fast"), ("disam", "fast"), ("disam_k2", "fast"))
  specs = JAX_SPECS_BY_MODEL.get(name, _DEFAULT_SPECS)
  if args.configs is not None:  # e.g. --configs fast ynn_off: only those configurations ('default': out of the box)
    specs = tuple((k, c) for k, c in specs if (c or "default") in args.configs)
  return specs


def step_ratios(timed: dict[str, Any]) -> dict[str, float]:
  """The ratios the report and the targets read: within the out-of-the-box cases (no prefix), within each other
  configuration ('<config>: ' prefix), and against the PyTorch peers."""
  r = lambda a, b, stat="min_ms": ratio(timed, a, b, stat)
  ratios: dict[str, float | None] = {
    "disam/sam (median)": r("disam", "sam", "median_ms"),
    "disam/sam (cpu)": r("disam", "sam", "cpu_min_ms"),
    "disam/erm (median)": r("disam", "erm", "median_ms"),
    "disam/erm (cpu)": r("disam", "erm", "cpu_min_ms"),
    "disam_lam0/sam (cpu)": r("disam_lam0", "sam", "cpu_min_ms"),
    "sam/erm (cpu)": r("sam", "erm", "cpu_min_ms"),
    "torch_disam/torch_erm": r("torch_disam", "torch_erm"),
    "torch_disam/torch_erm (paired)": r("torch_disam", "torch_erm", "paired"),
    "torch_disam/torch_sam": r("torch_disam", "torch_sam"),
    "torch_per_sample/torch_disam": r("torch_disam_per_sample", "torch_disam"),
    "jax_disam/torch_per_sample": r("disam", "torch_disam_per_sample"),
  }
  for config in XLA_CONFIGS:
    pre, c = (f"{config}: ", lambda k: f"{k}/{config}") if config else ("", lambda k: k)
    ratios.update(
      {
        f"{pre}disam/sam": r(c("disam"), c("sam")),
        f"{pre}disam/sam (paired)": r(c("disam"), c("sam"), "paired"),
        f"{pre}disam/erm": r(c("disam"), c("erm")),
        f"{pre}disam/erm (paired)": r(c("disam"), c("erm"), "paired"),
        f"{pre}disam_lam0/sam": r(c("disam_lam0"), c("sam")),
        f"{pre}disam_lam0/sam (paired)": r(c("disam_lam0"), c("sam"), "paired"),
        f"{pre}disam_adaptive/sam": r(c("disam_adaptive"), c("sam")),
        f"{pre}sam/erm": r(c("sam"), c("erm")),
        f"{pre}jax_erm/torch_erm": r(c("erm"), "torch_erm"),
        f"{pre}jax_sam/torch_sam": r(c("sam"), "torch_sam"),
        f"{pre}jax_disam/torch_disam": r(c("disam"), "torch_disam"),
        f"{pre}jax_disam/torch_disam (paired)": r(c("disam"), "torch_disam", "paired"),
      }
    )
    for kind in AMORTIZED_CASES:
      ratios[f"{pre}{kind}/erm"] = r(c(kind), c("erm"))
      ratios[f"{pre}{kind}/erm (paired)"] = r(c(kind), c("erm"), "paired")
      ratios[f"{pre}{kind}/disam"] = r(c(kind), c("disam"))
    if config:
      ratios[f"{pre}erm / default erm"] = r(c("erm"), "erm")
  return {k: v for k, v in ratios.items() if v is not None}


def _memory(timed: dict[str, Any], params_bytes: int) -> dict[str, Any]:
  """Compiled peak memory of DISAM against ERM and SAM, in the first configuration that timed all three."""
  for config in XLA_CONFIGS:
    lab = {k: label(k, config) for k in ("erm", "sam", "disam", "disam_adaptive")}
    if all(lab[k] in timed and "memory" in timed[lab[k]] for k in ("erm", "sam", "disam")):
      memory = {"config": config or "default"}
      memory.update({k: timed[lab[k]]["memory"] for k in lab if lab[k] in timed})
      peak = {k: timed[lab[k]]["memory"]["peak"] for k in ("erm", "sam", "disam")}
      memory["disam_minus_erm_bytes"] = peak["disam"] - peak["erm"]
      memory["disam_minus_erm_temp_bytes"] = timed[lab["disam"]]["memory"]["temp"] - timed[lab["erm"]]["memory"]["temp"]
      memory["disam_minus_sam_bytes"] = peak["disam"] - peak["sam"]
      memory["disam_minus_erm_in_param_copies"] = round((peak["disam"] - peak["erm"]) / params_bytes, 3)
      return memory
  return {}


def _achieved_gflops(timed: dict[str, Any]) -> None:
  """GFLOP/s per case: XLA's FLOP count of the out-of-the-box JAX step of the same kind (the algorithm's work,
  whatever the implementation) over the case's min time. PyTorch cases use the JAX count of their kind."""
  work = {c.split("/")[0]: v["gflops"] for c, v in timed.items() if "/" not in c and "gflops" in v}
  for c, v in timed.items():
    if "/" in c and "gflops" in v:
      work.setdefault(c.split("/")[0], v["gflops"])
  for c, v in timed.items():
    kind = c[len("torch_") :] if c.startswith("torch_") else c.split("/")[0]
    if kind in work and perturb_every(kind) == 1:  # amortized steps: XLA counts both branches of their cond
      v["work_gflop"] = work[kind]
      v["gflop_per_s"] = round(work[kind] / (v["min_ms"] / 1e3), 1)


def bench_step_time(models: dict, args, torch_module, load_samples, log) -> dict[str, Any]:
  """Every JAX case in its configurations (+ PyTorch peers) per model, interleaved in one process."""
  out = {}
  for name, (shape, kwargs) in models.items():
    log(f"  step time: {name} {shape}, M={args.num_domains} x {args.per_domain_batch}")
    x, y = make_batch(args.num_domains, args.per_domain_batch, shape)
    specs = _specs(name, args)
    built = {
      fast: build_jax_model(name, shape, kwargs, fast_conv=fast)
      for fast in {XLA_CONFIGS[config][0] for _, config in specs}
    }
    cases: list = [
      JaxCase(label(kind, config), kind, *built[XLA_CONFIGS[config][0]], x, y, compiler_options=XLA_CONFIGS[config][1])
      for kind, config in specs
    ]
    if torch_module is not None:
      for lab in TORCH_CASES if args.all_cases else TORCH_CASES_BY_MODEL.get(name, TORCH_CASES):
        cases.append(TorchCase(lab, name, shape, kwargs, x, y))
    timed = time_round_robin(
      cases,
      repeats=args.repeats,
      min_sample_s=args.min_sample_s,
      budget_s=args.budget_s,
      load_samples=load_samples,
      log=log,
      quiet=args.quiet,
    )
    for case in cases:
      if isinstance(case, JaxCase):
        timed[case.label].update(case.analysis())
    _achieved_gflops(timed)
    params_bytes = cases[0].params_bytes
    out[name] = {
      "input_shape": list(shape),
      "model_kwargs": kwargs,
      "num_domains": args.num_domains,
      "per_domain_batch": args.per_domain_batch,
      "batch": args.num_domains * args.per_domain_batch,
      "params_bytes": params_bytes,
      "num_params": params_bytes // 4,
      "cases": timed,
      "ratios": step_ratios(timed),
      "memory": _memory(timed, params_bytes),
    }
    log("    " + ", ".join(f"{k} {v['min_ms']:.1f}" for k, v in timed.items()) + " ms (min)")
  return out
