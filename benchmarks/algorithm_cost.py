"""Step cost of every harness algorithm relative to ERM, on the MLP and DomainBed's MNIST CNN.

    python -m benchmarks.algorithm_cost [--rounds 5] [--quick] [--out benchmarks/results/algorithm_cost.md]
    python -m benchmarks.algorithm_cost --penalty-memory [--domains 16 64 128]

The harness's own jitted training step (`steps.make_train_step`) on random data shaped like its default job:
rotated digits (8x8x1), 5 training domains x 64 examples, 10 classes, Adam. Per model and algorithm: the XLA FLOP
count of the compiled step (`cost_analysis`, deterministic) and the wall time, timed in interleaved rounds (every
algorithm once per round, the order rotated each round, so load changes hit all of them alike:
`step_cost.timing.time_round_robin`). On a shared machine other jobs only ever add
time, so the time ratio is of the fastest timings (algorithm's min over rounds / ERM's min over rounds); the median
over rounds of the per-round ratio is shown next to it. Writes a Markdown table; the numbers in docs/harness.md
come from it.

`--penalty-memory` compiles (and never runs) the value and gradient of CORAL and Fishr at M domains, each in the
harness's form (`penalties.coral_penalty`: O(M F^2); `penalties.fishr_domain_gradient_variance` of the linear head:
closed form) and in the form it replaced (every pair of covariance matrices; `[M b, P]` per-example head gradients
from `vmap(grad)`), and records XLA's temporary bytes (`compiled.memory_analysis().temp_size_in_bytes`) in a section
of the same file (the timing table above it is kept).

`--precision-speed` times the erm and disam steps with `--precision bf16` against float32, interleaved in the same
rounds, into another section of the same file.
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
import jax.numpy as jnp
import numpy as np

from benchmarks.step_cost.timing import StepCase, time_round_robin, write_results
from disam_jax.harness import algorithms, penalties, steps
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.tables import markdown_table

M, B, SHAPE, CLASSES = 5, 64, (8, 8, 1), 10
MODELS = {"mlp": ("MLP (256 hidden, 2 layers)", 300), "mnist_cnn": ("DomainBed MNIST CNN", 2)}  # steps per timing


def _algorithms() -> list[str]:
  """Every rule and penalty, and DISAM (or DISAM on SAGM, if registered) on every penalty."""
  names = list(algorithms.RULES) + ["sam" + ADAPTIVE] + list(algorithms.PENALTIES)
  names += [n for n in algorithms.ALGORITHMS if n.startswith("disam+")]
  names += [n for n in ("disam_sagm+coral",) if n in algorithms.ALGORITHMS]
  return names


ADAPTIVE = " --adaptive"  # a name ending in it: the algorithm with HParams(adaptive=True) (ASAM for sam)


def _step(model: str, algorithm: str, hparams: HParams, precision: str = "float32", label: str = ""):
  """`(StepCase of the compiled step, after one warm-up step; its XLA FLOP count)`."""
  label = label or algorithm
  if algorithm.endswith(ADAPTIVE):
    algorithm, hparams = algorithm[: -len(ADAPTIVE)], dataclasses.replace(hparams, adaptive=True)
  graphdef, params, model_state = steps.init_model(
    model, num_classes=CLASSES, input_shape=SHAPE, seed=0, model_kwargs={"precision": precision}
  )
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
  time_round_robin(
    [case for case, _ in runs.values()],
    repeats=rounds,
    min_sample_s=0,
    budget_s=None,
    load_samples=[],
    log=print,
    steps_per_sample={name: MODELS[model][1] for name in names},
  )
  times = {name: np.asarray(runs[name][0].times) for name in names}
  flops = {name: runs[name][1] for name in names}
  return {
    name: {
      "flops": flops[name],
      "flops_ratio": flops[name] / flops["erm"],
      "ms": 1000 * float(np.min(times[name])),
      "ratio": float(np.min(times[name]) / np.min(times["erm"])),
      "median_ratio": float(np.median(times[name] / times["erm"])),
    }
    for name in names
  }


# ------------------------------------------------------------------------------------------- penalties' temp memory

# (label, F, b, C): CORAL at the MLP's 256 features and ResNet-50's 2048; Fishr at iWildCam's ResNet-50 head
# (2048 features, 182 classes); b = 32 examples per domain (DomainBed's batch).
CORAL_SIZES = [("CORAL, F=256", 256, 32, None), ("CORAL, F=2048 (ResNet-50)", 2048, 32, None)]
FISHR_SIZES = [("Fishr, F=2048, C=182 (iWildCam)", 2048, 32, 182)]
PENALTY_MARKER = "## Temporary memory of the penalties"


def _coral_pairwise(features):
  """The replaced CORAL: every pair's mean and covariance differences (`[M (M - 1) / 2, F, F]`)."""
  z = features.astype(jnp.float32)
  m, b, _ = z.shape
  mean = z.mean(axis=1)
  centered = z - mean[:, None, :]
  cov = jnp.einsum("mbf,mbg->mfg", centered, centered) / (b - 1)
  i, j = np.triu_indices(m, k=1)
  return jnp.mean(jnp.mean((mean[i] - mean[j]) ** 2, axis=-1) + jnp.mean((cov[i] - cov[j]) ** 2, axis=(-2, -1)))


