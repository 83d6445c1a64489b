"""What gradient accumulation costs: `accumulate_domain_losses` at k = 1, 2, 4, 8 micro-batches, fixed total batch.

    python -m benchmarks.accumulation            # ~5 min on 2 cores: results/accumulation.md
    python -m benchmarks.accumulation --quick    # seconds: a tiny MLP, k = 1, 2, for the smoke test

For each model, one DISAM step (`disam(sgd(0.01, 0.9), rho=0.05, lam=0.1)`) on the same 4-domain batch:
`plain` (the grouped domain loss of the whole batch, no accumulation), then the batch split into k micro-batches
along the per-domain axis with `remat=True` (the default), and k=8 with `remat=False` for comparison. Reported:
XLA's compiled `memory_analysis()` temp size (the temporaries the step allocates, i.e. activations and gradients;
arguments: params, optimizer state and the batch, the same in every case, excluded) and the min/median step time
over rounds timed round-robin (case order rotated each round, so machine noise hits every case alike), each also
as a ratio to `plain` of the same run.
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

MODELS = {"mlp": ((28, 28, 1), 4, 256), "mnist_cnn": ((28, 28, 1), 4, 32)}  # input, M, per-domain batch
QUICK = {"mlp": ((8, 8, 1), 4, 16)}


def make_step(graphdef, model_state, num_domains, k, remat):
  """`(tx, jitted step(params, opt_state, x, y))`; k=None is the plain whole-batch domain loss on x [M, b, ...],
  else x is [k, M, b // k, ...] (micro-batches laid out by the input pipeline, so no copy inside the step)."""

  def per_example_loss(params, inputs, labels):
    logits, new_state = apply_model(graphdef, params, model_state, inputs, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels), new_state

  per_batch = disam_jax.grouped_domain_loss_fn(per_example_loss, has_aux=True)
  tx = disam_jax.disam(
    optax.sgd(0.01, momentum=0.9), 0.05, 0.1, has_aux=True, aux_example=model_state, num_domains=num_domains
  )

  def step(params, opt_state, x, y):
    if k is None:
      domain_loss_fn = lambda p: per_batch(p, x, y)
    else:
      domain_loss_fn = disam_jax.accumulate_domain_losses(per_batch, x, y, has_aux=True, remat=remat)
    updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=domain_loss_fn)
    return optax.apply_updates(params, updates), opt_state

  return tx, jax.jit(step, donate_argnums=(0, 1))


def measure_model(name, input_shape, m, b, ks, rounds):
  """Rows of (case, temp memory, step time, ratios to plain) for one model."""
  model = create_model(name, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0))
  graphdef, params, model_state = functional_model(model)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(m, b) + input_shape).astype(np.float32)
  y = rng.integers(0, 10, size=(m, b))
  split = lambda a, k: np.swapaxes(a.reshape((m, k, b // k) + a.shape[2:]), 0, 1)
  cases = [("plain", None, True)] + [(f"k={k}", k, True) for k in ks] + [(f"k={ks[-1]} no remat", ks[-1], False)]
  built, temp = {}, {}
  for label, k, remat in cases:
    tx, step = make_step(graphdef, model_state, m, k, remat)
    batch = (jnp.asarray(x), jnp.asarray(y)) if k is None else (jnp.asarray(split(x, k)), jnp.asarray(split(y, k)))
    fresh = jax.tree.map(jnp.array, params)
    state = (fresh, tx.init(fresh))
    compiled = step.lower(*state, *batch).compile()
    built[label] = StepCase(
      label, lambda s, c=compiled, b=batch: c(*s, *b), state, loss=lambda s: disam_jax.find_disam_state(s[1]).loss
    )
    temp[label] = compiled.memory_analysis().temp_size_in_bytes
    print(f"{name} {label}: compiled, temp {temp[label] / 2**20:.2f} MiB", flush=True)
  # One step per sample, the warm-up step first.
  time_round_robin(
    [built[label] for label, _, _ in cases], repeats=rounds, min_sample_s=0, budget_s=None, load_samples=[], log=print
  )
  base = built["plain"].times
  rows = []
  for label, _, _ in cases:
    times = built[label].times
    rows.append(
      {
        "case": label,
        "temp_mib": temp[label] / 2**20,
        "temp_ratio": temp[label] / temp["plain"],
        "min_ms": 1e3 * min(times),
        "min_ratio": min(times) / min(base),
        "median_ms": 1e3 * statistics.median(times),
        "median_ratio": statistics.median(times) / statistics.median(base),
      }
    )
  params_mib = sum(v.nbytes for v in jax.tree.leaves(params)) / 2**20
  return rows, params_mib, x.nbytes / 2**20


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a tiny MLP at k = 1, 2 with two rounds (smoke test)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 8; quick 2)")
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  models, ks = (QUICK, (1, 2)) if args.quick else (MODELS, (1, 2, 4, 8))
  rounds = args.rounds or (2 if args.quick else 8)
  load0 = os.getloadavg()
  start = time.perf_counter()
  results = {name: measure_model(name, shape, m, b, ks, rounds) for name, (shape, m, b) in models.items()}
  wall, load1 = time.perf_counter() - start, os.getloadavg()
  lines = [
    "# Gradient accumulation: `accumulate_domain_losses` at a fixed total batch",
    "",
    f"`python -m benchmarks.accumulation{' --quick' if args.quick else ''}`, {machine_line()}; "
    f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
    f"{wall:.0f} s. One DISAM step (SGD momentum, rho 0.05, lam 0.1), {rounds} rounds timed round-robin.",
    "",
    "temp = XLA `memory_analysis().temp_size_in_bytes` of the compiled step (arguments excluded: params, "
    "optimizer state and the batch, the same in every case); ratios are to `plain` (the whole batch, no "
    "accumulation) in the same run. `k=K` splits every domain's examples into K micro-batches (laid out "
    "`[K, M, b/K, ...]` on the host) summed with `lax.scan`, the micro-batch body under `jax.checkpoint`.",
  ]
  for name, (rows, params_mib, batch_mib) in results.items():
    shape, m, b = models[name]
    lines += [
      "",
      f"## {name} ({m} domains x {b} examples, input {shape}; params {params_mib:.2f} MiB, batch {batch_mib:.2f} MiB)",
      "",
    ]
    lines += markdown_table(
      ["case", "temp MiB", "temp / plain", "min ms", "min / plain", "median ms", "median / plain"],
      (
        [
          r["case"],
          f"{r['temp_mib']:.2f}",
          f"{r['temp_ratio']:.2f}",
          f"{r['min_ms']:.1f}",
          f"{r['min_ratio']:.2f}",
          f"{r['median_ms']:.1f}",
          f"{r['median_ratio']:.2f}",
        ]
        for r in rows
      ),
    )
  path = write_results(args.out_dir, "accumulation_quick" if args.quick else "accumulation", "\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
