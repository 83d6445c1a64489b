"""Where ViT-tiny's step time goes, JAX vs PyTorch: each layer kind's forward + backward at the step's shapes.

    python -m benchmarks.vit_ops [--rounds 7] [--out-dir benchmarks/results --name vit_ops]

The step_cost benchmark's ViT-tiny (4 domains x 32 = 128 images of 32x32x3: 65 tokens of width 192, 3 heads of 64,
MLP 768) is made of a few layer kinds. Each is timed here alone, forward and backward (the input and parameter
gradients for a fixed output cotangent: `jax.vjp` under `jax.jit` with the harness's CPU compiler options, and
`tensor.backward(cotangent)` with torch at 2 threads), JAX and PyTorch interleaved round-robin in one process.
`per step` multiplies by how many of each one forward + backward of the model runs (an ERM step; SAM and DISAM
run two), which says how much of the JAX/PyTorch gap of the whole step each layer kind explains.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

B, T, D, FF, HEADS = 128, 65, 192, 768, 3
DEPTH = 6
HEAD_DIM = D // HEADS


def _components(rng):
  """name -> (jax fn, torch fn, inputs, uses per forward pass of the model)."""
  import jax
  import torch.nn.functional as F
  from flax import nnx
  from flax.nnx.nn.attention import dot_product_attention

  r = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(np.float32)
  x, h = r(B, T, D), r(B, T, FF)
  qkv = tuple(r(B, T, HEADS, HEAD_DIM) for _ in range(3))  # Flax's layout: [batch, tokens, heads, head_dim]
  dense = lambda w, b, a: a @ w + b

  def jax_layer_norm(scale, bias, a):  # what the model runs: nnx.LayerNorm
    ln = nnx.LayerNorm(D, epsilon=1e-6, rngs=nnx.Rngs(0))
    ln.scale[...], ln.bias[...] = scale, bias
    return ln(a)

  def torch_attention(q, k, v):  # the peer's F.scaled_dot_product_attention in [batch, heads, tokens, head_dim]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

  return {
    "Linear 192->768 (fc1)": (dense, dense, (r(D, FF, scale=0.05), r(FF), x), DEPTH),
    "Linear 768->192 (fc2)": (dense, dense, (r(FF, D, scale=0.05), r(D), h), DEPTH),
    "Linear 192->192 (q, k, v, out)": (dense, dense, (r(D, D, scale=0.05), r(D), x), 4 * DEPTH),
    "GELU (tanh)": (lambda a: jax.nn.gelu(a, approximate=True), lambda a: F.gelu(a, approximate="tanh"), (h,), DEPTH),
    "LayerNorm 192": (
      jax_layer_norm,
      lambda s, b, a: F.layer_norm(a, (D,), s, b, 1e-6),
      (r(D), r(D), x),
      2 * DEPTH + 1,
    ),
    "attention core (softmax(QK^T/8) V)": (lambda q, k, v: dot_product_attention(q, k, v), torch_attention, qkv, DEPTH),
  }


def _jax_case(fn, inputs, options):
  import jax
  import jax.numpy as jnp

  args = [jnp.asarray(a) for a in inputs]
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(fn, *args).shape), jnp.float32)

  def forward_backward(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cotangent)

  compiled = jax.jit(forward_backward).lower(*args).compile(compiler_options=options)
  return lambda: jax.block_until_ready(compiled(*args))


def _torch_case(fn, inputs):
  import torch

  tensors = [torch.from_numpy(a).requires_grad_() for a in inputs]
  with torch.no_grad():
    shape = fn(*tensors).shape
  cotangent = torch.from_numpy(np.random.default_rng(1).standard_normal(tuple(shape)).astype(np.float32))

  def run():
    for t in tensors:
      t.grad = None
    fn(*tensors).backward(cotangent)

  return run


def _max_difference(jax_fn, torch_fn, inputs) -> float:
  """Largest |JAX - PyTorch| of the forward outputs on the same inputs: both time the same computation."""
  import jax.numpy as jnp
  import torch

  with torch.no_grad():
    want = torch_fn(*[torch.from_numpy(a) for a in inputs]).numpy()
  return float(np.max(np.abs(np.asarray(jax_fn(*[jnp.asarray(a) for a in inputs])) - want)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--calls", type=int, default=5, help="calls per sample")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--out-dir", default=None, help="write <name>.md and .json here")
  ap.add_argument("--name", default="vit_ops")
  args = ap.parse_args(argv)
  try:
    import torch
  except ImportError:
    sys.exit("benchmarks.vit_ops needs torch: pip install 'disam-jax[bench]'")
  torch.set_num_threads(args.threads)
  from benchmarks.step_cost.timing import load_avg, machine_line, write_results
  from disam_jax.harness.fast_conv import CPU_COMPILER_OPTIONS

  comps = _components(np.random.default_rng(0))
  differences = {name: _max_difference(jf, tf, inputs) for name, (jf, tf, inputs, _) in comps.items()}
  cases = []
  for name, (jf, tf, inputs, _) in comps.items():
    cases += [(name, "jax", _jax_case(jf, inputs, CPU_COMPILER_OPTIONS)), (name, "torch", _torch_case(tf, inputs))]
  for _, _, run in cases:
    run(), run()
  times: dict = {(n, fw): [] for n, fw, _ in cases}
  load = [load_avg()[0]]
  for r in range(args.rounds):
    for name, fw, run in cases[r % len(cases) :] + cases[: r % len(cases)]:
      t0 = time.perf_counter()
      for _ in range(args.calls):
        run()
      times[(name, fw)].append((time.perf_counter() - t0) / args.calls * 1e3)
    load.append(load_avg()[0])
  rows = []
  for name, (*_, uses) in comps.items():
    j, t = times[(name, "jax")], times[(name, "torch")]
    rows.append(
      {
        "op": name,
        "jax_median_ms": statistics.median(j),
        "torch_median_ms": statistics.median(t),
        "jax_min_ms": min(j),
        "torch_min_ms": min(t),
        "paired_ratio": statistics.median(a / b for a, b in zip(j, t)),
        "uses_per_pass": uses,
        "gap_per_pass_ms": uses * (statistics.median(j) - statistics.median(t)),
        "max_abs_difference": differences[name],
      }
    )
  from disam_jax.harness.tables import markdown_table

  lines = [
    f"# ViT-tiny layer kinds, forward + backward, JAX vs PyTorch ({machine_line()}, torch {torch.__version__} "
    f"at {args.threads} threads)",
    "",
    f"`python -m benchmarks.vit_ops --rounds {args.rounds}`: batch {B} x {T} tokens x {D}; median (min) ms "
    f"over {args.rounds} interleaved rounds of {args.calls} calls; load average per round {load}.",
    "",
  ]
  lines += markdown_table(
    [
      "op",
      "JAX ms",
      "PyTorch ms",
      "JAX / PyTorch (paired)",
      "uses per pass",
      "gap per pass (ms, median)",
      "max abs JAX - PyTorch output",
    ],
    (
      [
        row["op"],
        f"{row['jax_median_ms']:.2f} ({row['jax_min_ms']:.2f})",
        f"{row['torch_median_ms']:.2f} ({row['torch_min_ms']:.2f})",
        f"{row['paired_ratio']:.2f}",
        row["uses_per_pass"],
        f"{row['gap_per_pass_ms']:+.1f}",
        f"{row['max_abs_difference']:.1e}",
      ]
      for row in rows
    ),
  )
  markdown = "\n".join(lines) + "\n"
  print(markdown)
  data = {"rows": rows, "load": load, "rounds": args.rounds, "calls": args.calls, "threads": args.threads}
  if args.out_dir:
    write_results(args.out_dir, args.name, markdown, data)
  return data


if __name__ == "__main__":
  main()
