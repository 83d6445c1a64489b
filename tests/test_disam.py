"""Tests of disam_jax.disam against independent references (NumPy by hand, finite differences, optax SAM)."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import disam_jax
from tests import _reference as ref
from tests._steps import disam_step, run_steps

NUM_CLASSES = 3
M, B, D = 4, 6, 5


def make_problem(seed=0, m=M, b=B):
  rng = np.random.default_rng(seed)
  # Domain shift: each domain has its own input offset and scale, so the domain losses differ.
  x = np.stack([rng.normal(loc=i * 0.7, scale=1.0 + 0.3 * i, size=(b, D)) for i in range(m)])
  y = rng.integers(0, NUM_CLASSES, size=(m, b))
  params = {"w": rng.normal(size=(D, NUM_CLASSES)) * 0.5, "b": rng.normal(size=(NUM_CLASSES,)) * 0.1}
  return x, y, params


def jax_domain_loss_fn(x, y):
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)

  def f(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)

  return f


def to_jax(params, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}


def assert_tree_close(a, b, atol, rtol=0.0):
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64), atol=atol, rtol=rtol)


# --- the perturbation direction -------------------------------------------------------------------------------


def _explicit_objective(params_flat, shapes, x, y, lam):
  """L(w) - lam * V(w) in float64 NumPy, straight from the definitions (no chain rule)."""
  params, i = {}, 0
  for k, shape in shapes.items():
    n = int(np.prod(shape))
    params[k] = params_flat[i : i + n].reshape(shape)
    i += n
  losses, _ = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  return losses.mean() - lam * np.var(losses)  # np.var: population variance, as the paper


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.7, 3.0])
def test_perturbation_direction_matches_finite_differences(lam):
  x, y, params = make_problem(1)
  rho = 0.05
  shapes = {k: v.shape for k, v in params.items()}
  flat = np.concatenate([params[k].ravel() for k in shapes])
  h = 1e-6
  fd = np.array(
    [
      (_explicit_objective(flat + h * e, shapes, x, y, lam) - _explicit_objective(flat - h * e, shapes, x, y, lam))
      / (2 * h)
      for e in np.eye(flat.size)
    ]
  )
  # DISAM evaluates domain_loss_fn at w, then at the perturbed point w + eps: eps must be rho * fd / ||fd||.
  tx = disam_jax.disam(optax.sgd(1.0), rho=rho, lam=lam)
  f = jax_domain_loss_fn(x, y)
  p = to_jax(params)
  points = []

  def recording_f(q):
    jax.debug.callback(lambda v: points.append(jax.tree.map(np.asarray, v)), q)
    return f(q)

  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=recording_f)
  jax.effects_barrier()
  assert len(points) == 2
  eps = np.concatenate([np.asarray(points[1][k], np.float64).ravel() - params[k].ravel() for k in shapes])
  np.testing.assert_allclose(eps, rho * fd / np.linalg.norm(fd), atol=2e-7)
  np.testing.assert_allclose(float(state.perturbation_norm), np.linalg.norm(fd), rtol=1e-4)
  # ... and the update is the gradient of the plain L there (the hand-derived NumPy step).
  expected_g, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, rho, lam)
  assert_tree_close({k: -updates[k] for k in updates}, expected_g, atol=2e-6)


def test_reweighted_vjp_identity_against_per_domain_gradients():
  """g_p = sum_i c_i grad L_i with c_i = a_i(1 - 2 lam (L_i - L)), per-domain gradients by hand in NumPy."""
  x, y, params = make_problem(2)
  lam, rho = 0.5, 0.1
  losses, grads = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  c = (1.0 / M) * (1.0 - 2.0 * lam * (losses - losses.mean()))
  g_p = ref.combine(grads, c)
  tx = disam_jax.disam(optax.sgd(0.0), rho=rho, lam=lam, num_domains=M, diagnostics=True)
  p = to_jax(params)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  np.testing.assert_allclose(state.perturbation_norm, math.sqrt(sum(np.sum(v**2) for v in g_p.values())), rtol=1e-5)
  np.testing.assert_allclose(state.domain_losses, losses, rtol=1e-5)
  np.testing.assert_allclose(state.loss, losses.mean(), rtol=1e-5)
  np.testing.assert_allclose(state.variance, np.var(losses), rtol=1e-4)
  # The mechanism: the weights c_i, and the cosine between g_p and SAM's grad L = sum_i grad L_i / M.
  np.testing.assert_allclose(state.perturbation_weights, c, rtol=1e-5)
  g_sam = ref.combine(grads, [1.0 / M] * M)
  flat = lambda g: np.concatenate([g[k].ravel() for k in sorted(g)])
  cosine = flat(g_p) @ flat(g_sam) / (np.linalg.norm(flat(g_p)) * np.linalg.norm(flat(g_sam)))
  np.testing.assert_allclose(float(state.sam_cosine), cosine, rtol=1e-5)
  assert cosine < 0.999  # lam moves the direction on this data, so the check can tell


def test_perturbation_weights_go_negative_for_a_domain_far_above_the_mean():
  """c_i = a_i (1 - 2 lam (L_i - L)) < 0 when 2 lam (L_i - L) > 1: documented, visible in the state."""
  losses = np.array([0.2, 0.3, 3.0])
  p = {"w": jnp.ones(3)}
  f = lambda q: jnp.asarray(losses, jnp.float32) * q["w"]
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 1.0, num_domains=3, diagnostics=True)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  expected = (1 - 2 * 1.0 * (losses - losses.mean())) / 3
  assert expected[2] < 0
  np.testing.assert_allclose(state.perturbation_weights, expected, rtol=1e-5)
  # grad L_i = L_i e_i here, so g_p = c * losses and SAM's direction = losses / 3.
  g_p, g_sam = expected * losses, losses / 3
  np.testing.assert_allclose(
    float(state.sam_cosine), g_p @ g_sam / np.linalg.norm(g_p) / np.linalg.norm(g_sam), rtol=1e-5
  )
  assert float(state.sam_cosine) < 0  # the perturbation points away from SAM's


def test_sam_cosine_is_nan_without_diagnostics_and_one_at_lam_zero():
  x, y, params = make_problem(2)
  p, f = to_jax(params), jax_domain_loss_fn(x, y)
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.5, num_domains=M)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  assert np.isnan(float(state.sam_cosine)) and np.isnan(float(tx.init(p).sam_cosine))
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.0, num_domains=M, diagnostics=True)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  np.testing.assert_allclose(float(state.sam_cosine), 1.0, rtol=1e-6)
  np.testing.assert_allclose(state.perturbation_weights, np.full(M, 1.0 / M), rtol=1e-6)


def test_lam_effect_scales_with_the_loss_scale():
  """V is quadratic in the losses: scaling every loss by s is the same perturbation as lam * s (documented)."""
  x, y, params = make_problem(2)
  p, f = to_jax(params), jax_domain_loss_fn(x, y)
  run = lambda lam, scale: (
    disam_jax.disam(optax.sgd(1.0), 0.05, lam, num_domains=M)
    .update(
      None, disam_jax.disam(optax.sgd(1.0), 0.05, lam, num_domains=M).init(p), p, domain_loss_fn=lambda q: scale * f(q)
    )[1]
    .perturbation_weights
  )
  np.testing.assert_allclose(run(0.5, 4.0), run(2.0, 1.0), rtol=1e-5)


# --- trajectories against the hand-written NumPy step ---------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adam"])
def test_ten_step_trajectory_matches_numpy_reference(base, adaptive):
  x, y, params = make_problem(3)
  rho, lam = 0.1, 0.3
  if base == "sgd_momentum_wd":
    base_tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
    opt = ref.SGDMomentumWithDecay(0.1, 0.9, 1e-2)
  else:
    base_tx = optax.adam(0.05)
    opt = ref.Adam(0.05)
  expected = params
  for _ in range(10):
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, rho, lam, adaptive=adaptive)
    expected = opt.step(expected, g)
  got, _ = run_steps(
    disam_jax.disam(base_tx, rho, lam, adaptive=adaptive), to_jax(params), jax_domain_loss_fn(x, y), 10
  )
  assert_tree_close(got, expected, atol=2e-5)
  # The reference must actually move the parameters, or the test would prove nothing.
  assert max(np.abs(expected[k] - params[k]).max() for k in params) > 1e-2


def _conformance():
  path = pathlib.Path(__file__).parent / "data" / "disam_reference_v1.json"
  return json.loads(path.read_text())


@pytest.mark.parametrize("case", range(6))
def test_conformance_vectors(case):
  """Trajectories from an independent PyTorch restatement of the authors' loop (../shared/conformance)."""
  d = _conformance()
  c = d["cases"][case]
  x, y = jnp.asarray(d["x"], jnp.float32), jnp.asarray(d["y"])
  params = {k: jnp.asarray(v, jnp.float32) for k, v in d["params_init"].items()}

  def f(p):
    logits = jnp.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)

  b = c["base"]
  assert b["kind"] == "sgd"
  base_tx = optax.chain(
    optax.add_decayed_weights(b["weight_decay_coupled"]),
    optax.sgd(b["learning_rate"], b["momentum"], nesterov=b["nesterov"]),
  )
  tx = disam_jax.disam(base_tx, rho=c["rho"], lam=c["lam"], adaptive=c["adaptive"])
  trajectory = []
  ten, _ = run_steps(tx, params, f, 10, trajectory=trajectory)
  assert_tree_close(trajectory[0], c["params_after_1_step"], atol=2e-5)
  assert_tree_close(ten, c["params_after_10_steps"], atol=2e-5)


