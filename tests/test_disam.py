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

NUM_CLASSES = 3
M, B, D = 4, 6, 5


def make_problem(seed=0, m=M, b=B):
  rng = np.random.default_rng(seed)
  # Domain shift: each domain has its own input offset and scale, so the domain losses differ.
  x = np.stack([rng.normal(loc=i * 0.7, scale=1.0 + 0.3 * i, size=(b, D)) for i in range(m)])
  y = rng.integers(0, NUM_CLASSES, size=(m, b))
  params = {'w': rng.normal(size=(D, NUM_CLASSES)) * 0.5, 'b': rng.normal(size=(NUM_CLASSES,)) * 0.1}
  return x, y, params


def jax_domain_loss_fn(x, y):
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)

  def f(p):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)

  return f


def to_jax(params, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in params.items()}


def run_steps(tx, params, f, steps, trajectory=None):
  """`steps` jitted DISAM steps; appends the params after each step to `trajectory` if given."""
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    if trajectory is not None:
      trajectory.append(params)
  return params, state


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


@pytest.mark.parametrize('lam', [0.0, 0.1, 0.7, 3.0])
def test_perturbation_direction_matches_finite_differences(lam):
  x, y, params = make_problem(1)
  rho = 0.05
  shapes = {k: v.shape for k, v in params.items()}
  flat = np.concatenate([params[k].ravel() for k in shapes])
  h = 1e-6
  fd = np.array([
      (_explicit_objective(flat + h * e, shapes, x, y, lam) - _explicit_objective(flat - h * e, shapes, x, y, lam))
      / (2 * h)
      for e in np.eye(flat.size)
  ])
  # With base_tx = identity-like sgd(1) and a *linear* read-out of eps we recover g_p: the state's
  # perturbation_norm is ||g_p||, and eps = rho g_p/||g_p|| moves the params; compare eps to the FD direction.
  tx = disam_jax.disam(optax.sgd(0.0), rho=rho, lam=lam)
  f = jax_domain_loss_fn(x, y)
  p = to_jax(params)
  captured = {}

  def capturing_f(q):
    captured.setdefault('calls', []).append(q)
    return f(q)

  _, state = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=capturing_f))(p, tx.init(p))
  np.testing.assert_allclose(float(state.perturbation_norm), np.linalg.norm(fd), rtol=1e-4)
  # Independently check the perturbed point: eps = rho * fd / ||fd||, evaluated via the gradient at w + eps.
  expected_g, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, rho, lam)
  tx1 = disam_jax.disam(optax.sgd(1.0), rho=rho, lam=lam)
  updates, _ = tx1.update(None, tx1.init(p), p, domain_loss_fn=f)
  assert_tree_close({k: -updates[k] for k in updates}, expected_g, atol=2e-6)
  g_p_fd = {}
  i = 0
  for k, shape in shapes.items():
    n = int(np.prod(shape))
    g_p_fd[k] = fd[i : i + n].reshape(shape)
    i += n
  _, g_p_ref = ref.disam_gradient(params, x, y, NUM_CLASSES, rho, lam)
  assert_tree_close(g_p_ref, g_p_fd, atol=1e-6)  # the reweighting identity (c_i) equals the explicit objective


def test_reweighted_vjp_identity_against_per_domain_gradients():
  """g_p = sum_i c_i grad L_i with c_i = a_i(1 - 2 lam (L_i - L)), per-domain gradients by hand in NumPy."""
  x, y, params = make_problem(2)
  lam, rho = 0.5, 0.1
  losses, grads = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  c = (1.0 / M) * (1.0 - 2.0 * lam * (losses - losses.mean()))
  g_p = ref.combine(grads, c)
  tx = disam_jax.disam(optax.sgd(0.0), rho=rho, lam=lam)
  p = to_jax(params)
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  np.testing.assert_allclose(state.perturbation_norm, math.sqrt(sum(np.sum(v**2) for v in g_p.values())), rtol=1e-5)
  np.testing.assert_allclose(state.domain_losses, losses, rtol=1e-5)
  np.testing.assert_allclose(state.loss, losses.mean(), rtol=1e-5)
  np.testing.assert_allclose(state.variance, np.var(losses), rtol=1e-4)


# --- trajectories against the hand-written NumPy step ---------------------------------------------------------


