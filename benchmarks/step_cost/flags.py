"""XLA:CPU flags tried on the convnet and the ViT, each in its own process (sequential, not interleaved)."""

from __future__ import annotations

import os
from typing import Any

from benchmarks.step_cost.cases import JaxCase, build_jax_model, make_batch
from benchmarks.step_cost.config import FLAG_SWEEP, MODELS
from benchmarks.step_cost.timing import load_avg, time_round_robin
from benchmarks.step_cost.worker import run_worker


def flags_worker(config: dict) -> dict[str, Any]:
  """(subprocess) ERM and DISAM step time of one model under the XLA_FLAGS this process was started with."""
  name = config["model"]
  shape, kwargs = config["shape"], config["kwargs"]
  x, y = make_batch(config["num_domains"], config["per_domain_batch"], shape)
  graphdef, params, model_state = build_jax_model(name, shape, kwargs)
  cases = [JaxCase(kind, kind, graphdef, params, model_state, x, y) for kind in config["cases"]]
  timed = time_round_robin(
    cases,
    repeats=config["repeats"],
    min_sample_s=config["min_sample_s"],
    budget_s=None,
    load_samples=[],
    log=lambda s: None,
  )
  for case in cases:
    timed[case.label]["compile_s"] = round(case.compile_s, 3)
  return {"model": name, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": timed, "load": load_avg()}


def bench_flags(args, log) -> dict[str, Any]:
  """XLA:CPU flags tried on the convnet and the ViT (each in its own process; sequential, not interleaved)."""
  out = {"note": "ERM step; each flag set in its own subprocess, run one after another", "runs": []}
  for name, flags in ((n, f) for n in args.flag_models for f in FLAG_SWEEP[n]):
    shape, kwargs = MODELS[name]
    config = {
      "model": name,
      "shape": list(shape),
      "kwargs": kwargs,
      "num_domains": args.num_domains,
      "cases": ["erm"],
      "per_domain_batch": args.per_domain_batch,
      "repeats": args.flag_repeats,
      "min_sample_s": args.min_sample_s,
    }
    res = run_worker("flags", config, flags, timeout=900)
    res["xla_flags"], res["model"] = flags, name
    out["runs"].append(res)
    if "cases" in res:
      log(f"  flags {name} {flags or '(none)'}: erm {res['cases']['erm']['min_ms']:.1f} ms")
    else:
      log(f"  flags {flags}: failed: {res.get('error', '')[-300:]}")
  return out
