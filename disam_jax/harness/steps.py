"""The pure training and evaluation steps, the state they carry, and the model they run.

Owns `TrainState`, `init_train_state`, `make_train_step`, `make_eval_step`, `predict` and `init_model`. The step, for
every algorithm (`algorithms.make_optimizer`: ERM, SAM, DISAM)::

  x [M, b, H, W, C], y [M, b]  ->  one forward pass over the flattened [M*b] batch (BatchNorm sees all domains)
  (or a merged batch x [B, H, W, C], y [B], domain ids [B]: one forward pass, grouped by `domain_losses_from_ids`)
  domain_loss_fn(params) = (DomainLosses of the per-example cross-entropy grouped [M, b], new model_state)
  updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=domain_loss_fn)

The model state (BatchNorm running statistics, dropout RNG counters) is the aux output of `domain_loss_fn`. SAM
and DISAM evaluate it twice, at the weights and at the perturbed weights; the optimizer keeps the aux of the
*unperturbed* pass (`DisamState.aux`) and the step writes that back, so the running statistics never see the
perturbed weights. Both passes start from the same model state (same dropout mask).

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, model_state, x) -> logits` are pure and
place nothing on devices: under `jax.jit` with a sharded batch (`NamedSharding` along the per-domain batch axis)
they run unchanged. The training loop that drives them is `loop.run_cell`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disam_jax import (
  DisamState,
  domain_losses_from_grouped,
  domain_losses_from_ids,
  domain_objective,
  find_disam_state,
  grouped_domain_loss_fn,
)
from disam_jax.harness import penalties as penalties_lib
from disam_jax.harness.feeds import as_model_input

__all__ = [
  "PenaltyAux",
  "TrainState",
  "init_model",
  "init_train_state",
  "make_eval_counts",
  "make_eval_step",
  "make_train_step",
  "predict",
]


class TrainState(NamedTuple):
  """Everything a training step reads and writes.

  Attributes:
    params: the model's `nnx.Param` variables (what the optimizer updates and SAM/DISAM perturb).
    model_state: the model's other variables: BatchNorm running statistics, dropout RNG state (possibly empty).
    opt_state: the optimizer state (a `DisamState` for every registered algorithm).
    step: int32 scalar, number of steps taken.
  """

  params: Any
  model_state: Any
  opt_state: Any
  step: jax.Array


class PenaltyAux(NamedTuple):
  """The aux output of the domain loss function of an algorithm with a training-loss penalty (CORAL, V-REx, Fishr).

  The optimizer keeps the one of the unperturbed pass (`DisamState.aux`), so the penalty's running state (Fishr's
  moving average) advances once per step, like the BatchNorm statistics.

  Attributes:
    model_state: the model's new state.
    penalty_state: the penalty's new running state (`()` for CORAL and V-REx).
    penalty: float32 scalar, the unweighted penalty `P`.
    domain_losses: `[M]` float32, the plain per-domain cross-entropies (without the penalty), for the logs.
    loss: float32 scalar, their mean.
  """

  model_state: Any
  penalty_state: Any
  penalty: jax.Array
  domain_losses: jax.Array
  loss: jax.Array


def init_train_state(
  params: Any, model_state: Any, tx: optax.GradientTransformation, penalty: penalties_lib.Penalty | None = None
) -> TrainState:
  """The state before the first step. The optimizer's aux slot starts as this run's own model state.

  With a `penalty` (from `algorithms.make_penalty`), the aux slot is a `PenaltyAux` holding the penalty's initial
  state (e.g. Fishr's moving averages, zero).
  """
  opt_state = tx.init(params)
  aux = model_state
  if penalty is not None:
    m = find_disam_state(opt_state).domain_losses.shape[0]
    zero = jnp.zeros([], jnp.float32)
    aux = PenaltyAux(model_state, penalty.init(m, params["classifier"]), zero, jnp.zeros([m], jnp.float32), zero)
  if isinstance(opt_state, DisamState):
    opt_state = opt_state._replace(aux=aux)
  return TrainState(params, model_state, opt_state, jnp.zeros([], jnp.int32))


def make_train_step(
  graphdef: Any, tx: optax.GradientTransformationExtraArgs, penalty: penalties_lib.Penalty | None = None
) -> Callable:
  """Returns the pure `train_step(state, batch) -> (state, metrics)` for a model and an optimizer.

  Args:
    graphdef: from `models.functional_model`.
    tx: from `algorithms.make_optimizer` (has_aux=True; its state holds a `DisamState`).
    penalty: the algorithm's training-loss penalty (`algorithms.make_penalty`; None for erm/sam/disam). It is
      added to every domain's loss (`penalties.add_penalty`), so it is part of the training loss of every pass
      while DISAM's variance stays that of the plain cross-entropies. The state must come from
      `init_train_state(..., penalty)`.

  Returns:
    `train_step(state: TrainState, batch: (x [M, b, ...], y [M, b])) -> (TrainState, metrics)`, or with a merged
    batch (`--batching merged`, `data.MergedBatchSampler`; no penalty) `batch: (x [B, ...], y [B], domain ids [B]
    int32 in [0, M))`: one forward pass over the B examples, the per-domain losses by `domain_losses_from_ids` (a
    domain absent from the batch leaves the mean and the variance, and logs a loss of 0). Metrics: a dict of float32
    arrays: `loss` (the cross-entropy `sum_i a_i L_i` over the domains present, at the weights before the step),
    `domain_losses` `[M]`, `variance` (of the domain losses), `perturbation_norm` (0 for ERM), `grad_norm`; with a
    penalty also `penalty` (unweighted `P`) and `objective` (the minimized `L + w_t P`). Jit it.
  """
  from disam_jax.harness.models import apply_model, apply_model_with_head

  def per_example_loss(params, model_state, inputs, labels):
    logits, new_model_state = apply_model(graphdef, params, model_state, inputs, train=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return losses, new_model_state

  def penalized_domain_losses(params, state: TrainState, x, y):
    m, b = y.shape
    prior = find_disam_state(state.opt_state).aux
    logits, head, new_model_state = apply_model_with_head(
      graphdef, params, state.model_state, x.reshape((m * b,) + x.shape[2:]), train=True
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y.reshape(-1))
    plain = domain_losses_from_grouped(ce.reshape(m, b))
    means, _, loss, _ = domain_objective(plain)
    outputs = penalties_lib.DomainOutputs(
      features=head.features.reshape((m, b) + head.features.shape[1:]),
      labels=y,
      domain_losses=means,
      head=head.apply,
      head_params=head.params,
    )
    value, penalty_state = penalty.value(outputs, prior.penalty_state)
    losses = penalties_lib.add_penalty(plain, penalty.weight(state.step) * value)
    return losses, PenaltyAux(new_model_state, penalty_state, value, means, loss)

  def flat_domain_losses(params, state: TrainState, x, y, ids):
    """A merged batch's per-domain sums and counts: one forward pass over the [B] batch, grouped by the ids (a
    domain absent from the batch has count 0, so DISAM's mean and variance leave it out)."""
    losses, new_model_state = per_example_loss(params, state.model_state, x, y)
    m = find_disam_state(state.opt_state).domain_losses.shape[0]  # M, static
    return domain_losses_from_ids(losses, ids, m), new_model_state

  def train_step(state: TrainState, batch):
    if len(batch) == 3:  # a merged batch: x [B, ...], y [B], domain ids [B]
      if penalty is not None:
        raise ValueError(
          "A penalty needs per-domain batches [M, b]; merged batches (x, y, ids) are for erm and "
          "the sharpness-aware rules."
        )
      x, y, ids = batch
      x = as_model_input(x)
      domain_loss_fn = lambda p: flat_domain_losses(p, state, x, y, ids)
      return _finish(state, *tx.update(None, state.opt_state, state.params, domain_loss_fn=domain_loss_fn))
    x, y = batch
    x = as_model_input(x)  # uint8 pixels are cast on the device
    if penalty is None:
      grouped = grouped_domain_loss_fn(lambda p, i, l: per_example_loss(p, state.model_state, i, l), has_aux=True)
      domain_loss_fn = lambda p: grouped(p, x, y)
    else:
      domain_loss_fn = lambda p: penalized_domain_losses(p, state, x, y)
    return _finish(state, *tx.update(None, state.opt_state, state.params, domain_loss_fn=domain_loss_fn))

  def _finish(state: TrainState, updates, opt_state):
    stats = find_disam_state(opt_state)
    metrics = {
      "loss": stats.loss,
      "domain_losses": stats.domain_losses,
      "variance": stats.variance,
      "perturbation_norm": stats.perturbation_norm,
      "grad_norm": stats.grad_norm,
    }
    for name in ("perturbation_weights", "sam_cosine"):  # DISAM's mechanism, in states that carry it
      if getattr(stats, name, None) is not None:
        metrics[name] = getattr(stats, name)
    model_state = stats.aux  # from the unperturbed forward pass
    if penalty is not None:
      model_state = stats.aux.model_state
      metrics.update(
        loss=stats.aux.loss, domain_losses=stats.aux.domain_losses, penalty=stats.aux.penalty, objective=stats.loss
      )
    new_state = TrainState(
      params=optax.apply_updates(state.params, updates),
      model_state=model_state,
      opt_state=opt_state,
      step=state.step + 1,
    )
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: Any) -> Callable:
  """Returns the pure `eval_step(params, model_state, x) -> logits` (eval mode: running statistics, no dropout)."""
  from disam_jax.harness.models import apply_model

  def eval_step(params, model_state, x):
    logits, _ = apply_model(graphdef, params, model_state, as_model_input(x), train=False)
    return logits

  return eval_step