@pytest.mark.parametrize('adaptive', [False, True])
@pytest.mark.parametrize('base', ['sgd_momentum_wd', 'adam'])
def test_ten_step_trajectory_matches_numpy_reference(base, adaptive):
  x, y, params = make_problem(3)
  rho, lam = 0.1, 0.3
  if base == 'sgd_momentum_wd':
    base_tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
    opt = ref.SGDMomentumWithDecay(0.1, 0.9, 1e-2)
  else:
    base_tx = optax.adam(0.05)
    opt = ref.Adam(0.05)
  expected = params
  for _ in range(10):
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, rho, lam, adaptive=adaptive)
    expected = opt.step(expected, g)
  got, _ = run_steps(disam_jax.disam(base_tx, rho, lam, adaptive=adaptive), to_jax(params), jax_domain_loss_fn(x, y), 10)
  assert_tree_close(got, expected, atol=2e-5)
  # The reference must actually move the parameters, or the test would prove nothing.
  assert max(np.abs(expected[k] - params[k]).max() for k in params) > 1e-2


def _conformance():
  path = pathlib.Path(__file__).parent / 'data' / 'disam_reference_v1.json'
  return json.loads(path.read_text())


@pytest.mark.parametrize('case', range(6))
def test_conformance_vectors(case):
  """Trajectories from an independent PyTorch restatement of the authors' loop (../shared/conformance)."""
  d = _conformance()
  c = d['cases'][case]
  x, y = jnp.asarray(d['x'], jnp.float32), jnp.asarray(d['y'])
  params = {k: jnp.asarray(v, jnp.float32) for k, v in d['params_init'].items()}

  def f(p):
    logits = jnp.tanh(x @ p['w1'].T + p['b1']) @ p['w2'].T + p['b2']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)

  b = c['base']
  assert b['kind'] == 'sgd'
  base_tx = optax.chain(
      optax.add_decayed_weights(b['weight_decay_coupled']),
      optax.sgd(b['learning_rate'], b['momentum'], nesterov=b['nesterov']),
  )
  tx = disam_jax.disam(base_tx, rho=c['rho'], lam=c['lam'], adaptive=c['adaptive'])
  trajectory = []
  ten, _ = run_steps(tx, params, f, 10, trajectory)
  assert_tree_close(trajectory[0], c['params_after_1_step'], atol=2e-5)
  assert_tree_close(ten, c['params_after_10_steps'], atol=2e-5)


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


def _count_dots(m):
  x, y, params = make_problem(7, m=m, b=64 // m)
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  p = to_jax(params)
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(None, s, p, domain_loss_fn=jax_domain_loss_fn(x, y)))(p, tx.init(p))
  return str(jaxpr).count('dot_general')


def test_graph_size_does_not_grow_with_number_of_domains():
  """No per-domain backward passes: the step has the same matmuls at M=2 and M=32 (fixed total batch)."""
  assert _count_dots(2) == _count_dots(32)


# --- state, logging, aux ---------------------------------------------------------------------------------------


def test_state_exposes_metrics_and_unperturbed_aux():
  x, y, params = make_problem(8)
  f = jax_domain_loss_fn(x, y)

  def f_aux(p):
    return f(p), {'first_weight': p['w'][0, 0]}

  tx = disam_jax.disam(optax.sgd(0.1), rho=0.5, lam=0.1, has_aux=True, num_domains=M)
  p = to_jax(params)
  state = tx.init(p)
  assert state.domain_losses.shape == (M,) and state.aux is None
  _, state = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f_aux))(p, state)
  # aux comes from the unperturbed evaluation: the weight itself, not the perturbed weight.
  assert float(state.aux['first_weight']) == float(p['w'][0, 0])
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
  with pytest.raises(ValueError, match='exactly one DisamState'):
    disam_jax.find_disam_state(optax.sgd(0.1).init(p))


def test_chain_with_ordinary_transformations():
  """optax.chain forwards domain_loss_fn to every member; members after disam act on its updates."""
  x, y, params = make_problem(10)
  p = to_jax(params)
  f = jax_domain_loss_fn(x, y)
  alone, _ = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1).update(
      None, disam_jax.disam(optax.sgd(0.1), 0.05, 0.1).init(p), p, domain_loss_fn=f)
  chained = optax.chain(optax.clip_by_global_norm(1e-3), disam_jax.disam(optax.sgd(0.1), 0.05, 0.1), optax.scale(0.5))
  got, _ = chained.update(jax.tree.map(jnp.ones_like, p), chained.init(p), p, domain_loss_fn=f)
  assert_tree_close(got, {k: 0.5 * alone[k] for k in alone}, atol=1e-7)


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
    losses = optax.softmax_cross_entropy_with_integer_labels(xk @ q['w'] + q['b'], yk)
    return disam_jax.domain_losses_from_ids(losses, ik, M)

  tx = disam_jax.disam(optax.sgd(0.1), 0.1, 0.4)
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  # Reference: the same step on the three present domains only.
  present = [0, 1, 3]
  g, _ = ref.disam_gradient(params, x[present], y[present], NUM_CLASSES, 0.1, 0.4)
  assert_tree_close({k: -updates[k] / 0.1 for k in updates}, g, atol=2e-6)
  assert float(state.domain_counts[2]) == 0.0 and float(state.domain_losses[2]) == 0.0
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state))


