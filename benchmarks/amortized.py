"""What amortized DISAM costs per step against ERM: `perturb_every=k` (with and without reuse) and the variance trigger.

    python -m benchmarks.amortized                 # ~10 min on 2 cores: results/amortized.md (+ .json)
    python -m benchmarks.amortized --quick         # seconds: a tiny MLP, two rounds (the smoke test)
    python -m benchmarks.amortized --rate mlp=0.1  # also the trigger's cost at a measured ascent rate

Every case is one jitted, donated training step of the harness's models (the MLP and DomainBed's MNIST CNN, in the
harness's CPU configuration: fast_conv and its compiler options), 4 domains x 32 examples, SGD with momentum,
rho 0.05, lam 0.1, timed interleaved round-robin in one process (`step_cost.timing.time_round_robin`). Each sample
of an amortized case runs whole cycles of k steps, so its mean is the average step. Cases:

* `erm`, `disam` (every step full);
* `k<k> reuse 0` (`perturb_every=k`, the default `reuse_weight=0`: no `g_v`) and `k<k> reuse 0.7` (LookSAM's reuse);
* `trigger gap <g>`: `perturb_when=VarianceTrigger(min_gap=g, max_gap=g, factor=0)`, the trigger's compiled step
  (its decision and reference included) forced to ascend every g-th step. The trigger's average step at an ascent
  rate r is `one + r (full - one)` (one cond, the ascent branch or the one-pass branch each step); `one` and
  `full` are fitted by least squares over the gaps, and `--rate model=r` prints the cost at the rate r measured in
  the accuracy runs (docs/results.md).

Ratios to ERM: of the medians over rounds, and paired (the median over rounds of the per-round ratio).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np

from benchmarks.step_cost.cases import build_jax_model, make_batch, make_jax_step
from benchmarks.step_cost.config import LAM, RHO
from benchmarks.step_cost.timing import StepCase, load_avg, machine_line, time_round_robin, write_results
from disam_jax.harness.tables import markdown_table

MODELS = {"mlp": ((28, 28, 1), {}), "mnist_cnn": ((28, 28, 1), {})}
QUICK_MODELS = {"mlp": ((8, 8, 1), {"hidden": 32, "depth": 1})}
GAPS = (4, 8, 16)
NUM_DOMAINS, PER_DOMAIN = 4, 32
TARGET_OVER_ERM = 1.15  # the recommended amortization's average step / ERM (issue 21; docs/results.md)


def case_specs(gaps=GAPS) -> dict[str, tuple[str, dict, int]]:
  """label -> (kind, disam kwargs, steps per cycle)."""
  import disam_jax

  specs = {"erm": ("erm", {}, 1), "disam": ("disam", {}, 1)}
  for k in gaps:
    specs[f"k{k} reuse 0"] = ("disam", {"perturb_every": k}, k)
    specs[f"k{k} reuse 0.7"] = ("disam", {"perturb_every": k, "reuse_weight": 0.7}, k)
  for g in gaps:
    specs[f"trigger gap {g}"] = ("disam", {"perturb_when": disam_jax.VarianceTrigger(g, g, 0.0, 0.9)}, g)
  return specs


def _step(kind: str, kwargs: dict, graphdef, model_state, num_domains: int):
  """`benchmarks.step_cost.cases.make_jax_step`'s ERM or DISAM step (BatchNorm statistics from the unperturbed pass),
  with `kwargs` for disam."""
  return make_jax_step(kind, graphdef, model_state, num_domains, disam_kwargs=kwargs)


def build_cases(name: str, shape, model_kwargs, specs, per_domain: int) -> list[StepCase]:
  import jax
  import jax.numpy as jnp

  from disam_jax.harness.fast_conv import CPU_COMPILER_OPTIONS

  graphdef, params, model_state = build_jax_model(name, shape, model_kwargs, fast_conv=True)
  x, y = (jnp.asarray(a) for a in make_batch(NUM_DOMAINS, per_domain, shape))
  cases = []
  for label, (kind, kwargs, cycle) in specs.items():
    tx, step = _step(kind, kwargs, graphdef, model_state, NUM_DOMAINS)
    fresh = lambda t: jax.tree.map(jnp.array, t)
    state = (fresh(params), tx.init(fresh(params)), fresh(model_state))
    compiled = (
      jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, x, y).compile(compiler_options=CPU_COMPILER_OPTIONS)
    )

    def run(s, compiled=compiled):
      p, o, ms, loss = compiled(*s[:3], x, y)
      return p, o, ms, loss

    case = StepCase(label, run, state + (jnp.zeros([], jnp.float32),), loss=lambda s: s[3])
    case.step_multiple = cycle  # samples time whole cycles: their mean is the average step
    cases.append(case)
  return cases


def fit_trigger(times: dict[str, float], gaps=GAPS) -> tuple[float, float]:
  """Least-squares `(one, full)` of `avg(g) = one + (full - one) / g` over the forced gaps (ms)."""
  inv = np.asarray([1 / g for g in gaps])
  avg = np.asarray([times[f"trigger gap {g}"] for g in gaps])
  slope, intercept = np.polyfit(inv, avg, 1)
  return float(intercept), float(intercept + slope)


def summarize(timed: dict, gaps=GAPS) -> dict:
  erm = timed["erm"]
  rows = {}
  for label, c in timed.items():
    paired = statistics.median(a / b for a, b in zip(c["times_ms"], erm["times_ms"]))
    rows[label] = {
      "median_ms": c["median_ms"],
      "min_ms": c["min_ms"],
      "over_erm": c["median_ms"] / erm["median_ms"],
      "over_erm_paired": paired,
      "rounds": len(c["times_ms"]),
      "steps_per_sample": c["steps_per_sample"],
    }
  one, full = fit_trigger({k: v["median_ms"] for k, v in rows.items() if k.startswith("trigger")}, gaps)
  return {"cases": rows, "trigger_fit_ms": {"one_pass": one, "ascent": full}, "erm_median_ms": erm["median_ms"]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a tiny MLP, two rounds (smoke test)")
  parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default 7; quick 2)")
  parser.add_argument("--min-sample-s", type=float, default=None, help="shortest sample (default 1.0; quick 0)")
  parser.add_argument(
    "--rate",
    action="append",
    default=[],
    metavar="MODEL=R",
    help="the trigger ascent rate measured in the accuracy runs, to report its cost at",
  )
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  models = QUICK_MODELS if args.quick else {m: MODELS[m] for m in (args.models or MODELS)}
  repeats = args.repeats or (2 if args.quick else 7)
  min_sample = args.min_sample_s if args.min_sample_s is not None else (0.0 if args.quick else 1.0)
  rates = {}
  for item in args.rate:
    model, _, r = item.partition("=")
    rates[model] = float(r)
  gaps = (2, 4) if args.quick else GAPS
  load0, start = load_avg(), time.perf_counter()
  results, loads = {}, {}
  for name, (shape, kwargs) in models.items():
    print(f"{name}: compiling {len(case_specs(gaps))} cases", flush=True)
    cases = build_cases(name, shape, kwargs, case_specs(gaps), 4 if args.quick else PER_DOMAIN)
    samples: list = []
    timed = time_round_robin(
      cases, repeats=repeats, min_sample_s=min_sample, budget_s=None, load_samples=samples, log=print
    )
    results[name] = summarize(timed, gaps)
    loads[name] = samples
  wall, load1 = time.perf_counter() - start, load_avg()
  lines = [
    "# Amortized DISAM: average step against ERM",
    "",
    f"`python -m benchmarks.amortized{' --quick' if args.quick else ''}"
    f"{''.join(f' --rate {m}={r}' for m, r in rates.items())}`, {machine_line()}; load average "
    f"{load0[0]:.2f} at start, {load1[0]:.2f} at end; {wall:.0f} s. {repeats} rounds timed round-robin in one "
    f"process (order rotated each round), samples of at least {min_sample} s of whole cycles of k steps. "
    f"{NUM_DOMAINS} domains x {4 if args.quick else PER_DOMAIN} examples, SGD momentum, rho {RHO}, lam {LAM}, the "
    "harness's CPU configuration (fast_conv, its compiler options). Ratio: median step / median ERM step; paired: "
    "median over rounds of the per-round ratio. The floor of one full step every k is (k + 1) / k x ERM if an "
    "in-between step cost exactly one ERM step.",
  ]
  for name, res in results.items():
    lo = loads[name]
    lines += ["", f"## {name} (load average during the rounds {min(lo):.2f}-{max(lo):.2f})", ""]
    rows = []
    for label, r in res["cases"].items():
      k = next((int(t[1:]) for t in label.split() if t.startswith("k") and t[1:].isdigit()), None)
      if label.startswith("trigger gap"):
        k = int(label.split()[-1])
      floor = f"{(k + 1) / k:.3f}" if k else ("2" if label == "disam" else "1")
      rows.append(
        [
          label,
          f"{r['median_ms']:.3f}",
          f"{r['min_ms']:.3f}",
          f"{r['over_erm']:.3f}",
          f"{r['over_erm_paired']:.3f}",
          floor,
        ]
      )
    lines += markdown_table(["case", "median ms", "min ms", "/ ERM", "/ ERM paired", "floor (k+1)/k"], rows)
    one, full = res["trigger_fit_ms"]["one_pass"], res["trigger_fit_ms"]["ascent"]
    erm = res["erm_median_ms"]
    lines += [
      "",
      f"Trigger, fitted over the gaps: one-pass step {one:.3f} ms ({one / erm:.3f} x ERM), ascent step "
      f"{full:.3f} ms ({full / erm:.3f} x ERM).",
    ]
    if name in rates:
      r = rates[name]
      cost = one + r * (full - one)
      res["trigger_at_rate"] = {"rate": r, "ms": cost, "over_erm": cost / erm}
      lines.append(
        f"At the ascent rate {r:.4f} measured in the accuracy runs: {cost:.3f} ms, {cost / erm:.3f} x ERM "
        f"(target <= {TARGET_OVER_ERM}: {'met' if cost / erm <= TARGET_OVER_ERM else 'missed'})."
      )
  stem = "amortized_quick" if args.quick else "amortized"
  data = {"results": results, "loads": loads, "load_start": load0, "load_end": load1, "repeats": repeats}
  path = write_results(args.out_dir, stem, "\n".join(lines) + "\n", data)
  print(path)
  print("\n".join(lines))
  return data


if __name__ == "__main__":
  main()
