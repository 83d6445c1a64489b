"""disam(..., perturb_every=k | perturb_when=VarianceTrigger(...)): the amortized (LookSAM-style) DISAM step and
its variance trigger, against a NumPy hand computation (the trigger's decisions, reference and updates).

Kept apart from tests/test_disam.py (owned by the core's other developer) to keep both files' changes separate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import disam_jax
from tests._steps import disam_step, run_steps

RHO, LAM, LR = 0.3, 0.4, 0.1


def _problem(seed=0, m=3, n=6, d=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, n, d))
  y = rng.standard_normal((m, n)) + np.arange(m)[:, None]  # domains with different losses: c_i != a_i
  w = rng.standard_normal(d) * 0.5
  return x, y, w


def _domain_losses(w, x, y):  # [M] mean squared errors of a linear model
  return jnp.mean((jnp.einsum("mnd,d->mn", x, w) - y) ** 2, axis=1)


# ----------------------------------------------------------------------------- NumPy restatement (float64)


def _np_losses_grads(w, x, y):
  r = np.einsum("mnd,d->mn", x, w) - y
  losses = (r**2).mean(axis=1)
  grads = 2 * np.einsum("mnd,mn->md", x, r) / x.shape[1]  # [M, d]
  return losses, grads


def _np_run(w, xs, ys, every=1, alpha=0.7, trigger=None):
  """Hand computation of amortized DISAM steps with SGD(LR), step t on the batch (xs[t], ys[t]): a full step every
  `every` steps, or when `trigger = (min_gap, max_gap, factor, decay)` says so (factor a float or a function of t).
  Returns, after each step: weights, g_v, whether it ascended, the trigger's reference and steps since an ascent."""
  m = xs[0].shape[0]
  a = np.full(m, 1 / m)
  g_v = np.zeros_like(w)
  reference, since = 0.0, None if trigger is None else trigger[1] - 1
  out = []
  for t, (x, y) in enumerate(zip(xs, ys)):
    losses, grads = _np_losses_grads(w, x, y)
    loss = a @ losses
    variance = a @ (losses - loss) ** 2
    if trigger is None:
      full = t % every == 0
    else:  # VarianceTrigger: decide against the reference of the past steps, then update it with this step's
      min_gap, max_gap, factor, decay = trigger
      gap = since + 1
      f = factor(t) if callable(factor) else factor
      full = gap >= max_gap or (gap >= min_gap and variance > f * reference)
      reference = variance if t == 0 else decay * reference + (1 - decay) * variance
      since = 0 if full else gap
    if full:
      c = a * (1 - 2 * LAM * (losses - loss))
      g_p = c @ grads
      eps = RHO * g_p / (np.linalg.norm(g_p) + 1e-12)
      g = a @ _np_losses_grads(w + eps, x, y)[1]
      g_v = g - (g @ g_p) / (g_p @ g_p) * g_p
    else:
      g_w = a @ grads
      g = g_w + (alpha * np.linalg.norm(g_w) / np.linalg.norm(g_v) * g_v if alpha else 0)
    w = w - LR * g
    out.append(dict(w=w.copy(), g_v=g_v.copy(), full=full, reference=reference, since=since))
  return out


def _batches(seed, steps, m=3, n=6, d=4):
  """`steps` random batches of the _problem kind (so the domain-loss variance moves from step to step)."""
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((steps, m, n, d))
  ys = rng.standard_normal((steps, m, n)) * rng.uniform(0.2, 2.0, (steps, m, 1)) + np.arange(m)[:, None]
  return xs, ys


