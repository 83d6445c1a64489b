"""Multi-device: DISAM under pmap and sharded jit on 1-8 host CPU devices against one device on the whole batch.

Host CPU devices share the same 2 cores: this measures correctness (parameters after a few steps) and overhead,
not speed-up. Runs in a subprocess that sets the device count in XLA_FLAGS before importing jax.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from benchmarks.step_cost.cases import build_jax_model, make_batch
from benchmarks.step_cost.config import _DEVICE_FLAG, LAM, LR, MOMENTUM, MULTIDEVICE_COUNTS, RHO
from benchmarks.step_cost.timing import time_round_robin
from benchmarks.step_cost.worker import run_worker


def multidevice_worker(config: dict) -> dict[str, Any]:
  """(subprocess) DISAM under pmap and sharded jit on n host CPU devices vs one device on the whole batch."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import disam_jax
  from disam_jax.harness.models import apply_model

  m, b, steps = config["num_domains"], config["per_domain_batch"], config["check_steps"]
  results: dict[str, Any] = {"devices_available": jax.device_count(), "models": {}}
  for name, (shape, kwargs) in config["models"].items():
    graphdef, params, model_state = build_jax_model(name, shape, kwargs)
    if jax.tree.leaves(model_state):
      raise ValueError(f"{name} carries model state (BatchNorm): per-device statistics differ from one device")
    x, y = make_batch(m, b, shape)
    base = optax.sgd(LR, momentum=MOMENTUM)

    def per_example(q, xf, yf):
      logits, _ = apply_model(graphdef, q, model_state, xf, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yf)

    def device_major(q, xb, yb):
      # xb [n, M, b/n, ...] sharded on its first axis: flattening keeps each device's examples contiguous, so
      # GSPMD keeps the batch sharded. (Sharding the b axis of an [M, b, ...] batch does not survive the model's
      # [M*b, ...] flatten: GSPMD then all-gathers it and every device computes the whole batch.)
      n_, m_, k_ = xb.shape[:3]
      losses = per_example(q, xb.reshape((-1,) + xb.shape[3:]), yb.reshape(-1)).reshape(n_, m_, k_)
      return disam_jax.DomainLosses(losses.sum(axis=(0, 2)), jnp.full((m_,), n_ * k_, jnp.float32))

    def make_step(tx, loss_fn=disam_jax.grouped_domain_loss_fn(per_example)):  # noqa: B008 (built once, on purpose)
      def step(p, s, xb, yb):
        u, s = tx.update(None, s, p, domain_loss_fn=lambda q: loss_fn(q, xb, yb))
        return optax.apply_updates(p, u), s

      return step

    split = lambda a, n: a.reshape(m, n, b // n, *a.shape[2:]).swapaxes(0, 1)  # [n, M, b/n, ...]

    tx1 = disam_jax.disam(base, RHO, LAM, num_domains=m)
    txp = disam_jax.disam(base, RHO, LAM, num_domains=m, batch_axis_name="batch")

    def single():
      f = jax.jit(make_step(tx1), donate_argnums=(0, 1))
      p = jax.tree.map(jnp.array, params)
      state = [p, tx1.init(p)]
      xb, yb = jnp.asarray(x), jnp.asarray(y)
      return f, state, (xb, yb)

    def pmapped(n):
      f = jax.pmap(make_step(txp), axis_name="batch", devices=jax.devices()[:n], donate_argnums=(0, 1))
      rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (n,) + np.shape(a)), t)
      p = rep(params)
      state = [p, rep(jax.device_get(tx1.init(jax.tree.map(jnp.asarray, params))))]
      return f, state, (split(x, n), split(y, n))

    def sharded(n):
      mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
      rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
      f = jax.jit(make_step(tx1, device_major), donate_argnums=(0, 1))
      p = jax.device_put(jax.tree.map(jnp.array, params), rep)
      state = [p, jax.device_put(tx1.init(p), rep)]
      return f, state, (jax.device_put(split(x, n), data), jax.device_put(split(y, n), data))

    variants = {"single_device_jit": single}
    for n in config["device_counts"].get(name, ()):
      if n <= jax.device_count() and b % n == 0:
        variants[f"pmap_{n}"] = lambda n=n: pmapped(n)
        variants[f"sharded_jit_{n}"] = lambda n=n: sharded(n)
    runners, finals = {}, {}
    for label, make in variants.items():
      f, state, data = make()
      t0 = time.perf_counter()
      for _ in range(steps):
        state = list(f(*state, *data))
      jax.block_until_ready(state)
      p = state[0]
      if label.startswith("pmap"):
        spread = max(float(jnp.max(jnp.abs(a - a[:1]))) for a in jax.tree.leaves(p))
        p = jax.tree.map(lambda a: a[0], p)
      else:
        spread = 0.0
      finals[label] = (jax.device_get(p), spread, time.perf_counter() - t0)
      runners[label] = (f, state, data)
    ref = finals["single_device_jit"][0]
    cases: dict[str, Any] = {}

    class _Case:
      framework = "jax"

      def __init__(self, label):
        self.label, self.times = label, []

      def run(self, k):
        f, state, data = runners[self.label]
        for _ in range(k):
          state = list(f(*state, *data))
        jax.block_until_ready(state)
        runners[self.label] = (f, state, data)

      def final_loss(self):
        return 0.0

    timed = time_round_robin(
      [_Case(k) for k in runners],
      repeats=config["repeats"],
      min_sample_s=config["min_sample_s"],
      budget_s=config["budget_s"],
      load_samples=[],
      log=lambda s: None,
    )
    for label, (p, spread, first_s) in finals.items():
      diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(r)))) for a, r in zip(jax.tree.leaves(p), jax.tree.leaves(ref))
      )
      cases[label] = dict(
        timed[label],
        max_abs_diff_vs_single=diff,
        replica_spread=spread,
        first_steps_s=round(first_s, 3),
        overhead_vs_single=round(timed[label]["min_ms"] / timed["single_device_jit"]["min_ms"], 4),
      )
    results["models"][name] = {
      "input_shape": list(shape),
      "num_domains": m,
      "per_domain_batch": b,
      "check_steps": steps,
      "cases": cases,
    }
  return results


def bench_multidevice(models: dict, args, log) -> dict[str, Any]:
  per_model = {k: list(args.device_counts or MULTIDEVICE_COUNTS.get(k, (1, 2, 4, 8))) for k in models}
  counts = sorted({n for v in per_model.values() for n in v})
  config = {
    "models": {k: [list(v[0]), v[1]] for k, v in models.items()},
    "num_domains": args.num_domains,
    "per_domain_batch": args.per_domain_batch,
    "device_counts": per_model,
    "check_steps": 3,
    "repeats": args.repeats,
    "min_sample_s": args.min_sample_s,
    "budget_s": args.budget_s and args.budget_s / 4,
  }
  log(f"  multi-device: {list(models)} on {counts} host CPU devices (subprocess)")
  # Keep the caller's other XLA flags; replace any device count.
  inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
  flags = " ".join(inherited + [f"{_DEVICE_FLAG}={max(counts)}"])
  out = run_worker("multidevice", config, flags, timeout=1800)
  out["xla_flags"] = flags
  for name, res in out.get("models", {}).items():
    log(
      f"    {name}: "
      + ", ".join(f"{k} {v['min_ms']:.1f} ms (diff {v['max_abs_diff_vs_single']:.1e})" for k, v in res["cases"].items())
    )
  return out