# --- special cases: SAM and the base optimizer ---------------------------------------------------------------


def test_lam_zero_equals_optax_contrib_sam():
  x, y, params = make_problem(4)
  p = to_jax(params)
  f = jax_domain_loss_fn(x, y)
  loss = lambda q: jnp.mean(f(q))
  base = optax.sgd(0.1, momentum=0.9)
  rho = 0.07
  sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True)
  s_state, q = sam.init(p), p
  for _ in range(5):
    u, s_state = sam.update(jax.grad(loss)(q), s_state, q, grad_fn=lambda w, _: jax.grad(loss)(w))
    q = optax.apply_updates(q, u)
  got, _ = run_steps(disam_jax.disam(base, rho=rho, lam=0.0), p, f, 5)
  assert_tree_close(got, q, atol=1e-6)


def test_rho_zero_equals_base_optimizer():
  x, y, params = make_problem(5)
  p = to_jax(params)
  f = jax_domain_loss_fn(x, y)
  base = optax.adam(0.03)
  state, q = base.init(p), p
  for _ in range(5):
    u, state = base.update(jax.grad(lambda w: jnp.mean(f(w)))(q), state, q)
    q = optax.apply_updates(q, u)
  got, _ = run_steps(disam_jax.disam(base, rho=0.0, lam=0.5), p, f, 5)
  assert_tree_close(got, q, atol=1e-6)


# --- cost: two forward and two backward passes ------------------------------------------------------------------


def test_domain_loss_fn_is_traced_exactly_twice_per_step():
  x, y, params = make_problem(6)
  f = jax_domain_loss_fn(x, y)
  calls = []

  def counting(p):
    calls.append(1)
    return f(p)

  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  p = to_jax(params)
  jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=counting))(p, tx.init(p))
  assert len(calls) == 2


def mlp_problem(m, n=128, d=32, h=64, seed=7):
  """A tanh MLP whose FLOPs are dominated by its matmuls, on a [m, n/m, d] batch."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, n // m, d)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(m, n // m)))
  p = {
    "w1": jnp.asarray(rng.normal(size=(d, h)) / d**0.5, jnp.float32),
    "b1": jnp.zeros(h),
    "w2": jnp.asarray(rng.normal(size=(h, NUM_CLASSES)) / h**0.5, jnp.float32),
    "b2": jnp.zeros(NUM_CLASSES),
  }

  def f(q):
    logits = jnp.tanh(x.reshape(n, d) @ q["w1"] + q["b1"]) @ q["w2"] + q["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(n)).reshape(m, n // m).mean(axis=1)

  return p, f


def compiled_flops(fn, *args):
  """FLOPs of the compiled computation, from XLA's cost analysis."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _disam_step_flops(m, tx=None):
  p, f = mlp_problem(m)
  tx = tx or disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  return compiled_flops(lambda p, s: tx.update(None, s, p, domain_loss_fn=f), p, tx.init(p))


