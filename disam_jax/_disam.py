"""DISAM: Domain-Inspired Sharpness-Aware Minimization as an optax transformation.

Zhang, Fan, Yao, Zhang, Wang, "Domain-Inspired Sharpness-Aware Minimization Under Domain Shifts", ICLR 2024,
arXiv 2405.18861, Algorithm 1 and Eq. 6-8. One call to `update` does the whole step:

    g_p = grad_w [ L(w) - lam * V(w) ]                 # Eq. 7: perturbation direction
    eps = rho * g_p / (||g_p||_2 + 1e-12)              # Eq. 8: one global L2 norm
    g   = grad_w L(w + eps)                            # the plain training loss, no variance term
    updates, base_state = base_tx.update(g, base_state, w)

with per-domain mean losses `L_i`, domain weights `a_i`, `L = sum_i a_i L_i` and `V = sum_i a_i (L_i - L)^2`
(uniform `a_i = 1/M`: the paper's population variance). Since `grad V = sum_i 2 a_i (L_i - L) grad L_i`,

    g_p = sum_i c_i grad L_i,    c_i = a_i * (1 - 2 lam (L_i - L))

is ONE vector-Jacobian product of the domain loss function with cotangent `c` (Eq. 7 folded into the backward
pass): two forward and two backward passes per step whatever M is, exactly SAM's cost. `c_i` may be negative for a
domain far above the mean; that is the algorithm ("elastic calibration"), not a bug.
"""

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from disam_jax._domain_losses import DomainLosses

ScalarOrSchedule = Union[float, optax.Schedule]
_NORM_EPS = 1e-12


class DisamState(NamedTuple):
  """State of `disam`.

  Attributes:
    count: int32 scalar, number of `update` calls; drives `rho`/`lam` schedules.
    base_state: the state of the base optimizer.
    domain_losses: `[M]` float32 per-domain mean losses at the unperturbed weights of the last step (0 for a domain
      absent from that batch). Shape `[num_domains]` from `init` when `num_domains` is given, else `[0]` until the
      first update.
    domain_counts: `[M]` float32 number of examples of each domain in the last batch (1 per domain and device when
      `domain_loss_fn` returns plain means).
    loss: float32 scalar, training loss `L(w)` of the last step.
    variance: float32 scalar, variance of the domain losses `V(w)` of the last step.
    perturbation_norm: float32 scalar, `||g_p||` (adaptive: `|| |w| g_p ||`), the norm that scaled `eps`.
    grad_norm: float32 scalar, `||g||`, norm of the sharpness-aware gradient handed to `base_tx`.
    aux: with `has_aux=True`, the auxiliary output of `domain_loss_fn` at the *unperturbed* weights (the
      perturbed evaluation's aux is discarded); `None` until the first update, and always without `has_aux`.
  """

  count: chex.Array
  base_state: optax.OptState
  domain_losses: chex.Array
  domain_counts: chex.Array
  loss: chex.Array
  variance: chex.Array
  perturbation_norm: chex.Array
  grad_norm: chex.Array
  aux: Any


def _initial_state(base_state: optax.OptState, num_domains: Optional[int], aux_example: Any) -> DisamState:
  """The state before the first step: metrics zero, `[num_domains]` (or `[0]`) domain fields, aux_example."""
  m = 0 if num_domains is None else num_domains
  zero = jnp.zeros([], jnp.float32)
  return DisamState(
      count=jnp.zeros([], jnp.int32),
      base_state=base_state,
      domain_losses=jnp.zeros([m], jnp.float32),
      domain_counts=jnp.zeros([m], jnp.float32),
      loss=zero,
      variance=zero,
      perturbation_norm=zero,
      grad_norm=zero,
      aux=aux_example,
  )


def _check_hyperparameter(name: str, value: ScalarOrSchedule) -> None:
  """Rejects negative or non-finite rho/lam; probes schedules at a spread of step counts."""
  if callable(value):
    for step in (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000):
      v = float(value(jnp.asarray(step, jnp.int32)))
      if not math.isfinite(v) or v < 0:
        raise ValueError(
            f'{name} schedule must give finite values >= 0; {name}({step}) = {v}. A negative rho flips the '
            'perturbation to descend the loss (a warmup that starts below 0 is the usual cause).'
        )
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise TypeError(f'{name} must be a float or an optax schedule; got {value!r}.') from None
  if not math.isfinite(v) or v < 0:
    raise ValueError(f'{name} must be finite and >= 0; got {name}={value!r}.')


