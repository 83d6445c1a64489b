"""Every optax wrapper around `disam`: each either works, or is refused with what to write instead.

The refusals find the wrapper on the call stack by optax's module and function names (disam_jax/_wrappers.py):
these tests build each wrapper for real, so an optax upgrade that moves one makes its test fail instead of letting
the wrapper's work be dropped silently.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import disam_jax

M = 3
PARAMS = {'w': jnp.arange(8.0).reshape(4, 2) / 8, 'b': jnp.ones(2)}


def _losses(p):
  base = jnp.sum(p['w'] ** 2) + jnp.sum(p['b'])
  return jnp.stack([base * (i + 1) for i in range(M)])  # domain losses that differ: lam matters


def _disam():
  return disam_jax.disam(optax.sgd(0.1), 0.05, 0.5, num_domains=M)


def _step(tx, params=PARAMS):
  state = tx.init(params)
  return tx.update(None, state, params, domain_loss_fn=_losses)


REFUSED = {
    'chain, not first': (lambda: optax.chain(optax.clip_by_global_norm(1e-3), _disam()),
                         r'not the first member of this optax\.chain'),
    'named_chain, not first': (lambda: optax.named_chain(('clip', optax.clip_by_global_norm(1e-3)), ('d', _disam())),
                               r'not the first member of this optax\.named_chain'),
    'chain inside named_chain': (lambda: optax.named_chain(('c', optax.chain(optax.clip(1.0), _disam()))),
                                 r'not the first member of this optax\.chain'),
    'named_chain inside chain': (lambda: optax.chain(optax.named_chain(('c', optax.clip(1.0))), _disam()),
                                 r'not the first member of this optax\.chain'),
    'MultiSteps': (lambda: optax.MultiSteps(_disam(), every_k_schedule=2), 'MultiSteps.*accumulate_domain_losses'),
    'apply_if_finite': (lambda: optax.apply_if_finite(_disam(), 2), r'apply_if_finite.*inside base_tx'),
    'conditionally_mask': (lambda: optax.conditionally_mask(_disam(), lambda step: True),
                           r'conditionally_mask.*inside base_tx'),
    'conditionally_transform': (lambda: optax.conditionally_transform(_disam(), lambda step: True),
                                r'conditionally_transform.*inside base_tx'),
    'flatten': (lambda: optax.flatten(_disam()), r'optax\.flatten.*disam\(optax\.flatten\(optax\.adam'),
    'masked': (lambda: optax.masked(_disam(), {'w': True, 'b': False}), 'perturbation_mask'),
    'multi_transform': (lambda: optax.multi_transform({'d': _disam(), 'z': optax.set_to_zero()}, {'w': 'd', 'b': 'z'}),
                        'perturbation_mask'),
    'partition': (lambda: optax.partition({'d': _disam(), 'z': optax.set_to_zero()}, {'w': 'd', 'b': 'z'}),
                  r'optax\.partition.*perturbation_mask'),
}


@pytest.mark.parametrize('name', list(REFUSED))
def test_a_wrapper_that_would_drop_disams_work_is_refused(name):
  make, message = REFUSED[name]
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda: _step(make()))()


def test_lookahead_is_refused_at_init():
  """optax.lookahead does not pass domain_loss_fn on; refused when it initializes disam (before optax's TypeError)."""
  tx = optax.lookahead(_disam(), sync_period=2, slow_step_size=0.5)
  with pytest.raises(ValueError, match=r'optax\.lookahead: lookahead does not pass domain_loss_fn'):
    tx.init(optax.LookaheadParams.init_synced(PARAMS))


@pytest.mark.parametrize('combinator', ['chain', 'named_chain'])
def test_disam_first_in_a_chain_is_followed_by_the_other_members(combinator):
  """Members after disam act on its updates: chain(disam, scale(2)) is twice disam's update."""
  if combinator == 'chain':
    tx = optax.chain(_disam(), optax.scale(2.0))
  else:
    tx = optax.named_chain(('disam', _disam()), ('scale', optax.scale(2.0)))
  updates, _ = _step(tx)
  alone, _ = _step(_disam())
  for k in PARAMS:
    np.testing.assert_allclose(updates[k], 2 * alone[k], rtol=1e-6)
  assert float(jnp.abs(alone['w']).max()) > 0
