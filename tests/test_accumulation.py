"""Tests of accumulate_domain_losses: k micro-batches give the big-batch DISAM step, in constant memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen

import disam_jax
from tests import _reference as ref
from tests.test_disam import NUM_CLASSES, D, M, assert_tree_close, make_problem, to_jax

RHO, LAM, LR = 0.1, 0.4, 1.0


def _per_example(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)


def _step(f, params):
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM, num_domains=M)  # num_domains: keep the [M] metrics
  updates, state = jax.jit(lambda p: tx.update(None, tx.init(p), p, domain_loss_fn=f))(params)
  return {k: -updates[k] / LR for k in updates}, state


def _split(a, k, axis):
  """[..., n, ...] -> [k, ..., n // k, ...]: k micro-batches along `axis`."""
  shape = a.shape[:axis] + (k, a.shape[axis] // k) + a.shape[axis + 1 :]
  return jnp.moveaxis(jnp.reshape(a, shape), axis, 0)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_grouped_micro_batches_equal_the_big_batch_step(k):
  x, y, params = make_problem(30, b=8)
  p = to_jax(params)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  per_batch = disam_jax.grouped_domain_loss_fn(_per_example)
  big, big_state = _step(lambda q: per_batch(q, xj, yj), p)
  acc, state = _step(disam_jax.accumulate_domain_losses(per_batch, _split(xj, k, 1), _split(yj, k, 1)), p)
  assert_tree_close(acc, big, atol=1e-6)
  np.testing.assert_allclose(state.domain_losses, big_state.domain_losses, rtol=1e-6)
  np.testing.assert_array_equal(state.domain_counts, [8] * M)
  # Independent reference: the DISAM gradient of the whole batch, by hand in float64 NumPy.
  expected, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, RHO, LAM)
  assert_tree_close(acc, expected, atol=2e-6)


def _numpy_disam_gradient_from_ids(params, x, y, ids, present):
  """DISAM's gradient (uniform weights over the present domains) of a flat batch, float64 NumPy by hand."""
  per_domain = [ref.domain_losses_and_grads(params, x[ids == i][None], y[ids == i][None], NUM_CLASSES) for i in present]
  losses = np.array([l[0] for l, _ in per_domain])
  a = 1.0 / len(present)
  g_p = ref.combine([g[0] for _, g in per_domain], a * (1 - 2 * LAM * (losses - losses.mean())))
  norm = np.sqrt(sum(np.sum(v**2) for v in g_p.values()))
  perturbed = {k: params[k] + RHO * g_p[k] / norm for k in params}
  grads = [
    ref.domain_losses_and_grads(perturbed, x[ids == i][None], y[ids == i][None], NUM_CLASSES)[1][0] for i in present
  ]
  return ref.combine(grads, [a] * len(present))


def test_micro_batches_with_domain_ids_and_unequal_counts_equal_the_big_batch_step():
  rng = np.random.default_rng(31)
  n, k = 48, 4
  ids = rng.permutation(np.repeat([0, 1, 3], [5, 30, 13]))  # domain 2 absent, unequal counts
  x = rng.normal(size=(n, D)) + ids[:, None] * 0.5
  y = rng.integers(0, NUM_CLASSES, size=n)
  params = make_problem(31)[2]
  p = to_jax(params)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  per_batch = lambda q, xb, yb, ib: disam_jax.domain_losses_from_ids(_per_example(q, xb, yb), ib, M)
  big, big_state = _step(lambda q: per_batch(q, xj, yj, ids), p)
  split = lambda a: _split(jnp.asarray(a), k, 0)
  assert len({int(np.sum(b == 0)) for b in np.split(ids, k)}) > 1  # the micro-batches' domain mixes differ
  acc, state = _step(disam_jax.accumulate_domain_losses(per_batch, split(xj), split(yj), split(ids)), p)
  assert_tree_close(acc, big, atol=1e-6)
  np.testing.assert_array_equal(state.domain_counts, [5, 30, 0, 13])
  np.testing.assert_allclose(state.domain_losses, big_state.domain_losses, rtol=1e-6)
  assert_tree_close(acc, _numpy_disam_gradient_from_ids(params, x, y, ids, [0, 1, 3]), atol=2e-6)


def test_plain_mean_vectors_are_averaged_over_micro_batches():
  x, y, params = make_problem(32, b=8)
  p = to_jax(params)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  means = lambda q, xb, yb: _per_example(q, xb, yb).mean(axis=-1)  # [M] means of equal-sized micro-batches
  f = disam_jax.accumulate_domain_losses(means, _split(xj, 4, 1), _split(yj, 4, 1))
  acc, _ = _step(f, p)
  expected, _ = ref.disam_gradient(params, x, y, NUM_CLASSES, RHO, LAM)
  assert_tree_close(acc, expected, atol=2e-6)


def test_bfloat16_parameter_gradients_are_accumulated_in_float32():
  """k micro-batches with bf16 params: the gradient is one bf16 rounding of the float32 sum, not k roundings."""
  rng = np.random.default_rng(33)
  k, n = 64, 4
  w = jnp.asarray(1.0, jnp.bfloat16)
  xs = jnp.asarray(rng.uniform(0.5, 1.5, size=(k, n)), jnp.bfloat16)

  def per_batch(q, xb):
    return disam_jax.DomainLosses(jnp.stack([jnp.sum(q * xb[:2]), jnp.sum(q * xb[2:])]), jnp.full(2, 2.0))

  f = disam_jax.accumulate_domain_losses(per_batch, xs)
  grad = jax.grad(lambda q: jnp.sum(f(q).total))(w)
  assert grad.dtype == jnp.bfloat16
  exact = np.asarray(xs, np.float64).sum()
  assert float(grad) == float(jnp.asarray(exact, jnp.bfloat16))


def test_aux_mean_gives_the_big_batch_running_mean_and_stack_keeps_every_micro_batch():
  model = linen.BatchNorm(use_running_average=False, momentum=0.9)
  rng = np.random.default_rng(34)
  x = jnp.asarray(rng.normal(size=(M, 8, 3)) * np.arange(1, 4), jnp.float32)
  y = jnp.zeros((M, 8), jnp.int32)
  variables = model.init(jax.random.key(0), x[0])

  def per_batch(params, xb, yb):
    m, b = yb.shape
    out, updated = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, xb.reshape(m * b, 3), mutable=["batch_stats"]
    )
    return disam_jax.domain_losses_from_grouped(jnp.sum(out**2, -1).reshape(m, b)), updated["batch_stats"]

  f = disam_jax.accumulate_domain_losses(per_batch, _split(x, 4, 1), _split(y, 4, 1), has_aux=True)
  losses, stats = f(variables["params"])
  big = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(stats["mean"], 0.1 * big.mean(axis=0), rtol=1e-5)  # running mean started at 0
  micro = np.asarray(_split(x, 4, 1)).reshape(4, -1, 3)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * micro.var(axis=1).mean(axis=0), rtol=1e-5)
  np.testing.assert_array_equal(losses.count, [8] * M)
  stacked = disam_jax.accumulate_domain_losses(
    per_batch, _split(x, 4, 1), _split(y, 4, 1), has_aux=True, aux_reduction="stack"
  )(variables["params"])[1]
  assert stacked["mean"].shape == (4, 3)
  np.testing.assert_allclose(stacked["mean"], 0.1 * micro.mean(axis=1), rtol=1e-5)


