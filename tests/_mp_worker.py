"""Worker for tests/test_distributed.py: a few DISAM steps on a fixed problem, batch sharded over all devices of
all processes. Prints the final parameters (process 0) as JSON. Reads the JAX_* variables set by the launcher."""

import json
import sys

from disam_jax.harness import distributed

distributed.initialize(distributed.DistributedConfig.from_env(initialization_timeout=30, heartbeat_timeout=10))

import jax  # noqa: E402  (after initialize, as JAX requires)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import disam_jax  # noqa: E402
from tests._steps import run_steps  # noqa: E402

M, B, D, STEPS = 4, 8, 5, 3


def main():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(M, B, D)) + np.arange(M)[:, None, None]).astype(np.float32)
  y = rng.integers(0, 3, size=(M, B)).astype(np.int32)
  params = {"w": jnp.asarray(rng.normal(size=(D, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
  mesh = distributed.data_mesh()
  local = distributed.local_batch_slice(B, mesh)
  xg, yg = distributed.global_batch(mesh, (x[:, local], y[:, local]), B)
  params = jax.device_put(params, distributed.replicated(mesh))
  tx = disam_jax.disam(optax.adam(0.05), 0.1, 0.5)

  loss = lambda q, xb, yb: disam_jax.domain_losses_from_grouped(
    optax.softmax_cross_entropy_with_integer_labels(xb @ q["w"] + q["b"], yb)
  )
  params, state = run_steps(tx, params, loss, STEPS, xg, yg)
  if distributed.is_main_process():
    out = {k: np.asarray(jax.device_get(v)).tolist() for k, v in params.items()}
    print("RESULT " + json.dumps({"params": out, "devices": jax.device_count(), "processes": jax.process_count()}))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
