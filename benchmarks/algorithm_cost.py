"""Step cost of every harness algorithm relative to ERM, on the MLP and DomainBed's MNIST CNN.

    python -m benchmarks.algorithm_cost [--rounds 5] [--quick] [--out benchmarks/results/algorithm_cost.md]

The harness's own jitted training step (`steps.make_train_step`) on random data shaped like its default job:
rotated digits (8x8x1), 5 training domains x 64 examples, 10 classes, Adam. Per model and algorithm: the XLA FLOP
count of the compiled step (`cost_analysis`, deterministic) and the wall time, timed in interleaved rounds (every
algorithm once per round, the order rotated each round, so load changes hit all of them alike:
`step_cost.timing.time_round_robin`). On a shared machine other jobs only ever add
time, so the time ratio is of the fastest timings (algorithm's min over rounds / ERM's min over rounds); the median
over rounds of the per-round ratio is shown next to it. Writes a Markdown table; the numbers in docs/harness.md
come from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import time

import jax
import numpy as np

from benchmarks.step_cost.timing import StepCase, time_round_robin, write_results
from disam_jax.harness import algorithms, steps
from disam_jax.harness.algorithms import HParams

M, B, SHAPE, CLASSES = 5, 64, (8, 8, 1), 10
MODELS = {"mlp": ("MLP (256 hidden, 2 layers)", 300), "mnist_cnn": ("DomainBed MNIST CNN", 2)}  # steps per timing


def _algorithms() -> list[str]:
  """Every rule and penalty, and DISAM (or DISAM on SAGM, if registered) on every penalty."""
  names = list(algorithms.RULES) + ["sam" + ADAPTIVE] + list(algorithms.PENALTIES)
  names += [n for n in algorithms.ALGORITHMS if n.startswith("disam+")]
  names += [n for n in ("disam_sagm+coral",) if n in algorithms.ALGORITHMS]
  return names


ADAPTIVE = " --adaptive"  # a name ending in it: the algorithm with HParams(adaptive=True) (ASAM for sam)


def _step(model: str, algorithm: str, hparams: HParams):
  """`(StepCase of the compiled step, after one warm-up step; its XLA FLOP count)`."""
  label = algorithm
  if algorithm.endswith(ADAPTIVE):
    algorithm, hparams = algorithm[: -len(ADAPTIVE)], dataclasses.replace(hparams, adaptive=True)
  graphdef, params, model_state = steps.init_model(model, num_classes=CLASSES, input_shape=SHAPE, seed=0)
  tx = algorithms.make_optimizer(algorithm, hparams, num_domains=M, aux_example=model_state)
  penalty = algorithms.make_penalty(algorithm, hparams)
  state = steps.init_train_state(params, model_state, tx, penalty)
  rng = np.random.default_rng(0)
  batch = (rng.random((M, B) + SHAPE, dtype=np.float32), rng.integers(0, CLASSES, (M, B)).astype(np.int32))
  step = jax.jit(steps.make_train_step(graphdef, tx, penalty))
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  case = StepCase(label, lambda s: compiled(s[0], batch), compiled(state, batch), loss=lambda s: s[1]["loss"])
  return case, float(cost.get("flops", float("nan")))


def measure(model: str, names: list[str], rounds: int, hparams: HParams) -> dict[str, dict[str, float]]:
  runs = {name: _step(model, name, hparams) for name in names}
  time_round_robin([case for case, _ in runs.values()], repeats=rounds, min_sample_s=0, budget_s=None,
                   load_samples=[], log=print, steps_per_sample={name: MODELS[model][1] for name in names})
  times = {name: np.asarray(runs[name][0].times) for name in names}
  flops = {name: runs[name][1] for name in names}
  return {name: {"flops": flops[name], "flops_ratio": flops[name] / flops["erm"],
                 "ms": 1000 * float(np.min(times[name])),
                 "ratio": float(np.min(times[name]) / np.min(times["erm"])),
                 "median_ratio": float(np.median(times[name] / times["erm"]))} for name in names}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.algorithm_cost", description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--quick", action="store_true",
                      help="1 round, MLP only, five algorithms (erm, sam, disam, vrex, disam_sagm+coral): a smoke test")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "algorithm_cost.md"),
                      help="the Markdown file to write (FILE.md)")
  args = parser.parse_args(argv)
  models = ["mlp"] if args.quick else args.models
  rounds = 1 if args.quick else args.rounds
  hparams = HParams().for_run(300)  # the harness's default run; anneal steps do not change the cost
  names = _algorithms()
  if args.quick:
    names = [n for n in names if n in ("erm", "sam", "disam", "vrex", "disam_sagm+coral")]
  load_before = os.getloadavg()
  started = time.perf_counter()
  results = {model: measure(model, names, rounds, hparams) for model in models}
  load_after = os.getloadavg()
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [
    "# Step cost of every harness algorithm relative to ERM",
    "",
    f"`python -m benchmarks.algorithm_cost --rounds {rounds}` on {stamp}: {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPU cores, JAX {jax.__version__}, load average {load_before[0]:.1f} before and "
    f"{load_after[0]:.1f} after the run ({time.perf_counter() - started:.0f} s). The harness's jitted step on "
    f"random data shaped like its default job: {M} training domains x {B} examples of 8x8x1, 10 classes, Adam. "
    "FLOPs: XLA's count for the compiled step. Time / ERM: fastest timing over ERM's fastest (other jobs only add "
    "time); median: the median over the interleaved rounds of the per-round ratio; ms: the fastest timing.",
    "",
  ]
  header = "| algorithm | " + " | ".join(f"{MODELS[m][0]}: FLOPs / ERM | time / ERM | median | ms"
                                       for m in models) + " |"
  lines += [header, "|---|" + "---:|---:|---:|---:|" * len(models)]
  for name in names:
    cells = [f"{r['flops_ratio']:.2f} | {r['ratio']:.2f} | {r['median_ratio']:.2f} | {r['ms']:.1f}"
             for r in (results[m][name] for m in models)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  out = pathlib.Path(args.out)
  write_results(out.parent, out.name[:-len(".md")] if out.name.endswith(".md") else out.name, text)
  print(text)
  return results


if __name__ == "__main__":
  main()