def _run_batches(tx, w, xs, ys):
  """Jitted steps of `tx` on the batches; the weights and the state after each."""
  p = jnp.asarray(w, jnp.float32)
  state = tx.init(p)
  step = jax.jit(disam_step(tx, _domain_losses))
  out = []
  for x, y in zip(xs, ys):
    p, state = step(p, state, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    out.append((np.asarray(p), state))
  return out


def _run(tx, w, x, y, steps):
  state = tx.init(jnp.asarray(w, jnp.float32))
  step = jax.jit(disam_step(tx, lambda q: _domain_losses(q, x, y)))
  p, out = jnp.asarray(w, jnp.float32), []
  for _ in range(steps):
    p, state = step(p, state)
    out.append((np.asarray(p), state))
  return out


@pytest.mark.parametrize("every", [2, 3])
def test_reuses_the_orthogonal_component_as_computed_by_hand(every):
  x, y, w = _problem()
  x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=every, reuse_weight=0.7)
  got = _run(tx, w, x32, y32, steps=2 * every + 1)
  want = _np_run(w, [x] * (2 * every + 1), [y] * (2 * every + 1), every=every)
  for t, ((p, state), ref) in enumerate(zip(got, want)):
    np.testing.assert_allclose(p, ref["w"], rtol=1e-5, atol=1e-6, err_msg=f"weights after step {t}")
    np.testing.assert_allclose(state.reused_component, ref["g_v"], rtol=1e-4, atol=1e-6, err_msg=f"g_v after {t}")
    full = t % every == 0
    assert (float(state.perturbation_norm) > 0) == full  # in-between steps apply no perturbation
    assert float(state.ascended) == float(full)
    assert state.trigger_reference is None and state.steps_since_ascent is None


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
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros([], jnp.float32)}

  def f(p):
    losses = _domain_losses(p["w"], x, y) + p["b"] ** 2
    return losses, {"seen": jnp.sum(p["w"])}  # aux: a function of the weights the losses were evaluated at

  tx = disam_jax.disam(
    optax.sgd(LR),
    optax.linear_schedule(0.1, 0.3, 10),
    LAM,
    num_domains=3,
    has_aux=True,
    aux_example={"seen": jnp.zeros([])},
    perturbation_mask={"w": True, "b": False},
    perturb_every=2,
    reuse_weight=optax.linear_schedule(0.5, 1.0, 10),
  )
  state = tx.init(params)
  assert jax.tree.structure(state.reused_component) == jax.tree.structure(params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(None, s, p, domain_loss_fn=f)
    return (optax.apply_updates(p, u), s), (s.aux["seen"], jnp.sum(p["w"]))

  (p, s), (aux, before) = jax.jit(lambda c: jax.lax.scan(body, c, None, length=5))((params, state))
  np.testing.assert_allclose(aux, before, rtol=1e-6)  # aux from the unperturbed pass, in-between steps too
  assert int(s.count) == 5 and np.all(np.isfinite(np.asarray(p["w"])))


def test_pmap_equals_one_device():
  x, y, w = _problem(4, m=2, n=8)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  n_dev = 2
  assert jax.device_count() >= n_dev
  one = _run(
    disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=2, perturb_every=2, reuse_weight=0.7), w, x, y, steps=4
  )

  def local(q, xs, ys):  # sums and counts of this device's slice of every domain
    r = (jnp.einsum("mnd,d->mn", xs, q) - ys) ** 2
    return disam_jax.DomainLosses(r.sum(axis=1), jnp.full((2,), r.shape[1], jnp.float32))

  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=2, batch_axis_name="b", perturb_every=2, reuse_weight=0.7)

  pstep = jax.pmap(disam_step(tx, local), axis_name="b", devices=jax.devices()[:n_dev])
  split = lambda a: a.reshape(a.shape[0], n_dev, -1, *a.shape[2:]).swapaxes(0, 1)
  p = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (n_dev, w.shape[0]))
  s = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), tx.init(jnp.asarray(w, jnp.float32)))
  for t in range(4):
    p, s = pstep(p, s, split(x), split(y))
    np.testing.assert_allclose(np.asarray(p[0]), one[t][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p[0]), np.asarray(p[1]))


def test_bfloat16_params_keep_their_dtype():
  x, y, w = _problem(5)
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=2, reuse_weight=0.7)
  p = jnp.asarray(w, jnp.bfloat16)
  s = tx.init(p)
  f = lambda q: _domain_losses(q.astype(jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  p, s = run_steps(tx, p, f, 3, state=s)
  assert p.dtype == s.reused_component.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(p)))


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(perturb_every=0), "int >= 1"),
    (dict(perturb_every=2.5), "int >= 1"),
    (dict(perturb_every=True), "int >= 1"),
    (dict(reuse_weight=0.5), "needs perturb_every > 1"),
    (dict(perturb_every=2, reuse_weight=-1.0), "reuse_weight"),
    (dict(perturb_every=2, batch_axis_name="b", per_device_perturbation=True), "per_device_perturbation"),
  ],
)
def test_refusals(kwargs, message):
  with pytest.raises(ValueError, match=message):
    disam_jax.disam(optax.sgd(LR), RHO, LAM, **kwargs)


# ----------------------------------------------------------------------------- reuse_weight's default, 0


