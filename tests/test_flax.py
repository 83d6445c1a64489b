"""Tests of the Flax step helpers: Linen TrainState (apply_disam) and NNX (nnx_optimizer / nnx_update)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx
from flax.training import train_state

import disam_jax
from tests import _reference as ref
from tests.test_disam import NUM_CLASSES, M, B, D, assert_tree_close, make_problem


def test_linen_train_state_step_matches_numpy_reference():
  x, y, params_np = make_problem(40)
  model = linen.Dense(NUM_CLASSES)
  params = {'kernel': jnp.asarray(params_np['w'], jnp.float32), 'bias': jnp.asarray(params_np['b'], jnp.float32)}
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=disam_jax.disam(optax.sgd(0.1, momentum=0.9), 0.1, 0.3))

  @jax.jit
  def step(state):
    def f(p):
      logits = state.apply_fn({'params': p}, jnp.asarray(x, jnp.float32))
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(axis=1)
    return disam_jax.apply_disam(state, f)

  opt = ref.SGDMomentumWithDecay(0.1, 0.9, 0.0)
  expected = params_np
  for _ in range(3):
    state, metrics = step(state)
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, 0.1, 0.3)
    expected = opt.step(expected, g)
  assert int(state.step) == 3 and int(metrics.count) == 3
  assert_tree_close({'w': state.params['kernel'], 'b': state.params['bias']}, expected, atol=2e-5)


class _BNNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(D, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(8, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.dense(x))))


def test_nnx_step_keeps_batchnorm_statistics_of_the_unperturbed_pass():
  x, y, _ = make_problem(41)
  xf, yf = jnp.asarray(x.reshape(M * B, D), jnp.float32), jnp.asarray(y.reshape(M * B))
  model = _BNNet(nnx.Rngs(0))
  kernel, bias = np.asarray(model.dense.kernel[...]), np.asarray(model.dense.bias[...])
  optimizer = disam_jax.nnx_optimizer(model, optax.sgd(0.5), rho=0.5, lam=0.3, num_domains=M)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      losses = optax.softmax_cross_entropy_with_integer_labels(m(xf), yf)
      return losses.reshape(M, B).mean(axis=1)
    return disam_jax.nnx_update(optimizer, model, loss_fn)

  state = step(model, optimizer)
  # Independent reference: running stats after one update, from the unperturbed dense layer in NumPy.
  h = x.reshape(M * B, D) @ kernel + bias
  np.testing.assert_allclose(model.bn.mean[...], 0.1 * h.mean(axis=0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], 0.9 + 0.1 * h.var(axis=0), rtol=1e-4)
  # The parameters moved (rho is large, so the perturbed pass would give visibly different statistics).
  assert np.abs(np.asarray(model.dense.kernel[...]) - kernel).max() > 1e-3
  assert state.domain_losses.shape == (M,) and int(state.count) == 1
  state = step(model, optimizer)  # a second step runs with the same state structure
  assert int(state.count) == 2
