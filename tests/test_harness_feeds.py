"""The feeds between the input pipeline and the loop: `ArrayEvalFeed`'s slices and `as_model_input`."""

import jax.numpy as jnp
import numpy as np
import pytest

from disam_jax.harness import feeds


def _sets():
  rng = np.random.default_rng(0)
  return tuple(
    (rng.integers(0, 256, (n, 2, 2, 1), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32)) for n in (5, 0, 7)
  )


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_slices_are_disjoint_and_cover_every_row_once(processes):
  sets = _sets()
  parts = (("val", "a"), ("val", "b"), ("test", "c"))
  per_process = [list(feeds.ArrayEvalFeed(parts, sets, 8, p, processes).batches()) for p in range(processes)]
  assert len({len(b) for b in per_process}) == 1  # the same number of batches everywhere
  rows = []
  for j in range(len(per_process[0])):  # global batch j: the processes' slices in process order
    x = np.concatenate([per_process[p][j][0] for p in range(processes)])
    y = np.concatenate([per_process[p][j][1] for p in range(processes)])
    part = np.concatenate([per_process[p][j][2] for p in range(processes)])
    assert len(part) == 8 and x.dtype == np.uint8
    rows += [(k, x[i].tobytes(), y[i]) for i, k in enumerate(part) if k >= 0]
    assert (part[: (part >= 0).sum()] >= 0).all()  # padding only at the end
  expected = [(k, x.tobytes(), y) for k, (xs, ys) in enumerate(sets) for x, y in zip(xs, ys)]
  assert rows == expected  # every example once, in order, with its part


def test_bad_batch_size_is_refused():
  with pytest.raises(ValueError, match="multiple of the process count 2"):
    feeds.ArrayEvalFeed((("val", "a"),), _sets()[:1], 7, 0, 2)


def test_as_model_input_scales_bytes_and_keeps_floats():
  x = np.array([0, 128, 255], np.uint8)
  np.testing.assert_allclose(np.asarray(feeds.as_model_input(jnp.asarray(x))), x / 255.0, rtol=1e-6)
  assert feeds.as_model_input(jnp.asarray(x)).dtype == jnp.float32
  f = jnp.asarray([0.25, 0.5], jnp.float32)
  assert feeds.as_model_input(f) is f