def test_step_flops_do_not_grow_with_number_of_domains_and_equal_sams():
  """No per-domain backward passes: the compiled step's FLOPs are the same at M=2 and M=32 (fixed total batch),
  and equal optax.contrib.sam's; a step built from per-domain gradients (jacrev) is caught by the same measure."""
  flops_2, flops_32 = _disam_step_flops(2), _disam_step_flops(32)
  assert abs(flops_32 / flops_2 - 1) < 0.02, (flops_2, flops_32)
  p, f = mlp_problem(32)
  loss = lambda q: jnp.mean(f(q))
  sam = optax.contrib.sam(optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True)
  sam_flops = compiled_flops(
    lambda q, s: sam.update(jax.grad(loss)(q), s, q, grad_fn=lambda w, _: jax.grad(loss)(w)), p, sam.init(p)
  )
  assert abs(flops_32 / sam_flops - 1) < 0.02, (flops_32, sam_flops)

  def per_domain_gradients_step(q):  # what the reweighting avoids: M backward passes (a Jacobian)
    jac, losses = jax.jacrev(f)(q), f(q)
    c = (1 - 2 * 0.1 * (losses - losses.mean())) / losses.shape[0]
    g_p = jax.tree.map(lambda j: jnp.tensordot(c, j, 1), jac)
    return jax.grad(loss)(jax.tree.map(lambda w, g: w + 0.05 * g / optax.tree.norm(g_p), q, g_p))

  assert compiled_flops(per_domain_gradients_step, p) > 3 * flops_32


# --- state, logging, aux ---------------------------------------------------------------------------------------


def test_state_exposes_metrics_and_unperturbed_aux():
  x, y, params = make_problem(8)
  f = jax_domain_loss_fn(x, y)

  def f_aux(p):
    return f(p), {"first_weight": p["w"][0, 0]}

  tx = disam_jax.disam(optax.sgd(0.1), rho=0.5, lam=0.1, has_aux=True, num_domains=M)
  p = to_jax(params)
  state = tx.init(p)
  assert state.domain_losses.shape == (M,) and state.aux is None
  _, state = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f_aux))(p, state)
  # aux comes from the unperturbed evaluation: the weight itself, not the perturbed weight.
  assert float(state.aux["first_weight"]) == float(p["w"][0, 0])
  losses, _ = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  np.testing.assert_allclose(state.domain_losses, losses, rtol=1e-5)
  assert int(state.count) == 1
  g, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, 0.5, 0.1)
  np.testing.assert_allclose(state.grad_norm, math.sqrt(sum(np.sum(v**2) for v in g.values())), rtol=1e-5)


def test_find_disam_state_in_a_chain():
  x, y, params = make_problem(9)
  tx = optax.chain(disam_jax.disam(optax.sgd(0.1), 0.05, 0.1), optax.scale(0.5))
  p = to_jax(params)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  assert disam_jax.find_disam_state(state).loss > 0
  with pytest.raises(ValueError, match="exactly one DisamState"):
    disam_jax.find_disam_state(optax.sgd(0.1).init(p))


def test_chain_with_transformations_after_disam():
  """optax.chain forwards domain_loss_fn to every member; members after disam act on its updates."""
  x, y, params = make_problem(10)
  p = to_jax(params)
  f = jax_domain_loss_fn(x, y)
  alone, _ = _update(disam_jax.disam(optax.sgd(0.1), 0.05, 0.1), f, p)
  chained = optax.chain(disam_jax.disam(optax.sgd(0.1), 0.05, 0.1), optax.scale(0.5))
  got, _ = jax.jit(lambda p, s: chained.update(None, s, p, domain_loss_fn=f))(p, chained.init(p))
  assert_tree_close(got, {k: 0.5 * alone[k] for k in alone}, atol=1e-7)


# --- composition with optax wrappers: done right, or refused at trace time with what to write instead ----------


def _composition_problem():
  x, y, params = make_problem(10)
  return to_jax(params), jax_domain_loss_fn(x, y)


def test_incoming_updates_are_refused_not_discarded():
  p, f = _composition_problem()
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  grads = jax.tree.map(jnp.ones_like, p)
  with pytest.raises(ValueError, match=r"cannot use incoming updates: pass None.*inside base_tx"):
    jax.jit(lambda p, s: tx.update(grads, s, p, domain_loss_fn=f))(p, tx.init(p))


def test_chain_member_before_disam_given_gradients_is_refused_and_clip_inside_base_tx_clips():
  p, f = _composition_problem()
  chained = optax.chain(optax.clip_by_global_norm(1e-3), disam_jax.disam(optax.sgd(0.1), 0.05, 0.1))
  # Given None, clip clips nothing and is not refused (no argument shows it): tests/test_wrappers.py.
  with pytest.raises(ValueError, match=r"member before disam in an optax.chain.*inside base_tx"):
    grads = jax.tree.map(jnp.ones_like, p)
    jax.jit(lambda p, s: chained.update(grads, s, p, domain_loss_fn=f))(p, chained.init(p))
  # What the message says to write: the clip then acts on the sharpness-aware gradient (NumPy reference).
  tx = disam_jax.disam(optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)), 0.05, 0.1)
  got, _ = _update(tx, f, p)
  x, y, params = make_problem(10)
  g, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, 0.05, 0.1)
  norm = math.sqrt(sum(np.sum(v**2) for v in g.values()))
  assert norm > 1e-2
  assert_tree_close({k: -got[k] for k in got}, {k: g[k] * 1e-3 / norm for k in g}, atol=1e-8)


def test_multisteps_given_gradients_is_refused_with_a_pointer_to_accumulation():
  p, f = _composition_problem()
  tx = optax.MultiSteps(disam_jax.disam(optax.sgd(0.1), 0.05, 0.1), every_k_schedule=2)
  grads = jax.tree.map(jnp.ones_like, p)  # given None, optax's own error (tests/test_wrappers.py)
  with pytest.raises(ValueError, match="MultiSteps.*accumulate_domain_losses"):
    jax.jit(lambda p, s: tx.update(grads, s, p, domain_loss_fn=f))(p, tx.init(p))


@pytest.mark.parametrize("wrapper", ["apply_if_finite", "conditionally_transform", "conditionally_mask"])
def test_conditional_wrappers_given_gradients_are_refused_with_a_pointer_inside(wrapper):
  p, f = _composition_problem()
  inner = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  if wrapper == "apply_if_finite":
    tx = optax.apply_if_finite(inner, max_consecutive_errors=2)
  else:
    tx = getattr(optax, wrapper)(inner, lambda step, **_: step % 2 == 0, forward_extra_args=True)
  grads = jax.tree.map(jnp.ones_like, p)  # given None, JAX's lax.cond error (tests/test_wrappers.py)
  with pytest.raises(ValueError, match=r"apply_if_finite.*inside base_tx"):
    jax.jit(lambda p, s: tx.update(grads, s, p, domain_loss_fn=f))(p, tx.init(p))


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_masked_and_multi_transform_are_refused_with_a_pointer_to_perturbation_mask(wrapper):
  p, f = _composition_problem()
  inner = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  if wrapper == "masked":
    tx = optax.masked(inner, {"w": True, "b": False})
  else:
    tx = optax.multi_transform({"d": inner, "z": optax.set_to_zero()}, {"w": "d", "b": "z"})
  with pytest.raises(ValueError, match=r"optax.masked / optax.multi_transform.*perturbation_mask"):
    jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f))(p, tx.init(p))


