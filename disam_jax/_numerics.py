"""Small pieces of tree arithmetic the core's modules share: widened dtypes, schedules, masks, the global norm."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disam_jax import _sharding

NORM_EPS = 1e-12  # the floor under every norm DISAM divides by: a zero gradient gives a zero step, never NaN


def metric_dtype(params: optax.Params) -> jnp.dtype:
  """float32, or the widest floating dtype among the parameters if wider (float64 under x64)."""
  floats = [jnp.result_type(x) for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return functools.reduce(jnp.promote_types, floats, jnp.dtype(jnp.float32))


def at_step(value: optax.ScalarOrSchedule, count: jax.Array, dtype: Any) -> jax.Array:
  """`value` at step `count` (a schedule is called, a constant taken as is), in `dtype`."""
  return jnp.asarray(value(count) if callable(value) else value, dtype)


def wide(x: jax.Array) -> jax.Array:
  """x in float32, or in its own dtype if wider (bf16/fp16 -> float32, float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm over every leaf of a pytree, accumulated in float32 or wider (bfloat16 leaves add up in float32).

  One dot product per leaf, over all its axes in place, so a leaf sharded under `jax.jit` (GSPMD or an explicit
  mesh) adds up its shards without being gathered. Unlike `optax.global_norm`, which sums each leaf's squares in
  the leaf's own dtype, a bfloat16 tree's norm is not rounded to bfloat16. This is the norm `disam` logs as
  `DisamState.grad_norm`.

  Args:
    tree: a pytree of arrays (e.g. gradients), not split by `shard_map` / `pmap` (there, use the norm of the
      `batch_axis_name` machinery inside `disam`).

  Returns:
    A scalar `jax.Array`, float32 (float64 for float64 leaves).
  """
  return _sharding.ParamLayout(tree).norm(tree)


def resolve_mask(perturbation_mask: Any, params: optax.Params) -> Any:
  """A bool per params leaf from what `optax.masked` accepts: a (prefix) tree of bools, or a callable of params."""
  mask = perturbation_mask(params) if callable(perturbation_mask) else perturbation_mask
  try:
    # A bool at an inner node of `params` applies to every leaf below it (optax.masked's prefix semantics).
    return jax.tree.map(lambda keep, sub: jax.tree.map(lambda _: keep, sub), mask, params)
  except ValueError as e:
    raise ValueError(
      "perturbation_mask must be a pytree of bools with the structure of params, or a prefix of it (as "
      f"optax.masked accepts), or a function of params returning one: {e}"
    ) from None


def apply_mask(tree: Any, mask: Any) -> Any:
  def keep_or_zero(g, keep):
    if isinstance(keep, (bool, np.bool_)):
      return g if keep else jnp.zeros_like(g)
    return jnp.where(keep, g, jnp.zeros_like(g))  # traced or array bools

  return jax.tree.map(keep_or_zero, tree, mask)