def _at_step(value: ScalarOrSchedule, count: chex.Array) -> chex.Array:
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def _split_output(out: Any, has_aux: bool) -> tuple[DomainLosses, Any]:
  """Normalizes what `domain_loss_fn` returned to (DomainLosses, aux), checking shapes at trace time."""
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2) or isinstance(out, DomainLosses):
      raise ValueError(
          'With has_aux=True, domain_loss_fn must return (domain_losses, aux); got '
          f'{type(out).__name__}.'
      )
    out, aux = out
  else:
    if isinstance(out, tuple) and not isinstance(out, DomainLosses):
      raise ValueError(
          'domain_loss_fn returned a tuple: pass has_aux=True to disam() if it returns (domain_losses, aux), '
          'or return a DomainLosses / a [M] vector.'
      )
    aux = None
  if isinstance(out, DomainLosses):
    total, count = jnp.asarray(out.total), jnp.asarray(out.count)
  else:
    total = jnp.asarray(out)
    count = jnp.ones(jnp.shape(total), jnp.float32)
  if total.ndim != 1 or count.shape != total.shape:
    raise ValueError(
        'domain_loss_fn must return the per-domain losses as a vector of shape [M] (or DomainLosses with '
        f'total and count of shape [M]); got losses of shape {total.shape} and counts of shape {count.shape}.'
    )
  if not jnp.issubdtype(total.dtype, jnp.floating):
    raise ValueError(f'domain losses must be floating point; got dtype {total.dtype}.')
  return DomainLosses(total, jax.lax.stop_gradient(count.astype(jnp.float32))), aux


def _domain_weights(weighting: Union[str, chex.Array], count: chex.Array) -> chex.Array:
  """`[M]` weights a_i over the domains present in the batch (count > 0), summing to 1 (0 if none present)."""
  present = (count > 0).astype(jnp.float32)
  if isinstance(weighting, str):
    raw = present if weighting == 'uniform' else count
  else:
    if weighting.shape != count.shape:
      raise ValueError(
          f'domain_weights has {weighting.shape[0]} entries but domain_loss_fn returned {count.shape[0]} '
          'domain losses.'
      )
    raw = weighting * present
  return raw / jnp.maximum(raw.sum(), jnp.finfo(jnp.float32).tiny)


def _objective_terms(total: chex.Array, count: chex.Array, weighting) -> tuple[chex.Array, ...]:
  """(domain means, weights, L, V) from float32 global sums and counts; absent domains carry weight 0."""
  means = total / jnp.maximum(count, 1.0)
  weights = _domain_weights(weighting, count)
  loss = jnp.sum(weights * means)
  variance = jnp.sum(weights * (means - loss) ** 2)
  return means, weights, loss, variance