def make_eval_counts(eval_step: Callable, num_parts: int) -> Callable:
  """Returns the pure `counts(acc, params, model_state, x, y, part) -> acc + [correct, total]` of one evaluation
  batch, to jit: `x [n, H, W, C]`, `y [n]` int32, `part [n]` int32 (the evaluation part of each row, -1 on padding),
  `acc [2, num_parts]` int32: per part, the rows predicted right and the rows. Counted with `segment_sum` where the
  batch is (on a mesh: each device its rows, XLA adds the partial counts); padding rows count nowhere."""

  def counts(acc, params, model_state, x, y, part):
    pred = jnp.argmax(eval_step(params, model_state, x), axis=-1)
    segment = jnp.where(part >= 0, part, num_parts)  # padding: an extra segment, dropped
    correct = jax.ops.segment_sum((pred == y).astype(jnp.int32), segment, num_segments=num_parts + 1)
    total = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_parts + 1)
    return acc + jnp.stack([correct[:num_parts], total[:num_parts]])

  return counts


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


_all_finite_jit = jax.jit(_all_finite)


def _chunk_size(n: int, max_batch: int) -> int:
  """Power-of-two chunk sizes (at most `max_batch`) so evaluation compiles a handful of shapes, not one per set."""
  return min(max_batch, 1 << max(0, (n - 1).bit_length()))


