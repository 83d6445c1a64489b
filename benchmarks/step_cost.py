"""What a DISAM step costs: against optax's SAM, against ERM, over M, in memory, and against PyTorch.

    python -m benchmarks.step_cost            # full run (~10-15 min on 2 cores): results/step_cost.{json,md}
    python -m benchmarks.step_cost --quick    # seconds: one repeat of a tiny MLP, for CI

DISAM's step is two gradient evaluations, like SAM's (see disam_jax/_disam.py: the variance term folds into the
cotangent of ONE vector-Jacobian product), so its physical limit is about 2x an ERM step and 1x a SAM step. One
process builds every case on the same model, batch and data, compiles it, then times the cases *round-robin*
(case order rotated each round) so that machine noise hits them alike, and reports min and median per step:

  erm            base_tx alone: one value_and_grad of the mean loss, SGD(0.01, momentum 0.9)
  sam            optax.contrib.sam(base, chain(normalize(), sgd(rho)), opaque_mode=True)
  disam_lam0     disam(base, rho, lam=0)  (SAM through DISAM's code path)
  disam          disam(base, rho=0.05, lam=0.1)
  disam_adaptive disam(..., adaptive=True)
  torch_*        benchmarks/torch_disam.py on the same model and batch (torch.set_num_threads(2)):
                 erm, sam, disam (one loss per domain), disam_per_sample (one masked loss per sample, what the
                 authors' set() over a label tensor runs)

Plus: the domain sweep (M = 2..64 at a fixed total batch), compile times, XLA's compiled memory analysis and
FLOP counts, multi-device runs (pmap and sharded jit on 1-8 host CPU devices, in a subprocess that sets
XLA_FLAGS before importing jax), and the CPU options tried for the convnets (XLA flags, in subprocesses; a
convolution whose weight gradient runs as GEMMs, benchmarks/fast_conv.py). Every step is jitted with donated
params / optimizer state / model state and ends in `jax.block_until_ready`.

Threads: XLA:CPU is measured as is: its intra-op pool is sized to the machine's cores (2 here) and no XLA flag
is set in the main process; PyTorch gets torch.set_num_threads(2). Both run in this one process, one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_FLAG = '--xla_force_host_platform_device_count'

# ----------------------------------------------------------------------------- configuration

# name -> (input_shape, model kwargs); the same names and kwargs build the PyTorch peer.
MODELS = {
    'mlp': ((28, 28, 1), {}),
    'mnist_cnn': ((28, 28, 1), {}),
    'resnet18': ((32, 32, 3), {}),
    'vit_tiny': ((32, 32, 3), {}),
}
QUICK_MODELS = {'mlp': ((8, 8, 1), {'hidden': 32, 'depth': 1})}
NUM_CLASSES = 10
RHO, LAM, LR, MOMENTUM = 0.05, 0.1, 0.01, 0.9
JAX_CASES = ('erm', 'sam', 'disam_lam0', 'disam', 'disam_adaptive')
TORCH_CASES = ('torch_erm', 'torch_sam', 'torch_disam', 'torch_disam_per_sample')
# XLA configurations of the JAX cases, as per-jit compiler options (so both run interleaved in one process):
# '' is XLA:CPU out of the box; 'ynn_off' turns off the YNNPACK fusions that jaxlib 0.10.2 uses by default for
# convolutions and dots. On this CPU YNNPACK's convolution weight gradients are slow and erratic (2-4x), so the
# convnets run 1.5-3x faster without it (docs/performance.md). A case label is `kind` or `kind/config`.
XLA_CONFIGS = {'': None, 'ynn_off': {'xla_cpu_experimental_ynn_fusion_type': ''}}
_DEFAULT_SPECS = tuple((k, '') for k in JAX_CASES) + tuple((k, 'ynn_off') for k in ('erm', 'sam', 'disam'))
# To keep a full run near 15 minutes the larger models time fewer cases (--all-cases: every case in both
# configurations). The convnets get all five kinds where their steps are stable and fast (ynn_off); ResNet-18
# (~20 s per ERM step out of the box, ~6 s without YNNPACK) only ERM out of the box, as the reference.
JAX_SPECS_BY_MODEL = {
    'mnist_cnn': tuple((k, '') for k in ('erm', 'sam', 'disam')) + tuple((k, 'ynn_off') for k in JAX_CASES),
    'resnet18': (('erm', ''), ('erm', 'ynn_off'), ('sam', 'ynn_off'), ('disam', 'ynn_off')),
    'vit_tiny': tuple((k, '') for k in JAX_CASES) + (('erm', 'ynn_off'), ('disam', 'ynn_off')),
}
TORCH_CASES_BY_MODEL = {'resnet18': ('torch_erm', 'torch_disam'), 'vit_tiny': ('torch_erm', 'torch_sam', 'torch_disam')}
CONV_MODELS = ('mnist_cnn', 'resnet18')
# Multi-device: host CPU device counts per model (the CNN's compiles are slow: its largest count only).
MULTIDEVICE_COUNTS = {'mlp': (1, 2, 4, 8), 'mnist_cnn': (8,)}
_YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution,-dot,-eltwise,-reduce'
# XLA:CPU flags tried per model (ERM step, each in its own process): the convnet for convolutions, the ViT for
# dots. jaxlib 0.10.2 sends convolutions and dots to YNNPACK by default ("ynn_fusion" in the profile); _YNN_OFF is
# the process-wide form of the 'ynn_off' configuration.
FLAG_SWEEP = {
    'mnist_cnn': ('', '--xla_cpu_use_onednn=true',
                  '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY', _YNN_OFF),
    'vit_tiny': ('', _YNN_OFF),
}
TARGETS = {
    'disam_over_sam': 1.02,
    'disam_over_erm_convnets': 2.05,
    'domains_max_over_min': 1.05,
    'memory_extra_param_copies': 1.0,
}


# ----------------------------------------------------------------------------- machine and load


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _mem_total_gb() -> Optional[float]:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal'):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def machine_info() -> dict[str, Any]:
  return {
      'platform': platform.platform(),
      'cpu': _cpu_model(),
      'cores': os.cpu_count(),
      'cores_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
      'memory_gb': _mem_total_gb(),
      'python': platform.python_version(),
  }


def versions(torch_module=None) -> dict[str, Optional[str]]:
  import flax
  import jax
  import jaxlib
  import optax

  import disam_jax
  return {
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'numpy': np.__version__,
      'disam_jax': disam_jax.__version__,
      'torch': getattr(torch_module, '__version__', None),
  }


def load_avg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------- problems and steps


def make_batch(num_domains: int, per_domain: int, shape: Sequence[int], seed: int = 0):
  """`x [M, b, H, W, C]` N(0, 1) float32 and `y [M, b]` labels: domain-major, equal counts."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_domains, per_domain, *shape), dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, size=(num_domains, per_domain)).astype(np.int32)
  return x, y


