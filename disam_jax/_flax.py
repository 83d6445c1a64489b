"""Step helpers for Flax: Linen's TrainState and NNX's Optimizer.

Both Flax APIs need a little plumbing around `disam`: Linen's `TrainState.apply_gradients` does not forward extra
keyword arguments to `tx.update`, and NNX needs the model split into parameters (what DISAM differentiates and
perturbs) and the rest (BatchNorm statistics, RNG counters), merged back inside the loss function.
"""

from typing import Any, Callable

import optax
from flax import nnx
from flax.training import train_state as linen_train_state

from disam_jax._disam import DisamState, disam, find_disam_state


def apply_disam(
    state: linen_train_state.TrainState, domain_loss_fn: Callable[[Any], Any], **extra_args
) -> tuple[linen_train_state.TrainState, DisamState]:
  """One DISAM step on a Linen `TrainState` whose `tx` contains `disam` (what `apply_gradients` cannot do).

  Args:
    state: a `flax.training.train_state.TrainState` (or subclass, e.g. with `batch_stats`).
    domain_loss_fn: `f(params) -> [M]` per-domain losses (or `DomainLosses`, or `(losses, aux)` with `has_aux`).
    **extra_args: forwarded to `tx.update`.

  Returns:
    `(new_state, disam_state)`: the state after the step (step + 1, new params and opt_state) and the
    `DisamState` with the step's metrics and, with `has_aux`, the unperturbed aux (e.g. new BatchNorm statistics
    to write back: `new_state.replace(batch_stats=disam_state.aux)`).
  """
  updates, opt_state = state.tx.update(
      None, state.opt_state, state.params, domain_loss_fn=domain_loss_fn, **extra_args
  )
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
  )
  return new_state, find_disam_state(opt_state)


def nnx_optimizer(
    model: nnx.Module,
    base_tx: optax.GradientTransformation,
    rho: Any = 0.05,
    lam: Any = 0.1,
    *,
    num_domains: int,
    wrt: Any = nnx.Param,
    **disam_kwargs,
) -> nnx.Optimizer:
  """An `nnx.Optimizer` running `disam` on `model`'s `wrt` variables, ready for `nnx_update`.

  The model's other state (BatchNorm statistics, RNG counters) travels as DISAM's aux, so the optimizer is built
  with `has_aux=True`, `aux_example` = that state and a fixed `num_domains`: NNX keeps the optimizer state's
  structure fixed.
  """
  _, _, rest = nnx.split(model, wrt, ...)
  tx = disam(
      base_tx, rho, lam, has_aux=True, aux_example=nnx.as_pure(rest), num_domains=num_domains, **disam_kwargs
  )
  return nnx.Optimizer(model, tx, wrt=wrt)


def nnx_update(
    optimizer: nnx.Optimizer, model: nnx.Module, loss_fn: Callable[[nnx.Module], Any], **extra_args
) -> DisamState:
  """One DISAM step on an NNX model, in place (call it inside `nnx.jit`).

  Args:
    optimizer: from `nnx_optimizer(model, ...)`.
    model: the module; its `optimizer.wrt` variables are updated by the step and its other state (BatchNorm
      statistics) is set to the one of the *unperturbed* forward pass — the perturbed pass's is discarded.
    loss_fn: `loss_fn(model) -> [M]` per-domain losses (or `DomainLosses`) for the current batch.
    **extra_args: forwarded to `tx.update`.

  Returns:
    The `DisamState` of the step (per-domain losses, loss, variance, norms).
  """
  graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)

  def domain_loss_fn(p):
    # copy=True: a fresh module per evaluation, so the perturbed pass cannot touch `model`'s variables.
    evaluated = nnx.merge(graphdef, p, rest, copy=True)
    losses = loss_fn(evaluated)
    _, _, new_rest = nnx.split(evaluated, optimizer.wrt, ...)
    return losses, nnx.as_pure(new_rest)

  optimizer.update(model, params, domain_loss_fn=domain_loss_fn, **extra_args)
  state = find_disam_state(nnx.as_pure(optimizer.opt_state))
  nnx.update(model, state.aux)
  return state
