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
  with pytest.raises(ValueError, match=r'shape \[M, b\].*\(12,\)'):
    disam_jax.domain_losses_from_grouped(losses.ravel())
  with pytest.raises(ValueError, match='mask shape'):
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


@pytest.mark.parametrize('ids, match', [
    (np.array([0, 1, 4]), r'\[0, 4\); found \[4\]'),
    (np.array([0, -1, 2]), r'found \[-1\]'),
    (np.array([0.0, 1.0, 2.0]), 'must be integers'),
])
def test_from_ids_rejects_bad_ids_eagerly(ids, match):
  with pytest.raises(ValueError, match=match):
    disam_jax.domain_losses_from_ids(np.ones(3, np.float32), ids, 4)


def test_from_ids_rejects_bad_shapes_and_num_domains():
  with pytest.raises(ValueError, match='num_domains'):
    disam_jax.domain_losses_from_ids(np.ones(3), np.zeros(3, int), 0)
  with pytest.raises(ValueError, match=r'\(3,\) and \(2,\)'):
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
  with_aux = disam_jax.grouped_domain_loss_fn(lambda p, a, b: (per_example(p, a, b), 'aux'), has_aux=True)
  out, aux = with_aux(2.0, x, y)
  assert aux == 'aux'
  np.testing.assert_allclose(out.mean, expected, rtol=1e-6)


def test_vmapped_loss_fn_gives_per_domain_means():
  per_example = lambda params, x, y: jnp.sum(x * params, axis=-1) - y
  x = np.random.default_rng(2).normal(size=(4, 3, 2)).astype(np.float32)
  y = np.ones((4, 3), np.float32)
  out = disam_jax.vmapped_domain_loss_fn(per_example)(1.5, x, y)
  np.testing.assert_allclose(out, (np.sum(x * 1.5, axis=-1) - y).mean(axis=1), rtol=1e-6)
