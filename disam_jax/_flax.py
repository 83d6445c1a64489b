"""Step helpers for Flax: Linen's TrainState and NNX's Optimizer.

Both Flax APIs need a little plumbing around `disam`: Linen's `TrainState.apply_gradients` does not forward extra
keyword arguments to `tx.update`, and NNX needs the model split into parameters (what DISAM differentiates and
perturbs) and the rest (BatchNorm statistics, RNG counters), merged back inside the loss function.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.training import train_state as linen_train_state

from disam_jax._disam import DisamState, disam, find_disam_state
from disam_jax._domain_losses import DomainLosses


def apply_disam(
  state: linen_train_state.TrainState, domain_loss_fn: Callable[[optax.Params], Any], **extra_args
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
  # pyrefly: ignore  # optax's TransformUpdateFn type has neither `None` updates nor `domain_loss_fn`
  updates, opt_state = state.tx.update(None, state.opt_state, state.params, domain_loss_fn=domain_loss_fn, **extra_args)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  return new_state, find_disam_state(opt_state)


def nnx_optimizer(
  model: nnx.Module,
  base_tx: optax.GradientTransformation,
  rho: optax.ScalarOrSchedule = 0.05,
  lam: optax.ScalarOrSchedule = 0.1,
  *,
  num_domains: int | None = None,
  wrt: Any = nnx.Param,
  **disam_kwargs,
) -> nnx.Optimizer:
  """An `nnx.Optimizer` running `disam` on `model`'s `wrt` variables, ready for `nnx_update`.

  The model's other state (BatchNorm statistics, RNG counters) travels as DISAM's aux, so the optimizer is built
  with `has_aux=True` and `aux_example` = that state: NNX keeps the optimizer state's structure fixed.
  `num_domains` is optional, as for `disam`: without it the state's `[M]` fields (`domain_losses`, ...) are None.
  """
  _, _, rest = nnx.split(model, wrt, ...)
  tx = disam(base_tx, rho, lam, has_aux=True, aux_example=nnx.as_pure(rest), num_domains=num_domains, **disam_kwargs)
  return nnx.Optimizer(model, tx, wrt=wrt)


def nnx_update(
  optimizer: nnx.Optimizer,
  model: nnx.Module,
  loss_fn: Callable[[nnx.Module], Any],
  *,
  has_aux: bool = False,
  **extra_args,
) -> DisamState | tuple[DisamState, Any]:
  """One DISAM step on an NNX model, in place (call it inside `nnx.jit`).

  Example, with the logits of the unperturbed forward pass for accuracy (no third forward pass)::

    >>> import jax, jax.numpy as jnp, optax, disam_jax
    >>> from flax import nnx
    >>> m, b = 2, 4
    >>> x, y = jax.random.normal(jax.random.key(0), (m * b, 3)), jnp.zeros(m * b, jnp.int32)
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = disam_jax.nnx_optimizer(model, optax.sgd(0.1), num_domains=m)
    >>> def loss_fn(model):
    ...   logits = model(x)                                          # [M*b, classes]
    ...   losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    ...   return disam_jax.domain_losses_from_grouped(losses.reshape(m, b)), logits
    >>> step = nnx.jit(lambda model, optimizer: disam_jax.nnx_update(optimizer, model, loss_fn, has_aux=True))
    >>> state, logits = step(model, optimizer)
    >>> print(logits.shape, state.domain_losses.shape, int(state.count))
    (8, 2) (2,) 1

  Args:
    optimizer: from `nnx_optimizer(model, ...)`.
    model: the module; its `optimizer.wrt` variables are updated by the step and its other state (BatchNorm
      statistics) is set to the one of the *unperturbed* forward pass — the perturbed pass's is discarded.
    loss_fn: `loss_fn(model) -> [M]` per-domain losses (or `DomainLosses`) for the current batch; with `has_aux`,
      `loss_fn(model) -> (losses, aux)`, `aux` any pytree of arrays (logits, metrics).
    has_aux: whether `loss_fn` returns `(losses, aux)`, as in `jax.value_and_grad`.
    **extra_args: forwarded to `tx.update`.

  Returns:
    The `DisamState` of the step (per-domain losses, loss, variance, norms); with `has_aux`, `(DisamState, aux)`
    with `aux` from the *unperturbed* pass (the perturbed pass's is discarded). The aux is not kept in the
    optimizer state: `DisamState.aux` holds the model's non-`wrt` state only, so the state's structure is fixed.
  """
  graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)

  def domain_loss_fn(p):
    # copy=True: a fresh module per evaluation, so the perturbed pass cannot touch `model`'s variables.
    evaluated = nnx.merge(graphdef, p, rest, copy=True)
    losses, user_aux = _split_user_output(loss_fn(evaluated), has_aux)
    _, _, new_rest = nnx.split(evaluated, optimizer.wrt, ...)
    model_state = nnx.as_pure(new_rest)
    return losses, ((model_state, user_aux) if has_aux else model_state)

  # nnx.Optimizer.update takes a gradient argument and hands it to tx.update; DISAM computes both gradients from
  # domain_loss_fn and refuses incoming updates, so the tx is wrapped to pass None. With has_aux, the user's part of
  # DISAM's unperturbed aux is also taken out before the optimizer stores the state (nnx.Optimizer keeps its
  # state's structure fixed). Both calls run in this trace, so no tracer escapes.
  tx, user_aux = optimizer.tx, []

  def update_from_domain_loss_fn(updates, opt_state, p, **kwargs):
    del updates  # the params passed as nnx's gradient argument below
    updates, new_opt_state = tx.update(None, opt_state, p, **kwargs)  # pyrefly: ignore[bad-argument-type]
    if has_aux:
      model_state, aux = find_disam_state(new_opt_state).aux
      user_aux.append(aux)
      new_opt_state = _replace_disam_state(new_opt_state, lambda s: s._replace(aux=model_state))
    return updates, new_opt_state

  optimizer.tx = optax.GradientTransformationExtraArgs(tx.init, update_from_domain_loss_fn)  # pyrefly: ignore
  try:
    optimizer.update(model, params, domain_loss_fn=domain_loss_fn, **extra_args)
  finally:
    optimizer.tx = tx
  if not has_aux:
    state = find_disam_state(nnx.as_pure(optimizer.opt_state))
    nnx.update(model, state.aux)
    return state
  state = find_disam_state(nnx.as_pure(optimizer.opt_state))
  nnx.update(model, state.aux)
  return state, user_aux[0]


def _split_user_output(out: Any, has_aux: bool) -> tuple[Any, Any]:
  """(losses, aux) from what an NNX `loss_fn` returned, refusing a tuple that `has_aux` does not announce."""
  is_pair = isinstance(out, tuple) and not isinstance(out, DomainLosses) and len(out) == 2
  if has_aux and not is_pair:
    raise ValueError(f"nnx_update(..., has_aux=True) needs loss_fn to return (losses, aux); got {type(out).__name__}.")
  if not has_aux and isinstance(out, tuple) and not isinstance(out, DomainLosses):
    raise ValueError(
      "loss_fn returned a tuple: if it is (losses, aux), call nnx_update(optimizer, model, loss_fn, "
      "has_aux=True), which returns (DisamState, aux)."
    )
  return out if has_aux else (out, None)


def _replace_disam_state(opt_state: optax.OptState, fn: Callable[[DisamState], DisamState]) -> optax.OptState:
  """`opt_state` with its (single) `DisamState` replaced by `fn(DisamState)`."""
  is_disam = lambda x: isinstance(x, DisamState)
  return jax.tree.map(lambda s: fn(s) if is_disam(s) else s, opt_state, is_leaf=is_disam)
