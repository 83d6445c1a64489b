"""Every optax wrapper around `disam`: what the user sees, each case of docs/composition.md's table.

The checks are on what disam is given (incoming updates, `optax.MaskedNode` params), never on who calls it
(disam_jax/_wrappers.py). Where a wrapper shows in no argument, these tests pin down what happens instead (optax's or
JAX's own error, or for a chain member before disam given `None`, a step that is disam's alone), so an optax change
to any of them fails a test here rather than going unnoticed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import disam_jax

M = 3
PARAMS = {"w": jnp.arange(8.0).reshape(4, 2) / 8, "b": jnp.ones(2)}


def _losses(p):
  base = jnp.sum(p["w"] ** 2) + jnp.sum(p["b"])
  return jnp.stack([base * (i + 1) for i in range(M)])  # domain losses that differ: lam matters


def _disam():
  return disam_jax.disam(optax.sgd(0.1), 0.05, 0.5, num_domains=M)


def _step(tx, params=PARAMS):
  state = tx.init(params)
  return tx.update(None, state, params, domain_loss_fn=_losses)


WRAPPERS = {
  "chain, not first": lambda: optax.chain(optax.clip_by_global_norm(1e-3), _disam()),
  "named_chain, not first": lambda: optax.named_chain(("clip", optax.clip_by_global_norm(1e-3)), ("d", _disam())),
  "chain inside named_chain": lambda: optax.named_chain(("c", optax.chain(optax.clip(1e-3), _disam()))),
  "named_chain inside chain": lambda: optax.chain(optax.named_chain(("c", optax.clip(1e-3))), _disam()),
  "MultiSteps": lambda: optax.MultiSteps(_disam(), every_k_schedule=2),
  "apply_if_finite": lambda: optax.apply_if_finite(_disam(), 2),
  "conditionally_mask": lambda: optax.conditionally_mask(_disam(), lambda step: True),
  "conditionally_transform": lambda: optax.conditionally_transform(_disam(), lambda step: True),
  "flatten": lambda: optax.flatten(_disam()),
  "masked": lambda: optax.masked(_disam(), {"w": True, "b": False}),
  "multi_transform": lambda: optax.multi_transform({"d": _disam(), "z": optax.set_to_zero()}, {"w": "d", "b": "z"}),
  "partition": lambda: optax.partition({"d": _disam(), "z": optax.set_to_zero()}, {"w": "d", "b": "z"}),
}
_MASKED = r"optax\.masked / optax\.multi_transform / optax\.partition.*perturbation_mask"
_UPDATES = r"cannot use incoming updates: pass None.*member before disam in an optax\.chain.*inside base_tx"
# With gradients passed in, every wrapper is refused by disam itself with what to write instead.
REFUSED_WITH_GRADIENTS = {
  name: _MASKED if name in ("masked", "multi_transform", "partition") else _UPDATES for name in WRAPPERS
}
# With None passed in (as disam is called): what the user sees. A chain member before disam runs on None and acts on
# nothing (NOT refused: see test_a_chain_member_before_disam_given_none_acts_on_nothing).
WITH_NONE = {
  "MultiSteps": (ValueError, "pytree structure"),  # optax's own error: it accumulates the None "gradients"
  "apply_if_finite": (TypeError, "cond branch outputs must have the same pytree structure"),  # JAX's
  "conditionally_mask": (TypeError, "cond branch outputs must have the same pytree structure"),
  "conditionally_transform": (TypeError, "cond branch outputs must have the same pytree structure"),
  "flatten": (ValueError, "Need at least one array to concatenate"),  # jnp.concatenate of no leaves
  "masked": (ValueError, _MASKED),
  "multi_transform": (ValueError, _MASKED),
  "partition": (ValueError, _MASKED),
}
CHAINS = [name for name in WRAPPERS if "chain" in name]


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_a_wrapper_that_hands_disam_gradients_is_refused(name):
  tx = WRAPPERS[name]()
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  with pytest.raises(ValueError, match=REFUSED_WITH_GRADIENTS[name]):
    jax.jit(lambda s: tx.update(grads, s, PARAMS, domain_loss_fn=_losses))(tx.init(PARAMS))


@pytest.mark.parametrize("name", list(WITH_NONE))
def test_a_wrapper_given_none_fails_with_optaxs_or_disams_message(name):
  error, message = WITH_NONE[name]
  with pytest.raises(error, match=message):
    jax.jit(lambda: _step(WRAPPERS[name]()))()


@pytest.mark.parametrize("name", CHAINS)
def test_a_chain_member_before_disam_given_none_acts_on_nothing(name):
  """The one case no argument shows (docs/composition.md's table says so): the member before disam receives None
  and hands None on, so its clip clips nothing and the step is exactly disam's alone. Put it inside base_tx."""
  updates, _ = jax.jit(lambda: _step(WRAPPERS[name]()))()
  alone, _ = _step(_disam())
  for k in PARAMS:
    np.testing.assert_allclose(updates[k], alone[k], rtol=1e-6)
  assert float(jnp.abs(alone["w"]).max()) > 1e-3  # a clip at 1e-3 would have changed it


def test_lookahead_fails_with_optaxs_type_error():
  """optax.lookahead does not pass domain_loss_fn on: optax's own TypeError names the argument it refused."""
  tx = optax.lookahead(_disam(), sync_period=2, slow_step_size=0.5)
  params = optax.LookaheadParams.init_synced(PARAMS)
  state = tx.init(params)
  with pytest.raises(TypeError, match="unexpected keyword argument 'domain_loss_fn'"):
    tx.update(None, state, params, domain_loss_fn=_losses)


@pytest.mark.parametrize("combinator", ["chain", "named_chain"])
def test_disam_first_in_a_chain_is_followed_by_the_other_members(combinator):
  """Members after disam act on its updates: chain(disam, scale(2)) is twice disam's update."""
  if combinator == "chain":
    tx = optax.chain(_disam(), optax.scale(2.0))
  else:
    tx = optax.named_chain(("disam", _disam()), ("scale", optax.scale(2.0)))
  updates, _ = _step(tx)
  alone, _ = _step(_disam())
  for k in PARAMS:
    np.testing.assert_allclose(updates[k], 2 * alone[k], rtol=1e-6)
  assert float(jnp.abs(alone["w"]).max()) > 0
