"""Shared timing helpers: the machine and its load, one timed sample, round-robin rounds over cases, ratios.

Every section of the benchmark, and every benchmark script in benchmarks/, times its cases with
`time_round_robin`: the cases are interleaved (order rotated each round) so that the load of a shared machine hits
them alike, and each sample records wall time, this process's CPU time and how many cores other processes kept
busy. `StepCase` makes a case of a jitted step; `write_results` is the scripts' one results writer, `machine_line`
the when-and-where of their headers.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def machine_info() -> dict[str, Any]:
  return {
    "platform": platform.platform(),
    "cpu": _cpu_model(),
    "cores": os.cpu_count(),
    "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    "memory_gb": _mem_total_gb(),
    "python": platform.python_version(),
  }


def versions(torch_module=None) -> dict[str, str | None]:
  import flax
  import jax
  import jaxlib
  import optax

  import disam_jax

  return {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "disam_jax": disam_jax.__version__,
    "torch": getattr(torch_module, "__version__", None),
  }


def load_avg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def _machine_busy() -> tuple[int, int] | None:
  """(busy, total) jiffies of the whole machine from /proc/stat, or None off Linux."""
  try:
    with open("/proc/stat") as f:
      vals = [int(v) for v in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  return sum(vals) - vals[3] - vals[4], sum(vals)


def _minor_faults() -> int:
  """Minor page faults of this process so far (fresh pages touched: XLA's temporary buffers each step)."""
  try:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  except (ImportError, OSError):
    return 0


class _Sample:
  """Wall and process CPU time of one sample, and how many cores *other* processes kept busy meanwhile."""

  def __enter__(self):
    self.faults0 = _minor_faults()
    self.busy0, self.cpu0, self.t0 = _machine_busy(), time.process_time(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t0
    self.cpu = time.process_time() - self.cpu0
    self.faults = _minor_faults() - self.faults0
    busy1 = _machine_busy()
    self.others = None
    if self.busy0 is not None and busy1 is not None and busy1[1] > self.busy0[1]:
      cores = os.cpu_count() or 1
      machine = (busy1[0] - self.busy0[0]) / (busy1[1] - self.busy0[1]) * cores  # busy cores, all processes
      self.others = max(0.0, machine - self.cpu / max(self.wall, 1e-9))


def wait_for_quiet(threshold: float, max_wait_s: float, log) -> float:
  """Sleeps while other processes keep more than `threshold` cores busy (1 s probes), at most `max_wait_s`."""
  waited = 0.0
  while waited < max_wait_s:
    with _Sample() as probe:
      time.sleep(1.0)
    if probe.others is None or probe.others <= threshold:
      break
    waited += probe.wall
    time.sleep(min(4.0, max(0.0, max_wait_s - waited)))
    waited += 4.0
  if waited:
    log(f"    waited {waited:.0f} s for other processes to go below {threshold} busy cores")
  return waited


def time_round_robin(
  cases: list,
  *,
  repeats: int | None,
  min_sample_s: float,
  budget_s: float | None,
  load_samples: list,
  log: Callable[[str], None],
  quiet: dict | None = None,
  max_rounds: int = 15,
  steps_per_sample: dict[str, int] | None = None,
) -> dict[str, Any]:
  """Warm-up, then rounds over all cases (order rotated each round); each sample runs `inner` steps.

  `inner` is chosen per case so that one sample lasts at least `min_sample_s` (fast steps would otherwise be
  dominated by timer and dispatch noise), unless `steps_per_sample` gives it (`{label: steps}`). `repeats` rounds
  if given; else as many as fit in `budget_s`, between 2 and `max_rounds` (cheap models get many rounds, which is
  what makes min and median robust to a busy machine).
  Each sample records wall time, this process's CPU time (all threads; insensitive to time spent descheduled
  while other processes run) and the cores other processes kept busy. With `quiet`
  (`{'threshold': cores, 'max_wait_s': s, 'waited_s': running total}`), each round first waits for the other
  processes to calm down, within a total waiting budget.
  """
  first = {}
  for case in cases:
    t0 = time.perf_counter()
    case.run(1)
    first[case.label] = time.perf_counter() - t0
    if first[case.label] < 2.0 and min_sample_s > 0:  # a second, timed warm-up: the first pays for allocation
      t0 = time.perf_counter()
      case.run(1)
      first[case.label] = time.perf_counter() - t0
  fixed = steps_per_sample or {}
  inner = {c.label: fixed.get(c.label) or max(1, math.ceil(min_sample_s / max(first[c.label], 1e-6))) for c in cases}
  for c in cases:  # amortized cases: whole cycles of k steps (the first step of a cycle is the expensive one)
    k = getattr(c, "step_multiple", 1)
    inner[c.label] = k * math.ceil(inner[c.label] / k)
  round_s = sum(first[c.label] * inner[c.label] for c in cases)
  if repeats is not None:
    rounds = repeats
  elif budget_s is None:
    rounds = 2
  else:
    rounds = int(min(max_rounds, max(2, budget_s // max(round_s, 1e-9))))
  log(f"    {len(cases)} cases, ~{round_s:.1f} s per round, {rounds} rounds")
  cpu, others, faults = ({c.label: [] for c in cases} for _ in range(3))
  for r in range(rounds):
    if quiet is not None:
      quiet["waited_s"] += wait_for_quiet(quiet["threshold"], quiet["max_wait_s"] - quiet["waited_s"], log)
    order = cases[r % len(cases) :] + cases[: r % len(cases)]
    for case in order:
      with _Sample() as sample:
        case.run(inner[case.label])
      case.times.append(sample.wall / inner[case.label])
      cpu[case.label].append(sample.cpu / inner[case.label])
      faults[case.label].append(sample.faults / inner[case.label])
      if sample.others is not None:
        others[case.label].append(sample.others)
    load_samples.append(load_avg()[0])
  out = {}
  for case in cases:
    loss = case.final_loss()
    if not math.isfinite(loss):
      raise FloatingPointError(f"non-finite loss {loss} in case {case.label}")
    ms = [1e3 * t for t in case.times]
    cpu_ms = [1e3 * t for t in cpu[case.label]]
    out[case.label] = {
      "framework": case.framework,
      "min_ms": round(min(ms), 3),
      "median_ms": round(statistics.median(ms), 3),
      "times_ms": [round(t, 3) for t in ms],
      "cpu_min_ms": round(min(cpu_ms), 3),
      "cpu_median_ms": round(statistics.median(cpu_ms), 3),
      "other_processes_cores": round(statistics.mean(others[case.label]), 2) if others[case.label] else None,
      "page_faults_per_step": int(statistics.median(faults[case.label])),
      "steps_per_sample": inner[case.label],
    }
  return out


class StepCase:
  """A `time_round_robin` case of a jitted step, `state = step(state)`: `run(n)` takes n steps and waits for them.

  `loss(state)`, if given, is the float `final_loss` checks for finiteness (0.0 without it).
  """

  framework = "jax"

  def __init__(self, label: str, step: Callable[[Any], Any], state: Any, loss: Callable[[Any], Any] | None = None):
    self.label, self.step, self.state, self._loss = label, step, state, loss
    self.times: list[float] = []

  def run(self, steps: int) -> None:
    import jax

    for _ in range(steps):
      self.state = self.step(self.state)
    jax.block_until_ready(self.state)

  def final_loss(self) -> float:
    return float(self._loss(self.state)) if self._loss is not None else 0.0


def machine_line() -> str:
  """`'2026-12-03 13:00 UTC, x86_64, 2 cores, JAX 0.10.2'`: when and where a benchmark ran, for its header."""
  import datetime

  import jax

  return (
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__}"
  )


def ratio(cases: dict, a: str, b: str, stat: str = "min_ms") -> float | None:
  """`a / b` of a statistic; `stat='paired'`: the median over rounds of the per-round ratio (the two samples of
  a round were taken seconds apart, so slow drifts of the machine's load cancel)."""
  if a not in cases or b not in cases:
    return None
  if stat == "paired":
    return round(statistics.median(x / y for x, y in zip(cases[a]["times_ms"], cases[b]["times_ms"])), 4)
  return round(cases[a][stat] / cases[b][stat], 4)


def _nominal_mhz() -> float | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("cpu MHz"):
          return float(line.split(":", 1)[1])
  except (OSError, ValueError):
    pass
  return None


def cpu_peak(gemm_size: int = 2048, repeats: int = 5) -> dict[str, Any]:
  """This CPU's float32 peak two ways: nominal (cores x clock x 32 FLOP/cycle: two 256-bit FMA pipes per core,
  as on AMD Zen 2-4, where AVX-512 runs as two 256-bit halves; 8 lanes x 2 FLOP x 2 pipes) and measured (the best
  of `repeats` jitted `gemm_size`^3 float32 matmuls, 2 n^3 FLOP each). Under KVM the clock /proc/cpuinfo reports is
  the nominal one; boost clocks can make the measured GEMM exceed the nominal figure."""
  import jax
  import jax.numpy as jnp

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  mhz = _nominal_mhz()
  nominal = round(cores * mhz * 1e6 * 32 / 1e9, 1) if mhz else None
  a = jnp.asarray(np.random.default_rng(0).standard_normal((gemm_size, gemm_size), dtype=np.float32))
  matmul = jax.jit(jnp.dot)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  measured = round(2 * gemm_size**3 / best / 1e9, 1)
  note = (
    (
      f"nominal {nominal} GFLOP/s ({cores} cores x {mhz:.0f} MHz x 32 FLOP/cycle: two 256-bit FMA pipes per "
      f"core); measured {measured} GFLOP/s (best of {repeats} float32 {gemm_size}^3 matmuls in XLA, at the load "
      "of the moment)"
    )
    if mhz
    else f"measured {measured} GFLOP/s ({gemm_size}^3 float32 matmul)"
  )
  return {
    "cores": cores,
    "nominal_mhz": mhz,
    "nominal_gflops": nominal,
    "measured_gemm_gflops": measured,
    "gemm_size": gemm_size,
    "note": note,
  }


def write_results(out_dir: str, stem: str, markdown: str, data: dict | None = None) -> pathlib.Path:
  """Writes `<stem>.md` (and `<stem>.json` of `data`, if given) under `out_dir`, created if missing; returns the
  Markdown file's path. The one results writer of the benchmark scripts outside step_cost's own incremental one."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if data is not None:
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
  path = out / f"{stem}.md"
  path.write_text(markdown)
  return path