def build_jax_model(name: str, shape, model_kwargs, *, gemm_weight_grad: bool = False, seed: int = 0):
  """`(graphdef, host params, host model_state)`; params kept on the host so every case gets its own copy."""
  import jax
  from flax import nnx

  from disam_jax.harness.models import create_model, functional_model
  model = create_model(name, num_classes=NUM_CLASSES, input_shape=tuple(shape), rngs=nnx.Rngs(seed),
                       **model_kwargs)
  if gemm_weight_grad:
    from benchmarks.fast_conv import use_gemm_weight_grad
    use_gemm_weight_grad(model)
  graphdef, params, model_state = functional_model(model)
  return graphdef, jax.device_get(params), jax.device_get(model_state)


def make_jax_step(kind: str, graphdef, model_state, num_domains: int):
  """`(tx, step)` with `step(params, opt_state, model_state, x [M, b, ...], y [M, b]) -> (params, opt_state,
  model_state, loss)`. All kinds use the same model, loss and base optimizer; BatchNorm statistics come from the
  unperturbed pass in every kind."""
  import jax
  import optax

  import disam_jax
  from disam_jax.harness.models import apply_model

  base = optax.sgd(LR, momentum=MOMENTUM)
  has_state = bool(jax.tree.leaves(model_state))
  flat = lambda a: a.reshape((-1,) + a.shape[2:])

  def per_example(p, ms, xf, yf):
    logits, new_ms = apply_model(graphdef, p, ms, xf, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yf), new_ms

  def mean_loss(p, ms, x, y):
    losses, new_ms = per_example(p, ms, flat(x), flat(y))
    return losses.mean(), new_ms

  if kind == 'erm':
    tx = base

    def step(params, opt_state, ms, x, y):
      (loss, new_ms), g = jax.value_and_grad(mean_loss, has_aux=True)(params, ms, x, y)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_ms, loss

    return tx, step

  if kind == 'sam':
    tx = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True)

    def step(params, opt_state, ms, x, y):
      (loss, new_ms), g = jax.value_and_grad(mean_loss, has_aux=True)(params, ms, x, y)
      grad_fn = lambda p, _: jax.grad(lambda q: mean_loss(q, ms, x, y)[0])(p)
      updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state, new_ms, loss

    return tx, step

  lam = {'disam_lam0': 0.0}.get(kind, LAM)
  adaptive = kind == 'disam_adaptive'
  if kind not in ('disam', 'disam_lam0', 'disam_adaptive'):
    raise ValueError(f'unknown case {kind!r}')
  tx = disam_jax.disam(base, RHO, lam, adaptive=adaptive, num_domains=num_domains, has_aux=has_state,
                       aux_example=model_state if has_state else None)

  def step(params, opt_state, ms, x, y):
    if has_state:  # (losses, new model state): the state travels as DISAM's aux, from the unperturbed pass
      per_example_loss = lambda p, xf, yf: per_example(p, ms, xf, yf)
    else:
      per_example_loss = lambda p, xf, yf: per_example(p, ms, xf, yf)[0]
    grouped = disam_jax.grouped_domain_loss_fn(per_example_loss, has_aux=has_state)
    updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=lambda p: grouped(p, x, y))
    new_ms = opt_state.aux if has_state else ms
    return optax.apply_updates(params, updates), opt_state, new_ms, opt_state.loss

  return tx, step


def _label(kind: str, config: str) -> str:
  return f'{kind}/{config}' if config else kind


def _nbytes(tree) -> int:
  import jax
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


class JaxCase:
  """One jitted, donated training step with its own params / optimizer state copies."""

  framework = 'jax'

  def __init__(self, label: str, kind: str, graphdef, params, model_state, x, y,
               compiler_options: Optional[dict] = None):
    import jax
    import jax.numpy as jnp
    self.label, self.kind = label, kind
    num_domains = x.shape[0]
    tx, step = make_jax_step(kind, graphdef, model_state, num_domains)
    fresh = lambda t: jax.tree.map(jnp.array, t)
    self.state = (fresh(params), tx.init(fresh(params)), fresh(model_state))
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    self.params_bytes = _nbytes(params)
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    t0 = time.perf_counter()
    lowered = jitted.lower(*self.state, self.x, self.y)
    t1 = time.perf_counter()
    self.compiled = lowered.compile(compiler_options=compiler_options)
    t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1
    self.loss = None
    self.times: list[float] = []

  def run(self, steps: int) -> None:
    import jax
    state = self.state
    for _ in range(steps):
      *state, self.loss = self.compiled(*state, self.x, self.y)
    jax.block_until_ready((state, self.loss))
    self.state = tuple(state)

  def final_loss(self) -> float:
    return float(self.loss)

  def analysis(self) -> dict[str, Any]:
    out: dict[str, Any] = {'lower_s': round(self.lower_s, 3), 'compile_s': round(self.compile_s, 3)}
    mem = self.compiled.memory_analysis()
    if mem is not None:
      m = {k: int(getattr(mem, f'{k}_size_in_bytes')) for k in ('temp', 'argument', 'output', 'alias')}
      m['peak'] = m['temp'] + m['argument'] + m['output']  # the brief's figure: temp + argument + output
      m['peak_minus_alias'] = m['peak'] - m['alias']  # outputs written into donated arguments
      out['memory'] = m
    hlo = self.compiled.as_text()
    out['hlo_ops'] = {op: hlo.count(f' {op}(') for op in ('convolution', 'dot', 'fusion', 'all-reduce')}
    cost = self.compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per computation
      cost = cost[0] if cost else None
    if cost:
      out['gflops'] = round(float(cost.get('flops', float('nan'))) / 1e9, 4)
    return out


