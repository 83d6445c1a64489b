"""Per-domain losses: the `[M]` vector that DISAM consumes.

DISAM (Zhang et al., ICLR 2024, arXiv 2405.18861, Eq. 6-7) needs the mean loss of each of the M training domains,
`L_i(w)`. This module turns per-example losses into that vector, for the two batch layouts a domain-generalization
loop produces:

* grouped, `[M, b, ...]` (DomainBed: every domain contributes `b` examples per step): `domain_losses_from_grouped`
  on per-example losses `[M, b]`; `grouped_domain_loss_fn` runs *one* forward pass over the flattened `[M*b, ...]`
  batch (so BatchNorm sees the whole batch, as DomainBed's `torch.cat`); `vmapped_domain_loss_fn` vmaps over the
  domain axis instead (only for models without cross-example state);
* flat, `[n, ...]` with integer domain ids and a static M: `domain_losses_from_ids` (segment sums with counts).

All of them return a `DomainLosses(total, count)` pair rather than means: sums and counts reduce exactly across
devices (`psum`) and let DISAM drop domains that are absent from a batch (count 0) instead of counting them as a
loss of 0. A `domain_loss_fn` may also return a plain `[M]` vector of means; DISAM then treats every domain as
present with equal count.

Precision: sums and counts are accumulated, and returned, in float32 whatever the per-example losses' dtype (float64
when x64 is enabled and the losses are float64). Summed in bfloat16, the result's rounding alone costs up to 0.2%, and
a segment sum of 1024 losses drawn uniform on [0, 3] came out 34% low (the running total stops growing once it dwarfs
each addend); float16 sums overflow past 65504, and a bfloat16 count of 1021 reads 1020. The gradient still flows back
to the per-example losses in their own dtype (the cast's transpose), so bfloat16 compute with float32 parameters costs
nothing extra.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from disam_jax import _sharding


def _accumulation_dtype(dtype: Any) -> jnp.dtype:
  """float64 for float64 losses (x64 enabled), else float32: the dtype sums and counts are accumulated in."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


class DomainLosses(NamedTuple):
  """Per-domain loss sums and example counts.

  The helpers of this module return both in float32 (float64 for float64 losses under x64), never in a
  low-precision dtype of the losses.

  Attributes:
    total: `[M]` float, sum of the per-example losses of each domain.
    count: `[M]` float, number of examples of each domain (0 for a domain absent from the batch). Never
      differentiated.
  """

  total: jax.Array
  count: jax.Array

  @property
  def mean(self) -> jax.Array:
    """`[M]` mean loss per domain; 0 for absent domains (never NaN)."""
    return self.total / jnp.maximum(self.count, 1)


def as_domain_losses(out: Any, has_aux: bool = False) -> tuple[DomainLosses, Any]:
  """What a `domain_loss_fn` returned, as `disam` reads it: `(DomainLosses(total [M], count [M]), aux)`.

  Accepts what `disam` accepts: a `[M]` vector of per-domain means (read as totals with count 1 each), a
  `DomainLosses`, or with `has_aux` a pair `(either, aux)`. Checks the shapes and dtypes at trace time, refusing
  with what to write instead. The counts come back float32 or wider and never differentiated.

  Example (a `[M]` vector of means with an aux, as `domain_loss_fn` may return it)::

    >>> import jax.numpy as jnp, disam_jax
    >>> losses, aux = disam_jax.as_domain_losses((jnp.array([0.5, 1.5]), {'logits': jnp.zeros(3)}), has_aux=True)
    >>> print(losses.total, losses.count, sorted(aux))
    [0.5 1.5] [1. 1.] ['logits']

  Args:
    out: the value `domain_loss_fn(params)` returned.
    has_aux: whether it is a pair `(domain_losses, aux)`.

  Returns:
    `(DomainLosses, aux)`, aux `None` without `has_aux`.
  """
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2) or isinstance(out, DomainLosses):
      raise ValueError(f"With has_aux=True, domain_loss_fn must return (domain_losses, aux); got {type(out).__name__}.")
    out, aux = out
  else:
    if isinstance(out, tuple) and not isinstance(out, DomainLosses):
      raise ValueError(
        "domain_loss_fn returned a tuple: pass has_aux=True to disam() if it returns (domain_losses, aux), "
        "or return a DomainLosses / a [M] vector."
      )
    aux = None
  if isinstance(out, DomainLosses):
    total, count = jnp.asarray(out.total), jnp.asarray(out.count)
  else:
    total = jnp.asarray(out)
    count = jnp.ones(jnp.shape(total), jnp.float32)
  if total.ndim != 1 or count.shape != total.shape:
    raise ValueError(
      "domain_loss_fn must return the per-domain losses as a vector of shape [M] (or DomainLosses with "
      f"total and count of shape [M]); got losses of shape {total.shape} and counts of shape {count.shape}."
    )
  if not jnp.issubdtype(total.dtype, jnp.floating):
    raise ValueError(f"domain losses must be floating point; got dtype {total.dtype}.")
  count_dtype = (
    jnp.promote_types(count.dtype, jnp.float32) if jnp.issubdtype(count.dtype, jnp.floating) else jnp.float32
  )
  return DomainLosses(total, jax.lax.stop_gradient(count.astype(count_dtype))), aux