def _global_norm(tree: Any) -> chex.Array:
  """L2 norm over all leaves, accumulated in float32 (bf16 params)."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def disam(
    base_tx: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    lam: ScalarOrSchedule = 0.1,
    *,
    adaptive: bool = False,
    domain_weights: Union[str, jax.typing.ArrayLike] = 'uniform',
    has_aux: bool = False,
    aux_example: Any = None,
    num_domains: Optional[int] = None,
    batch_axis_name: Optional[str] = None,
    per_device_perturbation: bool = False,
    perturbation_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Domain-Inspired Sharpness-Aware Minimization (arXiv 2405.18861, Algorithm 1).

  Example::

    tx = disam_jax.disam(optax.sgd(0.01, momentum=0.9), rho=0.05, lam=0.1)
    opt_state = tx.init(params)
    f = lambda p: per_domain_mean_losses(p, batch)          # -> [M]
    updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=f)
    params = optax.apply_updates(params, updates)

  `update(updates, state, params, *, domain_loss_fn, **extra_args)` evaluates both gradients through
  `domain_loss_fn`, so the incoming `updates` are ignored (pass `None`; a gradient pytree passed there is discarded,
  not added). `params` is required. Other `extra_args` are forwarded to `base_tx`. `domain_loss_fn(params)` returns
  the per-domain losses at `params`: a `[M]` vector of means, a `DomainLosses(total, count)` (see
  `grouped_domain_loss_fn`, `domain_losses_from_ids`), or `(either, aux)` with `has_aux=True`.

  Where things go: gradient clipping, weight decay and anything else that should act on the sharpness-aware
  gradient belong *inside* `base_tx` (e.g. `optax.chain(optax.clip_by_global_norm(1.0),
  optax.add_decayed_weights(1e-4), optax.sgd(lr, 0.9))`); `base_tx` is applied at the unperturbed weights. In
  `optax.chain(a, disam(...), b)` the chain forwards `domain_loss_fn` to every member: `b` acts on DISAM's updates
  as usual, but `a`'s output is discarded because DISAM recomputes the gradient.

  Non-finite losses propagate into the updates (nothing is silently zeroed). To skip such steps, put
  `optax.apply_if_finite` inside base_tx, `disam(optax.apply_if_finite(sgd, max_consecutive_errors=5))`: it then
  sees the sharpness-aware gradient. (Wrapped around disam it would only inspect the ignored incoming updates.) A zero gradient gives a zero
  perturbation (the norm has a 1e-12 floor), never NaN.

  Args:
    base_tx: the optimizer applied to the sharpness-aware gradient `g` at the unperturbed weights.
    rho: perturbation radius (>= 0), or an optax schedule of the step count kept in the state. `rho=0` is
      exactly `base_tx` on the gradient of `L`.
    lam: weight of the domain-loss variance in the perturbation objective (>= 0), or a schedule. `lam=0` is
      exactly SAM. Paper defaults: rho 0.05, lam 0.1.
    adaptive: ASAM form, `eps = rho * w^2 * g_p / (|| |w| g_p || + 1e-12)` (the official code's flag).
    domain_weights: `'uniform'` (paper: `a_i = 1/M` over the domains present), `'count'` (`a_i = n_i / n`, what
      the official code effectively computes), or a `[M]` array of fixed weights (renormalized over present
      domains). The same weights define `L` and `V`.
    has_aux: `domain_loss_fn` returns `(domain_losses, aux)`; the unperturbed aux is kept in `state.aux`.
    aux_example: with `has_aux`, a pytree of arrays shaped like the aux (e.g. the model's current BatchNorm
      statistics): `init` stores it as `state.aux` instead of `None`, so the state keeps one structure across
      steps. Needed where the state must not change structure: `nnx.Optimizer`, a `lax.scan` carry, `lax.cond`.
    num_domains: M, if known: fixes the shape of `state.domain_losses` from `init` (needed when the state is a
      `lax.scan` carry) and checks every call against it.
    batch_axis_name: under `pmap`/`shard_map`, the mapped axis holding slices of the batch: domain loss sums and
      counts are summed over it before the variance, and both gradients are reduced, so N devices take the same
      step as one device on the whole batch. Not needed under `jit` with sharded arrays (GSPMD).
    per_device_perturbation: with `batch_axis_name`, each device perturbs with its own local `g_p` from its own
      domain losses ("m-sharpness", as google-research/sam); only the final gradients are averaged. Off by
      default: the perturbation is global (synchronized).
    perturbation_mask: a pytree of bools matching `params` (or a function of `params` returning one): only
      `True` leaves are perturbed and the norm is taken over them alone (SAM-ON style).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `DisamState`.

  References:
    Zhang et al., Domain-Inspired Sharpness-Aware Minimization Under Domain Shifts, ICLR 2024 (Eq. 6-8).
    Foret et al., Sharpness-Aware Minimization, ICLR 2021. Kwon et al., ASAM, ICML 2021.
  """
  _check_hyperparameter('rho', rho)
  _check_hyperparameter('lam', lam)
  if isinstance(domain_weights, str):
    if domain_weights not in ('uniform', 'count'):
      raise ValueError(
          f"domain_weights must be 'uniform', 'count' or a [M] array; got {domain_weights!r}."
      )
    weighting = domain_weights
  else:
    weighting = np.asarray(domain_weights, np.float32)
    if weighting.ndim != 1 or not np.all(np.isfinite(weighting)) or np.any(weighting < 0):
      raise ValueError(f'domain_weights must be a vector of finite values >= 0; got {domain_weights!r}.')
    if not weighting.sum() > 0:
      raise ValueError('domain_weights must not be all zero.')
    if num_domains is not None and weighting.shape[0] != num_domains:
      raise ValueError(
          f'domain_weights has {weighting.shape[0]} entries but num_domains={num_domains}.'
      )
    weighting = jnp.asarray(weighting)
  if num_domains is not None and (not isinstance(num_domains, int) or num_domains < 1):
    raise ValueError(f'num_domains must be a positive int; got {num_domains!r}.')
  if per_device_perturbation and batch_axis_name is None:
    raise ValueError('per_device_perturbation=True needs batch_axis_name (the pmap/shard_map axis).')
  base_tx = optax.with_extra_args_support(base_tx)
  lam_may_be_positive = callable(lam) or float(lam) > 0

  if aux_example is not None and not has_aux:
    raise ValueError('aux_example is only meaningful with has_aux=True.')

  def init_fn(params):
    return _initial_state(base_tx.init(params), num_domains, aux_example)

  def update_fn(updates, state, params=None, *, domain_loss_fn=None, **extra_args):
    del updates  # Both gradients come from domain_loss_fn.
    if domain_loss_fn is None:
      raise ValueError(
          'disam needs the per-domain losses: call tx.update(None, state, params, domain_loss_fn=f) with '
          'f(params) -> [M] losses. (In optax.chain, pass domain_loss_fn to the chain\'s update.)'
      )
    if params is None:
      raise ValueError('disam needs params: call tx.update(updates, state, params, domain_loss_fn=f).')
    rho_t, lam_t = _at_step(rho, state.count), _at_step(lam, state.count)
    reduce_losses = batch_axis_name is not None and not per_device_perturbation

    def local_totals(p):
      losses, aux = _split_output(domain_loss_fn(p), has_aux)
      return losses.total, (losses.count, aux)

    # Pass 1, unperturbed: forward, the objective on global sums, one backward with cotangent dJ/dtotal.
    total, vjp_fn, (count, aux) = jax.vjp(local_totals, params, has_aux=True)
    m = total.shape[0]
    expected = num_domains if num_domains is not None else (state.domain_losses.shape[0] or m)
    if m != expected:
      raise ValueError(
          f'domain_loss_fn returned {m} domain losses, but this optimizer state holds {expected} '
          '(the number of domains must not change between steps).'
      )
    if m == 1 and lam_may_be_positive:
      raise ValueError(
          f'domain_loss_fn returned a single domain loss with lam={lam!r}: the variance of one domain is '
          'identically 0, so DISAM would silently be SAM. Use lam=0 for SAM, or return one loss per domain.'
      )
    total32 = total.astype(jnp.float32)
    if reduce_losses:
      total32, count = jax.lax.psum((total32, count), batch_axis_name)

    def perturbation_objective(t):
      means, weights, loss, variance = _objective_terms(t, count, weighting)
      return loss - lam_t * variance, (means, weights, loss, variance)

    cotangent, (means, weights, loss, variance) = jax.grad(perturbation_objective, has_aux=True)(total32)
    (g_p,) = vjp_fn(cotangent.astype(total.dtype))
    if reduce_losses:
      g_p = jax.lax.psum(g_p, batch_axis_name)

    mask = perturbation_mask(params) if callable(perturbation_mask) else perturbation_mask
    if mask is not None:
      g_p = jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g), g_p, mask)
    if adaptive:
      scaled = jax.tree.map(lambda g, w: jnp.abs(w.astype(jnp.float32)) * g.astype(jnp.float32), g_p, params)
      p_norm = _global_norm(scaled)
      direction = jax.tree.map(lambda s, w: jnp.abs(w.astype(jnp.float32)) * s, scaled, params)
    else:
      p_norm = _global_norm(g_p)
      direction = jax.tree.map(lambda g: g.astype(jnp.float32), g_p)
    scale = rho_t / (p_norm + _NORM_EPS)
    perturbed = jax.tree.map(lambda w, d: (w.astype(jnp.float32) + scale * d).astype(w.dtype), params, direction)

    # Pass 2, perturbed: gradient of the plain training loss L; its aux (e.g. BatchNorm statistics) is dropped.
    grad_weights = weights / jnp.maximum(count, 1.0)

    def perturbed_loss(p):
      losses, _ = _split_output(domain_loss_fn(p), has_aux)
      return jnp.sum(grad_weights.astype(losses.total.dtype) * losses.total)

    g = jax.grad(perturbed_loss)(perturbed)
    if reduce_losses:
      g = jax.lax.psum(g, batch_axis_name)
    elif batch_axis_name is not None:  # per-device perturbation: average the local sharpness-aware gradients
      g = jax.lax.pmean(g, batch_axis_name)

    new_updates, base_state = base_tx.update(g, state.base_state, params, **extra_args)
    new_state = DisamState(
        count=optax.safe_increment(state.count),
        base_state=base_state,
        domain_losses=means,
        domain_counts=count,
        loss=loss,
        variance=variance,
        perturbation_norm=p_norm,
        grad_norm=_global_norm(g),
        aux=aux,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_disam_state(opt_state: optax.OptState) -> DisamState:
  """Returns the `DisamState` inside an optimizer state (e.g. of a chain), to read the logged metrics."""
  found = [
      s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, DisamState))
      if isinstance(s, DisamState)
  ]
  if len(found) != 1:
    raise ValueError(f'expected exactly one DisamState in the optimizer state; found {len(found)}.')
  return found[0]