class TorchCase:
  """A PyTorch training step from benchmarks/torch_disam.py on the same model, batch and data."""

  framework = 'torch'

  def __init__(self, label: str, model_name: str, shape, model_kwargs, x, y):
    import torch

    from benchmarks import torch_disam as td
    self.label = label
    algorithm = {'torch_erm': 'erm', 'torch_sam': 'sam'}.get(label, 'disam')
    per_domain = 'per_sample' if label == 'torch_disam_per_sample' else 'grouped'
    num_domains, per_domain_batch = x.shape[:2]
    n = num_domains * per_domain_batch
    torch.manual_seed(0)
    model = td.build_model(model_name, num_classes=NUM_CLASSES, input_shape=shape, **model_kwargs)
    self.step, _ = td.make_train_step(model, algorithm, num_domains=num_domains, rho=RHO, lam=LAM,
                                      per_domain=per_domain, base='sgd', lr=LR, momentum=MOMENTUM)
    self.x = torch.from_numpy(np.ascontiguousarray(x.reshape(n, *shape)))
    self.y = torch.from_numpy(y.reshape(n).astype(np.int64))
    self.domain_ids = torch.arange(num_domains).repeat_interleave(per_domain_batch)
    self.loss = None
    self.times: list[float] = []

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.loss = self.step(self.x, self.y, self.domain_ids)

  def final_loss(self) -> float:
    return float(self.loss)


def _machine_busy() -> Optional[tuple[int, int]]:
  """(busy, total) jiffies of the whole machine from /proc/stat, or None off Linux."""
  try:
    with open('/proc/stat') as f:
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
    log(f'    waited {waited:.0f} s for other processes to go below {threshold} busy cores')
  return waited