def test_masked_inside_base_tx_updates_only_the_subset():
  """What the refusal says to write: the whole model is perturbed, only 'w' is updated."""
  x, y, params = make_problem(10)
  p, f = to_jax(params), jax_domain_loss_fn(x, y)
  g, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, 0.05, 0.1)
  tx = disam_jax.disam(
    optax.multi_transform({"train": optax.sgd(1.0), "freeze": optax.set_to_zero()}, {"w": "train", "b": "freeze"}),
    0.05,
    0.1,
  )
  got, _ = _update(tx, f, p)
  np.testing.assert_allclose(-got["w"], g["w"], atol=2e-6)
  np.testing.assert_array_equal(got["b"], 0.0)
  # optax.masked inside base_tx: sgd on 'w'; the other leaves' gradients pass through unchanged (optax's rule).
  got, _ = _update(disam_jax.disam(optax.masked(optax.sgd(1.0), {"w": True, "b": False}), 0.05, 0.1), f, p)
  np.testing.assert_allclose(-got["w"], g["w"], atol=2e-6)
  np.testing.assert_allclose(got["b"], g["b"], atol=2e-6)


def test_inject_hyperparams_under_jit_with_traced_rho_and_lam():
  """The standard way to change rho/lam during training: equal to disam with those values, no recompile."""
  x, y, params = make_problem(12)
  p, f = to_jax(params), jax_domain_loss_fn(x, y)
  tx = optax.inject_hyperparams(disam_jax.disam, static_args=("base_tx", "num_domains"))(
    base_tx=optax.sgd(0.1, momentum=0.9), rho=0.05, lam=0.1, num_domains=np.int64(M)
  )
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    return disam_step(tx, f)(p, s)

  q, s = p, tx.init(p)
  expected, opt = params, ref.SGDMomentumWithDecay(0.1, 0.9, 0.0)
  for _t, (rho, lam) in enumerate([(0.05, 0.1), (0.2, 0.7), (0.0, 0.0)]):
    s.hyperparams["rho"] = jnp.asarray(rho)
    s.hyperparams["lam"] = jnp.asarray(lam)
    q, s = step(q, s)
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, rho, lam)
    expected = opt.step(expected, g)
  assert_tree_close(q, expected, atol=2e-5)
  assert len(traces) == 1
  assert s.inner_state.domain_losses.shape == (M,)
  with pytest.raises(ValueError, match="rho must be finite and >= 0"):  # concrete values are still checked
    optax.inject_hyperparams(disam_jax.disam, static_args=("base_tx",))(base_tx=optax.sgd(0.1), rho=-1.0).init(p)
  untraced_m = optax.inject_hyperparams(disam_jax.disam, static_args=("base_tx",))(
    base_tx=optax.sgd(0.1), num_domains=M
  )
  with pytest.raises(ValueError, match="static_args=\\('base_tx', 'num_domains'\\)"):
    jax.jit(lambda p, s: untraced_m.update(None, s, p, domain_loss_fn=f))(p, untraced_m.init(p))


# --- the state's structure never changes --------------------------------------------------------------------------


@pytest.mark.parametrize("num_domains", [None, M])
def test_state_structure_is_fixed_by_init(num_domains):
  x, y, params = make_problem(21)
  p, f = to_jax(params), jax_domain_loss_fn(x, y)
  tx = disam_jax.disam(optax.adam(0.01), 0.05, 0.1, num_domains=num_domains)
  init = tx.init(p)
  _, after = tx.update(None, init, p, domain_loss_fn=f)
  assert jax.tree.structure(init) == jax.tree.structure(after)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(init)] == [(a.shape, a.dtype) for a in jax.tree.leaves(after)]
  assert (after.domain_losses is None) if num_domains is None else after.domain_losses.shape == (M,)
  # One compile for many steps, and the state works as a lax.scan carry and under lax.cond.
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    return disam_step(tx, f)(p, s)

  q, s = p, init
  for _ in range(3):
    q, s = step(q, s)
  assert len(traces) == 1
  scanned, _ = jax.lax.scan(lambda c, _: (step(*c), None), (p, init), None, length=3)
  assert_tree_close(scanned[0], q, atol=1e-6)
  skip = jax.jit(lambda p, s, ok: jax.lax.cond(ok, lambda: step(p, s), lambda: (p, s)))
  assert_tree_close(skip(p, init, True)[0], step(p, init)[0], atol=0)


@pytest.mark.parametrize("num_domains", [None, M])
def test_checkpoint_restores_into_a_fresh_init(num_domains, tmp_path):
  """orbax and flax serialization restore a trained state into tx.init(params) (the target's shapes)."""
  import flax.serialization
  import orbax.checkpoint as ocp

  x, y, params = make_problem(22)
  p, f = to_jax(params), jax_domain_loss_fn(x, y)
  tx = disam_jax.disam(optax.sgd(0.1, momentum=0.9), 0.05, 0.1, num_domains=num_domains, diagnostics=True)
  _, state = run_steps(tx, p, f, 2)
  restored = flax.serialization.from_bytes(tx.init(p), flax.serialization.to_bytes(state))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", tx.init(p))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_extra_args_forwarded_to_base_tx():
  x, y, params = make_problem(11)
  p = to_jax(params)
  base = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
  tx = disam_jax.disam(base, 0.05, 0.1)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y), value=jnp.asarray(1.0))
  assert int(state.count) == 1


# --- schedules ---------------------------------------------------------------------------------------------------


def test_schedules_follow_the_step_count():
  x, y, params = make_problem(12)
  p = to_jax(params)
  rho_schedule = optax.linear_schedule(0.0, 0.2, transition_steps=4)
  lam_schedule = optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(1.0)], [2])
  tx = disam_jax.disam(optax.sgd(0.1, momentum=0.9), rho_schedule, lam_schedule)
  opt = ref.SGDMomentumWithDecay(0.1, 0.9, 0.0)
  expected = params
  for t in range(6):
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, float(rho_schedule(t)), 0.0 if t < 2 else 1.0)
    expected = opt.step(expected, g)
  got, state = run_steps(tx, p, jax_domain_loss_fn(x, y), 6)
  assert int(state.count) == 6
  assert_tree_close(got, expected, atol=2e-5)


# --- absent domains, weighting ---------------------------------------------------------------------------------