def test_all_domains_absent_gives_zero_step_not_nan():
  p = to_jax(make_problem(14)[2])
  f = lambda q: disam_jax.DomainLosses(jnp.zeros(3) * q['b'][0], jnp.zeros(3))
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
    losses.append(li[0]); grads.append(gi[0])
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
    per_example = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(xf, jnp.float32) @ q['w'] + q['b'], yf)
    return disam_jax.domain_losses_from_ids(per_example, ids, 3)

  tx = disam_jax.disam(optax.sgd(1.0), rho, lam, domain_weights='count')
  p = to_jax(params)
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  assert_tree_close({k: -updates[k] for k in updates}, expected, atol=2e-6)
  np.testing.assert_allclose(state.variance, a @ (losses - mean) ** 2, rtol=1e-4)


def test_fixed_domain_weights():
  x, y, params = make_problem(16)
  w = np.array([1.0, 1.0, 1.0, 1.0])
  p = to_jax(params)
  f = jax_domain_loss_fn(x, y)
  a, _ = disam_jax.disam(optax.sgd(1.0), 0.1, 0.3, domain_weights=w).update(
      None, disam_jax.disam(optax.sgd(1.0), 0.1, 0.3).init(p), p, domain_loss_fn=f)
  b, _ = disam_jax.disam(optax.sgd(1.0), 0.1, 0.3).update(
      None, disam_jax.disam(optax.sgd(1.0), 0.1, 0.3).init(p), p, domain_loss_fn=f)
  assert_tree_close(a, b, atol=1e-7)


# --- numerics --------------------------------------------------------------------------------------------------


def test_zero_gradient_gives_zero_perturbation_not_nan():
  p = {'w': jnp.ones((3,))}
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  f = lambda q: jnp.array([1.0, 2.0]) + 0.0 * q['w'].sum()
  updates, state = tx.update(None, tx.init(p), p, domain_loss_fn=f)
  assert np.all(np.asarray(updates['w']) == 0.0)
  assert float(state.perturbation_norm) == 0.0


def test_bfloat16_params():
  x, y, params = make_problem(17)
  p16 = to_jax(params, jnp.bfloat16)
  f = lambda q: jax_domain_loss_fn(x, y)({k: v.astype(jnp.float32) for k, v in q.items()})
  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  got, state = run_steps(tx, p16, f, 3)
  assert all(v.dtype == jnp.bfloat16 for v in got.values())
  assert state.perturbation_norm.dtype == jnp.float32 and state.variance.dtype == jnp.float32
  expected = params
  for _ in range(3):
    g, _ = ref.disam_gradient(expected, x, y, NUM_CLASSES, 0.05, 0.1)
    expected = {k: expected[k] - 0.1 * g[k] for k in expected}
  assert_tree_close(got, expected, atol=3e-2)  # bf16 has ~3 significant digits


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
  assert int(state.base_state.notfinite_count) == 0 and np.any(np.asarray(updates['w']) != 0)
  # Without it, NaN propagates into the updates: it is never silently zeroed.
  raw = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  updates, _ = raw.update(None, raw.init(p), p, domain_loss_fn=bad)
  assert np.isnan(np.asarray(updates['w'])).all()


def test_perturbation_mask_restricts_perturbation_and_norm():
  x, y, params = make_problem(19)
  rho, lam = 0.2, 0.3
  losses, grads = ref.domain_losses_and_grads(params, x, y, NUM_CLASSES)
  g_p = ref.combine(grads, (1.0 / M) * (1 - 2 * lam * (losses - losses.mean())))
  pert = dict(params)
  pert['w'] = params['w'] + rho * g_p['w'] / np.linalg.norm(g_p['w'])  # only 'w' perturbed, norm over 'w' alone
  _, pgrads = ref.domain_losses_and_grads(pert, x, y, NUM_CLASSES)
  expected = ref.combine(pgrads, [1.0 / M] * M)
  p = to_jax(params)
  tx = disam_jax.disam(optax.sgd(1.0), rho, lam, perturbation_mask={'w': True, 'b': False})
  updates, _ = tx.update(None, tx.init(p), p, domain_loss_fn=jax_domain_loss_fn(x, y))
  assert_tree_close({k: -updates[k] for k in updates}, expected, atol=2e-6)