def domain_losses_from_grouped(per_example_losses: jax.Array, mask: jax.Array | None = None) -> DomainLosses:
  """Per-domain sums and counts of losses laid out `[M, b]` (domain-major).

  Args:
    per_example_losses: `[M, b]` losses, row i holding the examples of domain i.
    mask: optional `[M, b]` bool/0-1 array, False for padding examples.

  Returns:
    `DomainLosses` with `total` and `count` of shape `[M]`, float32 (float64 for float64 losses).
  """
  losses = jnp.asarray(per_example_losses)
  if losses.ndim != 2:
    raise ValueError(
      "domain_losses_from_grouped expects per-example losses of shape [M, b] "
      f"(domains, per-domain batch); got shape {losses.shape}."
    )
  acc = _accumulation_dtype(losses.dtype)
  wide = losses.astype(acc)
  if mask is None:
    return DomainLosses(wide.sum(axis=1), jnp.full(losses.shape[:1], losses.shape[1], dtype=acc))
  mask = jnp.asarray(mask)
  if mask.shape != losses.shape:
    raise ValueError(f"mask shape {mask.shape} does not match losses shape {losses.shape}.")
  return DomainLosses(jnp.sum(jnp.where(mask, wide, 0), axis=1), mask.astype(acc).sum(axis=1))


def domain_losses_from_ids(per_example_losses: jax.Array, domain_ids: jax.Array, num_domains: int) -> DomainLosses:
  """Per-domain sums and counts of a flat batch with integer domain ids.

  Args:
    per_example_losses: `[n]` losses.
    domain_ids: `[n]` integers in `[0, num_domains)`. Checked eagerly when concrete (outside `jit`); under `jit`,
      out-of-range ids are dropped by the segment sum (they count for no domain).
    num_domains: static M.

  Returns:
    `DomainLosses` with `total` and `count` of shape `[M]`, float32 (float64 for float64 losses); a domain
    absent from the batch has count 0.
  """
  if not isinstance(num_domains, (int, np.integer)) or num_domains < 1:
    raise ValueError(f"num_domains must be a static positive int; got {num_domains!r}.")
  losses = jnp.asarray(per_example_losses)
  if losses.ndim != 1 or jnp.shape(domain_ids) != losses.shape:
    raise ValueError(
      "domain_losses_from_ids expects per_example_losses [n] and domain_ids [n]; "
      f"got {losses.shape} and {jnp.shape(domain_ids)}."
    )
  if not isinstance(domain_ids, jax.core.Tracer):
    ids = np.asarray(domain_ids)
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"domain_ids must be integers; got dtype {ids.dtype}.")
    bad = ids[(ids < 0) | (ids >= num_domains)]
    if bad.size:
      raise ValueError(f"domain_ids must lie in [0, {num_domains}); found {sorted(set(bad.tolist()))[:10]}.")
  acc = _accumulation_dtype(losses.dtype)
  wide, ones = losses.astype(acc), jnp.ones_like(losses, dtype=acc)
  if _sharding.explicit_spec(losses) is not None or _sharding.explicit_spec(domain_ids) is not None:
    # A batch sharded over an explicit mesh: the [M] sums are replicated (each device adds its slice, then one
    # all-reduce), which JAX must be told for a scatter. Out-of-range ids are dropped, as segment_sum does.
    add = lambda v: (
      jnp.zeros([num_domains], acc).at[domain_ids].add(v, mode="drop", out_sharding=jax.sharding.PartitionSpec())
    )
    return DomainLosses(add(wide), add(ones))
  total = jax.ops.segment_sum(wide, domain_ids, num_segments=num_domains)
  count = jax.ops.segment_sum(ones, domain_ids, num_segments=num_domains)
  return DomainLosses(total, count)


