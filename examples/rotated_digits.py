"""ERM vs SAM vs DISAM on scikit-learn's bundled 8x8 digits rotated into six domains (no download).

Domains are rotations of 0/15/30/45/60/75 degrees (disjoint images); the 75-degree domain is held out. A Flax NNX
MLP is trained with plain optax (ERM), SAM (`disam(lam=0)`) and DISAM for the same number of steps, and the
per-domain and held-out accuracies are printed, with two times per algorithm: `compile`, the wall time of the first
step (tracing, XLA compilation and that one step), and `ms/step`, the mean wall time of the other steps (steady
state: batch sampling, dispatch and compute, up to the last step's results being ready). JAX's runtime is started
before the first algorithm, so its start-up is counted against none of them.

    python examples/rotated_digits.py [--steps 600] [--seed 0]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import disam_jax
from disam_jax.harness.data import DomainBatchSampler, load_dataset, split_dataset


class MLP(nnx.Module):
  def __init__(self, in_features: int, num_classes: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(in_features, 128, rngs=rngs)
    self.out = nnx.Linear(128, num_classes, rngs=rngs)

  def __call__(self, x):  # x: [n, 8, 8, 1]
    return self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))


def domain_losses(model, x, y):
  """x [M, b, 8, 8, 1], y [M, b] -> [M] mean cross-entropy per domain (one forward over the whole batch)."""
  m, b = y.shape
  logits = model(x.reshape((m * b,) + x.shape[2:]))
  return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).reshape(m, b).mean(axis=1)


def accuracy(model, x, y):
  return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), axis=-1) == y))


def timed_steps(step, next_batch, steps: int) -> tuple[float, float]:
  """Runs `step(*next_batch())` `steps` times; returns `(first_s, steady_s)`.

  `first_s`: seconds of the first call, to its results being ready (tracing and compilation included).
  `steady_s`: mean seconds per call over the other `steps - 1` (NaN if there are none), to the last call's results
  being ready; every step depends on the one before (the model state), so that is when all of them have run.
  """
  start = time.perf_counter()
  jax.block_until_ready(step(*next_batch()))
  first_s = time.perf_counter() - start
  if steps < 2:
    return first_s, float("nan")
  start = time.perf_counter()
  for _ in range(steps - 1):
    out = step(*next_batch())
  jax.block_until_ready(out)
  return first_s, (time.perf_counter() - start) / (steps - 1)


def train(algorithm: str, split, steps: int, seed: int, rho: float, lam: float):
  model = MLP(64, 10, nnx.Rngs(seed))
  base = optax.adam(1e-3)
  if algorithm == "erm":
    optimizer = nnx.Optimizer(model, base, wrt=nnx.Param)
  else:
    lam = 0.0 if algorithm == "sam" else lam
    optimizer = disam_jax.nnx_optimizer(model, base, rho=rho, lam=lam, num_domains=len(split.train))

  @nnx.jit
  def step(model, optimizer, x, y):
    if algorithm == "erm":
      loss, grads = nnx.value_and_grad(lambda m: domain_losses(m, x, y).mean())(model)
      optimizer.update(model, grads)
      return loss
    return disam_jax.nnx_update(optimizer, model, lambda m: domain_losses(m, x, y)).loss

  sampler = DomainBatchSampler(split.train, batch_size_per_domain=32, seed=seed)

  def next_batch():
    x, y = sampler.next()
    return model, optimizer, jnp.asarray(x), jnp.asarray(y)

  compile_s, step_s = timed_steps(step, next_batch, steps)
  train_acc = [accuracy(model, x, y) for x, y in split.val]
  held_out = np.mean([accuracy(model, x, y) for x, y in split.test])
  return train_acc, held_out, compile_s, step_s


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=600, help="training steps per algorithm")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--lam", type=float, default=0.1)
  args = parser.parse_args()
  split = split_dataset(load_dataset("rotated_digits", seed=args.seed), held_out="75", seed=args.seed)
  print(
    f"training domains {split.train_domains}, held out {split.test_domains}, {args.steps} steps, "
    f"batch 32 per domain, adam 1e-3, rho={args.rho}, lam={args.lam}"
  )
  header = " ".join(f"{d:>6}" for d in split.train_domains)
  print(
    f"{'algorithm':<9} {header}  {'held-out':>8}  {'compile':>7}  {'ms/step':>7}   "
    "(validation accuracy per training domain; compile: the first step)"
  )
  jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.zeros(())))  # start JAX's runtime outside the timings
  for algorithm in ("erm", "sam", "disam"):
    train_acc, held_out, compile_s, step_s = train(algorithm, split, args.steps, args.seed, args.rho, args.lam)
    cells = " ".join(f"{100 * a:6.1f}" for a in train_acc)
    print(f"{algorithm:<9} {cells}  {100 * held_out:8.1f}  {compile_s:6.2f}s  {1e3 * step_s:7.2f}")


if __name__ == "__main__":
  main()