def time_round_robin(cases: list, *, repeats: Optional[int], min_sample_s: float, budget_s: Optional[float],
                     load_samples: list, log: Callable[[str], None], quiet: Optional[dict] = None,
                     max_rounds: int = 15) -> dict[str, Any]:
  """Warm-up, then rounds over all cases (order rotated each round); each sample runs `inner` steps.

  `inner` is chosen per case so that one sample lasts at least `min_sample_s` (fast steps would otherwise be
  dominated by timer and dispatch noise). `repeats` rounds if given; else as many as fit in `budget_s`, between 2
  and `max_rounds` (cheap models get many rounds, which is what makes min and median robust to a busy machine).
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
  inner = {c.label: max(1, math.ceil(min_sample_s / max(first[c.label], 1e-6))) for c in cases}
  round_s = sum(first[c.label] * inner[c.label] for c in cases)
  if repeats is not None:
    rounds = repeats
  elif budget_s is None:
    rounds = 2
  else:
    rounds = int(min(max_rounds, max(2, budget_s // max(round_s, 1e-9))))
  log(f'    {len(cases)} cases, ~{round_s:.1f} s per round, {rounds} rounds')
  cpu, others, faults = ({c.label: [] for c in cases} for _ in range(3))
  for r in range(rounds):
    if quiet is not None:
      quiet['waited_s'] += wait_for_quiet(quiet['threshold'], quiet['max_wait_s'] - quiet['waited_s'], log)
    order = cases[r % len(cases):] + cases[:r % len(cases)]
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
      raise FloatingPointError(f'non-finite loss {loss} in case {case.label}')
    ms = [1e3 * t for t in case.times]
    cpu_ms = [1e3 * t for t in cpu[case.label]]
    out[case.label] = {'framework': case.framework, 'min_ms': round(min(ms), 3),
                       'median_ms': round(statistics.median(ms), 3), 'times_ms': [round(t, 3) for t in ms],
                       'cpu_min_ms': round(min(cpu_ms), 3), 'cpu_median_ms': round(statistics.median(cpu_ms), 3),
                       'other_processes_cores': round(statistics.mean(others[case.label]), 2)
                       if others[case.label] else None,
                       'page_faults_per_step': int(statistics.median(faults[case.label])),
                       'steps_per_sample': inner[case.label]}
  return out


def _ratio(cases: dict, a: str, b: str, stat: str = 'min_ms') -> Optional[float]:
  """`a / b` of a statistic; `stat='paired'`: the median over rounds of the per-round ratio (the two samples of
  a round were taken seconds apart, so slow drifts of the machine's load cancel)."""
  if a not in cases or b not in cases:
    return None
  if stat == 'paired':
    return round(statistics.median(x / y for x, y in zip(cases[a]['times_ms'], cases[b]['times_ms'])), 4)
  return round(cases[a][stat] / cases[b][stat], 4)


# ----------------------------------------------------------------------------- sections


def bench_step_time(models: dict, args, torch_module, load_samples, log) -> dict[str, Any]:
  """Every JAX case (+ PyTorch peers, + the GEMM weight-gradient convolution on convnets) per model."""
  out = {}
  for name, (shape, kwargs) in models.items():
    log(f'  step time: {name} {shape}, M={args.num_domains} x {args.per_domain_batch}')
    x, y = make_batch(args.num_domains, args.per_domain_batch, shape)
    graphdef, params, model_state = build_jax_model(name, shape, kwargs)
    if args.all_cases:
      specs = tuple((k, c) for c in XLA_CONFIGS for k in JAX_CASES)
    elif args.quick:  # every kind once, and one compile with compiler options
      specs = tuple((k, '') for k in JAX_CASES) + (('disam', 'ynn_off'),)
    else:
      specs = JAX_SPECS_BY_MODEL.get(name, _DEFAULT_SPECS)
    cases: list = [JaxCase(_label(kind, config), kind, graphdef, params, model_state, x, y,
                           compiler_options=XLA_CONFIGS[config]) for kind, config in specs]
    if args.gemm_wgrad and name in CONV_MODELS:
      g2, p2, s2 = build_jax_model(name, shape, kwargs, gemm_weight_grad=True)
      cases += [JaxCase(f'{kind}/gemm_wgrad', kind, g2, p2, s2, x, y) for kind in ('erm', 'sam', 'disam')]
    if torch_module is not None:
      for label in TORCH_CASES if args.all_cases else TORCH_CASES_BY_MODEL.get(name, TORCH_CASES):
        cases.append(TorchCase(label, name, shape, kwargs, x, y))
    timed = time_round_robin(cases, repeats=args.repeats, min_sample_s=args.min_sample_s,
                             budget_s=args.budget_s, load_samples=load_samples, log=log, quiet=args.quiet)
    for case in cases:
      if isinstance(case, JaxCase):
        timed[case.label].update(case.analysis())
    params_bytes = cases[0].params_bytes
    r = lambda a, b, stat='min_ms': _ratio(timed, a, b, stat)
    ratios = {
        'disam/sam': r('disam', 'sam'), 'disam/sam (median)': r('disam', 'sam', 'median_ms'),
        'disam/sam (paired)': r('disam', 'sam', 'paired'), 'disam/sam (cpu)': r('disam', 'sam', 'cpu_min_ms'),
        'disam/erm': r('disam', 'erm'), 'disam/erm (median)': r('disam', 'erm', 'median_ms'),
        'disam/erm (paired)': r('disam', 'erm', 'paired'), 'disam/erm (cpu)': r('disam', 'erm', 'cpu_min_ms'),
        'disam_lam0/sam': r('disam_lam0', 'sam'), 'disam_lam0/sam (paired)': r('disam_lam0', 'sam', 'paired'),
        'disam_lam0/sam (cpu)': r('disam_lam0', 'sam', 'cpu_min_ms'),
        'ynn_off: disam_lam0/sam': r('disam_lam0/ynn_off', 'sam/ynn_off'),
        'ynn_off: disam_adaptive/sam': r('disam_adaptive/ynn_off', 'sam/ynn_off'),
        'disam_adaptive/sam': r('disam_adaptive', 'sam'),
        'sam/erm': r('sam', 'erm'), 'sam/erm (cpu)': r('sam', 'erm', 'cpu_min_ms'),
        'jax_disam/torch_disam': r('disam', 'torch_disam'), 'jax_erm/torch_erm': r('erm', 'torch_erm'),
        'jax_sam/torch_sam': r('sam', 'torch_sam'),
        'torch_disam/torch_erm': r('torch_disam', 'torch_erm'),
        'torch_disam/torch_erm (paired)': r('torch_disam', 'torch_erm', 'paired'),
        'jax_disam/torch_disam (paired)': r('disam', 'torch_disam', 'paired'),
        'torch_disam/torch_sam': r('torch_disam', 'torch_sam'),
        'torch_per_sample/torch_disam': r('torch_disam_per_sample', 'torch_disam'),
        'jax_disam/torch_per_sample': r('disam', 'torch_disam_per_sample'),
        'ynn_off: disam/sam': r('disam/ynn_off', 'sam/ynn_off'),
        'ynn_off: disam/sam (paired)': r('disam/ynn_off', 'sam/ynn_off', 'paired'),
        'ynn_off: disam/erm': r('disam/ynn_off', 'erm/ynn_off'),
        'ynn_off: disam/erm (paired)': r('disam/ynn_off', 'erm/ynn_off', 'paired'),
        'ynn_off: sam/erm': r('sam/ynn_off', 'erm/ynn_off'),
        'ynn_off: erm / default erm': r('erm/ynn_off', 'erm'),
        'ynn_off: jax_erm/torch_erm': r('erm/ynn_off', 'torch_erm'),
        'ynn_off: jax_disam/torch_disam': r('disam/ynn_off', 'torch_disam'),
        'ynn_off: jax_disam/torch_disam (paired)': r('disam/ynn_off', 'torch_disam', 'paired'),
        'gemm_wgrad: disam/sam': r('disam/gemm_wgrad', 'sam/gemm_wgrad'),
        'gemm_wgrad: disam/erm': r('disam/gemm_wgrad', 'erm/gemm_wgrad'),
        'gemm_wgrad: jax_erm/torch_erm': r('erm/gemm_wgrad', 'torch_erm'),
    }
    memory = {}
    for config in XLA_CONFIGS:  # the first configuration with ERM, SAM and DISAM timed
      lab = {k: _label(k, config) for k in ('erm', 'sam', 'disam', 'disam_adaptive')}
      if all(lab[k] in timed and 'memory' in timed[lab[k]] for k in ('erm', 'sam', 'disam')):
        memory = {'config': config or 'default'}
        memory.update({k: timed[lab[k]]['memory'] for k in lab if lab[k] in timed})
        peak = {k: timed[lab[k]]['memory']['peak'] for k in ('erm', 'sam', 'disam')}
        memory['disam_minus_erm_bytes'] = peak['disam'] - peak['erm']
        memory['disam_minus_erm_temp_bytes'] = (timed[lab['disam']]['memory']['temp']
                                                - timed[lab['erm']]['memory']['temp'])
        memory['disam_minus_sam_bytes'] = peak['disam'] - peak['sam']
        memory['disam_minus_erm_in_param_copies'] = round((peak['disam'] - peak['erm']) / params_bytes, 3)
        break
    out[name] = {
        'input_shape': list(shape), 'model_kwargs': kwargs, 'num_domains': args.num_domains,
        'per_domain_batch': args.per_domain_batch, 'batch': args.num_domains * args.per_domain_batch,
        'params_bytes': params_bytes, 'num_params': params_bytes // 4,
        'cases': timed, 'ratios': {k: v for k, v in ratios.items() if v is not None}, 'memory': memory,
    }
    log('    ' + ', '.join(f'{k} {v["min_ms"]:.1f}' for k, v in timed.items()) + ' ms (min)')
  return out


def bench_domains(models: dict, args, load_samples, log) -> dict[str, Any]:
  """disam at M = 2..64 domains with a fixed total batch (plus SAM, which does not depend on M)."""
  out = {}
  for name, (shape, kwargs) in models.items():
    total = args.sweep_batch
    ms = [m for m in args.sweep_domains if total % m == 0]
    log(f'  domains: {name}, total batch {total}, M in {ms}, XLA config {args.sweep_config or "default"}')
    graphdef, params, model_state = build_jax_model(name, shape, kwargs)
    cases = []
    options = XLA_CONFIGS[args.sweep_config]
    for m in ms:
      x, y = make_batch(m, total // m, shape)
      cases.append(JaxCase(f'disam_M{m}', 'disam', graphdef, params, model_state, x, y, compiler_options=options))
    x, y = make_batch(ms[0], total // ms[0], shape)
    cases.append(JaxCase('sam', 'sam', graphdef, params, model_state, x, y, compiler_options=options))
    timed = time_round_robin(cases, repeats=args.repeats, min_sample_s=args.min_sample_s,
                             budget_s=args.budget_s and args.budget_s / 2, load_samples=load_samples, log=log,
                             quiet=args.quiet)
    for case in cases:
      timed[case.label]['compile_s'] = round(case.compile_s, 3)
    lo, hi = f'disam_M{ms[0]}', f'disam_M{ms[-1]}'
    mins = [timed[f'disam_M{m}']['min_ms'] for m in ms]
    out[name] = {
        'total_batch': total, 'num_domains': ms, 'xla_config': args.sweep_config or 'default', 'cases': timed,
        'ratios': {f'M{ms[-1]}/M{ms[0]}': _ratio(timed, hi, lo),
                   f'M{ms[-1]}/M{ms[0]} (median)': _ratio(timed, hi, lo, 'median_ms'),
                   f'M{ms[-1]}/M{ms[0]} (paired)': _ratio(timed, hi, lo, 'paired'),
                   f'M{ms[-1]}/M{ms[0]} (cpu)': _ratio(timed, hi, lo, 'cpu_min_ms'),
                   'max/min over M': round(max(mins) / min(mins), 4),
                   f'M{ms[0]}/sam': _ratio(timed, lo, 'sam'), f'M{ms[-1]}/sam': _ratio(timed, hi, 'sam')},
    }
    log('    ' + ', '.join(f'{k} {v["min_ms"]:.1f}' for k, v in timed.items()) + ' ms (min)')
  return out


def _run_worker(mode: str, config: dict, xla_flags: str, timeout: float) -> dict[str, Any]:
  """Runs this module in a subprocess with XLA_FLAGS set before jax is imported; returns its JSON result."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags
  env['PYTHONPATH'] = _REPO + os.pathsep + env.get('PYTHONPATH', '')
  cmd = [sys.executable, '-m', 'benchmarks.step_cost', f'--{mode}-worker', json.dumps(config)]
  proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    return {'error': proc.stderr[-2000:], 'xla_flags': xla_flags}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def multidevice_worker(config: dict) -> dict[str, Any]:
  """(subprocess) DISAM under pmap and sharded jit on n host CPU devices vs one device on the whole batch."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import disam_jax
  from disam_jax.harness.models import apply_model

  m, b, steps = config['num_domains'], config['per_domain_batch'], config['check_steps']
  results: dict[str, Any] = {'devices_available': jax.device_count(), 'models': {}}
  for name, (shape, kwargs) in config['models'].items():
    graphdef, params, model_state = build_jax_model(name, shape, kwargs)
    if jax.tree.leaves(model_state):
      raise ValueError(f'{name} carries model state (BatchNorm): per-device statistics differ from one device')
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

    def make_step(tx, loss_fn=disam_jax.grouped_domain_loss_fn(per_example)):
      def step(p, s, xb, yb):
        u, s = tx.update(None, s, p, domain_loss_fn=lambda q: loss_fn(q, xb, yb))
        return optax.apply_updates(p, u), s
      return step

    split = lambda a, n: a.reshape(m, n, b // n, *a.shape[2:]).swapaxes(0, 1)  # [n, M, b/n, ...]

    tx1 = disam_jax.disam(base, RHO, LAM, num_domains=m)
    txp = disam_jax.disam(base, RHO, LAM, num_domains=m, batch_axis_name='batch')

    def single():
      f = jax.jit(make_step(tx1), donate_argnums=(0, 1))
      p = jax.tree.map(jnp.array, params)
      state = [p, tx1.init(p)]
      xb, yb = jnp.asarray(x), jnp.asarray(y)
      return f, state, (xb, yb)

    def pmapped(n):
      f = jax.pmap(make_step(txp), axis_name='batch', devices=jax.devices()[:n], donate_argnums=(0, 1))
      rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (n,) + np.shape(a)), t)
      p = rep(params)
      state = [p, rep(jax.device_get(tx1.init(jax.tree.map(jnp.asarray, params))))]
      return f, state, (split(x, n), split(y, n))

    def sharded(n):
      mesh = Mesh(np.array(jax.devices()[:n]), ('data',))
      rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
      f = jax.jit(make_step(tx1, device_major), donate_argnums=(0, 1))
      p = jax.device_put(jax.tree.map(jnp.array, params), rep)
      state = [p, jax.device_put(tx1.init(p), rep)]
      return f, state, (jax.device_put(split(x, n), data), jax.device_put(split(y, n), data))

    variants = {'single_device_jit': single}
    for n in config['device_counts'].get(name, ()):
      if n <= jax.device_count() and b % n == 0:
        variants[f'pmap_{n}'] = lambda n=n: pmapped(n)
        variants[f'sharded_jit_{n}'] = lambda n=n: sharded(n)
    runners, finals = {}, {}
    for label, make in variants.items():
      f, state, data = make()
      t0 = time.perf_counter()
      for _ in range(steps):
        state = list(f(*state, *data))
      jax.block_until_ready(state)
      p = state[0]
      if label.startswith('pmap'):
        spread = max(float(jnp.max(jnp.abs(a - a[:1]))) for a in jax.tree.leaves(p))
        p = jax.tree.map(lambda a: a[0], p)
      else:
        spread = 0.0
      finals[label] = (jax.device_get(p), spread, time.perf_counter() - t0)
      runners[label] = (f, state, data)
    ref = finals['single_device_jit'][0]
    cases: dict[str, Any] = {}

    class _Case:
      framework = 'jax'

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

    timed = time_round_robin([_Case(k) for k in runners], repeats=config['repeats'],
                             min_sample_s=config['min_sample_s'], budget_s=config['budget_s'],
                             load_samples=[], log=lambda s: None)
    for label, (p, spread, first_s) in finals.items():
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(r)))) for a, r in
                 zip(jax.tree.leaves(p), jax.tree.leaves(ref)))
      cases[label] = dict(timed[label], max_abs_diff_vs_single=diff, replica_spread=spread,
                          first_steps_s=round(first_s, 3),
                          overhead_vs_single=round(timed[label]['min_ms'] /
                                                   timed['single_device_jit']['min_ms'], 4))
    results['models'][name] = {'input_shape': list(shape), 'num_domains': m, 'per_domain_batch': b,
                               'check_steps': steps, 'cases': cases}
  return results


