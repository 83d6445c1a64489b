"""The core's public helpers (domain_objective, as_domain_losses, init_state, global_norm) against NumPy, and the
harness's ERM built on them (no DisamState written out by hand)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import disam_jax


def _objective_numpy(total, count, weights=None):
  """Eq. 6 written out: means over present domains, weights a_i renormalized over them, L and V."""
  total, count = np.asarray(total, np.float64), np.asarray(count, np.float64)
  present = count > 0
  means = np.where(present, total / np.maximum(count, 1), 0.0)
  raw = present.astype(np.float64) if weights is None else np.asarray(weights, np.float64) * present
  a = raw / raw.sum()
  loss = float((a * means).sum())
  return means, a, loss, float((a * (means - loss) ** 2).sum())


@pytest.mark.parametrize("weights", [None, "count", [1.0, 3.0, 2.0, 5.0]])
def test_domain_objective_matches_numpy_with_an_absent_domain(weights):
  total, count = np.array([3.0, 10.0, 0.0, 1.5]), np.array([2.0, 4.0, 0.0, 3.0])  # domain 2 absent
  ref_weights = count if weights == "count" else weights
  arg = "uniform" if weights is None else weights if isinstance(weights, str) else jnp.asarray(weights)
  means, a, loss, var = disam_jax.domain_objective(
    disam_jax.DomainLosses(jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)), arg
  )
  r_means, r_a, r_loss, r_var = _objective_numpy(total, count, ref_weights)
  np.testing.assert_allclose(means, r_means, rtol=1e-6)
  np.testing.assert_allclose(a, r_a, rtol=1e-6)
  assert float(a[2]) == 0.0
  np.testing.assert_allclose(float(loss), r_loss, rtol=1e-6)
  np.testing.assert_allclose(float(var), r_var, rtol=1e-5)


def test_as_domain_losses_reads_every_form_disam_accepts():
  means = jnp.array([0.5, 2.0])
  losses, aux = disam_jax.as_domain_losses(means)
  np.testing.assert_allclose(losses.total, [0.5, 2.0])
  np.testing.assert_allclose(losses.count, [1.0, 1.0])
  assert aux is None
  pair = (disam_jax.DomainLosses(jnp.array([1.0, 4.0]), jnp.array([2, 4], jnp.int32)), {"bn": 1})
  losses, aux = disam_jax.as_domain_losses(pair, has_aux=True)
  assert losses.count.dtype == jnp.float32 and aux == {"bn": 1}
  with pytest.raises(ValueError, match="pass has_aux=True"):
    disam_jax.as_domain_losses(pair)
  with pytest.raises(ValueError, match=r"vector of shape \[M\]"):
    disam_jax.as_domain_losses(jnp.ones([2, 3]))


def test_init_state_is_disams_state_before_the_first_step():
  params = {"w": jnp.ones([3])}
  base = optax.sgd(0.1)
  state = disam_jax.init_state(base.init(params), num_domains=4, aux_example={"s": jnp.zeros([2])})
  from_disam = disam_jax.disam(base, num_domains=4, has_aux=True, aux_example={"s": jnp.zeros([2])}).init(params)
  assert jax.tree.structure(state) == jax.tree.structure(from_disam)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(from_disam)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  assert np.isnan(float(state.sam_cosine)) and state.ascended is None and state.reused_component is None
  assert disam_jax.init_state(base.init(params)).domain_losses is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_global_norm_matches_numpy_in_float32_or_wider(dtype):
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((64, 33)), "b": [rng.standard_normal(7), rng.standard_normal((2, 3, 4))]}
  tree = jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  reference = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  norm = disam_jax.global_norm(tree)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(float(norm), reference, rtol=1e-6)


def test_harness_erm_logs_disams_fields_from_init_state():
  """ERM's state after a step has init's structure, the measured fields filled in and the perturbation's left at
  init's values (norm 0, weights 0, cosine NaN); its gradient step is plain SGD on L = mean_i L_i."""
  from disam_jax.harness import algorithms

  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  x = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]], np.float32)

  def f(p):
    return (x @ p["w"]) ** 2, {"n": jnp.zeros([])}  # three domains, one example each

  tx = algorithms.erm(optax.sgd(0.1), has_aux=True, aux_example={"n": jnp.zeros([])}, num_domains=3)
  state = tx.init(params)
  updates, new_state = jax.jit(lambda s: tx.update(None, s, params, domain_loss_fn=f))(state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  w = np.asarray(params["w"], np.float64)
  r = x.astype(np.float64) @ w
  grad = (2 * r[:, None] * x).mean(axis=0)  # d/dw mean_i (x_i . w)^2
  np.testing.assert_allclose(updates["w"], -0.1 * grad, rtol=1e-6)
  np.testing.assert_allclose(new_state.domain_losses, r**2, rtol=1e-6)
  np.testing.assert_allclose(float(new_state.loss), (r**2).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(new_state.variance), (r**2).var(), rtol=1e-5)
  np.testing.assert_allclose(float(new_state.grad_norm), np.linalg.norm(grad), rtol=1e-6)
  assert int(new_state.count) == 1 and float(new_state.perturbation_norm) == 0.0
  assert np.isnan(float(new_state.sam_cosine)) and not np.any(np.asarray(new_state.perturbation_weights))
