"""Targets and the Markdown report of a results dict (what results/step_cost.md shows)."""

from __future__ import annotations

from typing import Any

from benchmarks.step_cost.config import CONV_MODELS, REFERENCE_PERTURB_EVERY, TARGETS, XLA_CONFIGS
from disam_jax.harness.tables import markdown_table


def evaluate_targets(results: dict) -> list[dict[str, Any]]:
  """Each target with its measured value (ratio of min times; `paired`: median of per-round ratios) and whether
  the min-based value meets it."""
  targets = []

  def add(name, value, threshold, paired=None):
    if value is None:
      return
    targets.append(
      {"target": name, "value": value, "paired": paired, "threshold": threshold, "met": bool(value <= threshold)}
    )

  for model, res in results.get("step_time", {}).items():
    rt = res["ratios"]
    for config in XLA_CONFIGS:
      pre = f"{config}: " if config else ""
      config = config or "default"
      add(
        f"{model} [{config}]: disam / optax SAM",
        rt.get(f"{pre}disam/sam"),
        TARGETS["disam_over_sam"],
        rt.get(f"{pre}disam/sam (paired)"),
      )
      if model in CONV_MODELS:
        add(
          f"{model} [{config}]: disam / ERM",
          rt.get(f"{pre}disam/erm"),
          TARGETS["disam_over_erm_convnets"],
          rt.get(f"{pre}disam/erm (paired)"),
        )
      if "torch_disam/torch_erm" in rt:
        add(
          f"{model} [{config}]: JAX disam/ERM <= PyTorch disam/ERM (= threshold)",
          rt.get(f"{pre}disam/erm"),
          rt["torch_disam/torch_erm"],
        )
      add(f"{model} [{config}]: JAX ERM / PyTorch ERM", rt.get(f"{pre}jax_erm/torch_erm"), TARGETS["jax_over_torch"])
      add(
        f"{model} [{config}]: JAX disam / PyTorch disam",
        rt.get(f"{pre}jax_disam/torch_disam"),
        TARGETS["jax_over_torch"],
        rt.get(f"{pre}jax_disam/torch_disam (paired)"),
      )
      add(
        f"{model} [{config}]: disam(lam=0) / optax SAM",
        rt.get(f"{pre}disam_lam0/sam"),
        TARGETS["disam_over_sam"],
        rt.get(f"{pre}disam_lam0/sam (paired)"),
      )
    mem = res.get("memory", {})
    if "disam_minus_erm_in_param_copies" in mem:
      add(
        f"{model} [{mem['config']}]: disam - ERM peak memory, in parameter copies",
        mem["disam_minus_erm_in_param_copies"],
        TARGETS["memory_extra_param_copies"],
      )
  for model, res in results.get("step_time", {}).items():
    value = res["ratios"].get(f"fast: disam_k{REFERENCE_PERTURB_EVERY}/erm")
    add(
      f"{model} [fast]: disam(perturb_every={REFERENCE_PERTURB_EVERY}) average step / ERM (a reference; the "
      "recommended trigger: benchmarks/amortized)",
      value,
      TARGETS["amortized_over_erm"],
      res["ratios"].get(f"fast: disam_k{REFERENCE_PERTURB_EVERY}/erm (paired)"),
    )
  for algorithm, res in results.get("harness_loop", {}).get("algorithms", {}).items():
    add(
      f"harness loop ({algorithm}, mlp): harness ms per step / bare jitted loop (steps/s >= 0.95x bare)",
      res["harness/bare"],
      TARGETS["harness_over_bare"],
      res.get("harness/bare (paired)"),
    )
  for model, res in results.get("domains", {}).items():
    ms = res["num_domains"]
    key = f"M{ms[-1]}/M{ms[0]}"
    add(
      f"{model}: disam M={ms[-1]} / M={ms[0]}",
      res["ratios"][key],
      TARGETS["domains_max_over_min"],
      res["ratios"].get(f"{key} (paired)"),
    )
  return targets


def _fmt_ms(c: dict) -> str:
  return (
    f"{c['median_ms']:.2f} ({c['min_ms']:.2f})" if c["min_ms"] < 100 else f"{c['median_ms']:.0f} ({c['min_ms']:.0f})"
  )


def _mib(v: int) -> str:
  return f"{v / 2**20:.2f}"