def grouped_domain_loss_fn(per_example_loss_fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
  """Wraps a per-example loss into a domain loss function for `[M, b, ...]` batches.

  The returned function flattens the batch to `[M*b, ...]`, calls `per_example_loss_fn` once (one forward pass
  over the whole batch: BatchNorm sees all domains together), and groups the `[M*b]` losses back into `[M, b]`.

  Args:
    per_example_loss_fn: `(params, inputs [n, ...], labels [n, ...]) -> losses [n]`, or `(losses [n], aux)` when
      `has_aux`.
    has_aux: whether `per_example_loss_fn` returns auxiliary data.

  Returns:
    `fn(params, inputs [M, b, ...], labels [M, b, ...]) -> DomainLosses` (or `(DomainLosses, aux)`). Close over the
    batch to obtain DISAM's `domain_loss_fn`: `lambda p: fn(p, x, y)`.
  """

  def fn(params, inputs, labels):
    num_domains, per_domain = jnp.shape(inputs)[:2]
    n = num_domains * per_domain
    if _per_domain_axis_sharded(inputs, labels):
      # [M, b@data, ...] under an explicit mesh: merging M into a sharded b is not a local reshape, so the model
      # sees the batch example-major, [b*M] (each device keeps its own block), and the losses go back to [M, b].
      flat = lambda a: jnp.reshape(jnp.swapaxes(a, 0, 1), (n,) + jnp.shape(a)[2:])
      unflat = lambda l: jnp.swapaxes(jnp.reshape(l, (per_domain, num_domains)), 0, 1)
    else:
      flat = lambda a: jnp.reshape(a, (n,) + jnp.shape(a)[2:])
      unflat = lambda l: jnp.reshape(l, (num_domains, per_domain))
    out = per_example_loss_fn(params, flat(inputs), flat(labels))
    losses, aux = out if has_aux else (out, None)
    grouped = domain_losses_from_grouped(unflat(losses))
    return (grouped, aux) if has_aux else grouped

  return fn


def _per_domain_axis_sharded(*arrays: Any) -> bool:
  """Whether any array of a grouped batch is split along its per-domain axis (1) over an Explicit mesh axis.

  Refuses a domain axis (0) split over an Explicit axis: the domains are the groups every device must see.
  """
  sharded = False
  for a in jax.tree.leaves(arrays):
    spec = _sharding.explicit_spec(a)
    if spec is None:
      continue
    if spec[0]:
      raise ValueError(
        f"grouped_domain_loss_fn: the domain axis (0) of a [M, b, ...] batch is sharded over {spec[0]}; shard "
        "the per-domain batch axis instead (PartitionSpec(None, 'data')), so that every device holds a slice of "
        "every domain, or pass a flat batch with domain ids to domain_losses_from_ids."
      )
    sharded = sharded or (len(spec) > 1 and bool(spec[1]))
  return sharded


def vmapped_domain_loss_fn(per_example_loss_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Wraps a per-example loss into a domain loss function that vmaps over the domain axis.

  Each domain's examples go through the model separately (`jax.vmap` over axis 0), so use this only for models
  without cross-example state (no BatchNorm): it is the form to reach for when domains have different per-domain
  preprocessing or when a model is naturally written per domain.

  Args:
    per_example_loss_fn: `(params, inputs [b, ...], labels [b, ...]) -> losses [b]`.

  Returns:
    `fn(params, inputs [M, b, ...], labels [M, b, ...]) -> [M]` mean loss per domain, float32 (float64 for
    float64 losses).
  """

  def mean(losses):
    losses = jnp.asarray(losses)
    return jnp.mean(losses.astype(_accumulation_dtype(losses.dtype)))

  def fn(params, inputs, labels):
    per_domain = jax.vmap(lambda x, y: mean(per_example_loss_fn(params, x, y)))
    return per_domain(inputs, labels)

  return fn
