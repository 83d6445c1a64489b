"""disam(..., perturb_every=k): the amortized (LookSAM-style) DISAM step, against a NumPy hand computation.

Kept apart from tests/test_disam.py (owned by the core's other developer) to keep both files' changes separate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import disam_jax

RHO, LAM, LR = 0.3, 0.4, 0.1


def _problem(seed=0, m=3, n=6, d=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, n, d))
  y = rng.standard_normal((m, n)) + np.arange(m)[:, None]  # domains with different losses: c_i != a_i
  w = rng.standard_normal(d) * 0.5
  return x, y, w


def _domain_losses(w, x, y):  # [M] mean squared errors of a linear model
  return jnp.mean((jnp.einsum('mnd,d->mn', x, w) - y) ** 2, axis=1)


# ----------------------------------------------------------------------------- NumPy restatement (float64)


def _np_losses_grads(w, x, y):
  r = np.einsum('mnd,d->mn', x, w) - y
  losses = (r ** 2).mean(axis=1)
  grads = 2 * np.einsum('mnd,mn->md', x, r) / x.shape[1]  # [M, d]
  return losses, grads


def _np_run(w, x, y, steps, every, alpha=0.7):
  """Hand computation of `steps` amortized DISAM steps with SGD(LR); returns weights and g_v after each step."""
  m = x.shape[0]
  a = np.full(m, 1 / m)
  g_v = np.zeros_like(w)
  out = []
  for t in range(steps):
    losses, grads = _np_losses_grads(w, x, y)
    loss = a @ losses
    if t % every == 0:
      c = a * (1 - 2 * LAM * (losses - loss))
      g_p = c @ grads
      eps = RHO * g_p / (np.linalg.norm(g_p) + 1e-12)
      g = a @ _np_losses_grads(w + eps, x, y)[1]
      g_v = g - (g @ g_p) / (g_p @ g_p) * g_p
    else:
      g_w = a @ grads
      g = g_w + alpha * np.linalg.norm(g_w) / np.linalg.norm(g_v) * g_v
    w = w - LR * g
    out.append((w.copy(), g_v.copy()))
  return out


def _run(tx, w, x, y, steps):
  state = tx.init(jnp.asarray(w, jnp.float32))

  @jax.jit
  def step(p, s):
    u, s = tx.update(None, s, p, domain_loss_fn=lambda q: _domain_losses(q, x, y))
    return optax.apply_updates(p, u), s

  p, out = jnp.asarray(w, jnp.float32), []
  for _ in range(steps):
    p, state = step(p, state)
    out.append((np.asarray(p), state))
  return out


@pytest.mark.parametrize('every', [2, 3])
def test_reuses_the_orthogonal_component_as_computed_by_hand(every):
  x, y, w = _problem()
  x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=every)
  got = _run(tx, w, x32, y32, steps=2 * every + 1)
  want = _np_run(w, x, y, steps=2 * every + 1, every=every)
  for t, ((p, state), (w_ref, g_v_ref)) in enumerate(zip(got, want)):
    np.testing.assert_allclose(p, w_ref, rtol=1e-5, atol=1e-6, err_msg=f'weights after step {t}')
    np.testing.assert_allclose(state.reused_component, g_v_ref, rtol=1e-4, atol=1e-6, err_msg=f'g_v after {t}')
    full = t % every == 0
    assert (float(state.perturbation_norm) > 0) == full  # in-between steps apply no perturbation


def test_full_steps_are_disam_bit_for_bit_and_k1_is_disam():
  x, y, w = _problem(1)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  plain = _run(disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3), w, x, y, steps=3)
  k1 = _run(disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=1), w, x, y, steps=3)
  k4 = _run(disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=4), w, x, y, steps=1)
  for (pa, sa), (pb, sb) in zip(plain, k1):
    np.testing.assert_array_equal(pa, pb)
    assert sb.reused_component is None
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(plain[0][0], k4[0][0])  # step 0 is a full step


def test_one_forward_pass_between_full_steps():
  x, y, w = _problem(2)
  calls = []

  def counted(q):
    jax.debug.callback(lambda: calls.append(1))
    return _domain_losses(q, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))

  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=3)
  step = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=counted))
  p = jnp.asarray(w, jnp.float32)
  state = tx.init(p)
  per_step = []
  for _ in range(6):
    before = len(calls)
    u, state = step(p, state)
    jax.block_until_ready(u)
    per_step.append(len(calls) - before)
    p = optax.apply_updates(p, u)
  assert per_step == [2, 1, 1, 2, 1, 1]  # forward evaluations: full steps two, the others one


def test_state_structure_fixed_under_scan_with_aux_schedules_and_mask():
  x, y, w = _problem(3)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  params = {'w': jnp.asarray(w, jnp.float32), 'b': jnp.zeros([], jnp.float32)}

  def f(p):
    losses = _domain_losses(p['w'], x, y) + p['b'] ** 2
    return losses, {'seen': jnp.sum(p['w'])}  # aux: a function of the weights the losses were evaluated at

  tx = disam_jax.disam(optax.sgd(LR), optax.linear_schedule(0.1, 0.3, 10), LAM, num_domains=3, has_aux=True,
                       aux_example={'seen': jnp.zeros([])}, perturbation_mask={'w': True, 'b': False},
                       perturb_every=2, reuse_weight=optax.linear_schedule(0.5, 1.0, 10))
  state = tx.init(params)
  assert jax.tree.structure(state.reused_component) == jax.tree.structure(params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(None, s, p, domain_loss_fn=f)
    return (optax.apply_updates(p, u), s), (s.aux['seen'], jnp.sum(p['w']))

  (p, s), (aux, before) = jax.jit(lambda c: jax.lax.scan(body, c, None, length=5))((params, state))
  np.testing.assert_allclose(aux, before, rtol=1e-6)  # aux from the unperturbed pass, in-between steps too
  assert int(s.count) == 5 and np.all(np.isfinite(np.asarray(p['w'])))


def test_pmap_equals_one_device():
  x, y, w = _problem(4, m=2, n=8)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  n_dev = 2
  assert jax.device_count() >= n_dev
  one = _run(disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=2, perturb_every=2), w, x, y, steps=4)

  def local(q, xs, ys):  # sums and counts of this device's slice of every domain
    r = (jnp.einsum('mnd,d->mn', xs, q) - ys) ** 2
    return disam_jax.DomainLosses(r.sum(axis=1), jnp.full((2,), r.shape[1], jnp.float32))

  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=2, batch_axis_name='b', perturb_every=2)

  def step(p, s, xs, ys):
    u, s = tx.update(None, s, p, domain_loss_fn=lambda q: local(q, xs, ys))
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name='b', devices=jax.devices()[:n_dev])
  split = lambda a: a.reshape(a.shape[0], n_dev, -1, *a.shape[2:]).swapaxes(0, 1)
  p = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (n_dev, w.shape[0]))
  s = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), tx.init(jnp.asarray(w, jnp.float32)))
  for t in range(4):
    p, s = pstep(p, s, split(x), split(y))
    np.testing.assert_allclose(np.asarray(p[0]), one[t][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p[0]), np.asarray(p[1]))


def test_bfloat16_params_keep_their_dtype():
  x, y, w = _problem(5)
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=2)
  p = jnp.asarray(w, jnp.bfloat16)
  s = tx.init(p)
  f = lambda q: _domain_losses(q.astype(jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  for _ in range(3):
    u, s = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f))(p, s)
    p = optax.apply_updates(p, u)
  assert p.dtype == s.reused_component.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(p)))


@pytest.mark.parametrize('kwargs,message', [
    (dict(perturb_every=0), 'int >= 1'),
    (dict(perturb_every=2.5), 'int >= 1'),
    (dict(perturb_every=True), 'int >= 1'),
    (dict(reuse_weight=0.5), 'needs perturb_every > 1'),
    (dict(perturb_every=2, reuse_weight=-1.0), 'reuse_weight'),
    (dict(perturb_every=2, batch_axis_name='b', per_device_perturbation=True), 'per_device_perturbation'),
])
def test_refusals(kwargs, message):
  with pytest.raises(ValueError, match=message):
    disam_jax.disam(optax.sgd(LR), RHO, LAM, **kwargs)