def _fishr_per_example(head_params, features, labels):
  """The replaced Fishr variances: a head that is not `penalties.linear_head` takes the `[M b, P]` vmap(grad) path."""
  generic = lambda hp, z: z @ hp["kernel"] + hp["bias"]
  return penalties.fishr_domain_gradient_variance(generic, head_params, features, labels)


def _temp_bytes(fn, *args) -> int:
  """XLA's temporary bytes of `value_and_grad(fn)` (gradient with respect to every argument but labels)."""
  argnums = tuple(i for i, a in enumerate(args) if not jnp.issubdtype(jax.tree.leaves(a)[0].dtype, jnp.integer))
  total = lambda *a: jnp.sum(fn(*a))
  compiled = jax.jit(jax.value_and_grad(total, argnums=argnums)).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def penalty_memory(domains: list[int]) -> list[dict]:
  """Rows `{penalty, M, before, after}` of temp bytes, compiled on abstract inputs (nothing is allocated)."""
  rows = []
  for label, f, b, _ in CORAL_SIZES:
    for m in domains:
      z = jax.ShapeDtypeStruct((m, b, f), jnp.float32)
      rows.append(
        {
          "penalty": label,
          "M": m,
          "before": _temp_bytes(_coral_pairwise, z),
          "after": _temp_bytes(penalties.coral_penalty, z),
        }
      )
      print(rows[-1], flush=True)
  for label, f, b, c in FISHR_SIZES:
    for m in domains:
      hp = {"bias": jax.ShapeDtypeStruct((c,), jnp.float32), "kernel": jax.ShapeDtypeStruct((f, c), jnp.float32)}
      z, y = jax.ShapeDtypeStruct((m, b, f), jnp.float32), jax.ShapeDtypeStruct((m, b), jnp.int32)
      closed = lambda hp_, z_, y_: penalties.fishr_domain_gradient_variance(penalties.linear_head, hp_, z_, y_)
      rows.append(
        {
          "penalty": label,
          "M": m,
          "before": _temp_bytes(_fishr_per_example, hp, z, y),
          "after": _temp_bytes(closed, hp, z, y),
        }
      )
      print(rows[-1], flush=True)
  return rows


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _penalty_section(rows: list[dict], domains: list[int]) -> str:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [
    PENALTY_MARKER,
    "",
    f"`python -m benchmarks.algorithm_cost --penalty-memory --domains {' '.join(map(str, domains))}` on {stamp}, "
    f"JAX {jax.__version__}, {jax.default_backend()} backend: XLA's temporary bytes "
    "(`memory_analysis().temp_size_in_bytes`) of the compiled value and gradient of each penalty, b = 32 examples "
    "per domain, float32. Before: CORAL over every pair of covariance matrices, Fishr from `[M b, P]` per-example "
    "head gradients (`vmap(grad)`); after: the harness's `coral_penalty` (`M sum_i ||C_i - mean C||^2`, O(M F^2)) "
    "and Fishr's closed form for the linear head (O(M F C)). Compiled only, never run.",
    "",
    *markdown_table(
      ["penalty", "M", "temp before", "temp after", "before / after"],
      (
        [r["penalty"], r["M"], _gib(r["before"]), _gib(r["after"]), f"{r['before'] / max(r['after'], 1):.1f}"]
        for r in rows
      ),
      align="---:",
    ),
  ]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ bf16 against float32 speed

PRECISION_MARKER = "## --precision bf16 against float32"


def precision_speed(
  models: list[str], names: list[str], rounds: int, hparams: HParams, steps_per_sample: int | None = None
) -> dict:
  """`{model: {algorithm: {float32_ms, bf16_ms, ratio, median_ratio}}}`: the harness's step in both precisions,
  timed in the same interleaved rounds (ratio: bf16's fastest over float32's fastest)."""
  out = {}
  for model in models:
    runs = {
      (name, p): _step(model, name, hparams, precision=p, label=f"{name} {p}")[0]
      for name in names
      for p in ("float32", "bf16")
    }
    time_round_robin(
      list(runs.values()),
      repeats=rounds,
      min_sample_s=0,
      budget_s=None,
      load_samples=[],
      log=print,
      steps_per_sample={case.label: steps_per_sample or MODELS[model][1] for case in runs.values()},
    )
    out[model] = {}
    for name in names:
      t32, t16 = (np.asarray(runs[(name, p)].times) for p in ("float32", "bf16"))
      out[model][name] = {
        "float32_ms": 1000 * float(t32.min()),
        "bf16_ms": 1000 * float(t16.min()),
        "ratio": float(t16.min() / t32.min()),
        "median_ratio": float(np.median(t16 / t32)),
      }
  return out