def test_absent_domain_is_excluded_not_counted_as_zero():
  x, y, params = make_problem(13)
  p = to_jax(params)
  xf = jnp.asarray(x.reshape(M * B, D), jnp.float32)
  yf = jnp.asarray(y.reshape(M * B))
  ids = np.repeat(np.arange(M), B)
  keep = ids != 2  # domain 2 absent from this batch
  xk, yk, ik = xf[keep], yf[keep], ids[keep]

  def f(q):
    losses = optax.softmax_cross_entropy_with_integer_labels(xk @ q["w"] + q["b"], yk)
    return disam_jax.domain_losses_from_ids(losses, ik, M)

  tx = disam_jax.disam(optax.sgd(0.1), 0.1, 0.4, num_domains=M)
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  # Reference: the same step on the three present domains only.
  present = [0, 1, 3]
  g, _ = ref.disam_gradient(params, x[present], y[present], NUM_CLASSES, 0.1, 0.4)
  assert_tree_close({k: -updates[k] / 0.1 for k in updates}, g, atol=2e-6)
  assert float(state.domain_counts[2]) == 0.0 and float(state.domain_losses[2]) == 0.0
  assert float(state.perturbation_weights[2]) == 0.0
  assert np.isnan(float(state.sam_cosine))  # diagnostics off
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state._replace(sam_cosine=0.0)))


def test_all_domains_absent_gives_zero_step_not_nan():
  p = to_jax(make_problem(14)[2])
  f = lambda q: disam_jax.DomainLosses(jnp.zeros(3) * q["b"][0], jnp.zeros(3))
  tx = disam_jax.disam(optax.sgd(0.1), 0.1, 0.4)
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert np.isfinite(float(state.loss))


def test_count_weighting_equals_per_example_mean_and_weighted_variance():
  """'count' weighting: L = mean over all examples, V = sum_i (n_i/n)(L_i - L)^2 (the official code's effect)."""
  rng = np.random.default_rng(15)
  _, _, params = make_problem(15)
  counts = [2, 5, 9]
  xs = [rng.normal(loc=i, size=(n, D)) for i, n in enumerate(counts)]
  ys = [rng.integers(0, NUM_CLASSES, size=n) for n in counts]
  xf, yf = np.concatenate(xs), np.concatenate(ys)
  ids = np.concatenate([np.full(n, i) for i, n in enumerate(counts)])
  lam, rho = 0.3, 0.1
  # NumPy reference: per-domain losses/grads by hand, count weights a_i = n_i/n.
  losses, grads = [], []
  for xi, yi in zip(xs, ys):
    li, gi = ref.domain_losses_and_grads(params, xi[None], yi[None], NUM_CLASSES)
    losses.append(li[0])
    grads.append(gi[0])
  losses, a = np.array(losses), np.array(counts) / sum(counts)
  mean = a @ losses
  c = a * (1 - 2 * lam * (losses - mean))  # d/dL_i [sum a L - lam sum a (L - mean)^2]
  g_p = ref.combine(grads, c)
  norm = math.sqrt(sum(np.sum(v**2) for v in g_p.values()))
  pert = {k: params[k] + rho * g_p[k] / norm for k in params}
  pgrads = []
  for xi, yi in zip(xs, ys):
    pgrads.append(ref.domain_losses_and_grads(pert, xi[None], yi[None], NUM_CLASSES)[1][0])
  expected = ref.combine(pgrads, a)

  def f(q):
    per_example = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(xf, jnp.float32) @ q["w"] + q["b"], yf)
    return disam_jax.domain_losses_from_ids(per_example, ids, 3)

  tx = disam_jax.disam(optax.sgd(1.0), rho, lam, domain_weights="count", num_domains=3)
  p = to_jax(params)
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  assert_tree_close({k: -updates[k] for k in updates}, expected, atol=2e-6)
  np.testing.assert_allclose(state.perturbation_weights, c, rtol=1e-5)  # c_i of the means, from sums and counts
  np.testing.assert_allclose(state.variance, a @ (losses - mean) ** 2, rtol=1e-4)


def test_fixed_domain_weights():
  """Non-uniform fixed weights a_i define L and V (and so c_i and the final gradient), checked in NumPy."""
  x, y, params = make_problem(16)
  raw = np.array([4.0, 1.0, 2.0, 1.0])
  a = raw / raw.sum()
  rho, lam = 0.1, 0.3
  losses, grads = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  mean = a @ losses
  c = a * (1 - 2 * lam * (losses - mean))
  g_p = ref.combine(grads, c)
  norm = math.sqrt(sum(np.sum(v**2) for v in g_p.values()))
  pert = {k: params[k] + rho * g_p[k] / norm for k in params}
  expected = ref.combine(ref.domain_losses_and_grads(pert, x, y, NUM_CLASSES)[1], a)
  p = to_jax(params)
  tx = disam_jax.disam(optax.sgd(1.0), rho, lam, domain_weights=raw, num_domains=M)
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  assert_tree_close({k: -updates[k] for k in updates}, expected, atol=2e-6)
  np.testing.assert_allclose(state.perturbation_weights, c, rtol=1e-5)
  np.testing.assert_allclose(state.loss, mean, rtol=1e-5)
  np.testing.assert_allclose(state.variance, a @ (losses - mean) ** 2, rtol=1e-4)


# --- numerics --------------------------------------------------------------------------------------------------


def test_zero_gradient_gives_zero_perturbation_not_nan():
  p = {"w": jnp.ones((3,))}
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  f = lambda q: jnp.array([1.0, 2.0]) + 0.0 * q["w"].sum()
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  assert np.all(np.asarray(updates["w"]) == 0.0)
  assert float(state.perturbation_norm) == 0.0


def test_bfloat16_params():
  """bf16 params: one step equals the float64 reference step from the same bf16 weights, rounded to bf16, to about
  one bf16 rounding; plain SGD (no perturbation) and SAM (lam=0) are many roundings away, so the test can tell."""
  x, y, params = make_problem(17)
  p16 = to_jax(params, jnp.bfloat16)
  start = {k: np.asarray(v, np.float64) for k, v in p16.items()}  # the bf16 weights, exactly
  f = lambda q: jax_domain_loss_fn(x, y)({k: v.astype(jnp.float32) for k, v in q.items()})
  rho, lam, lr = 0.5, 2.0, 1.0
  tx = disam_jax.disam(optax.sgd(lr), rho, lam, num_domains=M)
  got, state = run_steps(tx, p16, f, 1)
  assert all(v.dtype == jnp.bfloat16 for v in got.values())
  assert state.perturbation_norm.dtype == jnp.float32 and state.variance.dtype == jnp.float32
  assert state.perturbation_weights.dtype == jnp.float32
  step = lambda g: {k: start[k] - lr * g[k] for k in start}
  expected = step(ref.disam_gradient(start, x, y, NUM_CLASSES, rho, lam)[0])
  sgd = step(ref.combine(ref.domain_losses_and_grads(start, x, y, NUM_CLASSES)[1], [1.0 / M] * M))
  sam = step(ref.disam_gradient(start, x, y, NUM_CLASSES, rho, 0.0)[0])
  ulp = lambda v: 2.0 ** (np.floor(np.log2(np.maximum(np.abs(v), 1e-3))) - 7)  # bf16 spacing at v
  err = lambda t: max(float(np.max(np.abs(np.asarray(got[k], np.float64) - t[k]) / ulp(t[k]))) for k in t)
  # The perturbed point itself is rounded to bf16 (as the params), so allow a few roundings.
  assert err(expected) <= 4, err(expected)
  assert err(sgd) > 30 and err(sam) > 30, (err(sgd), err(sam))


