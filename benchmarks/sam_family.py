"""What the SAM-family rules and DISAM's diagnostics cost: compiled FLOPs and step time relative to plain DISAM.

    python -m benchmarks.sam_family            # ~3 min on 2 cores: results/sam_family.md
    python -m benchmarks.sam_family --quick    # seconds: a tiny MLP, for the smoke test

One step of each case on the same 4-domain batch of the harness's models, SGD with momentum, rho 0.05, lam 0.1:
`disam` (rule 'sam'), `disam diagnostics=True` (adds `sam_cosine`: one more backward pass at w), `disam
rule='gsam'`, `disam rule='sagm'`, and `optax.contrib.sam` (opaque mode) as the outside reference. FLOPs from XLA's
`cost_analysis()` of the compiled step; times are min and median over rounds timed round-robin (case order rotated
each round), and the median of per-round ratios to `disam` (paired: the same round's noise hits both).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import disam_jax
from benchmarks.step_cost.timing import StepCase, machine_line, time_round_robin, write_results
from disam_jax.harness.models import apply_model, create_model, functional_model
from disam_jax.harness.tables import markdown_table

MODELS = {"mlp": ((28, 28, 1), 4, 32), "mnist_cnn": ((28, 28, 1), 4, 32)}  # input, M, per-domain batch
QUICK = {"mlp": ((8, 8, 1), 4, 8)}
CASES = {
  "disam": dict(),
  "disam diagnostics=True": dict(diagnostics=True),
  "disam rule='gsam'": dict(rule="gsam"),
  "disam rule='sagm'": dict(rule="sagm"),
}


def build_steps(graphdef, params, model_state, x, y):
  """{case: {'case': a StepCase of the compiled step from (params, opt_state), 'flops': XLA's FLOP count}}."""

  def domain_losses(p):
    logits, _ = apply_model(graphdef, p, model_state, x.reshape((-1,) + x.shape[2:]), train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y.reshape(-1))
    return disam_jax.domain_losses_from_grouped(losses.reshape(y.shape))

  base = optax.sgd(0.01, momentum=0.9)
  steps = {}
  for label, kwargs in CASES.items():
    tx = disam_jax.disam(base, 0.05, 0.1, num_domains=y.shape[0], **kwargs)

    def step(p, s, tx=tx):
      u, s = tx.update(None, s, p, domain_loss_fn=domain_losses)
      return optax.apply_updates(p, u), s

    steps[label] = (step, tx.init(params))
  loss = lambda p: jnp.mean(domain_losses(p).mean)
  sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True)

  def sam_step(p, s):
    u, s = sam.update(jax.grad(loss)(p), s, p, grad_fn=lambda w, _: jax.grad(loss)(w))
    return optax.apply_updates(p, u), s

  steps["optax.contrib.sam"] = (sam_step, sam.init(params))
  compiled = {}
  for label, (step, state) in steps.items():
    c = jax.jit(step).lower(params, state).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    compiled[label] = {"case": StepCase(label, lambda s, c=c: c(*s), (params, state)), "flops": float(cost["flops"])}
  return compiled


def measure_model(name, input_shape, m, b, rounds, inner):
  model = create_model(name, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0))
  graphdef, params, model_state = functional_model(model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(m, b) + input_shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(m, b)))
  cases = build_steps(graphdef, params, model_state, x, y)
  time_round_robin(
    [c["case"] for c in cases.values()],
    repeats=rounds,
    min_sample_s=0,
    budget_s=None,
    load_samples=[],
    log=print,
    steps_per_sample={label: inner for label in cases},
  )
  ref = cases["disam"]
  return [
    {
      "case": label,
      "gflops": c["flops"] / 1e9,
      "flops_ratio": c["flops"] / ref["flops"],
      "min_ms": 1e3 * min(c["case"].times),
      "median_ms": 1e3 * statistics.median(c["case"].times),
      "paired_ratio": statistics.median(t / u for t, u in zip(c["case"].times, ref["case"].times)),
    }
    for label, c in cases.items()
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a tiny MLP, two rounds (smoke test)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 15; quick 2)")
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  models = QUICK if args.quick else MODELS
  rounds = args.rounds or (2 if args.quick else 15)
  load0, start = os.getloadavg(), time.perf_counter()
  results = {
    name: measure_model(name, shape, m, b, rounds, 1 if args.quick or name != "mlp" else 20)
    for name, (shape, m, b) in models.items()
  }
  wall, load1 = time.perf_counter() - start, os.getloadavg()
  lines = [
    "# The SAM family and DISAM diagnostics: cost relative to plain DISAM",
    "",
    f"`python -m benchmarks.sam_family{' --quick' if args.quick else ''}`, {machine_line()}; "
    f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end "
    f"(a shared machine: times are noisy, FLOPs are not); {wall:.0f} s, {rounds} rounds timed round-robin. "
    "SGD momentum, rho 0.05, lam 0.1; FLOPs from XLA cost analysis of the compiled step.",
  ]
  for name, rows in results.items():
    shape, m, b = models[name]
    lines += ["", f"## {name} ({m} domains x {b} examples, input {shape})", ""]
    lines += markdown_table(
      ["case", "GFLOP", "FLOPs / disam", "min ms", "median ms", "time / disam (median of paired)"],
      (
        [
          r["case"],
          f"{r['gflops']:.4f}",
          f"{r['flops_ratio']:.3f}",
          f"{r['min_ms']:.2f}",
          f"{r['median_ms']:.2f}",
          f"{r['paired_ratio']:.2f}",
        ]
        for r in rows
      ),
    )
  path = write_results(args.out_dir, "sam_family_quick" if args.quick else "sam_family", "\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  main()
