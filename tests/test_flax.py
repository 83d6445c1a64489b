"""Tests of the Flax step helpers: Linen TrainState (apply_disam) and NNX (nnx_optimizer / nnx_update)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state

import disam_jax
from tests import _reference as ref
from tests.test_disam import NUM_CLASSES, B, D, M, assert_tree_close, make_problem


def test_linen_train_state_step_matches_numpy_reference():
  x, y, params_np = make_problem(40)
  model = linen.Dense(NUM_CLASSES)
  params = {"kernel": jnp.asarray(params_np["w"], jnp.float32), "bias": jnp.asarray(params_np["b"], jnp.float32)}
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=disam_jax.disam(optax.sgd(0.1, momentum=0.9), 0.1, 0.3)
  )

  @jax.jit
  def step(state):
    def f(p):
      logits = state.apply_fn({"params": p}, jnp.asarray(x, jnp.float32))
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(axis=1)

    return disam_jax.apply_disam(state, f)

  opt = ref.SGDMomentumWithDecay(0.1, 0.9, 0.0)
  expected = params_np
  for _ in range(3):
    state, metrics = step(state)
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, 0.1, 0.3)
    expected = opt.step(expected, g)
  assert int(state.step) == 3 and int(metrics.count) == 3
  assert_tree_close({"w": state.params["kernel"], "b": state.params["bias"]}, expected, atol=2e-5)


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


def _numpy_bn_net_logits(model, x):
  """Logits of `_BNNet` in training mode (BatchNorm on batch statistics), in float64 NumPy."""
  get = lambda v: np.asarray(v[...], np.float64)
  h = x @ get(model.dense.kernel) + get(model.dense.bias)
  h = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + model.bn.epsilon) * get(model.bn.scale) + get(model.bn.bias)
  return np.maximum(h, 0) @ get(model.head.kernel) + get(model.head.bias)


def test_nnx_update_returns_aux_of_the_unperturbed_pass_without_a_third_forward_pass():
  x, y, _ = make_problem(42)
  xf, yf = jnp.asarray(x.reshape(M * B, D), jnp.float32), jnp.asarray(y.reshape(M * B))
  model, twin = _BNNet(nnx.Rngs(0)), _BNNet(nnx.Rngs(0))
  expected_logits = _numpy_bn_net_logits(model, x.reshape(M * B, D))
  optimizer = disam_jax.nnx_optimizer(model, optax.sgd(0.5), rho=0.5, lam=0.3, num_domains=M)
  twin_optimizer = disam_jax.nnx_optimizer(twin, optax.sgd(0.5), rho=0.5, lam=0.3, num_domains=M)
  calls = []

  def losses_and_logits(m):
    calls.append(1)
    logits = m(xf)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, yf).reshape(M, B).mean(axis=1)
    return losses, {"logits": logits, "accuracy": jnp.mean(jnp.argmax(logits, -1) == yf)}

  @nnx.jit
  def step(model, optimizer):
    return disam_jax.nnx_update(optimizer, model, losses_and_logits, has_aux=True)

  @nnx.jit
  def plain_step(model, optimizer):
    return disam_jax.nnx_update(optimizer, model, lambda m: losses_and_logits(m)[0])

  state, aux = step(model, optimizer)
  assert len(calls) == 2  # the unperturbed and the perturbed pass: the aux rides on the first
  np.testing.assert_allclose(aux["logits"], expected_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], np.mean(expected_logits.argmax(-1) == y.reshape(-1)))
  # The step itself is the one without aux, and the optimizer state does not keep the aux.
  twin_state = plain_step(twin, twin_optimizer)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(twin)), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(state.domain_losses, twin_state.domain_losses)
  assert jax.tree.structure(state) == jax.tree.structure(twin_state)
  state, aux = step(model, optimizer)  # a second step, same structure, aux at the new weights
  assert int(state.count) == 2
  np.testing.assert_allclose(aux["logits"], _numpy_bn_net_logits(twin, x.reshape(M * B, D)), rtol=1e-4, atol=1e-5)


def test_nnx_update_refuses_an_unannounced_or_missing_aux():
  x, y, _ = make_problem(43)
  xf = jnp.asarray(x.reshape(M * B, D), jnp.float32)
  model = _BNNet(nnx.Rngs(0))
  optimizer = disam_jax.nnx_optimizer(model, optax.sgd(0.1), num_domains=M)
  losses = lambda m: jnp.mean(m(xf) ** 2, axis=1).reshape(M, B).mean(axis=1)
  with pytest.raises(ValueError, match=r"has_aux=True\), which returns \(DisamState, aux\)"):
    disam_jax.nnx_update(optimizer, model, lambda m: (losses(m), m(xf)))
  with pytest.raises(ValueError, match=r"needs loss_fn to return \(losses, aux\); got"):
    disam_jax.nnx_update(optimizer, model, losses, has_aux=True)


def test_nnx_optimizer_without_num_domains_steps_with_none_per_domain_fields():
  x, y = jnp.asarray(np.random.default_rng(0).normal(size=(M, 4, D)), jnp.float32), jnp.zeros((M, 4), jnp.int32)
  model = _BNNet(nnx.Rngs(0))
  optimizer = disam_jax.nnx_optimizer(model, optax.sgd(0.5), rho=0.5, lam=0.3)
  m, b = y.shape

  def loss_fn(mod):
    losses = optax.softmax_cross_entropy_with_integer_labels(mod(x.reshape((m * b,) + x.shape[2:])), y.reshape(-1))
    return disam_jax.domain_losses_from_grouped(losses.reshape(m, b))

  state = nnx.jit(lambda mod, opt: disam_jax.nnx_update(opt, mod, loss_fn))(model, optimizer)
  assert state.domain_losses is None and np.isfinite(float(state.loss))


def test_nnx_optimizer_built_by_hand_on_batchnorm_points_to_nnx_update():
  """nnx.Optimizer(model, disam(...)) with BatchNorm: Flax's TraceContextError becomes a pointer to nnx_update."""
  model = _BNNet(nnx.Rngs(0))
  x, y = jnp.ones((M, 4, D)), jnp.zeros((M, 4), jnp.int32)
  optimizer = nnx.Optimizer(model, disam_jax.disam(optax.sgd(0.1), num_domains=M), wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    out = nnx.merge(graphdef, p, rest)(x.reshape(M * 4, D))
    losses = optax.softmax_cross_entropy_with_integer_labels(out, y.reshape(-1))
    return disam_jax.domain_losses_from_grouped(losses.reshape(M, 4))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, None, domain_loss_fn=loss_fn)

  with pytest.raises(ValueError, match=r"TraceContextError.*nnx_optimizer.*nnx_update"):
    step(model, optimizer)
