"""Harness overhead: `disam-train`'s training loop (`run_experiment` -> `run_cell`) against a bare loop.

The bare loop calls the harness's own compiled step (the same jitted function, donated state) on one batch already
on the device, `steps` times, and blocks once at the end: the most a training loop could get from that step. The
sampled bare loop does the same with a fresh batch from the harness's sampler each step (`jax.device_put` of
`sampler.next()`): a user's plain loop, with no metrics read or logged. The
harness runs the same model, algorithm and batch size on the bundled rotated digits, with its batch sampling,
metrics, logging and progress callback; its per-step time is taken between the `on_step` callbacks of step 2 and
the last step before the final evaluation, so compilation, evaluation and checkpoints are excluded. The two are
interleaved over rounds; the ratio uses the min over rounds (paired: the median of per-round ratios).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from benchmarks.step_cost.timing import load_avg


def _harness_and_bare(algorithm: str, steps: int, model: str):
  """Three callables (harness, bare, bare with sampling), each running `steps` steps and returning the seconds per
  step."""
  import jax
  import jax.numpy as jnp

  from disam_jax.harness import data
  from disam_jax.harness.config import ExperimentConfig
  from disam_jax.harness.experiment import _cell_split, prepare, run_experiment
  from disam_jax.harness.loop import _compile
  from disam_jax.harness.steps import init_model, init_train_state

  config = ExperimentConfig(
    dataset="rotated_digits", model=model, algorithms=(algorithm,), seeds=(0,), steps=steps, eval_every=steps
  )
  prepared = prepare(config)
  config = dataclasses.replace(config, held_out=(prepared[1][0],))
  ds, held_out = prepared[0], (prepared[1][0],)
  split = _cell_split(config, ds, held_out[0], 0)
  graphdef, params, model_state = init_model(model, num_classes=ds.num_classes, input_shape=ds.input_shape, seed=0)
  compiled = _compile(config, graphdef, model_state, len(split.train))
  step_fn = compiled.train_steps[algorithm]
  sampler = data.DomainBatchSampler(split.train, config.hparams.batch_size, 0, domain_names=split.train_domains)
  batch = jax.device_put(sampler.next())
  state0 = init_train_state(params, model_state, compiled.txs[algorithm], (compiled.penalties or {}).get(algorithm))

  def harness(run_dir: str) -> float:
    stamps: dict[int, float] = {}
    run_experiment(
      config,
      run_dir,
      progress=False,
      prepared=(ds, held_out),
      on_step=lambda a, d, s, k, line: stamps.__setitem__(k, time.perf_counter()),
    )
    first, last = 2, steps - 1
    return (stamps[last] - stamps[first]) / (last - first)

  def bare_loop(next_batch) -> float:
    state = jax.tree.map(jnp.copy, state0)
    state, metrics = step_fn(state, batch)  # warm (compiled already by the harness's first run)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step_fn(state, next_batch())
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / steps

  bare = lambda: bare_loop(lambda: batch)
  # a user's plain loop: the same sampler's batch drawn and put on the device every step
  bare_sampled = lambda: bare_loop(lambda: jax.device_put(sampler.next()))
  return harness, bare, bare_sampled


def bench_harness_loop(args, load_samples, log, tmp_root: str) -> dict[str, Any]:
  """Per algorithm: harness and bare-loop ms per step over interleaved rounds, and their ratio."""
  import os
  import shutil

  steps, rounds = (20, 1) if args.quick else (args.harness_steps, args.harness_rounds)
  out: dict[str, Any] = {
    "model": "mlp",
    "dataset": "rotated_digits",
    "steps": steps,
    "rounds": rounds,
    "algorithms": {},
  }
  for algorithm in ("erm", "disam"):
    harness, bare, bare_sampled = _harness_and_bare(algorithm, steps, "mlp")
    times: dict[str, list[float]] = {"harness": [], "bare": [], "bare_sampled": []}
    for r in range(rounds + 1):  # round 0 compiles and warms up; not recorded
      run_dir = os.path.join(tmp_root, f"harness_{algorithm}_{r}")
      h = harness(run_dir)
      shutil.rmtree(run_dir, ignore_errors=True)
      b = bare()
      bs = bare_sampled()
      if r:
        times["harness"].append(1e3 * h)
        times["bare"].append(1e3 * b)
        times["bare_sampled"].append(1e3 * bs)
        load_samples.append(load_avg()[0])
    res = {
      k: {"min_ms": round(min(v), 4), "median_ms": round(statistics.median(v), 4), "times_ms": [round(t, 4) for t in v]}
      for k, v in times.items()
    }
    res["harness/bare"] = round(res["harness"]["min_ms"] / res["bare"]["min_ms"], 4)
    res["harness/bare (paired)"] = round(statistics.median(h / b for h, b in zip(times["harness"], times["bare"])), 4)
    res["harness steps/s / bare steps/s"] = round(1 / res["harness/bare"], 4)
    res["harness/bare_sampled"] = round(res["harness"]["min_ms"] / res["bare_sampled"]["min_ms"], 4)
    out["algorithms"][algorithm] = res
    log(
      f"  harness loop {algorithm}: harness {res['harness']['min_ms']:.3f} ms, bare {res['bare']['min_ms']:.3f} "
      f"ms per step (min over {rounds} rounds)"
    )
  return out