def test_default_reuse_weight_is_zero_plain_gradient_steps_in_between_and_no_g_v_kept():
  xs, ys = _batches(6, 7)
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=3)
  explicit = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_every=3, reuse_weight=0.0)
  got, got_explicit = _run_batches(tx, xs[0, 0, 0], xs, ys), _run_batches(explicit, xs[0, 0, 0], xs, ys)
  want = _np_run(xs[0, 0, 0].astype(np.float64), xs, ys, every=3, alpha=0.0)
  for t, ((p, state), (p2, _), ref) in enumerate(zip(got, got_explicit, want)):
    np.testing.assert_allclose(p, ref["w"], rtol=1e-5, atol=1e-6, err_msg=f"weights after step {t}")
    np.testing.assert_array_equal(p, p2)
    assert state.reused_component is None  # nothing reused: nothing computed or kept
    assert float(state.ascended) == float(t % 3 == 0)


# ----------------------------------------------------------------------------- perturb_when=VarianceTrigger


TRIGGER = disam_jax.VarianceTrigger(min_gap=2, max_gap=5, factor=1.0, decay=0.7)


def _decisions(out):
  return [bool(r["full"]) for r in out]


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_variance_trigger_decisions_reference_and_updates_as_computed_by_hand(alpha):
  xs, ys = _batches(7, 24)
  w0 = xs[0, 0, 0] * 0.5
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_when=TRIGGER, reuse_weight=alpha)
  got = _run_batches(tx, w0, xs, ys)
  want = _np_run(w0.astype(np.float64), xs, ys, alpha=alpha, trigger=tuple(TRIGGER))
  fired = _decisions(want)
  # the case must exercise every branch of the rule: ascents from the variance (gap < max_gap), from the cap
  # (gap == max_gap), and high variances refused by min_gap
  gaps = np.diff(np.flatnonzero(fired))
  assert fired[0] and set(gaps) >= {2, 5} and any(g < 5 for g in gaps), fired
  for t, ((p, state), ref) in enumerate(zip(got, want)):
    assert bool(state.ascended) == ref["full"], f"decision at step {t}: {fired}"
    assert int(state.steps_since_ascent) == ref["since"], t
    np.testing.assert_allclose(float(state.trigger_reference), ref["reference"], rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(p, ref["w"], rtol=2e-5, atol=1e-6, err_msg=f"weights after step {t}")
    assert (float(state.perturbation_norm) > 0) == ref["full"]
    if alpha:
      np.testing.assert_allclose(state.reused_component, ref["g_v"], rtol=1e-4, atol=1e-6, err_msg=f"g_v {t}")
    else:
      assert state.reused_component is None


def test_variance_trigger_rate_is_bounded_by_the_gaps_whatever_the_factor():
  xs, ys = _batches(8, 30)
  w0 = xs[0, 0, 0] * 0.5
  for factor, expect in ((0.0, "every min_gap"), (1e9, "every max_gap")):
    trig = disam_jax.VarianceTrigger(min_gap=3, max_gap=7, factor=factor, decay=0.9)
    tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_when=trig)
    fired = [bool(s.ascended) for _, s in _run_batches(tx, w0, xs, ys)]
    gap = 3 if expect == "every min_gap" else 7
    assert fired == [t % gap == 0 for t in range(30)], (factor, fired)