def test_norms_of_bfloat16_params_are_float32():
  """A linear loss whose gradients are exact in bf16: ||g_p|| = sqrt(3 * 1.5^2) and ||g|| to float32 precision
  (a bf16 norm would be 2.59375 instead of 2.598076)."""
  p = {"w": jnp.zeros(3, jnp.bfloat16)}
  f = lambda q: jnp.stack([1.0 * q["w"].astype(jnp.float32).sum(), 2.0 * q["w"].astype(jnp.float32).sum()])
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.0)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  np.testing.assert_allclose(float(state.perturbation_norm), math.sqrt(3 * 1.5**2), rtol=1e-6)
  np.testing.assert_allclose(float(state.grad_norm), math.sqrt(3 * 1.5**2), rtol=1e-6)


def test_non_finite_loss_composes_with_apply_if_finite():
  """apply_if_finite goes inside base_tx: it then sees DISAM's gradient and skips the non-finite step."""
  x, y, params = make_problem(18)
  p = to_jax(params)
  f = jax_domain_loss_fn(x, y)
  bad = lambda q: f(q) * jnp.nan
  tx = disam_jax.disam(optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3), 0.05, 0.1)
  state = tx.init(p)
  updates, state = tx.update(None, state, p, domain_loss_fn=bad)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(state.base_state.notfinite_count) == 1
  assert np.isnan(float(state.loss))  # the state still reports what happened
  updates, state = tx.update(None, state, p, domain_loss_fn=f)
  assert int(state.base_state.notfinite_count) == 0 and np.any(np.asarray(updates["w"]) != 0)
  # Without it, NaN propagates into the updates: it is never silently zeroed.
  raw = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  updates, _ = raw.update(None, raw.init(p), p, domain_loss_fn=bad)
  assert np.isnan(np.asarray(updates["w"])).all()


def test_perturbation_mask_restricts_perturbation_and_norm():
  x, y, params = make_problem(19)
  rho, lam = 0.2, 0.3
  losses, grads = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  g_p = ref.combine(grads, (1.0 / M) * (1 - 2 * lam * (losses - losses.mean())))
  pert = dict(params)
  pert["w"] = params["w"] + rho * g_p["w"] / np.linalg.norm(g_p["w"])  # only 'w' perturbed, norm over 'w' alone
  _, pgrads = ref.domain_losses_and_grads(pert, x, y, NUM_CLASSES)
  expected = ref.combine(pgrads, [1.0 / M] * M)
  p = to_jax(params)
  tx = disam_jax.disam(optax.sgd(1.0), rho, lam, perturbation_mask={"w": True, "b": False})
  updates, _ = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  assert_tree_close({k: -updates[k] for k in updates}, expected, atol=2e-6)


@pytest.mark.parametrize("form", ["prefix", "callable_python_bools", "callable_jnp_bools", "traced_bools"])
def test_perturbation_mask_accepts_what_optax_masked_accepts(form):
  """Prefix trees, callables, JAX bools (traced under jit): the same step as the full mask of the NumPy test."""
  x, y, params = make_problem(19)
  nested = {"enc": {"w": to_jax(params)["w"]}, "head": {"b": to_jax(params)["b"]}}

  def f(q):
    logits = jnp.asarray(x, jnp.float32) @ q["enc"]["w"] + q["head"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(axis=1)

  full = {"enc": {"w": True}, "head": {"b": False}}
  reference = disam_jax.disam(optax.sgd(1.0), 0.2, 0.3, perturbation_mask=full)
  expected, _ = _update(reference, f, nested)
  if form == "prefix":
    mask = {"enc": True, "head": False}
  elif form == "callable_python_bools":
    mask = lambda q: jax.tree.map(lambda a: a.ndim == 2, q)
  elif form == "callable_jnp_bools":
    mask = lambda q: jax.tree.map(lambda a: jnp.asarray(a.ndim == 2), q)
  tx_for = lambda m: disam_jax.disam(optax.sgd(1.0), 0.2, 0.3, perturbation_mask=m)
  if form == "traced_bools":
    step = jax.jit(lambda p, s, m: tx_for(m).update(None, s, p, domain_loss_fn=f))
    got, _ = step(nested, reference.init(nested), {"enc": jnp.asarray(True), "head": jnp.asarray(False)})
  else:
    tx = tx_for(mask)
    got, _ = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f))(nested, tx.init(nested))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  unmasked, _ = _update(disam_jax.disam(optax.sgd(1.0), 0.2, 0.3), f, nested)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(unmasked), jax.tree.leaves(expected))) > 1e-4
  with pytest.raises(ValueError, match="perturbation_mask must be a pytree of bools"):
    _update(tx_for({"enc": True}), f, nested)


def test_gradient_accumulation_inside_the_loss_function_equals_big_batch():
  """Micro-batches summed with lax.scan inside domain_loss_fn give the same step as the whole batch."""
  x, y, params = make_problem(20, b=8)
  p = to_jax(params)
  xs = jnp.asarray(x, jnp.float32).reshape(M, 4, 2, D).transpose(1, 0, 2, 3)  # 4 micro-batches [M, 2, D]
  ys = jnp.asarray(y).reshape(M, 4, 2).transpose(1, 0, 2)

  def accumulated(q):
    def body(acc, batch):
      xb, yb = batch
      losses = optax.softmax_cross_entropy_with_integer_labels(xb @ q["w"] + q["b"], yb)
      return acc + disam_jax.domain_losses_from_grouped(losses).total, None

    total, _ = jax.lax.scan(body, jnp.zeros(M), (xs, ys))
    return disam_jax.DomainLosses(total, jnp.full(M, 8.0))

  tx = disam_jax.disam(optax.sgd(0.1), 0.1, 0.3)
  a, _ = run_steps(tx, p, accumulated, 3)
  b, _ = run_steps(tx, p, jax_domain_loss_fn(x, y), 3)
  assert_tree_close(a, b, atol=1e-6)


