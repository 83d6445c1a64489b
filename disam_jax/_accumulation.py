"""Gradient accumulation for DISAM: micro-batches summed *inside* `domain_loss_fn`.

A DISAM step needs the per-domain losses of the whole batch twice: the perturbation direction (Eq. 7) weighs each
domain's gradient by how far its loss is from the mean, and the final gradient is taken at the perturbed weights.
Accumulating gradients across `update` calls (`optax.MultiSteps`) cannot give that: each call would perturb from
one micro-batch's losses. Instead, `accumulate_domain_losses` turns a domain loss function of one micro-batch into
one of the whole batch,

    total_i = sum_j total_ij,   count_i = sum_j count_ij          (j over the k micro-batches)

evaluated with `lax.scan` (one compiled micro-batch body whatever k is), so both DISAM gradients see the whole
batch and the step equals the big-batch step. With `remat=True` (default) the micro-batch body is wrapped in
`jax.checkpoint`: the backward pass recomputes each micro-batch's forward instead of storing k sets of
activations, so peak memory stays that of one micro-batch (plus the batch itself and the parameters) as k grows,
at the price of one more forward pass per backward pass.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from disam_jax._domain_losses import DomainLosses, _accumulation_dtype, as_domain_losses

_AUX_REDUCTIONS = ("mean", "stack")


def accumulate_domain_losses(
  domain_loss_fn: Callable[..., Any],
  *micro_batches: Any,
  has_aux: bool = False,
  aux_reduction: str = "mean",
  remat: bool = True,
) -> Callable[[Any], Any]:
  """A domain loss function of the whole batch, summing `domain_loss_fn` over k micro-batches with `lax.scan`.

  Example (DomainBed layout, 4 micro-batches of every domain's `b` examples; at zero weights each of the 8
  examples of a domain costs `ln 2`, so each domain's total is `8 ln 2 = 5.5452`)::

    >>> import jax, jax.numpy as jnp, numpy as np, optax, disam_jax
    >>> m, b = 2, 8
    >>> x, y = jax.random.normal(jax.random.key(0), (m, b, 3)), jnp.zeros((m, b), jnp.int32)
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> per_example_loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(x @ p['w'], y)
    >>> per_batch = disam_jax.grouped_domain_loss_fn(per_example_loss)   # (params, x [M, b', ...], y [M, b'])
    >>> split = lambda a: jnp.swapaxes(a.reshape((m, 4, b // 4) + a.shape[2:]), 0, 1)   # [4, M, b // 4, ...]
    >>> f = disam_jax.accumulate_domain_losses(per_batch, split(x), split(y))
    >>> print(np.round(f(params).total, 4), f(params).count)
    [5.5452 5.5452] [8. 8.]
    >>> tx = disam_jax.disam(optax.sgd(0.1), num_domains=m)
    >>> updates, opt_state = tx.update(None, tx.init(params), params, domain_loss_fn=f)

  With a flat batch and domain ids, split every array along its first axis (`a.reshape((4, n // 4) + ...)`) and
  return `domain_losses_from_ids(...)` from `domain_loss_fn`: micro-batches may hold different numbers of each
  domain's examples, or none; the sums and counts still add up to the whole batch's.

  The step equals the big-batch step exactly (up to float32 summation order) for models without cross-example
  state. With BatchNorm, each micro-batch is normalized with its own statistics, as in any accumulation.

  Randomness (dropout, augmentation): a key that `domain_loss_fn` closes over is the same in every micro-batch, so
  all k micro-batches would drop the same units. Pass one key per micro-batch as one more micro-batch array
  instead, e.g. `accumulate_domain_losses(fn, xs, ys, jax.random.split(key, k))` with `fn(params, x, y, key)`.

  Args:
    domain_loss_fn: `(params, *micro_batch) -> DomainLosses` for one micro-batch (or a `[M]` vector of means,
      counted as one example per domain per micro-batch, so the result is the mean of the micro-batch means:
      right only when every micro-batch holds the same number of each domain's examples), or
      `(that, aux)` with `has_aux`.
    *micro_batches: arrays (or pytrees of arrays) with a leading axis of size k, the micro-batch index;
      `domain_loss_fn` receives slice j of each.
    has_aux: `domain_loss_fn` returns `(losses, aux)`; the returned function then returns `(DomainLosses, aux)`.
    aux_reduction: how the k micro-batch auxes become one. `'mean'` (default): floating leaves averaged over the
      micro-batches, other leaves (integer counters) taken from the last; for BatchNorm running statistics
      computed from the same starting statistics this is exactly the big-batch update of the running mean (equal
      micro-batch sizes) and, for the variance, the mean of the micro-batch variances (ghost batch norm).
      `'stack'`: every micro-batch's aux, with a leading axis k (e.g. logits for metrics).
    remat: wrap the micro-batch body in `jax.checkpoint` (constant activation memory in k; one more forward pass
      per backward pass). `False` stores the activations of all k micro-batches, as the big batch would.

  Returns:
    `f(params) -> DomainLosses` (or `(DomainLosses, aux)`) for the whole batch, `total` and `count` `[M]` in
    float32 (float64 for float64 losses under x64). Pass it to `tx.update(..., domain_loss_fn=f)`. Gradients
    with respect to low-precision (bf16/fp16) parameters are accumulated over the micro-batches in float32.
  """
  if aux_reduction not in _AUX_REDUCTIONS:
    raise ValueError(f"aux_reduction must be one of {_AUX_REDUCTIONS}; got {aux_reduction!r}.")
  if not micro_batches:
    raise ValueError("accumulate_domain_losses needs the micro-batches: accumulate_domain_losses(fn, xs, ys, ...).")
  sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(micro_batches)}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise ValueError(
      "every micro-batch array must have the same leading axis k >= 1 (the micro-batch index); got leading "
      f"sizes {sorted(sizes, key=str)}."
    )

  def evaluate(params, batch):
    losses, aux = as_domain_losses(domain_loss_fn(params, *batch), has_aux)
    acc = _accumulation_dtype(losses.total.dtype)
    return DomainLosses(losses.total.astype(acc), losses.count.astype(acc)), aux

  body_fn = jax.checkpoint(evaluate) if remat else evaluate

  def fn(params):
    # Low-precision parameters enter the scan as float32, so their gradient is summed over the k micro-batches in
    # float32 (the scan's transpose accumulates in the dtype of what it closes over); each body casts back.
    wide = jax.tree.map(_widened, params)
    dtypes = jax.tree.map(lambda p: jnp.asarray(p).dtype, params)

    def body(carry, batch):
      losses, aux = body_fn(jax.tree.map(lambda w, d: w.astype(d), wide, dtypes), batch)
      return jax.tree.map(jnp.add, carry, losses), aux

    first = jax.tree.map(lambda a: a[0], micro_batches)
    shapes, _ = jax.eval_shape(evaluate, params, first)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    losses, auxes = jax.lax.scan(body, init, micro_batches)
    if not has_aux:
      return losses
    return losses, (auxes if aux_reduction == "stack" else jax.tree.map(_mean_or_last, auxes))

  return fn


def _widened(x: Any) -> Any:
  """float32 copy of a bf16/fp16 array; other leaves unchanged."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def _mean_or_last(stacked: jax.Array) -> jax.Array:
  """Mean over the leading micro-batch axis (accumulated in float32 or wider) for floats; else the last entry."""
  if jnp.issubdtype(stacked.dtype, jnp.floating):
    return jnp.mean(stacked.astype(_accumulation_dtype(stacked.dtype)), axis=0).astype(stacked.dtype)
  return stacked[-1]