def bench_multidevice(models: dict, args, log) -> dict[str, Any]:
  per_model = {k: list(args.device_counts or MULTIDEVICE_COUNTS.get(k, (1, 2, 4, 8))) for k in models}
  counts = sorted({n for v in per_model.values() for n in v})
  config = {'models': {k: [list(v[0]), v[1]] for k, v in models.items()}, 'num_domains': args.num_domains,
            'per_domain_batch': args.per_domain_batch, 'device_counts': per_model, 'check_steps': 3,
            'repeats': args.repeats, 'min_sample_s': args.min_sample_s,
            'budget_s': args.budget_s and args.budget_s / 4}
  log(f'  multi-device: {list(models)} on {counts} host CPU devices (subprocess)')
  # Keep the caller's other XLA flags; replace any device count.
  inherited = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_FLAG)]
  flags = ' '.join(inherited + [f'{_DEVICE_FLAG}={max(counts)}'])
  out = _run_worker('multidevice', config, flags, timeout=1800)
  out['xla_flags'] = flags
  for name, res in out.get('models', {}).items():
    log(f'    {name}: ' + ', '.join(f'{k} {v["min_ms"]:.1f} ms (diff {v["max_abs_diff_vs_single"]:.1e})'
                                   for k, v in res['cases'].items()))
  return out


