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

Each JAX kind runs in up to three configurations (config.py): out of the box, 'ynn_off' (the per-jit compiler
options of disam_jax.harness.fast_conv) and 'fast' (those options plus fast_conv's GEMM weight-gradient
convolution: what the harness runs on CPU). Plus: the domain sweep (M = 2..64 at a fixed total batch), compile
times, XLA's compiled memory analysis and FLOP counts with the achieved GFLOP/s against this CPU's peak,
multi-device runs (pmap and sharded jit on 1-8 host CPU devices, in a subprocess that sets XLA_FLAGS before
importing jax), and XLA flags tried on the convnets (in subprocesses). Every step is jitted with donated params /
optimizer state / model state and ends in `jax.block_until_ready`.

The package, by what it measures: config.py (models, cases, configurations, targets), timing.py (shared timing
helpers: machine, load, interleaved rounds, ratios, CPU peak), cases.py (the JAX problem and steps), torch_side.py
(the PyTorch peers), step_time.py (step cost, ratios, memory), domains.py (domain scaling), multidevice.py,
flags.py, worker.py (subprocess sections), report.py (targets, Markdown), cli.py (the one-command run).

Threads: XLA:CPU is measured as is: its intra-op pool is sized to the machine's cores (2 here) and no XLA flag
is set in the main process; PyTorch gets torch.set_num_threads(2). Both run in this one process, one at a time.
"""

from benchmarks.step_cost.cases import JaxCase, build_jax_model, make_batch, make_jax_step
from benchmarks.step_cost.cli import main, parse_args
from benchmarks.step_cost.config import JAX_CASES, MODELS, TORCH_CASES, XLA_CONFIGS
from benchmarks.step_cost.timing import load_avg, time_round_robin
from benchmarks.step_cost.torch_side import TorchCase

__all__ = [
  "JaxCase",
  "TorchCase",
  "build_jax_model",
  "make_batch",
  "make_jax_step",
  "main",
  "parse_args",
  "JAX_CASES",
  "MODELS",
  "TORCH_CASES",
  "XLA_CONFIGS",
  "load_avg",
  "time_round_robin",
]
