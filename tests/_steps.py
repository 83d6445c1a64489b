"""The jitted DISAM step loop the tests share: `tx.update(..., domain_loss_fn=...)` then `optax.apply_updates`."""

import jax
import optax


def disam_step(tx, loss):
  """``step(params, state, *batch) -> (params, state)``, not jitted: one update of `tx` (a DISAM transformation, or
  any chain containing one) with ``domain_loss_fn=lambda q: loss(q, *batch)``, applied to the params.

  `loss(params, *batch)` returns the per-domain losses (``[M]`` or a ``DomainLosses``). Wrap the step in
  ``jax.jit``, ``jax.pmap``, ``shard_map`` or ``lax.scan`` as the test needs.
  """

  def step(params, state, *batch):
    updates, state = tx.update(None, state, params, domain_loss_fn=lambda q: loss(q, *batch))
    return optax.apply_updates(params, updates), state

  return step


def run_steps(tx, params, loss, steps, *batch, state=None, jit=jax.jit, trajectory=None):
  """`steps` jitted steps of `tx` on the same `batch` (`disam_step`), from ``tx.init(params)`` or `state`.

  Returns ``(params, state)`` after the last step; the params after each step are appended to `trajectory` if given.
  """
  step = jit(disam_step(tx, loss))
  state = tx.init(params) if state is None else state
  for _ in range(steps):
    params, state = step(params, state, *batch)
    if trajectory is not None:
      trajectory.append(params)
  return params, state
