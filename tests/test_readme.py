"""The README's usage snippets run as written (with a tiny model and batch supplied)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

README = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
BLOCKS = {m.group(1): m.group(2) for m in re.finditer(r'## (Usage with [^\n]+)\n.*?```python\n(.*?)```', README, re.S)}
M, B = 3, 4


def _batch():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(M, B, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, size=(M, B)))


def test_plain_optax_snippet():
  x, y = _batch()
  dense = linen.Dense(3)
  params = dense.init(jax.random.key(0), x[0])
  env = {'params': params, 'apply': dense.apply, 'x': x, 'y': y, 'M': M}
  exec(BLOCKS['Usage with plain optax'], env)
  assert env['opt_state'].domain_losses.shape == (M,)


def test_nnx_snippet():
  x, y = _batch()
  env = {'model': nnx.Linear(6, 3, rngs=nnx.Rngs(0)), 'M': M, 'optax': optax}
  exec(BLOCKS['Usage with Flax NNX'], env)
  state = env['train_step'](env['model'], env['optimizer'], x, y)
  assert int(state.count) == 1


def test_linen_snippet():
  x, y = _batch()
  model = linen.Dense(3)
  env = {'model': model, 'params': model.init(jax.random.key(0), x[0])['params'], 'x': x, 'y': y}
  exec(BLOCKS['Usage with a Linen TrainState'], env)
  state, metrics = env['train_step'](env['state'], x, y)
  assert int(state.step) == 1 and metrics.loss > 0


def test_all_snippets_found():
  assert set(BLOCKS) == {'Usage with plain optax', 'Usage with Flax NNX', 'Usage with a Linen TrainState'}