def flags_worker(config: dict) -> dict[str, Any]:
  """(subprocess) ERM and DISAM step time of one model under the XLA_FLAGS this process was started with."""
  name = config['model']
  shape, kwargs = config['shape'], config['kwargs']
  x, y = make_batch(config['num_domains'], config['per_domain_batch'], shape)
  graphdef, params, model_state = build_jax_model(name, shape, kwargs)
  cases = [JaxCase(kind, kind, graphdef, params, model_state, x, y) for kind in config['cases']]
  timed = time_round_robin(cases, repeats=config['repeats'], min_sample_s=config['min_sample_s'],
                           budget_s=None, load_samples=[], log=lambda s: None)
  for case in cases:
    timed[case.label]['compile_s'] = round(case.compile_s, 3)
  return {'model': name, 'xla_flags': os.environ.get('XLA_FLAGS', ''), 'cases': timed, 'load': load_avg()}


def bench_flags(args, log) -> dict[str, Any]:
  """XLA:CPU flags tried on the convnet and the ViT (each in its own process; sequential, not interleaved)."""
  out = {'note': 'ERM step; each flag set in its own subprocess, run one after another', 'runs': []}
  for name, flags in ((n, f) for n in args.flag_models for f in FLAG_SWEEP[n]):
    shape, kwargs = MODELS[name]
    config = {'model': name, 'shape': list(shape), 'kwargs': kwargs, 'num_domains': args.num_domains,
              'cases': ['erm'],
              'per_domain_batch': args.per_domain_batch, 'repeats': args.flag_repeats,
              'min_sample_s': args.min_sample_s}
    res = _run_worker('flags', config, flags, timeout=900)
    res['xla_flags'], res['model'] = flags, name
    out['runs'].append(res)
    if 'cases' in res:
      log(f'  flags {name} {flags or "(none)"}: erm {res["cases"]["erm"]["min_ms"]:.1f} ms')
    else:
      log(f'  flags {flags}: failed: {res.get("error", "")[-300:]}')
  return out


# ----------------------------------------------------------------------------- targets and report


def evaluate_targets(results: dict) -> list[dict[str, Any]]:
  """Each target with its measured value (ratio of min times; `paired`: median of per-round ratios) and whether
  the min-based value meets it."""
  targets = []

  def add(name, value, threshold, paired=None):
    if value is None:
      return
    targets.append({'target': name, 'value': value, 'paired': paired, 'threshold': threshold,
                    'met': bool(value <= threshold)})

  for model, res in results.get('step_time', {}).items():
    rt = res['ratios']
    for config, pre in (('default', ''), ('ynn_off', 'ynn_off: ')):
      add(f'{model} [{config}]: disam / optax SAM', rt.get(f'{pre}disam/sam'), TARGETS['disam_over_sam'],
          rt.get(f'{pre}disam/sam (paired)'))
      if model in CONV_MODELS:
        add(f'{model} [{config}]: disam / ERM', rt.get(f'{pre}disam/erm'), TARGETS['disam_over_erm_convnets'],
            rt.get(f'{pre}disam/erm (paired)'))
      if 'torch_disam/torch_erm' in rt:
        add(f'{model} [{config}]: JAX disam/ERM <= PyTorch disam/ERM (= threshold)', rt.get(f'{pre}disam/erm'),
            rt['torch_disam/torch_erm'])
      add(f'{model} [{config}]: JAX ERM / PyTorch ERM', rt.get(f'{pre}jax_erm/torch_erm'), 1.0)
      add(f'{model} [{config}]: JAX disam / PyTorch disam', rt.get(f'{pre}jax_disam/torch_disam'), 1.0,
          rt.get(f'{pre}jax_disam/torch_disam (paired)'))
    add(f'{model} [default]: disam(lam=0) / optax SAM', rt.get('disam_lam0/sam'), TARGETS['disam_over_sam'],
        rt.get('disam_lam0/sam (paired)'))
    add(f'{model} [ynn_off]: disam(lam=0) / optax SAM', rt.get('ynn_off: disam_lam0/sam'), TARGETS['disam_over_sam'])
    mem = res.get('memory', {})
    if 'disam_minus_erm_in_param_copies' in mem:
      add(f'{model} [{mem["config"]}]: disam - ERM peak memory, in parameter copies',
          mem['disam_minus_erm_in_param_copies'], TARGETS['memory_extra_param_copies'])
  for model, res in results.get('domains', {}).items():
    ms = res['num_domains']
    key = f'M{ms[-1]}/M{ms[0]}'
    add(f'{model}: disam M={ms[-1]} / M={ms[0]}', res['ratios'][key], TARGETS['domains_max_over_min'],
        res['ratios'].get(f'{key} (paired)'))
  return targets


def _fmt_ms(c: dict) -> str:
  return f'{c["median_ms"]:.2f} ({c["min_ms"]:.2f})' if c['min_ms'] < 100 else f'{c["median_ms"]:.0f} ({c["min_ms"]:.0f})'


def _mib(v: int) -> str:
  return f'{v / 2**20:.2f}'