# --- errors, at trace time, naming the value -------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"rho": -0.1}, "rho=-0.1"),
    ({"lam": -1.0}, "lam=-1.0"),
    ({"rho": float("nan")}, "rho=nan"),
    ({"lam": float("inf")}, "lam=inf"),
    ({"rho": optax.linear_schedule(-0.1, 0.05, 10)}, r"rho\(0\) = -0.1"),
    ({"domain_weights": "balanced"}, "'balanced'"),
    ({"domain_weights": [1.0, -1.0]}, "finite values >= 0"),
    ({"domain_weights": [1.0, 1.0], "num_domains": 3}, "2 entries but num_domains=3"),
    ({"per_device_perturbation": True}, "needs batch_axis_name"),
    ({"aux_example": {"a": 1.0}}, "only meaningful with has_aux=True"),
    ({"num_domains": 0}, "num_domains must be a positive int"),
    ({"rho": "big"}, None),
  ],
)
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(TypeError if match is None else ValueError, match=match or "float or an optax schedule"):
    disam_jax.disam(optax.sgd(0.1), **kwargs)


def _update(tx, f, p=None):
  p = p if p is not None else {"w": jnp.ones(3)}
  return tx.update(None, tx.init(p), p, domain_loss_fn=f)


def test_missing_domain_loss_fn():
  tx = disam_jax.disam(optax.sgd(0.1))
  p = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="domain_loss_fn"):
    tx.update(None, tx.init(p), p)


def test_loss_fn_returning_non_vector():
  with pytest.raises(ValueError, match=r"shape \[M\].*got losses of shape \(2, 3\)"):
    _update(disam_jax.disam(optax.sgd(0.1)), lambda q: jnp.ones((2, 3)) * q["w"].sum())
  with pytest.raises(ValueError, match=r"got losses of shape \(\)"):
    _update(disam_jax.disam(optax.sgd(0.1)), lambda q: q["w"].sum())


def test_number_of_domains_must_not_change():
  tx = disam_jax.disam(optax.sgd(0.1), num_domains=3)
  with pytest.raises(ValueError, match="returned 4 values, but this optimizer was built with num_domains=3"):
    _update(tx, lambda q: jnp.ones(4) * q["w"].sum())


def test_num_domains_accepts_numpy_integers():
  p = {"w": jnp.ones(3)}
  for m in (np.int64(3), np.int32(3), jnp.asarray(3)):
    tx = disam_jax.disam(optax.sgd(0.1), num_domains=m)
    _, state = _update(tx, lambda q: q["w"] ** 2, p)
    assert state.domain_losses.shape == (3,)
  for bad in (True, 2.0, np.int64(0)):
    with pytest.raises(ValueError, match="num_domains must be a positive int"):
      disam_jax.disam(optax.sgd(0.1), num_domains=bad)


def test_single_domain_with_positive_lam_is_an_error_and_lam_zero_is_sam():
  with pytest.raises(ValueError, match="single domain loss with lam=0.1"):
    _update(disam_jax.disam(optax.sgd(0.1), lam=0.1), lambda q: jnp.sum(q["w"] ** 2)[None])
  updates, _ = _update(disam_jax.disam(optax.sgd(0.1), lam=0.0), lambda q: jnp.sum(q["w"] ** 2)[None])
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  # A schedule that is 0 wherever it is probed is lam=0; one that becomes positive is refused.
  got, _ = _update(
    disam_jax.disam(optax.sgd(0.1), lam=optax.constant_schedule(0.0)), lambda q: jnp.sum(q["w"] ** 2)[None]
  )
  np.testing.assert_array_equal(got["w"], updates["w"])
  with pytest.raises(ValueError, match="single domain loss"):
    _update(
      disam_jax.disam(optax.sgd(0.1), lam=optax.linear_schedule(0.0, 0.5, 100)), lambda q: jnp.sum(q["w"] ** 2)[None]
    )


def test_wrong_length_domain_weights():
  with pytest.raises(ValueError, match="domain_weights has 2 entries but domain_loss_fn returned 3"):
    _update(disam_jax.disam(optax.sgd(0.1), domain_weights=[1.0, 2.0]), lambda q: q["w"] ** 2)


def test_tuple_without_has_aux():
  with pytest.raises(ValueError, match="has_aux=True"):
    _update(disam_jax.disam(optax.sgd(0.1)), lambda q: (q["w"] ** 2, {}))


# --- float64 end to end -----------------------------------------------------------------------------------------


def test_float64_params_stay_float64_end_to_end():
  """Under x64, rho=0 is base_tx on grad L to float64 rounding (the same sum in another order), and the step
  matches NumPy to 1e-12."""
  with jax.enable_x64(True):
    x, y, params = make_problem(23)
    p = to_jax(params, jnp.float64)
    xs, ys = jnp.asarray(x, jnp.float64), jnp.asarray(y)
    f = lambda q: optax.softmax_cross_entropy_with_integer_labels(xs @ q["w"] + q["b"], ys).mean(axis=1)
    tx = disam_jax.disam(optax.sgd(1.0), 0.0, 0.5, num_domains=M)
    updates, state = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f))(p, tx.init(p))
    plain = jax.grad(lambda q: jnp.mean(f(q)))(p)
    for k in p:
      assert updates[k].dtype == jnp.float64
      np.testing.assert_allclose(-updates[k], plain[k], rtol=0, atol=1e-15)  # float32 rounding: ~1e-8
    for field in ("loss", "variance", "perturbation_norm", "grad_norm", "domain_losses", "perturbation_weights"):
      assert getattr(state, field).dtype == jnp.float64, field
    tx = disam_jax.disam(optax.sgd(1.0), 0.3, 0.5, num_domains=M, adaptive=True)
    updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
    g, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, 0.3, 0.5, adaptive=True)
    assert_tree_close({k: -updates[k] for k in updates}, g, atol=1e-12)
    losses, _ = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
    np.testing.assert_allclose(state.variance, np.var(losses), rtol=1e-12)


# --- the SAM family: GSAM and SAGM under the domain-inspired perturbation ------------------------------------------


def _flat(tree, keys):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in keys])


