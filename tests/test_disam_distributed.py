"""Multi-device DISAM: pmap, shard_map and sharded jit equal one device on the whole batch.

Runs on 8 host CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import disam_jax
from tests import _reference as ref
from tests._steps import run_steps
from tests.test_disam import NUM_CLASSES, assert_tree_close, make_problem, to_jax

M, B, STEPS = 4, 8, 3
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS, see conftest.py)")


def grouped_loss(p, x, y):
  """[M, b, D] batch -> DomainLosses (sums and counts), the form that reduces exactly across devices."""
  logits = x @ p["w"] + p["b"]
  return disam_jax.domain_losses_from_grouped(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def single_device(params, x, y, tx):
  return run_steps(tx, params, grouped_loss, STEPS, x, y)


def _problem():
  x, y, params = make_problem(30, m=M, b=B)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y), to_jax(params)


def test_pmap_equals_one_device():
  x, y, params = _problem()
  n = 4  # each device holds B/n examples of every domain
  tx = disam_jax.disam(optax.sgd(0.1, momentum=0.9), 0.1, 0.5, batch_axis_name="batch", num_domains=M)
  expected, expected_state = single_device(
    params, x, y, disam_jax.disam(optax.sgd(0.1, momentum=0.9), 0.1, 0.5, num_domains=M)
  )

  xs = x.reshape(M, n, B // n, -1).transpose(1, 0, 2, 3)  # [n, M, b/n, D]
  ys = y.reshape(M, n, B // n).transpose(1, 0, 2)

  replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), t)
  p, s = run_steps(
    tx,
    replicate(params),
    grouped_loss,
    STEPS,
    xs,
    ys,
    state=replicate(tx.init(params)),
    jit=functools.partial(jax.pmap, axis_name="batch"),
  )
  assert_tree_close(jax.tree.map(lambda a: a[0], p), expected, atol=1e-6)
  np.testing.assert_allclose(s.domain_losses[0], expected_state.domain_losses, rtol=1e-5)
  np.testing.assert_allclose(s.variance[1], expected_state.variance, rtol=1e-4)


def test_shard_map_with_flat_batch_and_unequal_counts_equals_one_device():
  """Flat batch with domain ids, shards holding different numbers of each domain: sums and counts reduce exactly."""
  rng = np.random.default_rng(31)
  n_dev, n = 8, 64
  _, _, params = make_problem(31)
  ids = rng.integers(0, M, size=n)  # unequal, random domain counts per shard
  x = rng.normal(size=(n, 5)) + ids[:, None] * 0.5
  y = rng.integers(0, NUM_CLASSES, size=n)
  x, y, params = jnp.asarray(x, jnp.float32), jnp.asarray(y), to_jax(params)

  def flat_loss(p, xb, yb, ib):
    losses = optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb)
    return disam_jax.domain_losses_from_ids(losses, ib, M)

  for weights, check_vma in (("uniform", True), ("count", True), ("uniform", False)):  # check_vma=True: default
    tx1 = disam_jax.disam(optax.sgd(0.1), 0.1, 0.5, domain_weights=weights, num_domains=M, diagnostics=True)
    u1, s1 = jax.jit(lambda p, s: tx1.update(None, s, p, domain_loss_fn=lambda q: flat_loss(q, x, y, ids)))(
      params, tx1.init(params)
    )
    tx = disam_jax.disam(
      optax.sgd(0.1), 0.1, 0.5, domain_weights=weights, batch_axis_name="d", num_domains=M, diagnostics=True
    )
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("d",))

    @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d")), out_specs=P(), check_vma=check_vma
    )
    def sharded(p, xb, yb, ib):
      return tx.update(None, tx.init(p), p, domain_loss_fn=lambda q: flat_loss(q, xb, yb, ib))

    un, sn = jax.jit(sharded)(params, x, y, jnp.asarray(ids))
    assert_tree_close(un, u1, atol=1e-6)
    for field in (
      "domain_losses",
      "domain_counts",
      "perturbation_weights",
      "loss",
      "variance",
      "sam_cosine",
      "perturbation_norm",
      "grad_norm",
    ):
      np.testing.assert_allclose(getattr(sn, field), getattr(s1, field), rtol=2e-5, atol=1e-7, err_msg=field)


def test_sharded_jit_equals_one_device():
  """GSPMD: the batch sharded along the per-domain batch axis with NamedSharding; no axis name needed."""
  x, y, params = _problem()
  tx = disam_jax.disam(optax.adam(0.05), 0.1, 0.5, adaptive=True)
  expected, _ = single_device(params, x, y, tx)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
  ys = jax.device_put(y, NamedSharding(mesh, P(None, "data")))
  params_r = jax.device_put(params, NamedSharding(mesh, P()))

  p, s = run_steps(tx, params_r, grouped_loss, STEPS, xs, ys)
  assert len(xs.sharding.device_set) == 8
  assert_tree_close(p, expected, atol=1e-6)


def test_per_device_perturbation_is_m_sharpness():
  """Each device perturbs with its own g_p from its own domain losses; the final gradients are averaged."""
  x, y, params_np = make_problem(32, m=M, b=B)
  n = 2
  rho, lam = 0.1, 0.5
  expected = []
  for d in range(n):
    sl = slice(d * B // n, (d + 1) * B // n)
    g, _ = ref.disam_gradient(params_np, x[:, sl], y[:, sl], NUM_CLASSES, rho, lam)
    expected.append(g)
  expected = {k: -0.1 * (expected[0][k] + expected[1][k]) / 2 for k in params_np}

  tx = disam_jax.disam(optax.sgd(0.1), rho, lam, batch_axis_name="batch", per_device_perturbation=True)
  xs = jnp.asarray(x, jnp.float32).reshape(M, n, B // n, -1).transpose(1, 0, 2, 3)
  ys = jnp.asarray(y).reshape(M, n, B // n).transpose(1, 0, 2)
  params = to_jax(params_np)

  @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0, 0))
  def step(p, xb, yb):
    u, _ = tx.update(None, tx.init(p), p, domain_loss_fn=lambda q: grouped_loss(q, xb, yb))
    return u

  u = step(params, xs, ys)
  assert_tree_close(jax.tree.map(lambda a: a[0], u), expected, atol=2e-6)
  assert_tree_close(jax.tree.map(lambda a: a[1], u), expected, atol=2e-6)
  # ... and it differs from the synchronized (global) perturbation on this data.
  sync = disam_jax.disam(optax.sgd(0.1), rho, lam)
  u_sync, _ = sync.update(
    None,
    sync.init(params),
    params,
    domain_loss_fn=lambda q: grouped_loss(q, jnp.asarray(x, jnp.float32), jnp.asarray(y)),
  )
  assert max(float(jnp.abs(u_sync[k] - u[k][0]).max()) for k in u_sync) > 1e-5


@pytest.mark.parametrize("weights", ["uniform", "count"])
def test_per_device_perturbation_changes_only_the_perturbation(weights):
  """Different domain mixes per device: with rho=0 the per-device step is the gradient of the *global* L (not an
  average of the devices' own L), and the logged losses are global; with rho>0 it still differs from the global
  perturbation."""
  rng = np.random.default_rng(33)
  n_dev, n = 4, 64
  _, _, params = make_problem(33)
  ids = np.sort(rng.integers(0, M, size=n))  # sorted: each shard holds a very different mix of domains
  x = rng.normal(size=(n, 5)) + ids[:, None] * 0.5
  y = rng.integers(0, NUM_CLASSES, size=n)
  x, y, params = jnp.asarray(x, jnp.float32), jnp.asarray(y), to_jax(params)
  ids = jnp.asarray(ids)

  def flat_loss(p, xb, yb, ib):
    losses = optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb)
    return disam_jax.domain_losses_from_ids(losses, ib, M)

  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("d",))

  def run(rho, per_device):
    tx = disam_jax.disam(
      optax.sgd(1.0),
      rho,
      0.5,
      domain_weights=weights,
      batch_axis_name="d",
      num_domains=M,
      per_device_perturbation=per_device,
    )

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d")), out_specs=P())
    def sharded(p, xb, yb, ib):
      u, s = tx.update(None, tx.init(p), p, domain_loss_fn=lambda q: flat_loss(q, xb, yb, ib))
      return u, s.loss, s.domain_losses

    return jax.jit(sharded)(params, x, y, ids)

  # Independent: the gradient of the global L by jax.grad of the whole-batch objective written out here.
  def global_loss(q):
    losses = optax.softmax_cross_entropy_with_integer_labels(x @ q["w"] + q["b"], y)
    counts = jnp.bincount(ids, length=M)
    means = jax.ops.segment_sum(losses, ids, M) / counts
    a = jnp.ones(M) / M if weights == "uniform" else counts / n
    return jnp.sum(a * means)

  expected = jax.grad(global_loss)(params)
  u, loss, domain_losses = run(0.0, True)
  assert_tree_close({k: -u[k] for k in u}, expected, atol=1e-6)
  np.testing.assert_allclose(loss, global_loss(params), rtol=1e-6)
  u_global, _, _ = run(0.0, False)
  assert_tree_close(u, u_global, atol=1e-6)
  u_local, _, _ = run(0.2, True)
  u_sync, _, _ = run(0.2, False)
  assert max(float(jnp.abs(u_local[k] - u_sync[k]).max()) for k in u) > 1e-4