def test_gradient_accumulation_inside_the_loss_function_equals_big_batch():
  """Micro-batches summed with lax.scan inside domain_loss_fn give the same step as the whole batch."""
  x, y, params = make_problem(20, b=8)
  p = to_jax(params)
  xs = jnp.asarray(x, jnp.float32).reshape(M, 4, 2, D).transpose(1, 0, 2, 3)  # 4 micro-batches [M, 2, D]
  ys = jnp.asarray(y).reshape(M, 4, 2).transpose(1, 0, 2)

  def accumulated(q):
    def body(acc, batch):
      xb, yb = batch
      losses = optax.softmax_cross_entropy_with_integer_labels(xb @ q['w'] + q['b'], yb)
      return acc + disam_jax.domain_losses_from_grouped(losses).total, None

    total, _ = jax.lax.scan(body, jnp.zeros(M), (xs, ys))
    return disam_jax.DomainLosses(total, jnp.full(M, 8.0))

  tx = disam_jax.disam(optax.sgd(0.1), 0.1, 0.3)
  a, _ = run_steps(tx, p, accumulated, 3)
  b, _ = run_steps(tx, p, jax_domain_loss_fn(x, y), 3)
  assert_tree_close(a, b, atol=1e-6)


# --- errors, at trace time, naming the value -------------------------------------------------------------------


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'rho': -0.1}, 'rho=-0.1'),
        ({'lam': -1.0}, 'lam=-1.0'),
        ({'rho': float('nan')}, 'rho=nan'),
        ({'lam': float('inf')}, 'lam=inf'),
        ({'rho': optax.linear_schedule(-0.1, 0.05, 10)}, r'rho\(0\) = -0.1'),
        ({'domain_weights': 'balanced'}, "'balanced'"),
        ({'domain_weights': [1.0, -1.0]}, 'finite values >= 0'),
        ({'domain_weights': [1.0, 1.0], 'num_domains': 3}, '2 entries but num_domains=3'),
        ({'per_device_perturbation': True}, 'needs batch_axis_name'),
        ({'aux_example': {'a': 1.0}}, 'only meaningful with has_aux=True'),
        ({'num_domains': 0}, 'num_domains must be a positive int'),
        ({'rho': 'big'}, None),
    ],
)
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(TypeError if match is None else ValueError, match=match or 'float or an optax schedule'):
    disam_jax.disam(optax.sgd(0.1), **kwargs)


def _update(tx, f, p=None):
  p = p if p is not None else {'w': jnp.ones(3)}
  return tx.update(None, tx.init(p), p, domain_loss_fn=f)


def test_missing_domain_loss_fn():
  tx = disam_jax.disam(optax.sgd(0.1))
  p = {'w': jnp.ones(3)}
  with pytest.raises(ValueError, match='domain_loss_fn'):
    tx.update(None, tx.init(p), p)


def test_loss_fn_returning_non_vector():
  with pytest.raises(ValueError, match=r'shape \[M\].*got losses of shape \(2, 3\)'):
    _update(disam_jax.disam(optax.sgd(0.1)), lambda q: jnp.ones((2, 3)) * q['w'].sum())
  with pytest.raises(ValueError, match=r'got losses of shape \(\)'):
    _update(disam_jax.disam(optax.sgd(0.1)), lambda q: q['w'].sum())


def test_number_of_domains_must_not_change():
  tx = disam_jax.disam(optax.sgd(0.1), num_domains=3)
  with pytest.raises(ValueError, match='returned 4 domain losses, but this optimizer state holds 3'):
    _update(tx, lambda q: jnp.ones(4) * q['w'].sum())
  tx = disam_jax.disam(optax.sgd(0.1))
  p = {'w': jnp.ones(3)}
  _, state = tx.update(None, tx.init(p), p, domain_loss_fn=lambda q: q['w'] ** 2)
  with pytest.raises(ValueError, match='returned 2 domain losses, but this optimizer state holds 3'):
    jax.jit(lambda s: tx.update(None, s, p, domain_loss_fn=lambda q: q['w'][:2] ** 2))(state)


def test_single_domain_with_positive_lam_is_an_error_and_lam_zero_is_sam():
  with pytest.raises(ValueError, match='single domain loss with lam=0.1'):
    _update(disam_jax.disam(optax.sgd(0.1), lam=0.1), lambda q: jnp.sum(q['w'] ** 2)[None])
  updates, _ = _update(disam_jax.disam(optax.sgd(0.1), lam=0.0), lambda q: jnp.sum(q['w'] ** 2)[None])
  assert np.all(np.isfinite(np.asarray(updates['w'])))


def test_wrong_length_domain_weights():
  with pytest.raises(ValueError, match='domain_weights has 2 entries but domain_loss_fn returned 3'):
    _update(disam_jax.disam(optax.sgd(0.1), domain_weights=[1.0, 2.0]), lambda q: q['w'] ** 2)


def test_tuple_without_has_aux():
  with pytest.raises(ValueError, match='has_aux=True'):
    _update(disam_jax.disam(optax.sgd(0.1)), lambda q: (q['w'] ** 2, {}))
