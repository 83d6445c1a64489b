"""Where a step's time goes: jax.profiler over a few steps of step_cost's cases, summed per compiled HLO op.

    python -m benchmarks.profile_step --model mnist_cnn --cases erm disam [--config fast] [--top 15]

For each case: the step time, the time per kind of op (convolution, dot, everything else) and the top ops with
the instruction at the root of each fusion, read from the compiled HLO. The time of an op is summed over the
threads that ran it, so on 2 cores the kinds add up to more than the wall time. Used to explain the misses in
docs/performance.md (which convolutions are slow, what DISAM runs that SAM does not).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import step_cost


def _fusion_roots(hlo: str) -> dict[str, tuple[str, str]]:
  """fusion instruction name -> (kind, root instruction text) from an optimized HLO module's text."""
  calls = dict(re.findall(r"%?([\w.\-]+) = [^\n]*? fusion\([^\n]*?calls=%?([\w.\-]+)", hlo))
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
  out = {}
  for name, comp in calls.items():
    body = bodies.get(comp, "")
    kind = "convolution" if " convolution(" in body else "dot" if " dot(" in body else "other"
    root = next((line.strip() for line in body.split("\n") if "ROOT" in line), "")
    out[name] = (kind, root)
  return out


def profile_case(case: step_cost.JaxCase, steps: int = 2) -> dict[str, Any]:
  import jax

  case.run(1)
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    t0 = time.perf_counter()
    case.run(steps)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      per_op[e["name"]] += e["dur"] / steps / 1e3  # ms per step
  roots = _fusion_roots(case.compiled.as_text())
  by_kind = collections.Counter()
  for name, ms in per_op.items():
    if name in roots:
      by_kind[roots[name][0]] += ms
    elif re.match(r"^[a-z][\w\-]*(\.\d+)?$", name) and not name.startswith("end"):
      by_kind["convolution" if name.startswith("convolution") else "dot" if name.startswith("dot") else "other"] += ms
  top = [
    (name, round(ms, 2), *roots.get(name, ("", "")))
    for name, ms in per_op.most_common()
    if name in roots or re.match(r"^[a-z][\w\-]*\.\d+$", name)
  ]
  return {"step_ms": round(1e3 * wall, 2), "by_kind_ms": {k: round(v, 1) for k, v in by_kind.most_common()}, "top": top}


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="mnist_cnn", choices=sorted(step_cost.MODELS))
  ap.add_argument("--cases", nargs="+", default=["erm", "sam", "disam"], choices=step_cost.JAX_CASES)
  ap.add_argument("--num-domains", type=int, default=4)
  ap.add_argument("--per-domain-batch", type=int, default=32)
  ap.add_argument(
    "--config",
    default="",
    choices=sorted(step_cost.XLA_CONFIGS),
    help="step_cost's configuration: '' out of the box, 'ynn_off', 'fast' (the harness's)",
  )
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--top", type=int, default=12)
  args = ap.parse_args(argv)
  shape, kwargs = step_cost.MODELS[args.model]
  x, y = step_cost.make_batch(args.num_domains, args.per_domain_batch, shape)
  fast, options = step_cost.XLA_CONFIGS[args.config]
  graphdef, params, model_state = step_cost.build_jax_model(args.model, shape, kwargs, fast_conv=fast)
  print(
    f"{args.model} {shape}, batch {args.num_domains}x{args.per_domain_batch}, XLA_FLAGS="
    f'"{os.environ.get("XLA_FLAGS", "")}", load {step_cost.load_avg()}'
  )
  for kind in args.cases:
    case = step_cost.JaxCase(kind, kind, graphdef, params, model_state, x, y, compiler_options=options)
    res = profile_case(case, args.steps)
    print(f"\n{kind}: {res['step_ms']} ms/step; op time by kind (ms, summed over threads): {res['by_kind_ms']}")
    for name, ms, kind_, root in res["top"][: args.top]:
      print(f"  {ms:9.2f}  {name:<28} {kind_:<11} {root[:150]}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