def _precision_section(results: dict, rounds: int, load: tuple[float, float]) -> str:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [
    PRECISION_MARKER,
    "",
    f"`python -m benchmarks.algorithm_cost --precision-speed --rounds {rounds}` on {stamp}: "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__}, "
    f"{jax.default_backend()} backend, load average {load[0]:.1f} before and {load[1]:.1f} after. The harness's jitted "
    f"step ({M} domains x {B} examples of 8x8x1, Adam) with `--precision bf16` (bfloat16 compute, float32 "
    "parameters) and float32, interleaved in the same rounds; ms: the fastest timing; bf16 / float32: fastest over "
    "fastest, and the median over rounds of the per-round ratio.",
    "",
    *markdown_table(
      ["model", "algorithm", "float32 ms", "bf16 ms", "bf16 / float32", "median"],
      (
        [
          MODELS[model][0],
          name,
          f"{r['float32_ms']:.1f}",
          f"{r['bf16_ms']:.1f}",
          f"{r['ratio']:.2f}",
          f"{r['median_ratio']:.2f}",
        ]
        for model, rows in results.items()
        for name, r in rows.items()
      ),
      align=["---", "---", "---:", "---:", "---:", "---:"],
    ),
  ]
  return "\n".join(lines) + "\n"


def _kept_sections(out: pathlib.Path) -> str:
  """The sections of `out` written by --penalty-memory / --precision-speed (kept when the main table is rewritten)."""
  text = out.read_text() if out.exists() else ""
  starts = [text.index(m) for m in (PENALTY_MARKER, PRECISION_MARKER) if m in text]
  return "\n" + text[min(starts) :] if starts else ""


def _write_section(out: pathlib.Path, marker: str, section: str) -> None:
  """Replaces (or appends) the section starting at `marker` (up to the next '## ' heading) in `out`."""
  text = out.read_text() if out.exists() else ""
  if marker in text:
    start = text.index(marker)
    end = text.find("\n## ", start + len(marker))
    text = text[:start] + (text[end + 1 :] if end >= 0 else "")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text((text.rstrip("\n") + "\n\n" if text.strip() else "") + section)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.algorithm_cost", description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument(
    "--quick",
    action="store_true",
    help="1 round, MLP only, five algorithms (erm, sam, disam, vrex, disam_sagm+coral): a smoke test",
  )
  parser.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(__file__), "results", "algorithm_cost.md"),
    help="the Markdown file to write (FILE.md)",
  )
  parser.add_argument(
    "--penalty-memory",
    action="store_true",
    help="instead of timing: temporary memory of CORAL and Fishr (before/after) at --domains",
  )
  parser.add_argument(
    "--domains",
    type=int,
    nargs="+",
    default=[16, 64, 128],
    metavar="M",
    help="numbers of domains for --penalty-memory (default: 16 64 128)",
  )
  parser.add_argument(
    "--precision-speed",
    action="store_true",
    help="instead of the algorithm table: erm and disam steps with --precision bf16 against float32",
  )
  args = parser.parse_args(argv)
  if args.penalty_memory:
    rows = penalty_memory(args.domains)
    section = _penalty_section(rows, args.domains)
    _write_section(pathlib.Path(args.out), PENALTY_MARKER, section)
    print(section)
    return {"penalty_memory": rows}
  if args.precision_speed:
    load_before = os.getloadavg()
    speed = precision_speed(
      ["mlp"] if args.quick else args.models,
      ["erm", "disam"],
      1 if args.quick else args.rounds,
      HParams().for_run(300),
      steps_per_sample=5 if args.quick else None,
    )
    section = _precision_section(speed, 1 if args.quick else args.rounds, (load_before[0], os.getloadavg()[0]))
    _write_section(pathlib.Path(args.out), PRECISION_MARKER, section)
    print(section)
    return {"precision_speed": speed}
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
    f"`python -m benchmarks.algorithm_cost --rounds {rounds}` on {stamp}: "
    f"{platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPU cores, JAX {jax.__version__}, load average {load_before[0]:.1f} before and "
    f"{load_after[0]:.1f} after the run ({time.perf_counter() - started:.0f} s). The harness's jitted step on "
    f"random data shaped like its default job: {M} training domains x {B} examples of 8x8x1, 10 classes, Adam. "
    "FLOPs: XLA's count for the compiled step. Time / ERM: fastest timing over ERM's fastest (other jobs only add "
    "time); median: the median over the interleaved rounds of the per-round ratio; ms: the fastest timing.",
    "",
  ]
  header = [
    "algorithm",
    *(cell for m in models for cell in (f"{MODELS[m][0]}: FLOPs / ERM", "time / ERM", "median", "ms")),
  ]
  lines += markdown_table(
    header,
    (
      [
        name,
        *(
          cell
          for r in (results[m][name] for m in models)
          for cell in (f"{r['flops_ratio']:.2f}", f"{r['ratio']:.2f}", f"{r['median_ratio']:.2f}", f"{r['ms']:.1f}")
        ),
      ]
      for name in names
    ),
    align="---:",
  )
  text = "\n".join(lines) + "\n"
  out = pathlib.Path(args.out)
  text += _kept_sections(out)
  write_results(out.parent, out.name[: -len(".md")] if out.name.endswith(".md") else out.name, text)
  print(text)
  return results


if __name__ == "__main__":
  main()
