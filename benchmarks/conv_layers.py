"""One convolution's forward and backward pass, layer by layer: XLA's gradients, fast_conv's, PyTorch's.

    python -m benchmarks.conv_layers              # ~5 min on 2 cores: results/fast_conv_layers.md
    python -m benchmarks.conv_layers --quick      # seconds: two tiny layers, for the smoke test

For each layer shape of the DomainBed MNIST CNN and of the CIFAR-stem ResNet-18 (batch 128, NHWC, float32), the
time of `grad(sum(conv(x, w)^2))` with respect to `x` and `w` (forward, input gradient, weight gradient), all with
`fast_conv.compiler_options()` (YNNPACK off), in four JAX forms:

* `xla`: `lax.conv_general_dilated`'s own gradients;
* `xla_cond`: the same inside a `lax.cond` branch (as `disam(..., perturb_every=k)` runs its perturbed pass);
* `fast`, `fast_cond`: `disam_jax.harness.fast_conv.conv_general_dilated`, plain and inside the cond;

and PyTorch's `Conv2d` forward plus `autograd.grad` for both (channels-first, `torch.set_num_threads(2)`, when
torch is installed: `pip install 'disam_jax[bench]'`). The cases of one layer are timed round-robin in one
process (step_cost's `time_round_robin`); min and median ms, and GFLOP/s of the 3 convolutions' work.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.step_cost import timing
from disam_jax.harness import fast_conv
from disam_jax.harness.tables import markdown_table

# (name, H=W, Cin, Cout, kernel, stride): every distinct layer of the two harness convnets at batch 128
LAYERS = (
  ("cnn.conv1", 28, 1, 64, 3, 1),
  ("cnn.conv2", 28, 64, 128, 3, 2),
  ("cnn.conv3/4", 14, 128, 128, 3, 1),
  ("r18.stem", 32, 3, 64, 3, 1),
  ("r18.layer1", 32, 64, 64, 3, 1),
  ("r18.layer2.down3x3", 32, 64, 128, 3, 2),
  ("r18.layer2.down1x1", 32, 64, 128, 1, 2),
  ("r18.layer2", 16, 128, 128, 3, 1),
  ("r18.layer3", 8, 256, 256, 3, 1),
  ("r18.layer4", 4, 512, 512, 3, 1),
)
QUICK_LAYERS = (("tiny.s1", 8, 4, 8, 3, 1), ("tiny.s2", 8, 4, 8, 3, 2))
_DN = ("NHWC", "HWIO", "NHWC")


class _JaxCase:
  framework = "jax"

  def __init__(self, label, conv, under_cond, x, w, stride, pad):
    self.label, self.times = label, []
    loss = lambda x, w: (conv(x, w, (stride, stride), pad, dimension_numbers=_DN) ** 2).sum()
    grad = jax.grad(loss, argnums=(0, 1))
    if under_cond:
      grad = lambda x, w, g=grad: lax.cond(x[0, 0, 0, 0] > -1e30, g, lambda x, w: (x, w), x, w)
    self._fn = jax.jit(grad, compiler_options=fast_conv.compiler_options())
    self._args, self._out = (x, w), None

  def run(self, steps):
    for _ in range(steps):
      self._out = self._fn(*self._args)
    jax.block_until_ready(self._out)

  def final_loss(self):
    return float(jnp.abs(self._out[1]).sum())


class _TorchCase:
  framework = "torch"

  def __init__(self, label, torch, x, w, stride, pad):
    self.label, self.times, self._torch = label, [], torch
    self._x = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).requires_grad_()
    self._w = torch.from_numpy(np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))).requires_grad_()
    self._stride, self._pad, self._out = stride, pad[0][0], None

  def run(self, steps):
    f = self._torch.nn.functional.conv2d
    for _ in range(steps):
      y = f(self._x, self._w, stride=self._stride, padding=self._pad)
      self._out = self._torch.autograd.grad((y**2).sum(), (self._x, self._w))

  def final_loss(self):
    return float(self._out[1].abs().sum())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=None, help="default 128 (quick: 4)")
  parser.add_argument("--min-sample-s", type=float, default=None)
  parser.add_argument("--repeats", type=int, default=None, help="rounds per layer (default 3; quick 1)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--name", default=None, help="results file stem (default fast_conv_layers[_quick])")
  args = parser.parse_args(argv)
  batch = args.batch or (4 if args.quick else 128)
  repeats = args.repeats or (1 if args.quick else 3)
  min_sample_s = args.min_sample_s if args.min_sample_s is not None else (0.0 if args.quick else 0.3)
  torch = None
  if not args.no_torch:
    try:
      import torch

      torch.set_num_threads(2)
    except ImportError:
      print("torch not installed (pip install 'disam_jax[bench]'): PyTorch column skipped")
  started, t0, load_before = datetime.datetime.now(datetime.timezone.utc), time.perf_counter(), timing.load_avg()
  rows, load_samples = [], []
  for name, size, cin, cout, k, stride in QUICK_LAYERS if args.quick else LAYERS:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = (rng.standard_normal((k, k, cin, cout), dtype=np.float32) / np.sqrt(k * k * cin)).astype(np.float32)
    pad = ((k // 2, k // 2),) * 2
    cases = [
      _JaxCase(label, conv, cond, jnp.asarray(x), jnp.asarray(w), stride, pad)
      for label, conv, cond in (
        ("xla", lax.conv_general_dilated, False),
        ("xla_cond", lax.conv_general_dilated, True),
        ("fast", fast_conv.conv_general_dilated, False),
        ("fast_cond", fast_conv.conv_general_dilated, True),
      )
    ]
    if torch is not None:
      cases.append(_TorchCase("torch", torch, x, w, stride, pad))
    out = timing.time_round_robin(
      cases, repeats=repeats, min_sample_s=min_sample_s, budget_s=None, load_samples=load_samples, log=print
    )
    ho = (size + 2 * (k // 2) - k) // stride + 1
    gflop = 3 * 2 * batch * ho * ho * k * k * cin * cout / 1e9  # forward, input gradient, weight gradient
    rows.append(
      {"layer": name, "shape": [batch, size, size, cin, cout, k, stride], "gflop": round(gflop, 3), "cases": out}
    )
    print(name, {c: out[c]["min_ms"] for c in out}, flush=True)
  results = {
    "date": started.isoformat(timespec="seconds"),
    "wall_s": round(time.perf_counter() - t0, 1),
    "machine": timing.machine_info(),
    "versions": timing.versions(torch),
    "load_before": load_before,
    "load_after": timing.load_avg(),
    "load_per_round": [min(load_samples), max(load_samples)] if load_samples else None,
    "batch": batch,
    "repeats": repeats,
    "rows": rows,
  }
  stem = args.name or ("fast_conv_layers_quick" if args.quick else "fast_conv_layers")
  path = timing.write_results(args.out_dir, stem, _markdown(results, argv), results)
  print(f"wrote {path.with_suffix('.json')} and .md")
  return results


def _markdown(r, argv) -> str:
  labels = ["xla", "xla_cond", "fast", "fast_cond"] + (
    ["torch"] if any("torch" in row["cases"] for row in r["rows"]) else []
  )
  lines = [
    "# One convolution's forward + backward pass: XLA's gradients, fast_conv's, PyTorch's",
    "",
    f"- Date: {r['date']}; command: `python -m benchmarks.conv_layers {' '.join(argv or [])}`; "
    f"wall time {r['wall_s']:.0f} s",
    f"- Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; versions {r['versions']}",
    f"- Load average (1 min) before {r['load_before']}, after {r['load_after']}, per round min/max "
    f"{r['load_per_round']}",
    f"- Batch {r['batch']}, NHWC float32, {r['repeats']} interleaved rounds per layer; the work is grad of "
    "sum(conv(x, w)^2) with respect to x and w. JAX with `fast_conv.compiler_options()` (YNNPACK off); `*_cond`: "
    "the same gradient inside a `lax.cond` branch. PyTorch: `conv2d` + `autograd.grad`, 2 threads.",
    "- Cells: min ms (GFLOP/s of the forward, input-gradient and weight-gradient convolutions' work).",
    "",
  ]
  rows = []
  for row in r["rows"]:
    c = row["cases"]
    cells = [f"{c[l]['min_ms']:.1f} ({row['gflop'] / c[l]['min_ms'] * 1e3:.0f})" if l in c else "-" for l in labels]
    vs = f"{c['fast']['min_ms'] / c['torch']['min_ms']:.2f}" if "torch" in c else "-"
    rows.append([row["layer"], ", ".join(map(str, row["shape"])), *cells, vs])
  lines += markdown_table(["layer", "N, H=W, Cin, Cout, k, stride", *labels, "fast / torch"], rows)
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
