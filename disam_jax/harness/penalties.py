"""DomainBed's objective-changing algorithms as functions of the per-domain outputs: CORAL, V-REx, Fishr.

Each adds a weighted penalty `w_t * P` to the training loss: the harness optimizes `L + w_t P` with
`L = mean_i L_i` (the mean of the per-domain cross-entropies). It does so by adding `w_t P` to every domain's
loss, `L_i' = L_i + w_t P`. Then `mean_i L_i' = L + w_t P` is the training loss of every pass (the ERM gradient,
and under SAM/DISAM the ascent gradient and the gradient at the perturbed weights), while the domain deviations
`L_i' - L' = L_i - L` and hence DISAM's variance `V` are those of the plain losses: DISAM's variance term stays
in the perturbation only, `g_p = grad (L + w_t P - lam V)`, `g = grad (L + w_t P)(w + eps)`.

Definitions (DomainBed, facebookresearch/DomainBed, domainbed/algorithms.py and lib/misc.py), with `M` domains,
`b` examples per domain, head inputs (features) `z` of width `F`:

* CORAL (Sun & Saenko 2016; DomainBed's ``CORAL`` = ``AbstractMMD`` with the ``mean_cov`` kernel):
  `P = mean over pairs i < j of [ mean_f (mu_i - mu_j)_f^2 + mean_fg (C_i - C_j)_fg^2 ]`, with `mu_i` the mean
  and `C_i` the unbiased (`1 / (b - 1)`) covariance of domain i's features. Weight `w = mmd_gamma` throughout.
* V-REx (Krueger et al. 2021, "Out-of-Distribution Generalization via Risk Extrapolation"): `P = mean_i (L_i -
  L)^2`, the population variance of the domain losses. Weight 1 for the first ``vrex_penalty_anneal_iters``
  steps, then ``vrex_lambda``.
* Fishr (Rame et al. 2022, "Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization"): the
  per-example gradients `G_n` of the cross-entropy with respect to the classifier head's parameters (weights and
  bias, flattened to `[P]`; DomainBed gets them with BackPACK; here, for a linear head, in closed form from the
  features and the softmax residuals without materialising them, otherwise `jax.vmap(jax.grad(...))` on the head),
  their per-domain variance `v_i = mean_n (G_n - mean_n G_n)^2` (biased, `[P]`), an exponential moving average
  per domain (DomainBed's ``MovingAverage(ema, oneminusema_correction=True)``: state `s_i <- ema s_i + (1 - ema)
  v_i`, stored without gradient, starting from 0; the penalty uses `s_i / (1 - ema)`, so the gradient reaching
  `v_i` has weight 1), and `P = mean_i mean_p (s_i / (1 - ema) - mean_j s_j / (1 - ema))_p^2`. Weight 0 for the
  first ``penalty_anneal_iters`` steps, then ``lambda``. The moving average is updated on every step (also before
  the anneal), as DomainBed's.

Under SAM/DISAM the loss is evaluated twice per step; Fishr's moving average advances once, from the unperturbed
pass (the perturbed pass reads the same state and its update is discarded), as BatchNorm statistics do.

DomainBed re-initializes Adam at the anneal step of V-REx and Fishr ("because it doesn't like the sharp jump in
gradient magnitudes"); the harness does the same with whatever base optimizer runs (`reset_at`), see
`disam_jax.harness.algorithms`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from disam_jax import DomainLosses

__all__ = [
  "DomainOutputs",
  "Penalty",
  "add_penalty",
  "coral",
  "coral_penalty",
  "fishr",
  "fishr_domain_gradient_variance",
  "fishr_penalty",
  "linear_head",
  "reset_at",
  "vrex",
  "vrex_penalty",
]


class DomainOutputs(NamedTuple):
  """What a penalty may look at, for one batch of M domains with b examples each.

  Attributes:
    features: `[M, b, F]` the classifier head's inputs.
    labels: `[M, b]` integer labels.
    domain_losses: `[M]` float32 mean cross-entropy of each domain.
    head: `head(head_params, z [n, F]) -> logits [n, C]`, the classifier head as a pure function.
    head_params: the head's parameters (a pytree; the same arrays as in the model's parameters, so gradients
      flow to them).
  """

  features: jax.Array
  labels: jax.Array
  domain_losses: jax.Array
  head: Callable[[Any, jax.Array], jax.Array]
  head_params: Any


class Penalty(NamedTuple):
  """A training-loss penalty `w_t * P`.

  Attributes:
    name: 'coral', 'vrex' or 'fishr'.
    init: `init(num_domains, head_params) -> state`, the penalty's running state (`()` if it has none).
    value: `value(outputs: DomainOutputs, state) -> (P float32 scalar, new_state)`.
    weight: `weight(step) -> w_t` float32 scalar, `step` the number of steps already taken.
    reset_step: re-initialize the base optimizer right before this step (DomainBed's Adam reset), or None.
  """

  name: str
  init: Callable[[int, Any], Any]
  value: Callable[[DomainOutputs, Any], tuple[jax.Array, Any]]
  weight: Callable[[jax.Array], jax.Array]
  reset_step: int | None


def add_penalty(losses: DomainLosses, term: jax.Array) -> DomainLosses:
  """Adds `term` (the weighted penalty) to the mean loss of every domain present: `L_i' = L_i + term`.

  The weighted mean of the domain losses becomes `L + term` and their deviations from it are unchanged, so
  DISAM's variance is the variance of the plain losses.
  """
  term = jnp.asarray(term, jnp.float32).astype(losses.total.dtype)
  return DomainLosses(losses.total + losses.count.astype(losses.total.dtype) * term, losses.count)


# ---------------------------------------------------------------------------------------------------------------------
# CORAL
# ---------------------------------------------------------------------------------------------------------------------


def coral_penalty(features: jax.Array) -> jax.Array:
  """DomainBed's CORAL penalty of `[M, b, F]` features: mean and covariance differences, averaged over pairs.

  `mean over i < j of mean((mu_i - mu_j)^2) + mean((C_i - C_j)^2)`, `C_i` the unbiased covariance (`b - 1`),
  accumulated in float32 (float64 for float64 features). 0 for a single domain (DomainBed's penalty stays 0 then).

  Computed in O(M F^2) memory and time, without forming the `M (M - 1) / 2` pairs: for any vectors `a_i`,
  `sum_{i<j} ||a_i - a_j||^2 = M sum_i ||a_i||^2 - ||sum_i a_i||^2 = M sum_i ||a_i - mean_j a_j||^2`; the last form
  (the one used, for both the means and the covariances) subtracts no two large sums, so float32 loses nothing to
  cancellation when the domains' covariances are close. The temporaries are the `[M, F, F]` covariances (the
  pairwise form also held `[M (M - 1) / 2, F, F]` differences: 1.56 GiB at M=64, F=256).
  """
  z = jnp.asarray(features)
  z = z.astype(_at_least_float32(z.dtype))
  m, b, f = z.shape
  if b < 2:
    raise ValueError(f"CORAL needs at least 2 examples per domain for a covariance; got {b}.")
  if m < 2:
    return jnp.zeros([], z.dtype)
  mean = z.mean(axis=1)  # [M, F]
  centered = z - mean[:, None, :]
  cov = jnp.einsum("mbf,mbg->mfg", centered, centered) / (b - 1)  # [M, F, F]
  pairs = m * (m - 1) / 2
  mean_spread = jnp.sum((mean - mean.mean(axis=0)) ** 2)  # sum_i ||mu_i - mean_j mu_j||^2
  cov_spread = jnp.sum((cov - cov.mean(axis=0)) ** 2)
  return (m * (mean_spread / f + cov_spread / (f * f)) / pairs).astype(z.dtype)


def coral(mmd_gamma: float = 1.0) -> Penalty:
  """CORAL with weight `mmd_gamma` (DomainBed hparams_registry: ``mmd_gamma`` 1.0)."""
  _check_nonnegative("mmd_gamma", mmd_gamma)
  return Penalty(
    name="coral",
    init=lambda num_domains, head_params: (),
    value=lambda outputs, state: (coral_penalty(outputs.features), state),
    weight=lambda step: jnp.asarray(mmd_gamma, jnp.float32),
    reset_step=None,
  )


# ---------------------------------------------------------------------------------------------------------------------
# V-REx
# ---------------------------------------------------------------------------------------------------------------------


def vrex_penalty(domain_losses: jax.Array) -> jax.Array:
  """`mean_i (L_i - mean_j L_j)^2` of the `[M]` domain losses (DomainBed's ``VREx``), in float32."""
  losses = jnp.asarray(domain_losses).astype(jnp.float32)
  return jnp.mean((losses - losses.mean()) ** 2)


def vrex(vrex_lambda: float = 10.0, anneal_steps: int = 500) -> Penalty:
  """V-REx: weight 1 for `anneal_steps` steps, then `vrex_lambda`; base optimizer reset at `anneal_steps`.

  DomainBed hparams_registry: ``vrex_lambda`` 1e1, ``vrex_penalty_anneal_iters`` 500.
  """
  _check_nonnegative("vrex_lambda", vrex_lambda)
  _check_steps("vrex anneal_steps", anneal_steps)
  return Penalty(
    name="vrex",
    init=lambda num_domains, head_params: (),
    value=lambda outputs, state: (vrex_penalty(outputs.domain_losses), state),
    weight=lambda step: jnp.where(step >= anneal_steps, jnp.float32(vrex_lambda), jnp.float32(1.0)),
    reset_step=anneal_steps,
  )


# ---------------------------------------------------------------------------------------------------------------------
# Fishr
# ---------------------------------------------------------------------------------------------------------------------


def linear_head(head_params: Any, z: jax.Array) -> jax.Array:
  """The linear classifier `z @ kernel + bias` (`nnx.Linear`'s parameters: `kernel [F, C]`, optional `bias [C]`)
  as a head function, in float32 (float64 for float64 inputs).

  `models.apply_model_with_head` hands it to the penalties for a model whose classifier is an `nnx.Linear`; Fishr
  then computes the per-example gradient variances in closed form (`fishr_domain_gradient_variance`).
  """
  kernel = jnp.asarray(head_params["kernel"])
  dtype = _at_least_float32(jnp.asarray(z).dtype, kernel.dtype)
  logits = jnp.asarray(z).astype(dtype) @ kernel.astype(dtype)
  if "bias" in head_params:
    logits = logits + jnp.asarray(head_params["bias"]).astype(dtype)
  return logits


def _at_least_float32(*dtypes) -> Any:
  """float32, or float64 where an input is (the tests' references run in float64)."""
  return jnp.result_type(jnp.float32, *dtypes)


def _per_example_head_gradients(head: Callable, head_params: Any, z: jax.Array, y: jax.Array) -> jax.Array:
  """`[n, P]` gradients of each example's cross-entropy with respect to the head's parameters, flattened."""

  def example_loss(hp, z1, y1):
    logits = head(hp, z1[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(_at_least_float32(logits.dtype)), y1[None])[0]

  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(head_params, z, y)
  leaves = jax.tree.leaves(grads)
  dtype = _at_least_float32(*(g.dtype for g in leaves))
  return jnp.concatenate([g.reshape(g.shape[0], -1).astype(dtype) for g in leaves], axis=1)


def _linear_head_gradient_variance(head_params: Any, features: jax.Array, labels: jax.Array) -> jax.Array:
  """`fishr_domain_gradient_variance` of `linear_head` in closed form, without per-example gradients.

  Example n's cross-entropy gradient is `dW_n = z_n r_n^T` (`[F, C]`) and `db_n = r_n`, with `r_n = softmax(z_n W +
  b) - onehot(y_n)`. Per domain and parameter, the biased variance over the b examples is `mean_n dW_n^2 - (mean_n
  dW_n)^2 = (z^2)^T (r^2) / b - (z^T r / b)^2` (and `mean_n r_n^2 - (mean_n r_n)^2` for the bias): two `[M, F, C]`
  contractions instead of an `[M b, F C + C]` buffer. Leaves in `jax.tree.leaves(head_params)` order, as the
  per-example path.
  """
  logits = linear_head(head_params, features)  # [M, b, C], float32 (float64 for float64 inputs)
  z = jnp.asarray(features).astype(logits.dtype)  # [M, b, F]
  probs = jax.nn.softmax(logits, axis=-1)
  r = probs - jax.nn.one_hot(labels, probs.shape[-1], dtype=logits.dtype)
  b = z.shape[1]
  variances = {"kernel": (jnp.einsum("mbf,mbc->mfc", z * z, r * r) / b - (jnp.einsum("mbf,mbc->mfc", z, r) / b) ** 2)}
  if "bias" in head_params:
    variances["bias"] = jnp.mean(r * r, axis=1) - jnp.mean(r, axis=1) ** 2
  m = z.shape[0]
  # nnx.State and dicts flatten in sorted key order: bias, then kernel
  return jnp.concatenate([variances[k].reshape(m, -1) for k in sorted(variances)], axis=1)


def fishr_domain_gradient_variance(
  head: Callable, head_params: Any, features: jax.Array, labels: jax.Array
) -> jax.Array:
  """`[M, P]` per-domain variance (biased, over the b examples) of the per-example head gradients.

  For `linear_head` (every registry model's classifier) in closed form (`_linear_head_gradient_variance`: temporary
  memory O(M F C), as the result); for any other head from `[M b, P]` per-example gradients
  (`jax.vmap(jax.grad(...))`).

  Args:
    head: `head(head_params, z [n, F]) -> logits [n, C]`.
    head_params: its parameters.
    features: `[M, b, F]` head inputs.
    labels: `[M, b]` integer labels.
  """
  if head is linear_head:
    return _linear_head_gradient_variance(head_params, features, labels)
  m, b = labels.shape
  grads = _per_example_head_gradients(
    head, head_params, features.reshape((m * b,) + features.shape[2:]), labels.reshape(-1)
  ).reshape(m, b, -1)
  centered = grads - grads.mean(axis=1, keepdims=True)
  return jnp.mean(centered**2, axis=1)


def fishr_penalty(grad_variance: jax.Array, ema_state: jax.Array, ema: float) -> tuple[jax.Array, jax.Array]:
  """Fishr's penalty from this step's `[M, P]` gradient variances and the moving-average state.

  Returns `(P, new_ema_state)`: `new = ema * state + (1 - ema) * v` (the state carries no gradient), and `P =
  mean_i mean_p (new_i / (1 - ema) - mean_j new_j / (1 - ema))^2` (DomainBed's ``l2_between_dicts`` averaged
  over domains).
  """
  new_state = ema * jax.lax.stop_gradient(ema_state) + (1.0 - ema) * grad_variance
  corrected = new_state / (1.0 - ema)
  penalty = jnp.mean((corrected - corrected.mean(axis=0, keepdims=True)) ** 2)
  return penalty, jax.lax.stop_gradient(new_state)


def fishr(fishr_lambda: float = 1000.0, ema: float = 0.95, anneal_steps: int = 1500) -> Penalty:
  """Fishr: weight 0 for `anneal_steps` steps, then `fishr_lambda`; base optimizer reset at `anneal_steps` (if > 0).

  DomainBed hparams_registry: ``lambda`` 1000, ``ema`` 0.95, ``penalty_anneal_iters`` 1500.
  """
  _check_nonnegative("fishr_lambda", fishr_lambda)
  _check_steps("fishr anneal_steps", anneal_steps)
  if not 0.0 <= ema < 1.0:
    raise ValueError(f"fishr ema must be in [0, 1); got {ema!r}.")

  def init(num_domains, head_params):
    size = sum(int(x.size) for x in jax.tree.leaves(head_params))
    return jnp.zeros([num_domains, size], jnp.float32)

  def value(outputs, state):
    variance = fishr_domain_gradient_variance(outputs.head, outputs.head_params, outputs.features, outputs.labels)
    return fishr_penalty(variance, state, ema)

  return Penalty(
    name="fishr",
    init=init,
    value=value,
    weight=lambda step: jnp.where(step >= anneal_steps, jnp.float32(fishr_lambda), jnp.float32(0.0)),
    reset_step=anneal_steps if anneal_steps > 0 else None,  # DomainBed: `== penalty_anneal_iters != 0`
  )


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer reset at the anneal step
# ---------------------------------------------------------------------------------------------------------------------


class ResetState(NamedTuple):
  """State of `reset_at`: `count` updates so far, and the wrapped optimizer's state."""

  count: jax.Array
  inner_state: optax.OptState


def reset_at(tx: optax.GradientTransformation, step: int) -> optax.GradientTransformationExtraArgs:
  """`tx`, re-initialized (`tx.init(params)`) right before its update number `step` (0-based).

  DomainBed re-creates the Adam optimizer of V-REx and Fishr when the penalty weight jumps (at
  ``update_count == anneal_iters``, before that step's update). Selected with `optax.tree.where`, so the step
  stays one jitted function.
  """
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return ResetState(jnp.zeros([], jnp.int32), tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    inner = optax.tree.where(state.count == step, tx.init(params), state.inner_state)
    updates, inner = tx.update(updates, inner, params, **extra_args)
    return updates, ResetState(optax.safe_increment(state.count), inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_nonnegative(name: str, value: float) -> None:
  if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")


def _check_steps(name: str, value: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
