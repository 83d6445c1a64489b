"""Domain scaling: DISAM at M = 2..64 domains with a fixed total batch, against SAM (which does not depend on M)."""

from __future__ import annotations

from typing import Any

from benchmarks.step_cost.cases import JaxCase, build_jax_model, make_batch
from benchmarks.step_cost.config import XLA_CONFIGS
from benchmarks.step_cost.timing import ratio, time_round_robin


def bench_domains(models: dict, args, load_samples, log) -> dict[str, Any]:
  """disam at M = 2..64 domains with a fixed total batch (plus SAM, which does not depend on M)."""
  out = {}
  for name, (shape, kwargs) in models.items():
    total = args.sweep_batch
    ms = [m for m in args.sweep_domains if total % m == 0]
    log(f"  domains: {name}, total batch {total}, M in {ms}, XLA config {args.sweep_config or 'default'}")
    fast, options = XLA_CONFIGS[args.sweep_config]
    graphdef, params, model_state = build_jax_model(name, shape, kwargs, fast_conv=fast)
    cases = []
    for m in ms:
      x, y = make_batch(m, total // m, shape)
      cases.append(JaxCase(f"disam_M{m}", "disam", graphdef, params, model_state, x, y, compiler_options=options))
    x, y = make_batch(ms[0], total // ms[0], shape)
    cases.append(JaxCase("sam", "sam", graphdef, params, model_state, x, y, compiler_options=options))
    timed = time_round_robin(
      cases,
      repeats=args.repeats,
      min_sample_s=args.min_sample_s,
      budget_s=args.budget_s and args.budget_s / 2,
      load_samples=load_samples,
      log=log,
      quiet=args.quiet,
    )
    for case in cases:
      timed[case.label]["compile_s"] = round(case.compile_s, 3)
    lo, hi = f"disam_M{ms[0]}", f"disam_M{ms[-1]}"
    mins = [timed[f"disam_M{m}"]["min_ms"] for m in ms]
    out[name] = {
      "total_batch": total,
      "num_domains": ms,
      "xla_config": args.sweep_config or "default",
      "cases": timed,
      "ratios": {
        f"M{ms[-1]}/M{ms[0]}": ratio(timed, hi, lo),
        f"M{ms[-1]}/M{ms[0]} (median)": ratio(timed, hi, lo, "median_ms"),
        f"M{ms[-1]}/M{ms[0]} (paired)": ratio(timed, hi, lo, "paired"),
        f"M{ms[-1]}/M{ms[0]} (cpu)": ratio(timed, hi, lo, "cpu_min_ms"),
        "max/min over M": round(max(mins) / min(mins), 4),
        f"M{ms[0]}/sam": ratio(timed, lo, "sam"),
        f"M{ms[-1]}/sam": ratio(timed, hi, "sam"),
      },
    }
    log("    " + ", ".join(f"{k} {v['min_ms']:.1f}" for k, v in timed.items()) + " ms (min)")
  return out
