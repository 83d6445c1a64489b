"""Collectives and per-device memory of an FSDP x tensor-parallel step: ERM, optax SAM and DISAM under GSPMD.

    python -m benchmarks.sharding            # ~2 min on 2 cores: results/sharding.{md,json}
    python -m benchmarks.sharding --quick    # seconds: a smaller model, no timing (the smoke test)

A small LM-style transformer (pre-LN, causal attention, every weight 2-D) on a 4x2 ('data', 'model') mesh of 8
emulated host CPU devices (this module sets XLA_FLAGS before importing jax). Every 2-D weight is sharded over both
axes: `[in, out]` weights P('data', 'model') (FSDP on the input axis, tensor-parallel on the output axis), the
output projections of attention and MLP P('model', 'data') (Megatron's row-parallel layers), the 1-D LayerNorm
scales replicated. The batch `[M, b, S]` of M domains is sharded on b over 'data'; the residual stream is
constrained to that layout, the attention heads and MLP hidden units to 'model'. Every step is `jax.jit` with
in/out shardings (params and optimizer state sharded like the params, donated) over Auto axes: GSPMD partitions.

Cases, all with Adam(1e-3) as the base optimizer and rho 0.05, lam 0.1: ERM (one gradient), optax SAM
(`optax.contrib.sam(adam, chain(normalize(), sgd(rho)), opaque_mode=True)`: one update call does both passes),
DISAM with rule sam / gsam / sagm, perturb_every=4, diagnostics=True. For each compiled step: the count and bytes
(from each op's result shape and dtype, summed over the elements of tuple-shaped results) of every all-gather,
all-reduce, reduce-scatter, all-to-all and collective-permute in `compiled.as_text()` (static counts: an op inside a
`lax.cond` branch is counted once, whether or not that branch runs), the parameter-shaped all-gathers (defined in
PARAM_SHAPED below), and `compiled.memory_analysis()` (per device: the SPMD program each device runs).
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import disam_jax  # noqa: E402
from benchmarks.step_cost.timing import load_avg, machine_info, time_round_robin, versions, write_results  # noqa: E402
from disam_jax.harness.tables import markdown_table  # noqa: E402

MESH_SHAPE = (("data", 4), ("model", 2))
# vocabulary, width, heads, MLP hidden, layers, sequence length, domains, sequences per domain. Chosen so that no
# activation has a parameter's (2-D) shape: the parameter-shaped count then counts parameters only.
CONFIGS = {
  "full": dict(V=320, D=128, H=4, F=384, L=2, S=32, M=4, b=8),
  "quick": dict(V=40, D=32, H=2, F=96, L=1, S=8, M=4, b=4),
}
QUICK_CASES = ("erm", "optax_sam", "disam")  # --quick: each case is an 8-device compile
RHO, LAM = 0.05, 0.1
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
CASES = {  # label: disam kwargs (None: not DISAM)
  "erm": None,
  "optax_sam": None,
  "disam": {},
  "disam_gsam": dict(rule="gsam"),
  "disam_sagm": dict(rule="sagm"),
  "disam_perturb_every4": dict(perturb_every=4, reuse_weight=0.7),  # the measured case keeps g_v (LookSAM)
  "disam_diagnostics": dict(diagnostics=True),
  # An attribution, not a configuration: DISAM whose returned state has grad_norm zeroed, so that XLA removes its
  # computation; the difference to 'disam' is what the logged ||g|| costs in collectives.
  "disam_minus_grad_norm": dict(),
}
DROPPED = {"disam_minus_grad_norm": ("grad_norm",)}
PARAM_SHAPED = (
  "an all-gather whose result is floating point and whose shape (size-1 dimensions dropped) is, for some "
  "parameter of global shape (d_1, ..., d_k) and PartitionSpec (a_1, ..., a_k), (d_1 / n_1, ..., d_k / n_k) with "
  "each n_i the product of the sizes of a subset of the mesh axes in a_i, other than the device's own shard "
  "(all n_i at their largest): the whole parameter or a partially gathered one. The model is sized so that no "
  "activation has such a shape."
)


# -- the model ---------------------------------------------------------------------------------------------------------


def param_specs(cfg):
  layer = {
    "ln1": P(),
    "wqkv": P("data", "model"),
    "wo": P("model", "data"),
    "ln2": P(),
    "w1": P("data", "model"),
    "w2": P("model", "data"),
  }
  return {
    "embed": P("data", "model"),
    "pos": P("data", "model"),
    "layers": [layer] * cfg["L"],
    "ln_f": P(),
    "unembed": P("data", "model"),
  }


def init_params(cfg, seed=0):
  V, D, F, S = cfg["V"], cfg["D"], cfg["F"], cfg["S"]
  keys = iter(jax.random.split(jax.random.key(seed), 4 + 4 * cfg["L"]))
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape, jnp.float32)
  layer = lambda: {
    "ln1": jnp.ones([D]),
    "wqkv": normal([D, 3 * D], D**-0.5),
    "wo": normal([D, D], D**-0.5),
    "ln2": jnp.ones([D]),
    "w1": normal([D, F], D**-0.5),
    "w2": normal([F, D], F**-0.5),
  }
  return {
    "embed": normal([V, D], 1.0),
    "pos": normal([S, D], 0.1),
    "layers": [layer() for _ in range(cfg["L"])],
    "ln_f": jnp.ones([D]),
    "unembed": normal([D, V], D**-0.5),
  }


def make_model(cfg, mesh):
  """`sequence_losses(params, tokens [M, b, S]) -> [M, b]` mean next-token cross-entropy of every sequence."""
  H = cfg["H"]
  constrain = lambda x, *spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
  residual = lambda x: constrain(x, None, "data", None, None)  # [M, b, S, D]: b on 'data'

  def layer_norm(x, scale):
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale

  def attention(x, p):
    m, b, s, d = x.shape
    qkv = constrain(x @ p["wqkv"], None, "data", None, "model")
    q, k, v = (
      constrain(t.reshape(m, b, s, H, d // H), None, "data", None, "model", None) for t in jnp.split(qkv, 3, axis=-1)
    )
    logits = jnp.einsum("mbshd,mbthd->mbhst", q, k) / math.sqrt(d // H)
    logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -1e9)
    out = jnp.einsum("mbhst,mbthd->mbshd", jax.nn.softmax(logits, axis=-1), v).reshape(m, b, s, d)
    return residual(out @ p["wo"])

  def mlp(x, p):
    return residual(constrain(jax.nn.gelu(x @ p["w1"]), None, "data", None, "model") @ p["w2"])

  def sequence_losses(params, tokens):
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    x = residual(jax.nn.one_hot(inputs, cfg["V"], dtype=jnp.float32) @ params["embed"] + params["pos"][:-1])
    for p in params["layers"]:
      x = x + attention(layer_norm(x, p["ln1"]), p)
      x = x + mlp(layer_norm(x, p["ln2"]), p)
    logits = layer_norm(x, params["ln_f"]) @ params["unembed"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)

  return sequence_losses


def make_tokens(cfg, seed=0):
  """`[M, b, S]` int32: domain d counts up by stride d + 1 mod V from a random start, a token in `noise[d]`
  replaced at random (the domains differ in how learnable they are)."""
  rng = np.random.default_rng(seed)
  M, b, S, V = cfg["M"], cfg["b"], cfg["S"], cfg["V"]
  start = rng.integers(0, V, size=(M, b, 1))
  stride = np.arange(1, M + 1)[:, None, None]
  tokens = (start + stride * np.arange(S)) % V
  noise = np.linspace(0.0, 0.3, M)[:, None, None]
  flip = rng.random((M, b, S)) < noise
  return jnp.asarray(np.where(flip, rng.integers(0, V, size=(M, b, S)), tokens), jnp.int32)


# -- the steps ---------------------------------------------------------------------------------------------------------


def make_steps(cfg, mesh, labels=tuple(CASES)):
  """{label: (step(params, state, tokens) -> (params, state, loss), tx)} for the cases in `labels`."""
  sequence_losses = make_model(cfg, mesh)
  domain_loss_fn = lambda p, t: disam_jax.domain_losses_from_grouped(sequence_losses(p, t))
  mean_loss = lambda p, t: sequence_losses(p, t).mean()
  base = optax.adam(1e-3)
  steps = {}

  def erm(p, s, t):
    loss, g = jax.value_and_grad(mean_loss)(p, t)
    u, s = base.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  steps["erm"] = (erm, base)
  sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True)

  def sam_step(p, s, t):
    loss, g = jax.value_and_grad(mean_loss)(p, t)
    u, s = sam.update(g, s, p, grad_fn=lambda w, _: jax.grad(mean_loss)(w, t))
    return optax.apply_updates(p, u), s, loss

  steps["optax_sam"] = (sam_step, sam)
  for label, kwargs in CASES.items():
    if kwargs is None or label not in labels:
      continue
    tx = disam_jax.disam(base, RHO, LAM, num_domains=cfg["M"], **kwargs)

    def disam_step(p, s, t, tx=tx, drop=DROPPED.get(label, ())):  # noqa: B008 (binds this case's values)
      u, s = tx.update(None, s, p, domain_loss_fn=lambda q: domain_loss_fn(q, t))
      s = s._replace(**{f: jnp.zeros_like(getattr(s, f)) for f in drop})
      return optax.apply_updates(p, u), s, disam_jax.find_disam_state(s).loss

    steps[label] = (disam_step, tx)
  return {label: steps[label] for label in labels}


def state_specs(tx, state, specs):
  """Params-shaped state leaves sharded like the params; everything else replicated."""
  return optax.tree_map_params(
    tx, lambda _, s: s, state, specs, transform_non_params=lambda _: P(), is_leaf=lambda v: isinstance(v, P)
  )


def named(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda v: isinstance(v, P))


# -- reading the compiled HLO ------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", re.M)
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shapes(result_type):
  """[(dtype, dims)] of an HLO result type: one array, or every element of a tuple."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(result_type)]