def predict(eval_step: Callable, params: Any, model_state: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes of `x` in chunks of `batch_size` (the last chunk zero-padded)."""
  out = []
  for start in range(0, len(x), batch_size):
    chunk = x[start : start + batch_size]
    size = _chunk_size(len(chunk), batch_size)
    if size != len(chunk):
      chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    logits = eval_step(params, model_state, chunk)
    out.append(np.asarray(jnp.argmax(logits, axis=-1))[: min(batch_size, len(x) - start)])
  return np.concatenate(out) if out else np.zeros([0], np.int64)


_INIT_CACHE: dict[tuple, tuple[Any, Callable]] = {}


def _model_initializer(model: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any]):
  """`(graphdef, jitted initialize(key, param_key) -> (params, model_state))`, cached per model configuration."""
  from flax import nnx

  from disam_jax.harness import models

  cache_key = (model, num_classes, input_shape, json.dumps(kwargs, sort_keys=True, default=repr))
  if cache_key in _INIT_CACHE:
    return _INIT_CACHE[cache_key]

  def build(key, param_key):
    return models.create_model(
      model, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(key, params=param_key), **kwargs
    )

  keys = (jax.random.key(0), jax.random.key(0, impl="rbg"))
  graphdef = models.functional_model(nnx.eval_shape(lambda: build(*keys)))[0]
  if len(_INIT_CACHE) >= 16:
    _INIT_CACHE.clear()
  _INIT_CACHE[cache_key] = (graphdef, jax.jit(lambda *k: models.functional_model(build(*k))[1:]))
  return _INIT_CACHE[cache_key]


def init_model(
  model: str,
  *,
  num_classes: int,
  input_shape: Sequence[int],
  seed: int,
  model_kwargs: dict[str, Any] | None = None,
  pretrained: str | None = None,
  mesh: Any | None = None,
) -> tuple[Any, Any, Any]:
  """Builds a registry model as `(graphdef, params, model_state)`, initialized from `seed`.

  Initialization runs under one `jax.jit` with an RBG key for the parameters (threefry's bit generator makes XLA
  compile for tens of seconds on a ResNet's many parameter shapes; RBG for a few); the dropout stream, which ends up
  in `model_state` and is checkpointed, stays a default (threefry) key from `seed`.
  `pretrained`: a weights file (`.pth`, `.safetensors` or `.npz`; our layout or torchvision's, see
  `models.load_pretrained`), loaded over the initialization (keys whose shapes differ, e.g. the classifier, and
  keys the file lacks, e.g. adapters, keep their initial values).
  `mesh`: create the parameters and model state on it, each leaf straight into its `distributed.fsdp_sharding`
  (`distributed.init_sharded`: never whole on one device when the mesh has an `fsdp` axis); with `pretrained`, the
  weights are loaded on one device per process as without a mesh, then placed (`distributed.place_state`).
  """
  from flax import nnx

  from disam_jax.harness import models

  graphdef, initialize = _model_initializer(
    model, int(num_classes), tuple(int(d) for d in input_shape), dict(model_kwargs or {})
  )
  from disam_jax.harness import distributed

  make = lambda: initialize(jax.random.key(seed), jax.random.key(seed, impl="rbg"))
  if mesh is None or pretrained is not None:
    params, model_state = make()
  else:
    params, model_state = distributed.init_sharded(make, mesh)
  if pretrained is not None:
    module = nnx.merge(graphdef, params, model_state)
    models.load_pretrained(module, pretrained)
    graphdef, params, model_state = models.functional_model(module)
    if mesh is not None:
      params, model_state = distributed.place_state((params, model_state), mesh)
  return graphdef, params, model_state
