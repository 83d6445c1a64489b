"""Refusing the optax compositions whose work DISAM would drop, from what disam is given (never from who calls it).

DISAM computes both of its gradients from `domain_loss_fn` and takes no incoming updates. Two things a wrapper does
to disam show in the arguments of its `init` / `update`, and both are refused, saying what to write instead:

* it hands disam updates (a member before disam in an `optax.chain` given gradients, `optax.MultiSteps`,
  `apply_if_finite`, `conditionally_transform` / `conditionally_mask` or `flatten` around it, given gradients):
  `check_updates`;
* it hands disam a subset of the params (`optax.masked`, `multi_transform`, `partition`: `optax.MaskedNode`
  leaves, a public optax type): `check_params`.

What shows in no argument is not checked: optax passes no trace of who called a transformation, and finding the
caller on the Python stack by optax's private module names broke with every optax refactor. So, with `None` as the
updates (as disam is called): a member before disam in a chain receives `None` and acts on nothing (a
`clip_by_global_norm` there clips nothing; the step is disam's alone); `MultiSteps`, `apply_if_finite`,
`conditionally_*` and `flatten` around disam fail inside optax / JAX with their own message (a pytree structure
error, a `lax.cond` branch mismatch, an empty concatenate); `lookahead` does not pass `domain_loss_fn` on and fails
with optax's TypeError. docs/composition.md's table lists each case; tests/test_wrappers.py checks what the user
sees, so an optax change to any of them fails a test.
"""

import jax
import optax

WHERE_TO = (
  "Put gradient transformations (clipping, weight decay, apply_if_finite, masking of the update, ...) inside "
  "base_tx, where they act on the sharpness-aware gradient: disam(optax.chain(optax.clip_by_global_norm(1.0), "
  "optax.sgd(lr)), rho, lam). For gradient accumulation, evaluate the micro-batches inside domain_loss_fn with "
  "disam_jax.accumulate_domain_losses (not optax.MultiSteps)."
)
MASKED = (
  "disam cannot run inside optax.masked / optax.multi_transform / optax.partition: domain_loss_fn must see all "
  "the params, and these hand disam only a subset. To perturb a subset, use disam(..., perturbation_mask=mask); "
  'to update a subset, put the mask inside base_tx: disam(optax.multi_transform({"train": optax.sgd(lr), '
  '"freeze": optax.set_to_zero()}, labels), ...).'
)
UPDATES = (
  "disam computes both of its gradients from domain_loss_fn, so it cannot use incoming updates: pass None as the "
  "first argument of update (tx.update(None, state, params, domain_loss_fn=f)). A wrapper that hands disam "
  "gradients is refused here too: a member before disam in an optax.chain (members after it act on its updates "
  "as usual), or optax.MultiSteps / apply_if_finite / conditionally_transform / flatten around it. " + WHERE_TO
)


def check_params(params: optax.Params) -> None:
  """Refuses the params of optax.masked / multi_transform / partition (MaskedNode leaves: a subset of them)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
    raise ValueError(MASKED)


def check_updates(updates: optax.Updates | None) -> None:
  """Refuses incoming updates (any array leaf): disam would not use them, so whatever produced them is dropped."""
  if jax.tree.leaves(updates):
    raise ValueError(UPDATES)
