"""`python -m benchmarks.step_cost`: arguments, the sections in order, results JSON and Markdown."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import benchmarks.step_cost as _package
from benchmarks.step_cost.config import (
  _REPO,
  FLAG_SWEEP,
  LAM,
  LR,
  MODELS,
  MOMENTUM,
  NUM_CLASSES,
  QUICK_MODELS,
  RHO,
  XLA_CONFIGS,
)
from benchmarks.step_cost.domains import bench_domains
from benchmarks.step_cost.flags import bench_flags, flags_worker
from benchmarks.step_cost.harness_loop import bench_harness_loop
from benchmarks.step_cost.multidevice import bench_multidevice, multidevice_worker
from benchmarks.step_cost.report import evaluate_targets, to_markdown
from benchmarks.step_cost.step_time import bench_step_time
from benchmarks.step_cost.timing import cpu_peak, load_avg, machine_info, versions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=_package.__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="one repeat of a tiny MLP (seconds), for CI")
  ap.add_argument("--name", default=None, help="results file stem (default step_cost or step_cost_quick)")
  ap.add_argument("--out-dir", default=os.path.join(_REPO, "benchmarks", "results"))
  ap.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
  ap.add_argument("--num-domains", type=int, default=None)
  ap.add_argument("--per-domain-batch", type=int, default=None)
  ap.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="rounds over all cases (default: what fits in --budget-s, 2 to 15; quick 1)",
  )
  ap.add_argument("--min-sample-s", type=float, default=None, help="each sample runs enough steps to last this")
  ap.add_argument(
    "--budget-s",
    type=float,
    default=None,
    help="seconds of timed rounds per model (domain sweep: half); at least 2 rounds (default 120)",
  )
  ap.add_argument("--sweep-models", nargs="+", default=None, choices=sorted(MODELS))
  ap.add_argument("--sweep-domains", nargs="+", type=int, default=None)
  ap.add_argument("--sweep-batch", type=int, default=None)
  ap.add_argument("--device-counts", nargs="+", type=int, default=None)
  ap.add_argument("--all-cases", action="store_true", help="every case on every model (slower)")
  ap.add_argument(
    "--configs",
    nargs="+",
    default=None,
    choices=["default"] + [c for c in XLA_CONFIGS if c],
    help="time the JAX cases in these configurations only (default: the case matrix of config.py)",
  )
  ap.add_argument("--no-domains", action="store_true", help="skip the domain sweep")
  ap.add_argument(
    "--quiet-threshold",
    type=float,
    default=None,
    help="before each round, wait while other processes keep more than this many cores busy",
  )
  ap.add_argument("--max-wait-s", type=float, default=300.0, help="total waiting budget for --quiet-threshold")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-multidevice", action="store_true")
  ap.add_argument("--no-flags", action="store_true", help="skip the XLA flag sweep")
  ap.add_argument("--no-harness-loop", action="store_true", help="skip the harness-overhead section")
  ap.add_argument("--harness-steps", type=int, default=300, help="steps per harness / bare-loop sample")
  ap.add_argument("--harness-rounds", type=int, default=5)
  ap.add_argument(
    "--sweep-config",
    default="fast",
    choices=sorted(XLA_CONFIGS),
    help="XLA configuration of the domain sweep ('' = out of the box)",
  )
  ap.add_argument("--flag-models", nargs="+", default=list(FLAG_SWEEP), choices=sorted(FLAG_SWEEP))
  ap.add_argument("--flag-repeats", type=int, default=2)
  ap.add_argument("--multidevice-worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--flags-worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  quick = args.quick
  defaults = dict(
    num_domains=4,
    per_domain_batch=4 if quick else 32,
    repeats=1 if quick else None,
    min_sample_s=0.0 if quick else 0.25,
    budget_s=None if quick else 120.0,
    sweep_domains=[2, 4] if quick else [2, 4, 8, 16, 32, 64],
    sweep_batch=16 if quick else 128,
  )
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.quiet = (
    None
    if args.quiet_threshold is None
    else {"threshold": args.quiet_threshold, "max_wait_s": args.max_wait_s, "waited_s": 0.0}
  )
  if quick:
    args.device_counts = args.device_counts or [2]
    args.no_flags = True
  args.name = args.name or ("step_cost_quick" if quick else "step_cost")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.multidevice_worker is not None:
    config = json.loads(args.multidevice_worker)
    config["models"] = {k: (tuple(v[0]), v[1]) for k, v in config["models"].items()}
    print(json.dumps(multidevice_worker(config)))
    return {}
  if args.flags_worker is not None:
    print(json.dumps(flags_worker(json.loads(args.flags_worker))))
    return {}

  log = lambda s: print(s, file=sys.stderr, flush=True)
  start = time.perf_counter()
  load_before = load_avg()
  catalog = QUICK_MODELS if args.quick else MODELS
  models = {k: catalog[k] for k in (args.models or list(catalog)) if k in catalog} or dict(QUICK_MODELS)
  sweep_models = {k: catalog[k] for k in (args.sweep_models or ["mlp", "mnist_cnn"]) if k in catalog}
  md_models = {k: catalog[k] for k in ("mlp", "mnist_cnn") if k in catalog}
  torch_module = None
  if not args.no_torch:
    try:
      import torch

      torch.set_num_threads(2)
      torch_module = torch
    except ImportError:
      log("torch not importable: PyTorch cases skipped")

  import jax

  results: dict[str, Any] = {
    "name": args.name,
    "command": "python -m benchmarks.step_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
    "quick": args.quick,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": machine_info(),
    "versions": versions(torch_module),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax_devices": [str(d) for d in jax.devices()],
    "threads": (
      f"XLA:CPU as is (intra-op pool = {os.cpu_count()} cores, XLA_FLAGS="
      f'"{os.environ.get("XLA_FLAGS", "")}"); torch.set_num_threads('
      f"{torch_module.get_num_threads() if torch_module else '-'})"
    ),
    "settings": {
      "num_domains": args.num_domains,
      "per_domain_batch": args.per_domain_batch,
      "rho": RHO,
      "lam": LAM,
      "base": f"sgd(lr={LR}, momentum={MOMENTUM})",
      "num_classes": NUM_CLASSES,
      "repeats": args.repeats,
      "min_sample_s": args.min_sample_s,
      "budget_s": args.budget_s,
      "data": "N(0,1) images, uniform labels, seed 0",
    },
  }
  rounds: list[float] = []
  os.makedirs(args.out_dir, exist_ok=True)
  json_path = os.path.join(args.out_dir, f"{args.name}.json")
  md_path = os.path.join(args.out_dir, f"{args.name}.md")

  def save():  # after every section, so that a long run interrupted late keeps what it measured
    results["load"] = {
      "before": load_before,
      "after": load_avg(),
      "rounds": rounds,
      "waited_for_quiet_s": args.quiet["waited_s"] if args.quiet else None,
    }
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)

  log(f"step_cost: {args.name}, load {load_before}, jax devices {jax.device_count()}")
  results["peak"] = cpu_peak(gemm_size=256 if args.quick else 2048)
  results["step_time"] = {}
  for name, model in models.items():
    results["step_time"].update(bench_step_time({name: model}, args, torch_module, rounds, log))
    save()
  if not args.no_domains:
    results["domains"] = bench_domains(sweep_models, args, rounds, log)
    save()
  if not args.no_harness_loop:
    with tempfile.TemporaryDirectory() as tmp:
      results["harness_loop"] = bench_harness_loop(args, rounds, log, tmp)
    save()
  if not args.no_multidevice and md_models:
    results["multi_device"] = bench_multidevice(md_models, args, log)
    save()
  if not args.no_flags:
    results["xla_flag_sweep"] = bench_flags(args, log)
  results["targets"] = evaluate_targets(results)
  save()
  markdown = to_markdown(results)
  with open(md_path, "w") as f:
    f.write(markdown)
  print(markdown)
  log(f"wrote {json_path} and {md_path} in {results['wall_time_s']:.0f} s")
  return results


if __name__ == "__main__":
  main()