def _mlp_step_temp_bytes(k, remat):
  """XLA's temporary memory of a jitted DISAM step of an MLP over a [4096, 32] batch in k micro-batches."""
  rng = np.random.default_rng(35)
  n, d, h = 4096, 32, 256
  params = {
    "w1": jnp.asarray(rng.normal(size=(d, h)) * 0.1, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(h, h)) * 0.1, jnp.float32),
    "w3": jnp.asarray(rng.normal(size=(h, NUM_CLASSES)) * 0.1, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, size=n))
  ids = jnp.asarray(rng.integers(0, M, size=n))

  def per_batch(q, xb, yb, ib):
    hidden = jnp.tanh(jnp.tanh(xb @ q["w1"]) @ q["w2"])
    return disam_jax.domain_losses_from_ids(
      optax.softmax_cross_entropy_with_integer_labels(hidden @ q["w3"], yb), ib, M
    )

  tx = disam_jax.disam(optax.sgd(0.1), 0.05, 0.1)
  micro = [_split(a, k, 0) for a in (x, y, ids)]
  f = disam_jax.accumulate_domain_losses(per_batch, *micro, remat=remat)
  step = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=f))
  return step.lower(params, tx.init(params)).compile().memory_analysis().temp_size_in_bytes


def test_peak_memory_does_not_grow_with_the_batch_when_split_in_micro_batches():
  one = _mlp_step_temp_bytes(1, remat=True)
  eight = _mlp_step_temp_bytes(8, remat=True)
  stored = _mlp_step_temp_bytes(8, remat=False)
  # Activations: 2 x [4096, 256] float32 = 8 MiB for the whole batch; each micro-batch holds an eighth.
  assert eight < 0.3 * one, (eight, one)
  assert eight < 0.3 * stored, (eight, stored)  # without remat the scan stores every micro-batch's activations


