"""Refusing the optax wrappers whose work DISAM would silently drop.

DISAM computes both of its gradients from `domain_loss_fn` and takes no incoming updates. A wrapper that hands it
updates (a chain member before it), params of another shape (flatten, lookahead), a subset of the params (masked,
multi_transform, partition), or that must produce updates without calling it (apply_if_finite & co.) cannot be
honoured: DISAM refuses it at init / trace time, saying what to write instead.

optax passes no trace of who called a transformation, so the callers are found on the Python call stack by their
module and function names (`_CALLERS`). Those names are optax's private layout: tests/test_wrappers.py builds every
wrapper around `disam` and fails if an optax upgrade moves one, so a refusal cannot silently stop happening. Where
the arguments alone suffice (a masked subset of the params, incoming updates) the check is on the arguments.
"""

import sys
from typing import Any, Callable, Optional

import jax
import optax

WHERE_TO = (
    'Put gradient transformations (clipping, weight decay, apply_if_finite, masking of the update, ...) inside '
    'base_tx, where they act on the sharpness-aware gradient: disam(optax.chain(optax.clip_by_global_norm(1.0), '
    'optax.sgd(lr)), rho, lam). For gradient accumulation, evaluate the micro-batches inside domain_loss_fn with '
    'disam_jax.accumulate_domain_losses (not optax.MultiSteps).'
)

_MULTI_STEPS = (
    'disam cannot run inside optax.MultiSteps: MultiSteps would hand it the averaged gradients of the micro-batches, '
    'which DISAM cannot use (it recomputes both gradients), and step on the last micro-batch only. Evaluate all '
    'micro-batches inside domain_loss_fn instead, with disam_jax.accumulate_domain_losses: both DISAM gradients then '
    'see the whole batch.'
)
_CONDITIONAL = (
    'disam cannot be wrapped by optax.apply_if_finite / conditionally_transform / conditionally_mask: the wrapper '
    'inspects the incoming updates, which DISAM does not use, and must produce updates without calling it. Put the '
    'wrapper inside base_tx, e.g. disam(optax.apply_if_finite(optax.sgd(lr), max_consecutive_errors=5), rho, lam): '
    'it then sees the sharpness-aware gradient.'
)
_FLATTEN = (
    'disam cannot run inside optax.flatten: flatten hands it one concatenated vector instead of the params that '
    'domain_loss_fn takes. Flatten inside base_tx instead: disam(optax.flatten(optax.adam(lr)), rho, lam).'
)
_LOOKAHEAD = (
    'disam cannot run inside optax.lookahead: lookahead does not pass domain_loss_fn (or any other extra argument) '
    'on to the optimizer it wraps, so disam could never be given its losses. Lookahead over DISAM is not '
    'supported; use disam(base_tx, rho, lam) on the params, with any gradient transformation inside base_tx.'
)
_NOT_FIRST = (
    'disam is not the first member of this optax.{}: the members before it would act on updates that disam does '
    'not use (it recomputes both gradients from domain_loss_fn), so their work would be dropped. ' + WHERE_TO +
    ' Members after disam act on its updates as usual.'
)
MASKED = (
    'disam cannot run inside optax.masked / optax.multi_transform / optax.partition: domain_loss_fn must see all '
    'the params, and these hand disam only a subset. To perturb a subset, use disam(..., perturbation_mask=mask); '
    'to update a subset, put the mask inside base_tx: disam(optax.multi_transform({"train": optax.sgd(lr), '
    '"freeze": optax.set_to_zero()}, labels), ...).'
)

# (optax module, function) of every wrapper refused by where it calls from; `None` matches any function.
_CALLERS = {
    ('optax.transforms._accumulation', None): _MULTI_STEPS,
    ('optax.transforms._conditionality', None): _CONDITIONAL,
    ('optax.transforms._layouts', None): _FLATTEN,
    ('optax._src.lookahead', None): _LOOKAHEAD,
}
_COMBINING = 'optax.transforms._combining'
_STACK_DEPTH = 64


def refuse_enclosing_wrapper(fn: Callable) -> None:
  """Raises ValueError if `fn` (disam's init or update) is being called by a wrapper that would drop its work.

  Walks up the stack from the caller of `fn`'s caller until the first optax combinator that holds `fn`: `chain`
  and `named_chain` are fine when `fn` is their first member (and the walk stops there: an enclosing chain's other
  members act on disam's output); the wrappers of `_CALLERS` are refused wherever they are.
  """
  frame = sys._getframe(2)
  for _ in range(_STACK_DEPTH):
    if frame is None:
      return
    module, name = frame.f_globals.get('__name__', ''), frame.f_code.co_name
    message = _CALLERS.get((module, name)) or _CALLERS.get((module, None))
    if message is not None:
      raise ValueError(message)
    if module == _COMBINING:
      first = _first_member(frame.f_locals, fn)
      if first is not None:
        if not first:
          raise ValueError(_NOT_FIRST.format('named_chain' if 'transforms' in frame.f_locals else 'chain'))
        return
    frame = frame.f_back


def _first_member(local_vars: dict, fn: Callable) -> Optional[bool]:
  """In a chain's / named_chain's update or init frame that is calling `fn`: whether `fn` is its first member.
  None when the frame is not calling `fn` (another member, or another combinator)."""
  if local_vars.get('fn') is fn and local_vars.get('update_fns'):  # chain's update
    return local_vars['update_fns'][0] is fn
  if local_vars.get('fn') is fn and local_vars.get('init_fns'):  # chain's init
    return local_vars['init_fns'][0] is fn
  tx = local_vars.get('tx')
  members = local_vars.get('transforms')
  if members and tx is not None and fn in (getattr(tx, 'update', None), getattr(tx, 'init', None)):
    first = members[0][1]
    return fn in (first.update, first.init)
  return None


def check_params(params: Any) -> None:
  """Refuses the params of optax.masked / multi_transform / partition (MaskedNode leaves: a subset of them)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
    raise ValueError(MASKED)