def to_markdown(results: dict) -> str:
  lines = [f'# Step cost: {results["name"]}', '']
  m, v = results['machine'], results['versions']
  lines += [
      f'- Date: {results["date"]}; command: `{results["command"]}`; wall time {results["wall_time_s"]:.0f} s',
      f'- Machine: {m["cpu"]}, {m["cores_usable"]} cores, {m["memory_gb"]} GB, {m["platform"]}',
      f'- Versions: python {m["python"]}, jax {v["jax"]}, jaxlib {v["jaxlib"]}, flax {v["flax"]}, optax '
      f'{v["optax"]}, numpy {v["numpy"]}, torch {v["torch"]}, disam_jax {v["disam_jax"]}',
      f'- Threads: {results["threads"]}',
      f'- Load average (1 min) before {results["load"]["before"]}, after {results["load"]["after"]}, per round '
      f'min {min(results["load"]["rounds"] or [0]):.2f} / max {max(results["load"]["rounds"] or [0]):.2f}',
      f'- Settings: {results["settings"]}',
      '- Times: median (min) ms per step over the rounds; cases interleaved round-robin in one process; ratios '
      'use the min.',
      '',
  ]
  st = results.get('step_time', {})
  if st:
    lines += ['## Step time per case', '']
    labels = []
    for res in st.values():
      for k in res['cases']:
        if k not in labels:
          labels.append(k)
    lines += ['| case | ' + ' | '.join(f'{k} ({r["batch"]} = {r["num_domains"]}x{r["per_domain_batch"]})'
                                       for k, r in st.items()) + ' |',
              '|---' * (len(st) + 1) + '|']
    for lab in labels:
      lines.append(f'| {lab} | ' + ' | '.join(_fmt_ms(r['cases'][lab]) if lab in r['cases'] else '-'
                                              for r in st.values()) + ' |')
    lines.append('| rounds | ' + ' | '.join(str(len(next(iter(r['cases'].values()))['times_ms']))
                                           for r in st.values()) + ' |')
    lines += ['', 'Process CPU time per step, min ms (all threads of this process; time spent descheduled does not '
              'count) / minor page faults per step (fresh pages touched) / cores other processes kept busy '
              'meanwhile (mean over samples):', '',
              '| case | ' + ' | '.join(st) + ' |', '|---' * (len(st) + 1) + '|']
    cpu_cell = lambda c: (f'{c["cpu_min_ms"]:.1f} / {c["page_faults_per_step"] / 1e3:.1f}k / '
                          f'{c["other_processes_cores"] if c["other_processes_cores"] is not None else "-"}')
    for lab in labels:
      lines.append(f'| {lab} | ' + ' | '.join(cpu_cell(r['cases'][lab]) if lab in r['cases'] else '-'
                                              for r in st.values()) + ' |')
    lines += ['', '## Ratios (min times)', '']
    keys = []
    for res in st.values():
      for k in res['ratios']:
        if k not in keys:
          keys.append(k)
    lines += ['| ratio | ' + ' | '.join(st) + ' |', '|---' * (len(st) + 1) + '|']
    for k in keys:
      lines.append(f'| {k} | ' + ' | '.join(f'{r["ratios"][k]:.3f}' if k in r['ratios'] else '-'
                                            for r in st.values()) + ' |')
    lines += ['', '## Compile time, FLOPs and memory (XLA compiled analysis)', '',
              'peak = temp + argument + output (MiB); alias = outputs written into donated arguments.', '',
              '| model | case | lower s | compile s | GFLOP/step | conv+dot ops | temp | argument | output | alias | '
              'peak |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for name, res in st.items():
      for lab, c in res['cases'].items():
        if c['framework'] != 'jax':
          continue
        mem = c.get('memory', {})
        cells = [_mib(mem[k]) if k in mem else '-' for k in ('temp', 'argument', 'output', 'alias', 'peak')]
        ops = c.get('hlo_ops', {})
        lines.append(f'| {name} | {lab} | {c["lower_s"]:.2f} | {c["compile_s"]:.2f} | {c.get("gflops", "-")} | '
                     f'{ops.get("convolution", 0) + ops.get("dot", 0)} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| model | XLA config | params MiB | disam - ERM peak MiB | = parameter copies | '
              'disam - ERM temp MiB | disam - SAM peak MiB |', '|---|---|---|---|---|---|---|']
    for name, res in st.items():
      mem = res.get('memory', {})
      if mem:
        lines.append(f'| {name} | {mem["config"]} | {_mib(res["params_bytes"])} | '
                     f'{_mib(mem["disam_minus_erm_bytes"])} | '
                     f'{mem["disam_minus_erm_in_param_copies"]:.3f} | {_mib(mem["disam_minus_erm_temp_bytes"])} | '
                     f'{_mib(mem["disam_minus_sam_bytes"])} |')
  dom = results.get('domains', {})
  if dom:
    lines += ['', '## Number of domains at a fixed total batch (disam, median (min) ms)', '']
    for name, res in dom.items():
      ms = res['num_domains']
      lines += [f'{name}, total batch {res["total_batch"]}:', '',
                '| ' + ' | '.join(f'M={m}' for m in ms) + ' | SAM | ' + ' | '.join(res['ratios']) + ' |',
                '|---' * (len(ms) + 1 + len(res['ratios'])) + '|',
                '| ' + ' | '.join(_fmt_ms(res['cases'][f'disam_M{m}']) for m in ms) + f' | '
                f'{_fmt_ms(res["cases"]["sam"])} | ' + ' | '.join(f'{v:.3f}' for v in res['ratios'].values())
                + ' |', '']
  md = results.get('multi_device', {})
  if md.get('models'):
    lines += ['## Multi-device (host CPU devices sharing the same 2 cores: correctness and overhead only)', '',
              f'XLA_FLAGS={md.get("xla_flags")}; params after {next(iter(md["models"].values()))["check_steps"]} '
              'steps compared with one device on the whole batch.', '',
              '| model | variant | median (min) ms | / single device | max abs diff vs single | replica spread |',
              '|---|---|---|---|---|---|']
    for name, res in md['models'].items():
      for lab, c in res['cases'].items():
        lines.append(f'| {name} | {lab} | {_fmt_ms(c)} | {c["overhead_vs_single"]:.3f} | '
                     f'{c["max_abs_diff_vs_single"]:.2e} | {c["replica_spread"]:.1e} |')
    lines.append('')
  elif 'error' in md:
    lines += ['## Multi-device', '', f'failed: {md["error"][-500:]}', '']
  fl = results.get('xla_flag_sweep', {})
  if fl.get('runs'):
    lines += ['## XLA:CPU flags (ERM step; each in its own process, sequential; median (min) ms)', '',
              '| model | XLA_FLAGS | ERM step | compile s | other processes (cores) |', '|---|---|---|---|---|']
    for run in fl['runs']:
      if 'cases' in run:
        c = run['cases']['erm']
        lines.append(f'| {run["model"]} | `{run["xla_flags"] or "(none)"}` | {_fmt_ms(c)} | {c["compile_s"]:.1f} | '
                     f'{c["other_processes_cores"]} |')
      else:
        lines.append(f'| {run["model"]} | `{run["xla_flags"]}` | failed | - | - |')
    lines.append('')
  tg = results.get('targets', [])
  if tg:
    lines += ['## Targets', '', 'value: ratio of min times; paired: median over rounds of the per-round ratio.', '',
              '| target | value | paired | threshold | met |', '|---|---|---|---|---|']
    for t in tg:
      paired = f'{t["paired"]:.3f}' if t.get('paired') is not None else '-'
      lines.append(f'| {t["target"]} | {t["value"]:.3f} | {paired} | <= {t["threshold"]:.3f} | '
                   f'{"yes" if t["met"] else "**no**"} |')
    lines.append('')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='one repeat of a tiny MLP (seconds), for CI')
  ap.add_argument('--name', default=None, help='results file stem (default step_cost or step_cost_quick)')
  ap.add_argument('--out-dir', default=os.path.join(_REPO, 'benchmarks', 'results'))
  ap.add_argument('--models', nargs='+', default=None, choices=sorted(MODELS))
  ap.add_argument('--num-domains', type=int, default=None)
  ap.add_argument('--per-domain-batch', type=int, default=None)
  ap.add_argument('--repeats', type=int, default=None,
                  help='rounds over all cases (default: what fits in --budget-s, 2 to 15; quick 1)')
  ap.add_argument('--min-sample-s', type=float, default=None, help='each sample runs enough steps to last this')
  ap.add_argument('--budget-s', type=float, default=None,
                  help='seconds of timed rounds per model (domain sweep: half); at least 2 rounds (default 120)')
  ap.add_argument('--sweep-models', nargs='+', default=None, choices=sorted(MODELS))
  ap.add_argument('--sweep-domains', nargs='+', type=int, default=None)
  ap.add_argument('--sweep-batch', type=int, default=None)
  ap.add_argument('--device-counts', nargs='+', type=int, default=None)
  ap.add_argument('--all-cases', action='store_true', help='every case on every model (slower)')
  ap.add_argument('--quiet-threshold', type=float, default=None,
                  help='before each round, wait while other processes keep more than this many cores busy')
  ap.add_argument('--max-wait-s', type=float, default=300.0, help='total waiting budget for --quiet-threshold')
  ap.add_argument('--no-torch', action='store_true')
  ap.add_argument('--no-multidevice', action='store_true')
  ap.add_argument('--no-flags', action='store_true', help='skip the XLA flag sweep')
  ap.add_argument('--gemm-wgrad', action='store_true',
                  help='also time the convnets with benchmarks/fast_conv.py (weight gradients as GEMMs)')
  ap.add_argument('--sweep-config', default='ynn_off', choices=sorted(XLA_CONFIGS),
                  help="XLA configuration of the domain sweep ('' = out of the box)")
  ap.add_argument('--flag-models', nargs='+', default=list(FLAG_SWEEP), choices=sorted(FLAG_SWEEP))
  ap.add_argument('--flag-repeats', type=int, default=2)
  ap.add_argument('--multidevice-worker', default=None, help=argparse.SUPPRESS)
  ap.add_argument('--flags-worker', default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  quick = args.quick
  defaults = dict(
      num_domains=4, per_domain_batch=4 if quick else 32, repeats=1 if quick else None,
      min_sample_s=0.0 if quick else 0.25, budget_s=None if quick else 120.0,
      sweep_domains=[2, 4] if quick else [2, 4, 8, 16, 32, 64], sweep_batch=16 if quick else 128,
  )
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.quiet = None if args.quiet_threshold is None else {
      'threshold': args.quiet_threshold, 'max_wait_s': args.max_wait_s, 'waited_s': 0.0}
  if quick:
    args.device_counts = args.device_counts or [2]
    args.no_flags = True
  args.name = args.name or ('step_cost_quick' if quick else 'step_cost')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.multidevice_worker is not None:
    config = json.loads(args.multidevice_worker)
    config['models'] = {k: (tuple(v[0]), v[1]) for k, v in config['models'].items()}
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
  sweep_models = {k: catalog[k] for k in (args.sweep_models or ['mlp', 'mnist_cnn']) if k in catalog}
  md_models = {k: catalog[k] for k in ('mlp', 'mnist_cnn') if k in catalog}
  torch_module = None
  if not args.no_torch:
    try:
      import torch
      torch.set_num_threads(2)
      torch_module = torch
    except ImportError:
      log('torch not importable: PyTorch cases skipped')

  import jax
  results: dict[str, Any] = {
      'name': args.name,
      'command': 'python -m benchmarks.step_cost ' + ' '.join(argv if argv is not None else sys.argv[1:]),
      'quick': args.quick,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': machine_info(),
      'versions': versions(torch_module),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'jax_devices': [str(d) for d in jax.devices()],
      'threads': (f'XLA:CPU as is (intra-op pool = {os.cpu_count()} cores, XLA_FLAGS='
                  f'"{os.environ.get("XLA_FLAGS", "")}"); torch.set_num_threads('
                  f'{torch_module.get_num_threads() if torch_module else "-"})'),
      'settings': {'num_domains': args.num_domains, 'per_domain_batch': args.per_domain_batch, 'rho': RHO,
                   'lam': LAM, 'base': f'sgd(lr={LR}, momentum={MOMENTUM})', 'num_classes': NUM_CLASSES,
                   'repeats': args.repeats, 'min_sample_s': args.min_sample_s, 'budget_s': args.budget_s,
                   'data': 'N(0,1) images, uniform labels, seed 0'},
  }
  rounds: list[float] = []
  os.makedirs(args.out_dir, exist_ok=True)
  json_path = os.path.join(args.out_dir, f'{args.name}.json')
  md_path = os.path.join(args.out_dir, f'{args.name}.md')

  def save():  # after every section, so that a long run interrupted late keeps what it measured
    results['load'] = {'before': load_before, 'after': load_avg(), 'rounds': rounds,
                       'waited_for_quiet_s': args.quiet['waited_s'] if args.quiet else None}
    results['wall_time_s'] = round(time.perf_counter() - start, 1)
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=1)

  log(f'step_cost: {args.name}, load {load_before}, jax devices {jax.device_count()}')
  results['step_time'] = {}
  for name, model in models.items():
    results['step_time'].update(bench_step_time({name: model}, args, torch_module, rounds, log))
    save()
  results['domains'] = bench_domains(sweep_models, args, rounds, log)
  save()
  if not args.no_multidevice and md_models:
    results['multi_device'] = bench_multidevice(md_models, args, log)
    save()
  if not args.no_flags:
    results['xla_flag_sweep'] = bench_flags(args, log)
  results['targets'] = evaluate_targets(results)
  save()
  markdown = to_markdown(results)
  with open(md_path, 'w') as f:
    f.write(markdown)
  print(markdown)
  log(f'wrote {json_path} and {md_path} in {results["wall_time_s"]:.0f} s')
  return results


if __name__ == '__main__':
  main()