def to_markdown(results: dict) -> str:
  lines = [f"# Step cost: {results['name']}", ""]
  m, v = results["machine"], results["versions"]
  lines += [
    f"- Date: {results['date']}; command: `{results['command']}`; wall time {results['wall_time_s']:.0f} s",
    f"- Machine: {m['cpu']}, {m['cores_usable']} cores, {m['memory_gb']} GB, {m['platform']}",
    f"- Versions: python {m['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax "
    f"{v['optax']}, numpy {v['numpy']}, torch {v['torch']}, disam_jax {v['disam_jax']}",
    f"- Threads: {results['threads']}",
    f"- Load average (1 min) before {results['load']['before']}, after {results['load']['after']}, per round "
    f"min {min(results['load']['rounds'] or [0]):.2f} / max {max(results['load']['rounds'] or [0]):.2f}",
    f"- Settings: {results['settings']}",
    "- Times: median (min) ms per step over the rounds; cases interleaved round-robin in one process; ratios "
    "use the min.",
    "",
  ]
  st = results.get("step_time", {})
  if st:
    lines += ["## Step time per case", ""]
    labels = []
    for res in st.values():
      for k in res["cases"]:
        if k not in labels:
          labels.append(k)
    rows = [[lab, *(_fmt_ms(r["cases"][lab]) if lab in r["cases"] else "-" for r in st.values())] for lab in labels]
    rows.append(["rounds", *(len(next(iter(r["cases"].values()))["times_ms"]) for r in st.values())])
    lines += markdown_table(
      ["case", *(f"{k} ({r['batch']} = {r['num_domains']}x{r['per_domain_batch']})" for k, r in st.items())], rows
    )
    lines += [
      "",
      "Process CPU time per step, min ms (all threads of this process; time spent descheduled does not "
      "count) / minor page faults per step (fresh pages touched) / cores other processes kept busy "
      "meanwhile (mean over samples):",
      "",
    ]
    cpu_cell = lambda c: (
      f"{c['cpu_min_ms']:.1f} / {c['page_faults_per_step'] / 1e3:.1f}k / "
      f"{c['other_processes_cores'] if c['other_processes_cores'] is not None else '-'}"
    )
    lines += markdown_table(
      ["case", *st],
      ([lab, *(cpu_cell(r["cases"][lab]) if lab in r["cases"] else "-" for r in st.values())] for lab in labels),
    )
    peak = results.get("peak", {})
    lines += [
      "",
      "Achieved GFLOP/s (work: XLA's FLOP count of the out-of-the-box JAX step of the same kind, so "
      "every implementation of a kind is credited the same work; over the min time). Peak of this CPU: "
      f"{peak.get('note', 'not measured')}",
      "",
    ]
    lines += markdown_table(
      ["case", *st],
      (
        [
          lab,
          *(
            f"{r['cases'][lab]['gflop_per_s']:.1f}" if "gflop_per_s" in r["cases"].get(lab, {}) else "-"
            for r in st.values()
          ),
        ]
        for lab in labels
      ),
    )
    lines += ["", "## Ratios (min times)", ""]
    keys = []
    for res in st.values():
      for k in res["ratios"]:
        if k not in keys:
          keys.append(k)
    lines += markdown_table(
      ["ratio", *st], ([k, *(f"{r['ratios'][k]:.3f}" if k in r["ratios"] else "-" for r in st.values())] for k in keys)
    )
    lines += [
      "",
      "## Compile time, FLOPs and memory (XLA compiled analysis)",
      "",
      "peak = temp + argument + output (MiB); alias = outputs written into donated arguments.",
      "",
    ]
    rows = []
    for name, res in st.items():
      for lab, c in res["cases"].items():
        if c["framework"] != "jax":
          continue
        mem = c.get("memory", {})
        cells = [_mib(mem[k]) if k in mem else "-" for k in ("temp", "argument", "output", "alias", "peak")]
        ops = c.get("hlo_ops", {})
        rows.append(
          [
            name,
            lab,
            f"{c['lower_s']:.2f}",
            f"{c['compile_s']:.2f}",
            c.get("gflops", "-"),
            ops.get("convolution", 0) + ops.get("dot", 0),
            *cells,
          ]
        )
    lines += markdown_table(
      [
        "model",
        "case",
        "lower s",
        "compile s",
        "GFLOP/step",
        "conv+dot ops",
        "temp",
        "argument",
        "output",
        "alias",
        "peak",
      ],
      rows,
    )
    rows = []
    for name, res in st.items():
      mem = res.get("memory", {})
      if mem:
        rows.append(
          [
            name,
            mem["config"],
            _mib(res["params_bytes"]),
            _mib(mem["disam_minus_erm_bytes"]),
            f"{mem['disam_minus_erm_in_param_copies']:.3f}",
            _mib(mem["disam_minus_erm_temp_bytes"]),
            _mib(mem["disam_minus_sam_bytes"]),
          ]
        )
    lines += [
      "",
      *markdown_table(
        [
          "model",
          "XLA config",
          "params MiB",
          "disam - ERM peak MiB",
          "= parameter copies",
          "disam - ERM temp MiB",
          "disam - SAM peak MiB",
        ],
        rows,
      ),
    ]
  dom = results.get("domains", {})
  if dom:
    lines += ["", "## Number of domains at a fixed total batch (disam, median (min) ms)", ""]
    for name, res in dom.items():
      ms = res["num_domains"]
      lines += [
        f"{name}, total batch {res['total_batch']}:",
        "",
        *markdown_table(
          [*(f"M={m}" for m in ms), "SAM", *res["ratios"]],
          [
            [
              *(_fmt_ms(res["cases"][f"disam_M{m}"]) for m in ms),
              _fmt_ms(res["cases"]["sam"]),
              *(f"{v:.3f}" for v in res["ratios"].values()),
            ]
          ],
        ),
        "",
      ]
  md = results.get("multi_device", {})
  if md.get("models"):
    lines += [
      "## Multi-device (host CPU devices sharing the same 2 cores: correctness and overhead only)",
      "",
      f"XLA_FLAGS={md.get('xla_flags')}; params after {next(iter(md['models'].values()))['check_steps']} "
      "steps compared with one device on the whole batch.",
      "",
      *markdown_table(
        ["model", "variant", "median (min) ms", "/ single device", "max abs diff vs single", "replica spread"],
        (
          [
            name,
            lab,
            _fmt_ms(c),
            f"{c['overhead_vs_single']:.3f}",
            f"{c['max_abs_diff_vs_single']:.2e}",
            f"{c['replica_spread']:.1e}",
          ]
          for name, res in md["models"].items()
          for lab, c in res["cases"].items()
        ),
      ),
    ]
    lines.append("")
  elif "error" in md:
    lines += ["## Multi-device", "", f"failed: {md['error'][-500:]}", ""]
  fl = results.get("xla_flag_sweep", {})
  if fl.get("runs"):
    lines += [
      "## XLA:CPU flags (ERM step; each in its own process, sequential; median (min) ms)",
      "",
    ]
    rows = []
    for run in fl["runs"]:
      if "cases" in run:
        c = run["cases"]["erm"]
        rows.append(
          [
            run["model"],
            f"`{run['xla_flags'] or '(none)'}`",
            _fmt_ms(c),
            f"{c['compile_s']:.1f}",
            c["other_processes_cores"],
          ]
        )
      else:
        rows.append([run["model"], f"`{run['xla_flags']}`", "failed", "-", "-"])
    lines += markdown_table(["model", "XLA_FLAGS", "ERM step", "compile s", "other processes (cores)"], rows)
    lines.append("")
  hl = results.get("harness_loop", {})
  if hl.get("algorithms"):
    lines += [
      "## Harness loop (disam-train's run_cell against a bare jitted loop of the same compiled step)",
      "",
      f"{hl['model']} on {hl['dataset']}, {hl['steps']} steps per sample, {hl['rounds']} interleaved rounds; "
      "harness time between the step-2 and last-but-one on_step callbacks (no compile, evaluation or "
      "checkpoint); bare: one device-resident batch, donated state, one block at the end; bare sampled: "
      "the same with a fresh batch from the sampler each step. Median (min) ms.",
      "",
    ]
    rows = []
    for algorithm, res in hl["algorithms"].items():
      sampled = res.get("bare_sampled")
      rows.append(
        [
          algorithm,
          _fmt_ms(res["harness"]),
          _fmt_ms(res["bare"]),
          _fmt_ms(sampled) if sampled else "-",
          f"{res['harness/bare']:.3f}",
          f"{res['harness/bare (paired)']:.3f}",
          f"{res['harness steps/s / bare steps/s']:.3f}",
          f"{res.get('harness/bare_sampled', float('nan')):.3f}",
        ]
      )
    lines += markdown_table(
      [
        "algorithm",
        "harness",
        "bare",
        "bare sampled",
        "harness / bare",
        "paired",
        "harness steps/s / bare steps/s",
        "harness / bare sampled",
      ],
      rows,
    )
    lines.append("")
  tg = results.get("targets", [])
  if tg:
    lines += [
      "## Targets",
      "",
      "value: ratio of min times; paired: median over rounds of the per-round ratio.",
      "",
      *markdown_table(
        ["target", "value", "paired", "threshold", "met"],
        (
          [
            t["target"],
            f"{t['value']:.3f}",
            f"{t['paired']:.3f}" if t.get("paired") is not None else "-",
            f"<= {t['threshold']:.3f}",
            "yes" if t["met"] else "**no**",
          ]
          for t in tg
        ),
      ),
    ]
    lines.append("")
  return "\n".join(lines) + "\n"
