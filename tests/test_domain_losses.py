"""Tests of the per-domain loss helpers against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import disam_jax


def test_grouped_sums_counts_and_mask():
  losses = np.arange(12, dtype=np.float32).reshape(3, 4)
  out = disam_jax.domain_losses_from_grouped(losses)
  np.testing.assert_allclose(out.total, losses.sum(axis=1))
  np.testing.assert_allclose(out.count, [4, 4, 4])
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  out = disam_jax.domain_losses_from_grouped(losses, mask)
  np.testing.assert_allclose(out.total, [0 + 1, 4 + 5 + 6 + 7, 0])
  np.testing.assert_allclose(out.count, [2, 4, 0])
  np.testing.assert_allclose(out.mean, [0.5, 5.5, 0.0])  # absent domain: 0, not NaN
  with pytest.raises(ValueError, match=r"shape \[M, b\].*\(12,\)"):
    disam_jax.domain_losses_from_grouped(losses.ravel())
  with pytest.raises(ValueError, match="mask shape"):
    disam_jax.domain_losses_from_grouped(losses, mask[:2])


def test_from_ids_matches_numpy_and_handles_absent_domains():
  rng = np.random.default_rng(0)
  losses = rng.random(20).astype(np.float32)
  ids = rng.choice([0, 1, 3], size=20)  # domain 2 absent
  out = disam_jax.domain_losses_from_ids(losses, ids, 4)
  for d in range(4):
    np.testing.assert_allclose(out.total[d], losses[ids == d].sum(), rtol=1e-6)
    assert out.count[d] == (ids == d).sum()
  assert out.count[2] == 0 and out.mean[2] == 0.0
  # Under jit (traced ids) it works too.
  jitted = jax.jit(lambda l, i: disam_jax.domain_losses_from_ids(l, i, 4))(losses, ids)
  np.testing.assert_allclose(jitted.total, out.total, rtol=1e-6)


@pytest.mark.parametrize(
  "ids, match",
  [
    (np.array([0, 1, 4]), r"\[0, 4\); found \[4\]"),
    (np.array([0, -1, 2]), r"found \[-1\]"),
    (np.array([0.0, 1.0, 2.0]), "must be integers"),
  ],
)
def test_from_ids_rejects_bad_ids_eagerly(ids, match):
  with pytest.raises(ValueError, match=match):
    disam_jax.domain_losses_from_ids(np.ones(3, np.float32), ids, 4)


def test_from_ids_rejects_bad_shapes_and_num_domains():
  with pytest.raises(ValueError, match="num_domains"):
    disam_jax.domain_losses_from_ids(np.ones(3), np.zeros(3, int), 0)
  with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
    disam_jax.domain_losses_from_ids(np.ones(3), np.zeros(2, int), 2)


def test_grouped_loss_fn_runs_one_forward_pass_over_the_whole_batch():
  seen = []

  def per_example(params, x, y):
    seen.append(x.shape)
    return jnp.sum((x * params) ** 2, axis=-1) + y

  fn = disam_jax.grouped_domain_loss_fn(per_example)
  x = np.random.default_rng(1).normal(size=(3, 5, 2)).astype(np.float32)
  y = np.arange(15, dtype=np.float32).reshape(3, 5)
  out = fn(2.0, x, y)
  assert seen == [(15, 2)]
  expected = (np.sum((x * 2.0) ** 2, axis=-1) + y).mean(axis=1)
  np.testing.assert_allclose(out.mean, expected, rtol=1e-6)
  with_aux = disam_jax.grouped_domain_loss_fn(lambda p, a, b: (per_example(p, a, b), "aux"), has_aux=True)
  out, aux = with_aux(2.0, x, y)
  assert aux == "aux"
  np.testing.assert_allclose(out.mean, expected, rtol=1e-6)


def test_vmapped_loss_fn_gives_per_domain_means():
  per_example = lambda params, x, y: jnp.sum(x * params, axis=-1) - y
  x = np.random.default_rng(2).normal(size=(4, 3, 2)).astype(np.float32)
  y = np.ones((4, 3), np.float32)
  out = disam_jax.vmapped_domain_loss_fn(per_example)(1.5, x, y)
  np.testing.assert_allclose(out, (np.sum(x * 1.5, axis=-1) - y).mean(axis=1), rtol=1e-6)


# --- precision: sums and counts in float32 (float64 under x64), checked against NumPy float64 ------------------


def _bf16_losses(n, seed=0):
  """`[n]` bfloat16 per-example losses and the exact float64 values they hold."""
  raw = np.random.default_rng(seed).uniform(0.0, 3.0, size=n)
  bf16 = jnp.asarray(raw, jnp.bfloat16)
  return bf16, np.asarray(bf16, np.float64)


@pytest.mark.parametrize("b", [32, 512, 1024])
def test_bfloat16_losses_are_summed_to_float32_accuracy(b):
  m = 3
  losses, exact = _bf16_losses(m * b, seed=b)
  grouped = disam_jax.domain_losses_from_grouped(losses.reshape(m, b))
  ids = np.repeat(np.arange(m), b)
  flat = disam_jax.domain_losses_from_ids(losses, ids, m)
  expected = exact.reshape(m, b).sum(axis=1)  # the float64 sum of the very bf16 values
  for out in (grouped, flat, jax.jit(disam_jax.domain_losses_from_grouped)(losses.reshape(m, b))):
    assert out.total.dtype == jnp.float32 and out.count.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.total, np.float64), expected, rtol=2e-6)
    np.testing.assert_array_equal(out.count, [b] * m)
  vmapped = disam_jax.vmapped_domain_loss_fn(lambda p, x, y: x * p)(
    jnp.bfloat16(1), losses.reshape(m, b), losses.reshape(m, b)
  )
  assert vmapped.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(vmapped, np.float64), expected / b, rtol=2e-6)


def test_float16_sums_do_not_overflow():
  losses = jnp.full((2, 1024), 100.0, jnp.float16)  # each sum is 102400 > float16's max 65504
  out = disam_jax.domain_losses_from_grouped(losses)
  np.testing.assert_array_equal(out.total, [102400.0, 102400.0])
  out = disam_jax.domain_losses_from_ids(losses.ravel(), np.repeat([0, 1], 1024), 2)
  np.testing.assert_array_equal(out.total, [102400.0, 102400.0])


def test_bfloat16_mask_count_is_exact():
  losses = jnp.ones((2, 1024), jnp.bfloat16)
  mask = np.ones((2, 1024), bool)
  mask[0, 1021:] = False  # 1021 examples: not representable in bfloat16 (which rounds it to 1020)
  out = disam_jax.domain_losses_from_grouped(losses, mask)
  np.testing.assert_array_equal(out.count, [1021, 1024])
  np.testing.assert_array_equal(out.total, [1021, 1024])


def test_float64_losses_stay_float64_under_x64():
  with jax.enable_x64(True):
    exact = 1.0 + np.arange(4) * 1e-12  # differences invisible in float32
    out = disam_jax.domain_losses_from_grouped(jnp.asarray(exact, jnp.float64).reshape(2, 2))
    assert out.total.dtype == jnp.float64 and out.count.dtype == jnp.float64
    np.testing.assert_array_equal(out.total, exact.reshape(2, 2).sum(axis=1))
    out = disam_jax.domain_losses_from_ids(jnp.asarray(exact), np.array([0, 0, 1, 1]), 2)
    assert out.total.dtype == jnp.float64
    np.testing.assert_array_equal(out.total, exact.reshape(2, 2).sum(axis=1))
    # float32 losses are not widened just because x64 is on.
    assert disam_jax.domain_losses_from_grouped(jnp.ones((2, 2), jnp.float32)).total.dtype == jnp.float32


def test_readme_mixed_precision_example_matches_float64_reference():
  """docs/guide.md's bf16-compute / float32-params snippet, run as written: DISAM's domain losses, L and V equal NumPy
  float64 means of the same bf16 per-example losses."""
  import pathlib
  import re

  import optax

  readme = (pathlib.Path(__file__).parents[1] / "docs" / "guide.md").read_text()
  snippet = re.search(r"## Mixed precision\n.*?```python\n(.*?)```", readme, re.S).group(1)
  env = {}
  exec(snippet, env)  # the block is self-contained: its own toy data, params and model
  state, updates = env["opt_state"], env["updates"]
  x, y, ids, params, apply, m = (env[k] for k in ("x", "y", "ids", "params", "apply", "M"))
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  # Reference: the bf16 per-example losses at params, grouped and averaged in float64 NumPy.
  # XLA rounds the bf16 per-example losses slightly differently in each compiled program (measured: means 4e-5
  # apart), hence rtol 5e-4.
  per_example = jax.jit(
    lambda p: optax.softmax_cross_entropy_with_integer_labels(
      apply(jax.tree.map(lambda w: w.astype(jnp.bfloat16), p), x.astype(jnp.bfloat16)), y
    )
  )(params)
  assert per_example.dtype == jnp.bfloat16
  per_example, ids = np.asarray(per_example, np.float64), np.asarray(ids)
  means = np.array([per_example[ids == i].mean() for i in range(m)])
  np.testing.assert_allclose(state.domain_losses, means, rtol=5e-4)
  np.testing.assert_allclose(state.loss, means.mean(), rtol=5e-4)
  np.testing.assert_array_equal(state.domain_counts, np.bincount(ids, minlength=m))