def collectives(hlo_text):
  """[{'op', 'shapes', 'bytes'}] for every collective in the HLO text. An async `-start` op's result tuple holds its
  operands then its outputs: only the outputs (its second half) are counted; its `-done` is not an op here."""
  ops = []
  for m in _OP.finditer(hlo_text):
    shapes = _shapes(m.group(1))
    if m.group(3):
      shapes = shapes[len(shapes) // 2 :]
    nbytes = sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes)
    ops.append({"op": m.group(2), "shapes": shapes, "bytes": nbytes})
  return ops


def param_shaped_set(params, specs, mesh):
  """Every shape (size-1 dims dropped) a parameter has whole or partially gathered, not its own shard: PARAM_SHAPED."""
  sizes = dict(mesh.shape)
  out = set()
  for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))):
    spec = tuple(spec) + (None,) * (x.ndim - len(spec))
    choices, shard = [], []
    for d, entry in zip(x.shape, spec):
      axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
      subsets = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
      choices.append(sorted({d // math.prod(sizes[a] for a in c) for c in subsets}))
      shard.append(d // math.prod(sizes[a] for a in axes))
    for shape in itertools.product(*choices):
      if list(shape) != shard:
        out.add(tuple(n for n in shape if n != 1))
  return out


def _elements(ops):
  """A Counter of (kind, one result array): a tuple-shaped all-reduce counts each of its arrays. XLA combines
  all-reduces into tuples differently in different programs; by element, two steps compare array by array."""
  return collections.Counter(
    (o["op"], f"{dt}[{','.join(map(str, dims))}]", _DTYPE_BYTES[dt] * math.prod(dims))
    for o in ops
    for dt, dims in o["shapes"]
  )


def op_difference(ops, reference):
  """(arrays moved by `ops` beyond `reference`'s, arrays of `reference` not moved by `ops`), by collective kind
  and array shape (multiset differences of _elements), each with its count and bytes."""
  a, b = _elements(ops), _elements(reference)
  fmt = lambda c: [{"op": op, "array": arr, "times": n, "bytes_each": nb} for (op, arr, nb), n in sorted(c.items())]
  return fmt(a - b), fmt(b - a)


def summarize(ops, param_shapes):
  by_op = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  gathered = []
  for o in ops:
    by_op[o["op"]]["count"] += 1
    by_op[o["op"]]["bytes"] += o["bytes"]
    if o["op"] == "all-gather":
      for dt, dims in o["shapes"]:
        if dt in ("f16", "bf16", "f32", "f64") and tuple(n for n in dims if n != 1) in param_shapes:
          gathered.append(f"{dt}[{','.join(map(str, dims))}]")
  return {
    "collectives": by_op,
    "total_count": sum(v["count"] for v in by_op.values()),
    "total_bytes": sum(v["bytes"] for v in by_op.values()),
    "param_shaped_all_gathers": len(gathered),
    "param_shaped_all_gather_shapes": sorted(gathered),
  }


def memory(compiled):
  m = compiled.memory_analysis()
  fields = {
    "temp": "temp_size_in_bytes",
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
  }
  out = {k: int(getattr(m, v)) for k, v in fields.items()}
  out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def shard_bytes(tree):
  """Bytes of one device's shards of a tree of sharded arrays (device 0's, the largest under even splits)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# -- the run -----------------------------------------------------------------------------------------------------------


class _Case:
  framework = "jax"

  def __init__(self, label, fn, args, step_multiple=1):
    self.label, self.fn, self.args, self.times, self.step_multiple = label, fn, args, [], step_multiple
    self.loss = float("nan")

  def run(self, k):
    p, s, t = self.args
    for _ in range(k):
      p, s, loss = self.fn(p, s, t)
    jax.block_until_ready((p, s))
    self.args, self.loss = (p, s, t), float(loss)

  def final_loss(self):
    return self.loss


def measure(cfg, labels, time_steps: bool, log=print):
  devices = np.asarray(jax.devices()[:8]).reshape([n for _, n in MESH_SHAPE])
  mesh = jax.sharding.Mesh(
    devices, [a for a, _ in MESH_SHAPE], axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_SHAPE)
  )
  specs = param_specs(cfg)
  params0 = jax.device_get(init_params(cfg))  # host copies: every case gets fresh device buffers (donated)
  tokens = jax.device_put(make_tokens(cfg), NamedSharding(mesh, P(None, "data", None)))
  param_shapes = param_shaped_set(params0, specs, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(params0))
  results, cases, all_ops = {}, [], {}
  for label, (step, tx) in make_steps(cfg, mesh, labels).items():
    params = jax.device_put(params0, named(mesh, specs))
    state = tx.init(params)
    s_specs = state_specs(tx, state, specs)
    state = jax.device_put(state, named(mesh, s_specs))
    jitted = jax.jit(
      step,
      in_shardings=(named(mesh, specs), named(mesh, s_specs), tokens.sharding),
      out_shardings=(named(mesh, specs), named(mesh, s_specs), NamedSharding(mesh, P())),
      donate_argnums=(0, 1),
    )
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, tokens).compile()
    compile_s = time.perf_counter() - t0
    ops = all_ops[label] = collectives(compiled.as_text())
    row = dict(
      summarize(ops, param_shapes),
      memory=memory(compiled),
      compile_s=round(compile_s, 2),
      state_bytes_per_device=shard_bytes(state),
      param_bytes_per_device=shard_bytes(params),
      tokens_bytes_per_device=shard_bytes(tokens),
    )
    # Run it: the step must run, and keep every params-shaped leaf's layout.
    multiple = CASES[label].get("perturb_every", 1) if CASES[label] else 1
    case = _Case(label, compiled, (params, state, tokens), multiple)
    case.run(multiple)
    p, s, _ = case.args
    row["layout_kept"] = all(
      x.sharding.spec == sp or (x.sharding.is_fully_replicated and not any(sp))
      for x, sp in zip(
        jax.tree.leaves(p) + jax.tree.leaves(s),
        jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))
        + jax.tree.leaves(s_specs, is_leaf=lambda v: isinstance(v, P)),
      )
    )
    row["loss_after_first_steps"] = case.loss
    results[label] = row
    cases.append(case)
    log(
      f"  {label}: {row['total_count']} collectives, {row['total_bytes']} B, "
      f"{row['param_shaped_all_gathers']} parameter-shaped all-gathers, temp {row['memory']['temp']} B, "
      f"compile {compile_s:.1f} s"
    )
  for label, row in results.items():  # what each case's collectives add to / lack from optax SAM's
    if label.startswith("disam"):
      extra, missing = op_difference(all_ops[label], all_ops["optax_sam"])
      row["vs_optax_sam"] = {
        "extra": extra,
        "missing": missing,
        "extra_bytes": sum(o["times"] * o["bytes_each"] for o in extra),
        "missing_bytes": sum(o["times"] * o["bytes_each"] for o in missing),
      }
  timing = None
  if time_steps:
    timing = time_round_robin(
      cases, repeats=None, min_sample_s=0.3, budget_s=40, load_samples=[], log=log, max_rounds=8
    )
  return {
    "config": cfg,
    "num_params": int(num_params),
    "param_bytes_global": int(4 * num_params),
    "param_shaped_shapes": sorted("x".join(map(str, s)) for s in param_shapes),
    "cases": results,
    "timing": timing,
  }


def targets(cases):
  sam = cases["optax_sam"]
  out = []
  for label, row in cases.items():
    if not label.startswith("disam"):
      continue
    out.append(
      {
        "case": label,
        "collective_bytes_le_sam": row["total_bytes"] <= sam["total_bytes"],
        "temp_le_sam": row["memory"]["temp"] <= sam["memory"]["temp"],
        "extra_param_shaped_all_gathers_vs_sam": row["param_shaped_all_gathers"] - sam["param_shaped_all_gathers"],
        "extra_param_shaped_all_gathers_vs_erm": row["param_shaped_all_gathers"]
        - cases["erm"]["param_shaped_all_gathers"],
      }
    )
  return out


def _kib(n):
  return f"{n / 1024:.1f}"


def markdown(data):
  cases, cfg = data["cases"], data["config"]
  lines = [
    "# Sharded parameters: collectives and per-device memory of an FSDP x tensor-parallel step",
    "",
    f"`{data['command']}`, {data['date']}, {data['machine']['cpu']} ({data['machine']['cores']} cores, shared), "
    f"JAX {data['versions']['jax']}, optax {data['versions']['optax']}; load average {data['load']['before'][0]} "
    f"at start, {data['load']['after'][0]} at end; {data['wall_time_s']:.0f} s.",
    "",
    f"Transformer: vocabulary {cfg['V']}, width {cfg['D']}, {cfg['H']} heads, MLP {cfg['F']}, {cfg['L']} layers, "
    f"sequence {cfg['S']}; {data['num_params']} parameters ({_kib(data['param_bytes_global'])} KiB float32). "
    f"Batch: {cfg['M']} domains x {cfg['b']} sequences. Mesh 4x2 ('data', 'model'), 8 emulated CPU devices, "
    "GSPMD (Auto axes, jax.jit with in/out shardings, params and optimizer state donated). [in, out] weights "
    "P('data', 'model'), attention/MLP output projections P('model', 'data'), LayerNorm scales replicated; "
    "batch P(None, 'data', None). Adam(1e-3); rho 0.05, lam 0.1.",
    "",
    "## Collectives in the compiled step (count / KiB of results, per device)",
    "",
  ]
  lines += markdown_table(
    ["case", *COLLECTIVES, "total", "parameter-shaped all-gathers"],
    (
      [
        label,
        *(f"{row['collectives'][op]['count']} / {_kib(row['collectives'][op]['bytes'])}" for op in COLLECTIVES),
        f"{row['total_count']} / {_kib(row['total_bytes'])}",
        row["param_shaped_all_gathers"],
      ]
      for label, row in cases.items()
    ),
  )
  lines += [
    "",
    f"Parameter-shaped all-gather: {PARAM_SHAPED} Counts are static (an op inside a `lax.cond` branch counts "
    "once: perturb_every=4 has the full step and the in-between step in the two branches of one cond).",
    "",
    "## Per-device memory of the compiled step (KiB, `compiled.memory_analysis()`)",
    "",
  ]
  rows = []
  for label, row in cases.items():
    m = row["memory"]
    rows.append(
      [
        label,
        _kib(m["temp"]),
        _kib(m["argument"]),
        _kib(m["output"]),
        _kib(m["alias"]),
        _kib(m["peak_estimate"]),
        _kib(row["state_bytes_per_device"]),
        f"{m['temp'] / cases['erm']['memory']['temp']:.2f}",
        f"{m['temp'] / cases['optax_sam']['memory']['temp']:.2f}",
      ]
    )
  lines += markdown_table(
    [
      "case",
      "temp",
      "arguments",
      "outputs",
      "aliased",
      "peak estimate (args + outputs - aliased + temp)",
      "optimizer state (one device's shards)",
      "temp / ERM's",
      "temp / SAM's",
    ],
    rows,
  )
  lines += [
    "",
    "## Where DISAM's collectives differ from optax SAM's",
    "",
    "The arrays each DISAM step moves that SAM's does not (and the reverse), matched by collective kind and "
    "array shape, each element of a tuple-shaped all-reduce on its own (XLA combines small all-reduces "
    "into tuples differently in different programs):",
    "",
  ]
  fmt = lambda ops: "; ".join(f"{o['op']} {o['array']} x{o['times']}" for o in ops) or "-"
  lines += markdown_table(
    ["case", "extra arrays (kind, shape, times)", "extra bytes", "arrays of SAM's it does not move", "bytes"],
    (
      [label, fmt(d["extra"]), d["extra_bytes"], fmt(d["missing"]), d["missing_bytes"]]
      for label, d in ((label, row["vs_optax_sam"]) for label, row in cases.items() if "vs_optax_sam" in row)
    ),
  )
  p = cases["erm"]
  lines += [
    "",
    f"One device holds {_kib(p['param_bytes_per_device'])} KiB of parameters (1/8 of "
    f"{_kib(data['param_bytes_global'])}) and {_kib(p['tokens_bytes_per_device'])} KiB of tokens; the argument "
    "sizes above are those shards plus the optimizer state's, so memory_analysis is per device.",
  ]
  if data.get("timing"):
    t = data["timing"]
    lines += ["", "## Step time (8 emulated devices on 2 shared cores: indicative only)", ""]
    lines += markdown_table(
      ["case", "min ms", "median ms", "other processes (cores)"],
      ([k, f"{v['min_ms']:.1f}", f"{v['median_ms']:.1f}", v["other_processes_cores"]] for k, v in t.items()),
    )
  lines += [
    "",
    "## Target: DISAM's collective bytes and temp memory <= optax SAM's, no extra parameter-shaped all-gathers",
    "",
  ]
  lines += markdown_table(
    ["case", "collective bytes <= SAM's", "temp <= SAM's", "parameter-shaped all-gathers - SAM's", "- ERM's"],
    (
      [
        t["case"],
        t["collective_bytes_le_sam"],
        t["temp_le_sam"],
        t["extra_param_shaped_all_gathers_vs_sam"],
        t["extra_param_shaped_all_gathers_vs_erm"],
      ]
      for t in data["targets"]
    ),
  )
  if all(row["collectives"]["reduce-scatter"]["count"] == 0 for row in cases.values()):
    lines += [
      "",
      "XLA:CPU forms no reduce-scatter in any of these steps: gradients of FSDP weights are all-reduced at "
      "their 'data'-gathered shape and each device keeps its slice (ERM, SAM and DISAM alike).",
    ]
  lines += ["", verdict(cases)]
  return "\n".join(lines) + "\n"


def verdict(cases):
  """The target in words, from the numbers above."""
  sam, erm = cases["optax_sam"], cases["erm"]
  out = []
  shaped = {label: row["param_shaped_all_gathers"] for label, row in cases.items() if label.startswith("disam")}
  same = all(n == sam["param_shaped_all_gathers"] for n in shaped.values())
  out.append(
    f"Parameter-shaped all-gathers: ERM {erm['param_shaped_all_gathers']} (one per 2-D weight: its forward pass "
    f"gathers it), optax SAM {sam['param_shaped_all_gathers']} (two forward passes), DISAM "
    + ("the same as SAM in every case" if same else ", ".join(f"{k} {v}" for k, v in shaped.items()))
    + ": "
    + ("no extra parameter-shaped all-gather." if same else "EXTRA parameter-shaped all-gathers.")
  )
  d = cases.get("disam")
  if d is not None:
    extra = d["total_bytes"] - sam["total_bytes"]
    line = (
      f"Collective bytes: DISAM (rule sam) {d['total_bytes']} B against SAM's {sam['total_bytes']} B "
      f"({extra:+d} B, {100 * extra / sam['total_bytes']:+.4f} %)"
    )
    if "disam_minus_grad_norm" in cases:
      g = d["total_bytes"] - cases["disam_minus_grad_norm"]["total_bytes"]
      line += (
        f"; the logged grad_norm accounts for {g} B of it (dropping it from the output removes that many "
        "bytes of scalar all-reduces), the rest is the [M] domain-loss sum in place of SAM's scalar loss"
      )
    out.append(line + ".")
    t = d["memory"]["temp"] - sam["memory"]["temp"]
    out.append(
      f"Temp memory: DISAM (rule sam) {_kib(d['memory']['temp'])} KiB against SAM's "
      f"{_kib(sam['memory']['temp'])} KiB per device ({t / 1024:+.1f} KiB)."
    )
  return "\n\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a smaller model, no timing (smoke test)")
  parser.add_argument("--no-timing", action="store_true", help="compile and analyse only")
  parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit(f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS={_FLAG} before importing jax")
  cfg = CONFIGS["quick" if args.quick else "full"]
  labels = QUICK_CASES if args.quick else tuple(CASES)
  load0, start = load_avg(), time.perf_counter()
  data = measure(cfg, labels, time_steps=not (args.quick or args.no_timing))
  data.update(
    name="sharding",
    quick=args.quick,
    command="python -m benchmarks.sharding"
    + (" --quick" if args.quick else "")
    + (" --no-timing" if args.no_timing else ""),
    date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    machine=machine_info(),
    versions=versions(),
    load={"before": load0, "after": load_avg()},
    wall_time_s=round(time.perf_counter() - start, 1),
    param_shaped_definition=PARAM_SHAPED,
  )
  data["targets"] = targets(data["cases"])
  text = markdown(data)
  path = write_results(args.out_dir, "sharding_quick" if args.quick else "sharding", text, data)
  print(text)
  print(f"wrote {path}")
  return data


if __name__ == "__main__":
  main()