def test_bad_arguments_are_refused():
  f = lambda q, xb: disam_jax.DomainLosses(xb * q, jnp.ones(2))
  with pytest.raises(ValueError, match="same leading axis"):
    disam_jax.accumulate_domain_losses(f, jnp.ones((4, 2)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="needs the micro-batches"):
    disam_jax.accumulate_domain_losses(f)
  with pytest.raises(ValueError, match="aux_reduction must be one of"):
    disam_jax.accumulate_domain_losses(f, jnp.ones((4, 2)), aux_reduction="last")
  with pytest.raises(ValueError, match="has_aux=True"):
    disam_jax.accumulate_domain_losses(lambda q, xb: (f(q, xb), 0), jnp.ones((4, 2)))(1.0)


@pytest.mark.slow  # default tier: test_peak_memory_does_not_grow_with_the_batch_when_split_in_micro_batches
def test_benchmark_quick_smoke(tmp_path):
  """`python -m benchmarks.accumulation --quick` runs and writes its table (timings are not asserted)."""
  from benchmarks import accumulation

  accumulation.main(["--quick", "--out-dir", str(tmp_path)])
  table = (tmp_path / "accumulation_quick.md").read_text()
  for case in ("| plain |", "| k=1 |", "| k=2 |", "| k=2 no remat |"):
    assert case in table


def test_readme_snippet_equals_the_big_batch_step():
  """docs/guide.md's accumulation block, run as written; its `f` then gives the NumPy big-batch DISAM gradient."""
  import pathlib
  import re

  readme = (pathlib.Path(__file__).parents[1] / "docs" / "guide.md").read_text()
  snippet = re.search(r"## Gradient accumulation\n.*?```python\n(.*?)```", readme, re.S).group(1)
  env = {}
  exec(snippet, env)  # self-contained: its own toy [M, b, 5] batch, split into k micro-batches
  assert env["xs"].shape[0] == env["k"] > 1
  rng = np.random.default_rng(36)
  params = {"w": rng.normal(size=(5, 2)), "b": rng.normal(size=2)}
  tx = disam_jax.disam(optax.sgd(LR), RHO, LAM)
  p = to_jax(params)
  updates, _ = tx.update(None, tx.init(p), p, domain_loss_fn=env["f"])
  expected, _ = ref.disam_gradient(params, np.asarray(env["x"], np.float64), np.asarray(env["y"]), 2, RHO, LAM)
  assert_tree_close({k: -updates[k] / LR for k in p}, expected, atol=2e-6)


def test_a_key_per_micro_batch_gives_each_its_own_dropout_mask():
  """Keys passed as a micro-batch array (one per micro-batch) reach each micro-batch; the sum equals the NumPy
  sum of the k dropout-masked losses, and differs from a closed-over key's (the same mask k times)."""
  k, n = 4, 6
  w = jnp.arange(1.0, 9.0)  # [8] features
  x = jnp.ones((k, 1, n, 8))  # [k, M=1, b, 8]
  keys = jax.random.split(jax.random.key(0), k)

  def per_batch(params, x, key):
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    return disam_jax.domain_losses_from_grouped(jnp.sum(jnp.where(keep, x, 0.0) * params, axis=-1))

  total = disam_jax.accumulate_domain_losses(per_batch, x, keys)(w).total
  masks = [np.asarray(jax.random.bernoulli(keys[j], 0.5, x.shape[1:])) for j in range(k)]
  expected = sum(float(np.sum(np.where(m, 1.0, 0.0) * np.asarray(w))) for m in masks)
  np.testing.assert_allclose(float(total[0]), expected, rtol=1e-6)
  closed = disam_jax.accumulate_domain_losses(lambda p, x: per_batch(p, x, keys[0]), x)(w).total
  np.testing.assert_allclose(
    float(closed[0]), k * float(np.sum(np.where(masks[0], 1.0, 0.0) * np.asarray(w))), rtol=1e-6
  )
  assert float(closed[0]) != float(total[0])