def _numpy_family_gradient(params, x, y, rho, lam, rule, alpha):
  """GSAM / SAGM restated from the papers (Zhuang et al. 2022 Alg. 1; Wang et al. 2023 Alg. 1 / official code) in
  float64 NumPy on hand-derived gradients; the unperturbed gradient is DISAM's g_p (= grad L at lam = 0)."""
  keys = sorted(params)
  losses, grads = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  m = len(losses)
  g_p = ref.combine(grads, [(1 - 2 * lam * (li - losses.mean())) / m for li in losses])
  norm = np.linalg.norm(_flat(g_p, keys))
  step = rho / norm - (alpha if rule == "sagm" else 0.0)
  w_adv = {k: params[k] + step * g_p[k] for k in keys}
  g_adv = ref.combine(ref.domain_losses_and_grads(w_adv, x, y, NUM_CLASSES)[1], [1.0 / m] * m)
  if rule == "sagm":
    return {k: (g_p[k] + g_adv[k]) / 2 for k in keys}
  a, b = _flat(g_p, keys), _flat(g_adv, keys)
  perp = {k: g_p[k] - (a @ b) / (b @ b) * g_adv[k] for k in keys}  # the part of g_p orthogonal to g_adv
  assert abs(_flat(perp, keys) @ b) < 1e-10 * np.linalg.norm(a) * np.linalg.norm(b)
  return {k: g_adv[k] - alpha * perp[k] for k in keys}


@pytest.mark.parametrize("rule, alpha", [("gsam", 0.3), ("sagm", 0.5), ("gsam", None), ("sagm", None)])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_gsam_and_sagm_match_numpy_restatement(rule, alpha, lam):
  x, y, params = make_problem(40)
  rho = 0.2
  used_alpha = alpha if alpha is not None else {"gsam": 0.2, "sagm": 0.001}[rule]
  expected = _numpy_family_gradient(params, x, y, rho, lam, rule, used_alpha)
  p = to_jax(params)
  tx = disam_jax.disam(optax.sgd(1.0), rho, lam, rule=rule, alpha=alpha)
  updates, _ = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=jax_domain_loss_fn(x, y)))(p, tx.init(p))
  assert_tree_close({k: -updates[k] for k in updates}, expected, atol=2e-6)
  # The rule matters on this problem: it is not SAM's gradient.
  sam, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, rho, lam)
  assert max(np.abs(expected[k] - sam[k]).max() for k in sam) > (1e-3 if alpha is not None else 1e-5)


@pytest.mark.parametrize("rule", ["gsam", "sagm"])
def test_gsam_and_sagm_ten_step_trajectories_with_adam(rule):
  x, y, params = make_problem(41)
  rho, lam, alpha = 0.1, 0.3, 0.2
  opt, expected = ref.Adam(0.05), params
  for _ in range(10):
    expected = opt.step(expected, _numpy_family_gradient(expected, x, y, rho, lam, rule, alpha))
  got, _ = run_steps(
    disam_jax.disam(optax.adam(0.05), rho, lam, rule=rule, alpha=alpha), to_jax(params), jax_domain_loss_fn(x, y), 10
  )
  assert_tree_close(got, expected, atol=2e-5)


def test_gsam_lam_zero_matches_finite_difference_gradients():
  """Plain GSAM at lam=0 with every gradient by central finite differences of the NumPy loss (no chain rule)."""
  x, y, params = make_problem(42)
  keys = sorted(params)
  shapes = {k: params[k].shape for k in keys}
  unflat = lambda v: {
    k: v[o : o + int(np.prod(shapes[k]))].reshape(shapes[k])
    for k, o in zip(keys, np.cumsum([0] + [int(np.prod(shapes[k])) for k in keys])[:-1])
  }
  loss = lambda v: ref.domain_losses_and_grads(unflat(v), x, y, NUM_CLASSES)[0].mean()
  fd = lambda v: np.array([(loss(v + 1e-6 * e) - loss(v - 1e-6 * e)) / 2e-6 for e in np.eye(v.size)])
  w = _flat(params, keys)
  rho, alpha = 0.3, 0.4
  g = fd(w)
  g_adv = fd(w + rho * g / np.linalg.norm(g))
  expected = g_adv - alpha * (g - (g @ g_adv) / (g_adv @ g_adv) * g_adv)
  p = to_jax(params)
  tx = disam_jax.disam(optax.sgd(1.0), rho, 0.0, rule="gsam", alpha=alpha)
  updates, _ = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  np.testing.assert_allclose(-_flat(updates, keys), expected, atol=2e-6)


def test_sagm_lam_zero_matches_finite_difference_gradients():
  x, y, params = make_problem(43)
  keys = sorted(params)
  sizes = [int(np.prod(params[k].shape)) for k in keys]
  unflat = lambda v: {k: v[o : o + n].reshape(params[k].shape) for k, o, n in zip(keys, np.cumsum([0] + sizes), sizes)}
  loss = lambda v: ref.domain_losses_and_grads(unflat(v), x, y, NUM_CLASSES)[0].mean()
  fd = lambda v: np.array([(loss(v + 1e-6 * e) - loss(v - 1e-6 * e)) / 2e-6 for e in np.eye(v.size)])
  w = _flat(params, keys)
  rho, alpha = 0.3, 0.5
  g = fd(w)
  expected = (g + fd(w + (rho / np.linalg.norm(g) - alpha) * g)) / 2
  p = to_jax(params)
  tx = disam_jax.disam(optax.sgd(1.0), rho, 0.0, rule="sagm", alpha=alpha)
  updates, _ = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  np.testing.assert_allclose(-_flat(updates, keys), expected, atol=2e-6)


@pytest.mark.parametrize("rule", ["gsam", "sagm"])
def test_gsam_and_sagm_cost_what_sam_costs(rule):
  """Two forward and two backward passes: the compiled step's FLOPs equal SAM's within 2%; domain_loss_fn is
  traced twice."""
  sam_flops = _disam_step_flops(8)
  flops = _disam_step_flops(8, disam_jax.disam(optax.sgd(0.1), 0.05, 0.1, rule=rule))
  assert abs(flops / sam_flops - 1) < 0.02, (flops, sam_flops)
  p, f = mlp_problem(8)
  calls = []
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1, rule=rule)
  jax.jit(lambda q, s: tx.update(None, s, q, domain_loss_fn=lambda r: (calls.append(1), f(r))[1]))(p, tx.init(p))
  assert len(calls) == 2


def test_family_arguments_are_checked():
  with pytest.raises(ValueError, match="rule must be 'sam', 'gsam' or 'sagm'"):
    disam_jax.disam(optax.sgd(0.1), rule="asam")
  with pytest.raises(ValueError, match="alpha is GSAM's / SAGM's parameter"):
    disam_jax.disam(optax.sgd(0.1), alpha=0.1)
  with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
    disam_jax.disam(optax.sgd(0.1), rule="gsam", alpha=-0.1)
  with pytest.raises(ValueError, match="per_device_perturbation"):
    disam_jax.disam(optax.sgd(0.1), rule="sagm", batch_axis_name="d", per_device_perturbation=True)