def test_variance_trigger_untriggered_steps_run_one_forward_pass():
  xs, ys = _batches(9, 10)
  calls = []
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_when=TRIGGER)

  @jax.jit
  def step(p, s, x, y):
    def counted(q):
      jax.debug.callback(lambda: calls.append(1))
      return _domain_losses(q, x, y)

    u, s = tx.update(None, s, p, domain_loss_fn=counted)
    return optax.apply_updates(p, u), s

  p = jnp.asarray(xs[0, 0, 0], jnp.float32)
  s = tx.init(p)
  per_step, fired = [], []
  for x, y in zip(xs, ys):
    before = len(calls)
    p, s = step(p, s, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    jax.block_until_ready(p)
    per_step.append(len(calls) - before)
    fired.append(bool(s.ascended))
  assert not all(fired) and any(fired[1:])
  assert per_step == [2 if f else 1 for f in fired]


def test_variance_trigger_factor_schedule_scan_and_inject_hyperparams():
  xs, ys = _batches(10, 12)
  w0 = xs[0, 0, 0] * 0.5
  factor = optax.linear_schedule(0.5, 2.0, 10)
  trig = disam_jax.VarianceTrigger(min_gap=1, max_gap=4, factor=factor, decay=0.8)
  want = _np_run(w0.astype(np.float64), xs, ys, alpha=0.0, trigger=(1, 4, lambda t: float(factor(t)), 0.8))
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=3, perturb_when=trig)
  x32, y32 = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)

  def body(carry, batch):
    p, s = carry
    u, s = tx.update(None, s, p, domain_loss_fn=lambda q: _domain_losses(q, *batch))
    return (optax.apply_updates(p, u), s), (s.ascended, p)

  p0 = jnp.asarray(w0, jnp.float32)
  (p, _), (ascended, _) = jax.jit(lambda c: jax.lax.scan(body, c, (x32, y32)))((p0, tx.init(p0)))
  assert [bool(a) for a in ascended] == _decisions(want)
  np.testing.assert_allclose(np.asarray(p), want[-1]["w"], rtol=2e-5, atol=1e-6)
  # inject_hyperparams: rho and lam traced, perturb_when (a NamedTuple) static; the same steps
  injected = optax.inject_hyperparams(disam_jax.disam, static_args=("base_tx", "num_domains", "perturb_when"))(
    base_tx=optax.sgd(LR), rho=RHO, lam=LAM, num_domains=3, perturb_when=trig
  )
  got = _run_batches(injected, w0, xs, ys)
  np.testing.assert_allclose(got[-1][0], want[-1]["w"], rtol=2e-5, atol=1e-6)


def test_variance_trigger_pmap_equals_one_device():
  xs, ys = _batches(11, 8, m=2, n=8)
  w0 = xs[0, 0, 0] * 0.5
  one = _run_batches(disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=2, perturb_when=TRIGGER), w0, xs, ys)
  n_dev = 2
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=2, batch_axis_name="b", perturb_when=TRIGGER)

  def local(q, xb, yb):
    r = (jnp.einsum("mnd,d->mn", xb, q) - yb) ** 2
    return disam_jax.DomainLosses(r.sum(axis=1), jnp.full((2,), r.shape[1], jnp.float32))

  def step(p, s, xb, yb):
    u, s = tx.update(None, s, p, domain_loss_fn=lambda q: local(q, xb, yb))
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name="b", devices=jax.devices()[:n_dev])
  split = lambda a: jnp.asarray(a, jnp.float32).reshape(a.shape[0], n_dev, -1, *a.shape[2:]).swapaxes(0, 1)
  p = jnp.broadcast_to(jnp.asarray(w0, jnp.float32), (n_dev, w0.shape[0]))
  s = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), tx.init(jnp.asarray(w0, jnp.float32)))
  for t, (x, y) in enumerate(zip(xs, ys)):
    p, s = pstep(p, s, split(x), split(y))
    np.testing.assert_allclose(np.asarray(p[0]), one[t][0], rtol=1e-5, atol=1e-6)
    assert bool(s.ascended[0]) == bool(one[t][1].ascended) == bool(s.ascended[1])


@pytest.mark.parametrize(
  "kwargs,error,message",
  [
    (dict(perturb_when="variance"), TypeError, r"disam_jax.VarianceTrigger\(min_gap"),
    (dict(perturb_when=TRIGGER, perturb_every=4), ValueError, "pass one of them"),
    (dict(perturb_when=disam_jax.VarianceTrigger(min_gap=0)), ValueError, "min_gap must be an int >= 1"),
    (dict(perturb_when=disam_jax.VarianceTrigger(min_gap=2.5)), ValueError, "min_gap must be an int >= 1"),
    (dict(perturb_when=disam_jax.VarianceTrigger(min_gap=8, max_gap=4)), ValueError, "min_gap <= max_gap"),
    (dict(perturb_when=disam_jax.VarianceTrigger(factor=-1.0)), ValueError, "factor must be finite and >= 0"),
    (dict(perturb_when=disam_jax.VarianceTrigger(decay=1.0)), ValueError, r"decay must be in \[0, 1\)"),
    (dict(perturb_when=disam_jax.VarianceTrigger(decay=optax.constant_schedule(0.5))), TypeError, "not a schedule"),
    (dict(reuse_weight=0.0), ValueError, "needs perturb_every > 1 or perturb_when"),
    (
      dict(perturb_when=TRIGGER, batch_axis_name="b", per_device_perturbation=True),
      ValueError,
      "per_device_perturbation",
    ),
  ],
)
def test_trigger_refusals(kwargs, error, message):
  with pytest.raises(error, match=message):
    disam_jax.disam(optax.sgd(LR), RHO, LAM, **kwargs)
