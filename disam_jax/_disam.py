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
domain far above the mean; that is the algorithm ("elastic calibration"), not a bug. The weights `c_i` are kept in
the state (`perturbation_weights`) so the mechanism can be watched.

The SAM family (`rule=`) shares this one step; the rules differ only in the perturbed point and the final gradient,
both from `g_p` (the ascent gradient at `w`) and `g_adv = grad L(w_adv)` (the gradient at the perturbed point):

    sam:   w_adv = w + rho g_p / ||g_p||                final  g_adv
    gsam:  w_adv = w + rho g_p / ||g_p||                final  g_adv - alpha g_perp,  g_perp = g_p - (<g_p, g_adv> /
                                                              ||g_adv||^2) g_adv       (Zhuang et al., ICLR 2022)
    sagm:  w_adv = w + (rho / ||g_p|| - alpha) g_p     final  (g_p + g_adv) / 2      (Wang et al., CVPR 2023)

At lam = 0, `g_p = grad L(w)` and these are exactly GSAM and SAGM as their official code computes them. At lam > 0
the unperturbed gradient entering GSAM's and SAGM's final gradient is DISAM's `g_p = grad (L - lam V)` -- what the
official DISAM code wires (its optimizer reuses the first backward pass), and the only choice that keeps the step at
two forward and two backward passes (`grad L(w)` would be a third backward pass). Consequence: SAGM's update then
carries `-(lam / 2) grad V`, i.e. the step *increases* V by `lr lam / 2 |grad V|^2` to first order, and GSAM's
`g_perp` includes V's gradient; the paper does not say which it meant.
"""

import functools
import math
import operator
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from disam_jax import _sharding
from disam_jax import _wrappers
from disam_jax._domain_losses import DomainLosses

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
_NORM_EPS = 1e-12

# alpha=None takes the rule's published default:
# - gsam 0.2: the official GSAM example (juntang-zhuang/GSAM, example/train.py, `--alpha 0.2`); the paper tunes
#   alpha in {0.01, ..., 0.3} (Zhuang et al., ICLR 2022, Sec. 5). No DomainBed setting is published for GSAM.
# - sagm 0.001: the official SAGM DomainBed hyperparameters (Wang-pengfei/SAGM, domainbed/hparams_registry.py,
#   SAGM_DG: rho 0.05, alpha 0.001).
_DEFAULT_ALPHA = {'gsam': 0.2, 'sagm': 0.001}


class VarianceTrigger(NamedTuple):
  """When an amortized DISAM step runs its ascent: when the domain-loss variance of this step is high.

  `disam(..., perturb_when=VarianceTrigger(min_gap, max_gap, factor, decay))`. At step t, with `V_t` the variance of
  the domain losses `V(w) = sum_i a_i (L_i - L)^2` (Eq. 6) of this step's unperturbed forward pass (free: every step
  runs it) and `s` the steps since the last ascent step counting this one, the step runs the full two-pass DISAM
  step (the ascent) iff

      s >= max_gap   or   (s >= min_gap  and  V_t > factor * r_{t-1}),

  else one forward and backward pass at `w` (plus the reused component, see `reuse_weight`). `r` is the running
  reference of past variances: `r_0 = V_0`, `r_t = decay r_{t-1} + (1 - decay) V_t`, updated every step after the
  decision. The first step always ascends (`s` starts at `max_gap`). So the ascent rate is between `1 / max_gap`
  and `1 / min_gap` whatever the losses do: `min_gap` caps the cost, `max_gap` bounds the staleness.

  Attributes:
    min_gap: int >= 1 (static), fewest steps from one ascent to the next (1: the variance alone decides).
    max_gap: int >= min_gap (static), most steps from one ascent to the next.
    factor: float >= 0 or an optax schedule of the step count: how far above its reference the variance must be
      (1: above the running mean; 0: every step allowed by `min_gap`).
    decay: float in [0, 1): the reference's decay per step (0.9: about the last 10 steps).
  """

  min_gap: int = 16
  max_gap: int = 32
  factor: ScalarOrSchedule = 1.0
  decay: float = 0.9


class DisamState(NamedTuple):
  """State of `disam`. Its structure, shapes and dtypes are fixed by `init` and never change.

  The metrics are float32, or float64 when the parameters are float64 (the dtype of the widest floating parameter,
  at least float32).

  Attributes:
    count: int32 scalar, number of `update` calls; drives `rho`/`lam` schedules.
    base_state: the state of the base optimizer.
    domain_losses: `[M]` per-domain mean losses `L_i` at the unperturbed weights of the last step (0 for a domain
      absent from that batch). Kept only when `num_domains=M` is given: without it M is unknown at `init`, and these
      `[M]` fields are `None` from `init` on, so that the state's structure never changes (the scalars are always
      kept).
    domain_counts: `[M]` number of examples of each domain in the last batch (1 per domain and device when
      `domain_loss_fn` returns plain means). `None` without `num_domains`.
    perturbation_weights: `[M]` the weights `c_i` of the perturbation direction `g_p = sum_i c_i grad L_i`,
      `c_i = a_i (1 - 2 lam (L_i - L))` (the cotangent DISAM already computes; 0 for absent domains). `c_i < 0` when
      `2 lam (L_i - L) > 1`: the perturbation then *descends* that domain's loss. `None` without `num_domains`.
    loss: scalar training loss `L(w) = sum_i a_i L_i` of the last step: the weighted mean of the domain means, which
      is the batch mean only when every domain has the same count (or with `domain_weights='count'`).
    variance: scalar variance of the domain losses `V(w) = sum_i a_i (L_i - L)^2` of the last step.
    perturbation_norm: scalar `||g_p||` (adaptive: `|| |w| g_p ||`), the norm that scaled `eps`. With
      `per_device_perturbation`, this, `perturbation_weights` and `sam_cosine` are each device's own, logged as
      their mean over the devices (so every device holds the same state: shard_map's out_specs `P()` hold).
    grad_norm: scalar `||g||`, norm of the sharpness-aware gradient handed to `base_tx`.
    sam_cosine: scalar cosine between DISAM's `g_p` and SAM's direction `grad L(w)` with `diagnostics=True` (one
      extra backward pass); NaN otherwise. 1 at `lam=0`.
    aux: with `has_aux=True`, the auxiliary output of `domain_loss_fn` at the *unperturbed* weights (the
      perturbed evaluation's aux is discarded); `aux_example` until the first update (`None` without it).
    reused_component: with amortization (`perturb_every=k > 1` or `perturb_when`) and a `reuse_weight` that is not
      the constant 0, the params-shaped component `g_v` of the last full step's sharpness-aware gradient orthogonal
      to its ascent gradient `g_p`, which the steps in between add back to their plain gradient (LookSAM); zeros
      from `init`. `None` otherwise (every step full, or `reuse_weight=0`: nothing is reused, nothing is kept).
    ascended: with amortization, scalar 1 if the last step ran the ascent (the full two-pass step), 0 if it was a
      one-pass step; its mean over steps is the ascent rate. `None` when every step is full.
    trigger_reference: with `perturb_when=VarianceTrigger(...)`, scalar running reference of the domain-loss
      variance, `r_t = decay r_{t-1} + (1 - decay) V_t` (`r_0 = V_0`), against which the next step's variance is
      compared. `None` otherwise.
    steps_since_ascent: with `perturb_when`, int32 scalar, steps since the last ascent step (0 right after one;
      `max_gap - 1` at `init`, so the first step ascends). `None` otherwise.
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
  perturbation_weights: chex.Array
  sam_cosine: chex.Array
  reused_component: Any = None
  ascended: Optional[chex.Array] = None
  trigger_reference: Optional[chex.Array] = None
  steps_since_ascent: Optional[chex.Array] = None


def _metric_dtype(params: Any) -> jnp.dtype:
  """float32, or the widest floating dtype among the parameters if wider (float64 under x64)."""
  floats = [jnp.result_type(x) for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return functools.reduce(jnp.promote_types, floats, jnp.dtype(jnp.float32))


def _initial_state(
    base_state: optax.OptState, num_domains: Optional[int], aux_example: Any, dtype: Any = jnp.float32,
    reused_component: Any = None, amortized: bool = False, trigger: Optional[VarianceTrigger] = None,
) -> DisamState:
  """The state before the first step: metrics zero, `[num_domains]` (or None) domain fields, aux_example; with
  `amortized` the `ascended` flag, with `trigger` its reference 0 and `max_gap - 1` steps since an ascent."""
  per_domain = None if num_domains is None else jnp.zeros([num_domains], dtype)
  zero = jnp.zeros([], dtype)
  return DisamState(
      count=jnp.zeros([], jnp.int32),
      base_state=base_state,
      domain_losses=per_domain,
      domain_counts=per_domain,
      loss=zero,
      variance=zero,
      perturbation_norm=zero,
      grad_norm=zero,
      aux=aux_example,
      perturbation_weights=per_domain,
      sam_cosine=jnp.full([], jnp.nan, dtype),
      reused_component=reused_component,
      ascended=zero if amortized or trigger is not None else None,
      trigger_reference=None if trigger is None else zero,
      steps_since_ascent=None if trigger is None else jnp.asarray(trigger.max_gap - 1, jnp.int32),
  )


_SCHEDULE_PROBES = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def _concrete_float(value: Any) -> Optional[float]:
  """`float(value)`, or None when value is traced (e.g. a hyperparameter of optax.inject_hyperparams under jit)."""
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:
    return None


def _check_hyperparameter(name: str, value: ScalarOrSchedule) -> None:
  """Rejects negative or non-finite rho/lam; probes schedules at a spread of step counts; skips traced values."""
  if callable(value):
    for step in _SCHEDULE_PROBES:
      with jax.ensure_compile_time_eval():  # concrete even when disam() is built under jit (inject_hyperparams)
        v = float(value(jnp.asarray(step, jnp.int32)))
      if not math.isfinite(v) or v < 0:
        raise ValueError(
            f'{name} schedule must give finite values >= 0; {name}({step}) = {v}. A negative rho flips the '
            'perturbation to descend the loss (a warmup that starts below 0 is the usual cause).'
        )
    return
  if isinstance(value, (jax.Array, np.ndarray)) and jnp.ndim(value):
    raise ValueError(f'{name} must be a scalar; got an array of shape {jnp.shape(value)}.')
  try:
    v = _concrete_float(value)
  except (TypeError, ValueError):
    raise TypeError(f'{name} must be a float or an optax schedule; got {value!r}.') from None
  if v is not None and (not math.isfinite(v) or v < 0):
    raise ValueError(f'{name} must be finite and >= 0; got {name}={value!r}.')


def _may_be_positive(value: ScalarOrSchedule) -> Optional[bool]:
  """Whether lam can be > 0: schedules at the probe steps; None when traced (unknown)."""
  if callable(value):
    with jax.ensure_compile_time_eval():
      return any(float(value(jnp.asarray(s, jnp.int32))) > 0 for s in _SCHEDULE_PROBES)
  v = _concrete_float(value)
  return None if v is None else v > 0


def _at_step(value: ScalarOrSchedule, count: chex.Array, dtype: Any) -> chex.Array:
  return jnp.asarray(value(count) if callable(value) else value, dtype)


def _static_positive_int(name: str, value: Any, sets: str, must_be: str = 'an int >= 1') -> int:
  """`value` as a static Python int >= 1 (an int, numpy integer or concrete integer array), else a clear error."""
  try:
    n = operator.index(value)  # int, numpy integer, or a concrete integer array (inject_hyperparams' init)
  except jax.errors.TracerIntegerConversionError:
    raise ValueError(
        f'{name} must be static (it {sets}). With optax.inject_hyperparams, list it in '
        f"static_args: inject_hyperparams(disam, static_args=('base_tx', '{name}'))."
    ) from None
  except TypeError:
    n = None
  if n is None or isinstance(value, bool) or n < 1:
    raise ValueError(f'{name} must be {must_be}; got {value!r}.')
  return n


def _static_num_domains(num_domains: Any) -> Optional[int]:
  if num_domains is None:
    return None
  return _static_positive_int('num_domains', num_domains, "sets the state's shape", 'a positive int')


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
  count_dtype = jnp.promote_types(count.dtype, jnp.float32) if jnp.issubdtype(count.dtype, jnp.floating) else jnp.float32
  return DomainLosses(total, jax.lax.stop_gradient(count.astype(count_dtype))), aux


def _domain_weights(weighting: Union[str, chex.Array], count: chex.Array) -> chex.Array:
  """`[M]` weights a_i over the domains present in the batch (count > 0), summing to 1 (0 if none present)."""
  present = (count > 0).astype(count.dtype)
  if isinstance(weighting, str):
    raw = present if weighting == 'uniform' else count
  else:
    if weighting.shape != count.shape:
      raise ValueError(
          f'domain_weights has {weighting.shape[0]} entries but domain_loss_fn returned {count.shape[0]} '
          'domain losses.'
      )
    raw = weighting.astype(count.dtype) * present
  return raw / jnp.maximum(raw.sum(), jnp.finfo(count.dtype).tiny)


def _objective_terms(total: chex.Array, count: chex.Array, weighting) -> tuple[chex.Array, ...]:
  """(domain means, weights, L, V) from global sums and counts (in total's dtype); absent domains weigh 0."""
  count = count.astype(total.dtype)
  means = total / jnp.maximum(count, 1.0)
  weights = _domain_weights(weighting, count)
  loss = jnp.sum(weights * means)
  variance = jnp.sum(weights * (means - loss) ** 2)
  return means, weights, loss, variance


def _wide(x: chex.Array) -> chex.Array:
  """x in float32, or in its own dtype if wider (bf16/fp16 -> float32, float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _global_norm(tree: Any) -> chex.Array:
  """L2 norm over all leaves of an unsharded (or GSPMD / explicitly sharded) tree, in float32 or wider."""
  return _sharding.ParamLayout(tree).norm(tree)


def _param_layout(params: Any, axes: Optional[tuple], param_specs: Any, domain_loss_fn: Callable,
                  per_device_perturbation: bool) -> _sharding.ParamLayout:
  """How `params` are split over the mapped axes, checked against what the loss and the options need.

  Refuses, at trace time: a loss that all-gathers over a batch axis where the layout cannot be seen (pmap, or
  shard_map with check_vma=False) and `param_specs` is not given (FSDP parameters would be taken as replicated:
  norms over one slice, gradients summed across different slices); `per_device_perturbation` with parameters
  split over a batch axis (their gradient is already summed over the devices, so there is no per-device `g_p`).
  """
  if axes is None:
    if param_specs is not None:
      raise ValueError(
          'param_specs describes parameters split inside shard_map/pmap; it needs batch_axis_name. Under jax.jit '
          'with sharded arrays (GSPMD or an explicit mesh) the layout is in the arrays: drop param_specs.'
      )
    return _sharding.ParamLayout(params)
  layout = _sharding.ParamLayout.of(params, axes, param_specs)
  if param_specs is None and not layout.typed and _gathers_over(domain_loss_fn, params, axes):
    raise ValueError(
        f'domain_loss_fn all-gathers over the batch axis {axes if len(axes) > 1 else axes[0]!r}, which is how '
        'FSDP parameters are used, but this map does not type values with their layout (pmap, or shard_map with '
        'check_vma=False), so disam cannot tell split parameters from replicated ones. Use shard_map with '
        'check_vma=True (the default), or pass disam(..., param_specs=specs) with the in_specs of the params '
        '(PartitionSpec() for a replicated leaf; param_specs=PartitionSpec() if all are replicated and the '
        'all-gather is of something else).'
    )
  if per_device_perturbation and layout.any_sharded_over_batch:
    raise ValueError(
        'per_device_perturbation=True with parameters split over the batch axis (FSDP): their gradient is summed '
        'over the devices by the all-gather in the loss, so no device has a gradient of its own to perturb with. '
        'Use the global perturbation (per_device_perturbation=False).'
    )
  return layout


_GATHERS = ('all_gather', 'all_gather_invariant')


def _gathers_over(domain_loss_fn: Callable, params: Any, axes: tuple) -> bool:
  """Whether tracing `domain_loss_fn(params)` meets an all-gather over any of `axes` (sub-jaxprs included)."""
  jaxpr = jax.make_jaxpr(domain_loss_fn)(params).jaxpr

  def walk(j) -> bool:
    for eqn in j.eqns:
      if eqn.primitive.name in _GATHERS:
        names = eqn.params.get('axis_name', ())
        names = names if isinstance(names, tuple) else (names,)
        if set(names) & set(axes):
          return True
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns') and walk(inner):
            return True
    return False

  return walk(jaxpr)


def _resolve_mask(perturbation_mask: Any, params: Any) -> Any:
  """A bool per params leaf from what `optax.masked` accepts: a (prefix) tree of bools, or a callable of params."""
  mask = perturbation_mask(params) if callable(perturbation_mask) else perturbation_mask
  try:
    # A bool at an inner node of `params` applies to every leaf below it (optax.masked's prefix semantics).
    return jax.tree.map(lambda keep, sub: jax.tree.map(lambda _: keep, sub), mask, params)
  except ValueError as e:
    raise ValueError(
        'perturbation_mask must be a pytree of bools with the structure of params, or a prefix of it (as '
        f'optax.masked accepts), or a function of params returning one: {e}'
    ) from None


def _apply_mask(tree: Any, mask: Any) -> Any:
  def keep_or_zero(g, keep):
    if isinstance(keep, (bool, np.bool_)):
      return g if keep else jnp.zeros_like(g)
    return jnp.where(keep, g, jnp.zeros_like(g))  # traced or array bools

  return jax.tree.map(keep_or_zero, tree, mask)


def _check_params(fn: Callable, params: Any) -> None:
  """The params are all of them (not a masked subset) and no enclosing optax wrapper would drop disam's work."""
  _wrappers.check_params(params)
  _wrappers.refuse_enclosing_wrapper(fn)


def _check_call(update_fn: Callable, updates: Any, params: Any, domain_loss_fn: Any) -> None:
  if domain_loss_fn is None:
    raise ValueError(
        'disam needs the per-domain losses: call tx.update(None, state, params, domain_loss_fn=f) with '
        'f(params) -> [M] losses. (In optax.chain, pass domain_loss_fn to the chain\'s update.)'
    )
  if params is None:
    raise ValueError('disam needs params: call tx.update(None, state, params, domain_loss_fn=f).')
  _check_params(update_fn, params)
  if jax.tree.leaves(updates):
    raise ValueError(
        'disam computes both of its gradients from domain_loss_fn, so it cannot use incoming updates: pass None '
        'as the first argument of update (tx.update(None, state, params, domain_loss_fn=f)). ' + _wrappers.WHERE_TO
    )


def _checked_rule(rule: str, alpha: Any, per_device_perturbation: bool) -> Any:
  """The rule's alpha (its published default for None), refusing what the rule cannot take."""
  if rule not in ('sam', 'gsam', 'sagm'):
    raise ValueError(f"rule must be 'sam', 'gsam' or 'sagm'; got {rule!r}.")
  if rule == 'sam':
    if alpha is not None:
      raise ValueError("alpha is GSAM's / SAGM's parameter: pass rule='gsam' or rule='sagm', or drop alpha.")
    return None
  alpha = _DEFAULT_ALPHA[rule] if alpha is None else alpha
  _check_hyperparameter('alpha', alpha)
  if per_device_perturbation:
    raise ValueError(
        f"rule={rule!r} combines the unperturbed gradient into the final one, which per_device_perturbation "
        "keeps per device: use the global perturbation (per_device_perturbation=False) with GSAM/SAGM."
    )
  return alpha


def _checked_domain_weights(domain_weights: Any, num_domains: Optional[int]) -> Any:
  """'uniform' / 'count', a traced array (inject_hyperparams under jit: checked at init), or a checked [M] array."""
  if isinstance(domain_weights, str):
    if domain_weights not in ('uniform', 'count'):
      raise ValueError(f"domain_weights must be 'uniform', 'count' or a [M] array; got {domain_weights!r}.")
    return domain_weights
  if isinstance(domain_weights, jax.core.Tracer):
    return domain_weights
  weighting = np.asarray(domain_weights, np.float32)
  if weighting.ndim != 1 or not np.all(np.isfinite(weighting)) or np.any(weighting < 0):
    raise ValueError(f'domain_weights must be a vector of finite values >= 0; got {domain_weights!r}.')
  if not weighting.sum() > 0:
    raise ValueError('domain_weights must not be all zero.')
  if num_domains is not None and weighting.shape[0] != num_domains:
    raise ValueError(f'domain_weights has {weighting.shape[0]} entries but num_domains={num_domains}.')
  return jnp.asarray(weighting)


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
    batch_axis_name: Optional[Union[str, tuple[str, ...]]] = None,
    per_device_perturbation: bool = False,
    param_specs: Any = None,
    perturbation_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    diagnostics: bool = False,
    rule: str = 'sam',
    alpha: Optional[ScalarOrSchedule] = None,
    perturb_every: Optional[int] = None,
    reuse_weight: Optional[ScalarOrSchedule] = None,
    perturb_when: Optional[VarianceTrigger] = None,
) -> optax.GradientTransformationExtraArgs:
  """Domain-Inspired Sharpness-Aware Minimization (arXiv 2405.18861, Algorithm 1).

  Example::

    tx = disam_jax.disam(optax.sgd(0.01, momentum=0.9), rho=0.05, lam=0.1, num_domains=M)
    opt_state = tx.init(params)
    f = lambda p: per_domain_mean_losses(p, batch)          # -> [M]
    updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=f)
    params = optax.apply_updates(params, updates)

  `update(None, state, params, *, domain_loss_fn, **extra_args)` evaluates both gradients through
  `domain_loss_fn`, so it takes no incoming updates: pass `None` (a gradient pytree there is refused, never
  silently discarded). `params` is required. Other `extra_args` are forwarded to `base_tx`. `domain_loss_fn(params)`
  returns the per-domain losses at `params`: a `[M]` vector of means, a `DomainLosses(total, count)` (see
  `grouped_domain_loss_fn`, `domain_losses_from_ids`), or `(either, aux)` with `has_aux=True`.

  Where things go: gradient clipping, weight decay, `optax.apply_if_finite`, masks of the update and anything else
  that should act on the sharpness-aware gradient belong *inside* `base_tx` (e.g. `optax.chain(
  optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), optax.sgd(lr, 0.9))`); `base_tx` is applied at
  the unperturbed weights. `optax.chain(disam(...), b)` works (`b` acts on DISAM's updates); wrappers whose work
  DISAM would drop (a chain member before disam, `MultiSteps`, `apply_if_finite` around it, `masked`,
  `multi_transform`) are refused at trace time with what to write instead. `optax.inject_hyperparams(disam,
  static_args=('base_tx',))` works under `jit` (rho and lam traced; list `num_domains` in `static_args` too).

  Non-finite losses propagate into the updates (nothing is silently zeroed). A zero gradient gives a zero
  perturbation (the norm has a 1e-12 floor), never NaN.

  Args:
    base_tx: the optimizer applied to the sharpness-aware gradient `g` at the unperturbed weights.
    rho: perturbation radius (>= 0), or an optax schedule of the step count kept in the state. `rho=0` is
      exactly `base_tx` on the gradient of `L`. Checked when concrete (a traced value is taken as given).
    lam: weight of the domain-loss variance in the perturbation objective (>= 0), or a schedule. `lam=0` is
      exactly SAM. Paper defaults: rho 0.05, lam 0.1. Its effect scales with the loss scale: `V` is quadratic in
      the losses, so `c_i` depends on `lam * (L_i - L)`; multiplying the losses by s multiplies `lam`'s effect by s.
    adaptive: ASAM form, `eps = rho * w^2 * g_p / (|| |w| g_p || + 1e-12)` (the official code's flag).
    domain_weights: `'uniform'` (paper: `a_i = 1/M` over the domains present), `'count'` (`a_i = n_i / n`, what
      the official code effectively computes), or a `[M]` array of fixed weights (renormalized over present
      domains). The same weights define `L` and `V`.
    has_aux: `domain_loss_fn` returns `(domain_losses, aux)`; the unperturbed aux is kept in `state.aux`.
    aux_example: with `has_aux`, a pytree of arrays shaped like the aux (e.g. the model's current BatchNorm
      statistics): `init` stores it as `state.aux` instead of `None`, so the state keeps one structure across
      steps. Needed where the state must not change structure: `nnx.Optimizer`, a `lax.scan` carry, `lax.cond`.
    num_domains: M (an int or numpy integer). Without it, the `[M]` fields of the state (`domain_losses`,
      `domain_counts`, `perturbation_weights`) are `None` (M is unknown at `init`, and the state's structure
      never changes); with it they are `[M]` and every call is checked against M.
    batch_axis_name: under `pmap`/`shard_map` (with or without `check_vma`), the mapped axis holding slices of the
      batch, or a tuple of axes (`('data', 'fsdp')`) when the batch is split over several: domain loss sums and
      counts are summed over them before the variance, and both gradients are reduced, so N devices take the same
      step as one device on the whole batch. Not needed under `jit` with sharded arrays (GSPMD, explicit meshes:
      parameters and batch may be sharded any way there; every norm is of the whole parameter).
    param_specs: inside `shard_map` with parameters split over mesh axes (FSDP, tensor parallel): the
      PartitionSpecs of the params (the in_specs given to shard_map; a prefix tree, `PartitionSpec()` or None for a
      replicated leaf). Norms and dot products are then taken over whole parameters (each device's slice, summed
      over the leaf's axes), and a leaf split over a batch axis is taken to be all-gathered inside the loss, which
      already sums its gradient over that axis. With `check_vma=True` (shard_map's default) the layout is read from
      the types and `param_specs` is optional (checked if given). Under `pmap` or `check_vma=False` it is needed
      whenever parameters are split: a loss that all-gathers over a batch axis without it is refused.
    per_device_perturbation: with `batch_axis_name`, each device perturbs with its own local `g_p` from its own
      domain losses ("m-sharpness", as google-research/sam); only the perturbation changes: the final gradient is
      still that of the global `L` (global weights and counts), and the logged losses are global. Off by default:
      the perturbation is global (synchronized). A device whose slice holds one domain only has a local variance
      of 0, so `lam` does nothing there: that is warned about at run time (give every device every domain).
      Refused with parameters split over the batch axis (FSDP): their gradient is summed by the loss's
      all-gather, so no device has a `g_p` of its own.
    perturbation_mask: what `optax.masked` accepts, for the perturbation: a pytree of bools matching `params` or a
      prefix of it (`{'encoder': True, 'head': False}`), Python or (traced) JAX bools, or a function of `params`
      returning one. Only `True` leaves are perturbed and the norm is taken over them alone (SAM-ON style).
    diagnostics: also compute `state.sam_cosine`, the cosine between `g_p` and SAM's `grad L(w)` (one extra
      backward pass, no extra forward pass); NaN when off.
    rule: the sharpness-aware rule the domain-inspired perturbation is put under: `'sam'` (the paper's DISAM),
      `'gsam'` (Zhuang et al., ICLR 2022) or `'sagm'` (Wang et al., CVPR 2023); see the module docstring for each
      update. All three cost two forward and two backward passes; `lam=0` is plain SAM / GSAM / SAGM.
    alpha: GSAM's weight of the orthogonal component, or SAGM's step back along `g_p` (>= 0, or a schedule);
      `None` takes the rule's published default (gsam 0.2, sagm 0.001). Only for `rule='gsam'` / `'sagm'`.
    perturb_every: k >= 1 (a Python int; `None` is 1, and keeps `optax.inject_hyperparams` from tracing it). k = 1
      is the step above, every step. k > 1 amortizes it, LookSAM-style
      (Liu et al., CVPR 2022): every k-th step (step counts 0, k, 2k, ...) is the full two-pass step (the
      "ascent"); the k - 1 steps in between run ONE forward and backward pass, at `w`, and hand `base_tx`
      `grad L(w) + reuse_weight * (||grad L(w)|| / ||g_v||) g_v`, with `g_v = g - (<g, g_p> / ||g_p||^2) g_p` the
      part of the last full step's sharpness-aware gradient `g` orthogonal to its ascent gradient `g_p`. Why the
      gradient component and not the perturbation: the in-between steps still evaluate the loss at the unperturbed
      weights, so the logged losses, variance, `c_i` and the aux (BatchNorm statistics) are this step's, from the
      unperturbed pass, exactly as on full steps; reusing `eps` would move that one pass to `w + eps`. `g_v` is
      taken against `g_p` (not `grad L(w)`, LookSAM's choice for SAM, where the two coincide) so full steps stay at
      DISAM's two passes; they differ by `lam grad V`. In-between steps log `perturbation_norm` 0, `sam_cosine`
      NaN and `ascended` 0. Not with `per_device_perturbation` (replicas would keep different state).
    reuse_weight: LookSAM's alpha (>= 0, or a schedule), the weight of the reused component. `None` (default) is
      0: the in-between steps are plain gradient steps ("DISAM every k steps"), and no `g_v` is computed or kept
      (`reused_component` None). LookSAM's published 0.7 lost accuracy in every run we measured
      (docs/results.md). Only when amortized (`perturb_every > 1` or `perturb_when`).
    perturb_when: `None`, or a `VarianceTrigger(min_gap, max_gap, factor, decay)`: instead of every k-th step,
      ascend when this step's domain-loss variance `V_t` (from its unperturbed forward pass, which every step runs)
      exceeds `factor` times a running reference of past variances, at most once per `min_gap` steps and at least
      once per `max_gap` (see `VarianceTrigger`). The step is otherwise that of `perturb_every`: one `lax.cond`,
      one pass when not ascending, `reuse_weight` as above. The state keeps the reference
      (`trigger_reference`) and `steps_since_ascent`. Not with `perturb_every > 1`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `DisamState`.

  References:
    Zhang et al., Domain-Inspired Sharpness-Aware Minimization Under Domain Shifts, ICLR 2024 (Eq. 6-8).
    Foret et al., Sharpness-Aware Minimization, ICLR 2021. Kwon et al., ASAM, ICML 2021.
    Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization, ICLR 2022 (GSAM, Algorithm 1).
    Wang et al., Sharpness-Aware Gradient Matching for Domain Generalization, CVPR 2023 (SAGM, Algorithm 1).
    Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022 (LookSAM, Algorithm 1).
  """
  _check_hyperparameter('rho', rho)
  _check_hyperparameter('lam', lam)
  alpha = _checked_rule(rule, alpha, per_device_perturbation)
  num_domains = _static_num_domains(num_domains)
  perturb_every, reuse_weight, trigger = _check_amortization(perturb_every, reuse_weight, per_device_perturbation,
                                                             perturb_when)
  amortized = perturb_every > 1 or trigger is not None
  weighting = _checked_domain_weights(domain_weights, num_domains)
  if per_device_perturbation and batch_axis_name is None:
    raise ValueError('per_device_perturbation=True needs batch_axis_name (the pmap/shard_map axis).')
  if aux_example is not None and not has_aux:
    raise ValueError('aux_example is only meaningful with has_aux=True.')
  base_tx = optax.with_extra_args_support(base_tx)
  lam_may_be_positive = _may_be_positive(lam)

  def init_fn(params):
    _check_params(init_fn, params)
    reused = jax.tree.map(jnp.zeros_like, params) if amortized and reuse_weight is not None else None
    return _initial_state(base_tx.init(params), num_domains, aux_example, _metric_dtype(params), reused,
                          amortized=amortized, trigger=trigger)

  def update_fn(updates, state, params=None, *, domain_loss_fn=None, **extra_args):
    _check_call(update_fn, updates, params, domain_loss_fn)
    dtype = state.loss.dtype  # fixed by init: float32, or float64 with float64 params
    rho_t, lam_t = _at_step(rho, state.count, dtype), _at_step(lam, state.count, dtype)
    alpha_t = None if alpha is None else _at_step(alpha, state.count, dtype)
    axis = _sharding.axis_names(batch_axis_name) or None
    layout = _param_layout(params, axis, param_specs, domain_loss_fn, per_device_perturbation)

    # Pass 1, unperturbed: forward; the statistics of the global sums; backward passes share its VJP.
    total, count, aux, vjp_fn = _unperturbed_pass(domain_loss_fn, has_aux, params, layout)
    _check_domain_count(total.shape[0], num_domains, axis, lam, lam_may_be_positive)
    stats = _domain_statistics(total, count, dtype, axis, weighting, lam_t, per_device_perturbation)
    if per_device_perturbation and lam_may_be_positive is not False:
      _warn_if_one_local_domain(stats.pert_count)
    reduce_g_p = axis is not None and not per_device_perturbation

    def backward(cot):  # the VJP of the unperturbed pass, summed over devices when the perturbation is global
      (grad,) = vjp_fn(layout.device_local(cot.astype(total.dtype)))
      return layout.sum_gradient(grad) if reduce_g_p else grad

    def sharpness_aware_gradient(g_ascent):  # the two-pass step from g_ascent = g_p: (g for base_tx, ||g_p||, cos)
      mask = None if perturbation_mask is None else _resolve_mask(perturbation_mask, params)
      g_p = g_ascent if mask is None else _apply_mask(g_ascent, mask)
      perturbed, p_norm = _ascent_point(params, g_p, rho_t, alpha_t if rule == 'sagm' else None, adaptive, layout)
      cosine = jnp.full([], jnp.nan)
      if diagnostics:  # SAM's direction grad L(w): the same VJP with cotangent a_i / n_i (no extra forward pass)
        g_sam = backward(stats.pert_weights / jnp.maximum(stats.pert_count, 1.0))
        cosine = _cosine(g_p, g_sam if mask is None else _apply_mask(g_sam, mask), layout)
      g = _perturbed_gradient(domain_loss_fn, has_aux, perturbed, stats.grad_weights, layout)
      if rule != 'sam':
        g = _final_gradient(rule, alpha_t, g_ascent, g, layout)
      return g, p_norm, cosine

    amortization = (None, None, None)
    if not amortized:
      g, p_norm, cosine = sharpness_aware_gradient(backward(stats.cotangent))
      reused = state.reused_component
    else:  # amortized (LookSAM): a full step every perturb_every steps / when triggered, one pass in between
      if trigger is None:
        full_now = state.count % perturb_every == 0
        amortization = (full_now, None, None)
      else:  # this step's variance, from the forward pass above, decides (the same value on every device)
        amortization = _trigger_decision(trigger, state, stats.variance, dtype)
        full_now = amortization[0]
      # One backward pass of the unperturbed forward outside the cond, with the cotangent of the step's kind:
      # g_p on a full step, grad L in between (the cond's operands are then params-sized, never activations).
      first = backward(jnp.where(full_now, stats.cotangent, stats.grad_weights))
      weight_t = None if reuse_weight is None else _at_step(reuse_weight, state.count, dtype)
      g, p_norm, cosine, reused = _amortized_gradient(
          state, params, full_now, first, sharpness_aware_gradient, weight_t, dtype, layout)

    new_updates, base_state = base_tx.update(g, state.base_state, params, **extra_args)
    c = stats.cotangent * stats.pert_count  # the weights c_i of g_p = sum_i c_i grad L_i
    if per_device_perturbation:  # each device's own: logged as their mean, so the state is the same on every device
      p_norm, cosine, c = jax.lax.pmean((p_norm, cosine, c), axis)
    metrics = (p_norm, layout.norm(g), cosine, c)
    return new_updates, _next_state(state, base_state, stats, metrics, aux, reused, dtype, amortization)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _wrong_domain_count(m: int, num_domains: int, axes: Optional[tuple]) -> str:
  """Why `domain_loss_fn` returned m losses where num_domains were expected, and what to write instead."""
  said = f'domain_loss_fn returned {m} values, but this optimizer was built with num_domains={num_domains}: '
  if m > num_domains:
    return said + (
        'it must return one loss per domain (or DomainLosses of [M] sums and counts), not per-example losses. '
        'Group them: disam_jax.domain_losses_from_grouped(losses.reshape(M, b)), '
        'disam_jax.domain_losses_from_ids(losses, domain_ids, M), or wrap the per-example loss in '
        'disam_jax.grouped_domain_loss_fn. (If these are domain losses, the number of domains must not change '
        'between steps: build the optimizer with the right num_domains.)'
    )
  if axes is not None:
    return said + (
        "under pmap/shard_map the loss sees only this device's block of the batch, and this block holds only "
        f'{m} of the domains (the batch is split along its domain axis). Split the per-domain axis instead '
        "(in_specs PartitionSpec(None, 'data') for an [M, b, ...] batch), or return "
        'disam_jax.domain_losses_from_ids(losses, domain_ids, M) with the global domain ids: every device then '
        'returns all M domains (count 0 for those it does not hold).'
    )
  return said + 'the number of domains must not change between steps (pass the same M every step).'


def _warn_if_one_local_domain(local_count: chex.Array) -> None:
  """Warns (once per call site, at run time) when a device's batch holds at most one domain under
  per_device_perturbation: its local variance is then 0 and lam has no effect on its perturbation."""

  def warn():
    warnings.warn(
        'per_device_perturbation=True: a device holds the examples of at most one domain, so its local domain-loss '
        'variance is 0 and lam has no effect on its perturbation (it is SAM there). Give every device a slice of '
        'every domain (split the per-domain batch axis), or use the global perturbation '
        '(per_device_perturbation=False).', stacklevel=1)

  jax.lax.cond(jnp.sum(local_count > 0) <= 1, lambda: jax.debug.callback(warn), lambda: None)


# -- the stages of one step, in the order `update` runs them ----------------------------------------------------------

def _unperturbed_pass(domain_loss_fn: Callable, has_aux: bool, params: Any, layout: _sharding.ParamLayout):
  """Pass 1 at `w`: `(total [M], count [M], aux, vjp)` of this device's domain-loss sums; `vjp(cotangent)` is the
  gradient of `sum_i cotangent_i total_i`, so every backward pass of the step reuses this one forward pass."""

  def local_totals(p):
    losses, aux = _split_output(_evaluate(domain_loss_fn, p), has_aux)
    return losses.total, (losses.count, aux)

  total, vjp_fn, (count, aux) = jax.vjp(local_totals, layout.device_local(params), has_aux=True)
  return total, count, aux, vjp_fn


def _evaluate(domain_loss_fn: Callable, params: Any) -> Any:
  """`domain_loss_fn(params)`, turning Flax NNX's TraceContextError (a module's BatchNorm statistics mutated from
  inside DISAM's trace, e.g. `nnx.Optimizer(model, disam(...))`) into what to write instead."""
  try:
    return domain_loss_fn(params)
  except Exception as e:
    if type(e).__name__ == 'TraceContextError' and type(e).__module__.startswith('flax'):
      raise ValueError(
          'domain_loss_fn mutated a Flax NNX variable (e.g. BatchNorm statistics) of a module that lives outside '
          "DISAM's trace, which Flax forbids (TraceContextError). With NNX, build the optimizer with "
          'disam_jax.nnx_optimizer(model, base_tx, rho, lam) and step with disam_jax.nnx_update(optimizer, model, '
          'loss_fn): each pass then runs on a fresh copy of the model, and the statistics of the unperturbed pass '
          'are written back.'
      ) from e
    raise


def _check_domain_count(m: int, num_domains: Optional[int], axes: Optional[tuple], lam: Any,
                        lam_may_be_positive: Optional[bool]) -> None:
  if num_domains is not None and m != num_domains:
    raise ValueError(_wrong_domain_count(m, num_domains, axes))
  if m == 1 and lam_may_be_positive:
    raise ValueError(
        f'domain_loss_fn returned a single domain loss with lam={lam!r}: the variance of one domain is '
        'identically 0, so DISAM would silently be SAM. Use lam=0 for SAM, or return one loss per domain.'
    )


class _Statistics(NamedTuple):
  """The domain statistics of one step (global over devices unless `pert_*`, the perturbation's own)."""
  means: chex.Array          # [M] L_i
  count: chex.Array          # [M] n_i, summed over devices
  loss: chex.Array           # L = sum_i a_i L_i
  variance: chex.Array       # V = sum_i a_i (L_i - L)^2
  grad_weights: chex.Array   # [M] dL/dtotal_i = a_i / n_i: grad L is the VJP with these
  pert_count: chex.Array     # [M] the counts the perturbation is formed from (this device's, per-device)
  pert_weights: chex.Array   # [M] a_i of the perturbation's counts
  cotangent: chex.Array      # [M] dJ/dtotal_i of J = L - lam V: g_p is the VJP with these


def _domain_statistics(total: chex.Array, count: chex.Array, dtype: Any, axes: Optional[tuple], weighting: Any,
                       lam_t: chex.Array, per_device: bool) -> _Statistics:
  """Eq. 6 on the sums and counts of the whole batch (psummed over `axes`), and Eq. 7's cotangent:
  `c_i / n_i` with `c_i = a_i (1 - 2 lam (L_i - L))`, from the global sums (this device's, per-device)."""
  wide = jnp.promote_types(dtype, total.dtype)
  local_total, local_count = total.astype(wide), count.astype(wide)
  global_total, global_count = local_total, local_count
  if axes is not None:
    global_total, global_count = jax.lax.psum((local_total, local_count), axes)
  means, weights, loss, variance = _objective_terms(global_total, global_count, weighting)
  pert_total, pert_count = (local_total, local_count) if per_device else (global_total, global_count)

  def perturbation_objective(t):
    _, w_i, l, v = _objective_terms(t, pert_count, weighting)
    return l - lam_t * v, w_i

  cotangent, pert_weights = jax.grad(perturbation_objective, has_aux=True)(pert_total)
  grad_weights = weights / jnp.maximum(global_count, 1.0)
  return _Statistics(means, global_count, loss, variance, grad_weights, pert_count, pert_weights, cotangent)


def _ascent_point(params: Any, g_p: Any, rho_t: chex.Array, sagm_alpha: Optional[chex.Array], adaptive: bool,
                  layout: _sharding.ParamLayout) -> tuple[Any, chex.Array]:
  """Eq. 8: `(w + rho g_p / ||g_p||, ||g_p||)`; ASAM: `w + rho w^2 g_p / || |w| g_p ||`; SAGM (`sagm_alpha`):
  `w + (rho / ||g_p|| - alpha) g_p` (the official code; adaptive: times w^2). In the params' dtypes."""
  if adaptive:
    scaled = jax.tree.map(lambda g, w: jnp.abs(_wide(w)) * _wide(g), g_p, params)
    p_norm = layout.norm(scaled)
    direction = jax.tree.map(lambda s, w: jnp.abs(_wide(w)) * s, scaled, params)
  else:
    p_norm = layout.norm(g_p)
    direction = jax.tree.map(_wide, g_p)
  scale = rho_t / (p_norm + _NORM_EPS)
  if sagm_alpha is not None:
    scale = scale - sagm_alpha
  return jax.tree.map(lambda w, d: (_wide(w) + scale * d).astype(w.dtype), params, direction), p_norm


def _cosine(a: Any, b: Any, layout: _sharding.ParamLayout) -> chex.Array:
  """`<a, b> / (||a|| ||b||)`, eps-guarded (diagnostics: DISAM's g_p against SAM's grad L(w))."""
  return layout.vdot(a, b) / (layout.norm(a) * layout.norm(b) + _NORM_EPS)


def _perturbed_gradient(domain_loss_fn: Callable, has_aux: bool, perturbed: Any, grad_weights: chex.Array,
                        layout: _sharding.ParamLayout) -> Any:
  """Pass 2: `g = grad L(w_adv)`, the plain training loss (no variance term) at the perturbed point, summed over
  devices; its aux (e.g. BatchNorm statistics) is dropped."""

  def perturbed_loss(p):
    losses, _ = _split_output(_evaluate(domain_loss_fn, p), has_aux)
    return jnp.sum(grad_weights.astype(losses.total.dtype) * losses.total)

  return layout.sum_gradient(jax.grad(perturbed_loss)(layout.device_local(perturbed)))


def _next_state(state: DisamState, base_state: Any, stats: _Statistics, metrics: tuple, aux: Any, reused: Any,
                dtype: Any, amortization: tuple = (None, None, None)) -> DisamState:
  """The state after the step: `metrics = (||g_p||, ||g||, cosine, c)`; `[M]` fields None without num_domains;
  `amortization = (ascended, trigger_reference, steps_since_ascent)`, each None where not kept."""
  ascended, reference, since = amortization
  p_norm, grad_norm, cosine, c = metrics
  per_domain = lambda x: None if state.domain_losses is None else x.astype(dtype)
  return DisamState(
      count=optax.safe_increment(state.count),
      base_state=base_state,
      domain_losses=per_domain(stats.means),
      domain_counts=per_domain(stats.count),
      loss=stats.loss.astype(dtype),
      variance=stats.variance.astype(dtype),
      perturbation_norm=p_norm.astype(dtype),
      grad_norm=grad_norm.astype(dtype),
      aux=aux,
      perturbation_weights=per_domain(c),
      sam_cosine=cosine.astype(dtype),
      reused_component=reused,
      ascended=None if ascended is None else ascended.astype(dtype),
      trigger_reference=reference,
      steps_since_ascent=since,
  )


def _final_gradient(rule: str, alpha: chex.Array, g_w: Any, g_adv: Any, layout: _sharding.ParamLayout) -> Any:
  """GSAM's / SAGM's gradient from the unperturbed ascent gradient `g_w` and the perturbed one `g_adv`.

  gsam: `g_adv - alpha (g_w - <g_w, g_adv> / ||g_adv||^2 g_adv)` (the official code's eps placement);
  sagm: `(g_w + g_adv) / 2`. Elementwise work only: no pass through the model.
  """
  if rule == 'sagm':
    return jax.tree.map(lambda a, b: ((_wide(a) + _wide(b)) / 2).astype(b.dtype), g_w, g_adv)
  norm_w, norm_adv = layout.norm(g_w), layout.norm(g_adv)
  cosine = layout.vdot(g_w, g_adv) / (norm_w * norm_adv + _NORM_EPS)
  parallel = cosine * norm_w / (norm_adv + _NORM_EPS)  # <g_w, g_adv> / ||g_adv||^2, eps-guarded
  return jax.tree.map(
      lambda a, b: (_wide(b) - alpha * (_wide(a) - parallel * _wide(b))).astype(b.dtype), g_w, g_adv
  )


def _check_trigger(trigger: Any) -> Optional[VarianceTrigger]:
  """`perturb_when` validated at construction: None, or a VarianceTrigger with static gaps, factor >= 0 and decay in
  [0, 1) (a traced decay / factor, from inject_hyperparams, is taken as given)."""
  if trigger is None:
    return None
  if not isinstance(trigger, VarianceTrigger):
    raise TypeError(
        'perturb_when must be None (ascend every perturb_every steps) or disam_jax.VarianceTrigger(min_gap=..., '
        f'max_gap=..., factor=..., decay=...); got {trigger!r}.')
  min_gap = _static_positive_int('VarianceTrigger.min_gap', trigger.min_gap, "chooses the step's structure")
  max_gap = _static_positive_int('VarianceTrigger.max_gap', trigger.max_gap, "chooses the step's structure")
  if max_gap < min_gap:
    raise ValueError(
        f'VarianceTrigger needs min_gap <= max_gap (at least one ascent every max_gap steps, at most one every '
        f'min_gap); got min_gap={min_gap}, max_gap={max_gap}.')
  _check_hyperparameter('VarianceTrigger.factor', trigger.factor)
  if callable(trigger.decay):
    raise TypeError('VarianceTrigger.decay must be a float in [0, 1), not a schedule.')
  decay = _concrete_float(trigger.decay)
  if decay is not None and not 0 <= decay < 1:
    raise ValueError(f'VarianceTrigger.decay must be in [0, 1); got {trigger.decay!r}.')
  return trigger._replace(min_gap=min_gap, max_gap=max_gap)


def _check_amortization(perturb_every: Any, reuse_weight: Any, per_device_perturbation: bool, perturb_when: Any):
  """`(k, reuse_weight, trigger)` validated: k a static int >= 1 (None: 1); `perturb_when` a VarianceTrigger (then
  k is 1); reuse_weight only when amortized (None: 0). A constant reuse_weight of 0 comes back as None: nothing is
  reused, so no `g_v` is computed or kept."""
  if perturb_every is None:
    perturb_every = 1
  k = _static_positive_int('perturb_every', perturb_every, "chooses the step's structure")
  trigger = _check_trigger(perturb_when)
  if trigger is not None and k != 1:
    raise ValueError(
        f'perturb_every={k} and perturb_when both choose which steps ascend: pass one of them (perturb_when '
        'bounds the gap between ascents itself, with VarianceTrigger(min_gap, max_gap)).')
  if k == 1 and trigger is None:
    if reuse_weight is not None:
      raise ValueError(
          'reuse_weight weighs the component reused between full steps: it needs perturb_every > 1 or perturb_when.')
    return k, None, None
  if per_device_perturbation:
    raise ValueError(
        'perturb_every > 1 / perturb_when reuse state between steps, which per_device_perturbation would keep '
        'different on every device (the replicas would drift apart): use the global perturbation.'
    )
  reuse_weight = 0.0 if reuse_weight is None else reuse_weight
  _check_hyperparameter('reuse_weight', reuse_weight)
  if not callable(reuse_weight) and _concrete_float(reuse_weight) == 0.0:
    reuse_weight = None
  return k, reuse_weight, trigger


def _trigger_decision(trigger: VarianceTrigger, state: DisamState, variance: chex.Array, dtype: Any):
  """`(ascend, r_t, s_t)`: whether this step ascends (see `VarianceTrigger`), the updated reference and the steps
  since the last ascent after this step (0 if it ascends). Scalars only: no pass through the model."""
  gap = state.steps_since_ascent + 1
  v = variance.astype(dtype)
  reference = state.trigger_reference
  high = v > _at_step(trigger.factor, state.count, dtype) * reference
  ascend = (gap >= trigger.max_gap) | ((gap >= trigger.min_gap) & high)
  decay = jnp.asarray(trigger.decay, dtype)
  new_reference = jnp.where(state.count == 0, v, decay * reference + (1 - decay) * v)
  return ascend, new_reference, jnp.where(ascend, 0, gap).astype(jnp.int32)


def _amortized_gradient(state: DisamState, params: Any, full_now: chex.Array, first: Any, full_step: Callable,
                        reuse_weight: Optional[chex.Array], dtype: Any, layout: _sharding.ParamLayout):
  """LookSAM over DISAM: `full_step(g_p)` when `full_now`, else the plain gradient plus the reused component.

  `first` is the backward pass of the unperturbed forward: `g_p` on a full step, `grad L(w)` in between.
  Full step: `g` from `full_step(g_p)` and `g_v = g - (<g, g_p> / ||g_p||^2) g_p` kept. In between:
  `g = grad L(w) + reuse_weight (||grad L(w)|| / ||g_v||) g_v`, `g_v` carried unchanged. `reuse_weight=None` (the
  constant 0): no `g_v` at all, the in-between step hands `grad L(w)` on as it is. Returns `(g, ||g_p|| or 0,
  cosine or NaN, g_v or None)`; norms and dot products in float32 or wider, every output in the dtype it has on the
  full step.
  """

  def full(g_ascent):
    g, p_norm, cosine = full_step(g_ascent)
    g_v = None
    if reuse_weight is not None:
      along = layout.vdot(g, g_ascent) / (layout.vdot(g_ascent, g_ascent) + _NORM_EPS)
      g_v = jax.tree.map(lambda a, b, w: (_wide(a) - along * _wide(b)).astype(w.dtype), g, g_ascent, params)
    return g, p_norm.astype(dtype), cosine.astype(dtype), g_v

  def in_between(g_w):
    g_v = state.reused_component
    if reuse_weight is None:
      return g_w, jnp.zeros([], dtype), jnp.full([], jnp.nan, dtype), None
    scale = reuse_weight * layout.norm(g_w) / (layout.norm(g_v) + _NORM_EPS)
    g = jax.tree.map(lambda a, v: (_wide(a) + scale * _wide(v)).astype(a.dtype), g_w, g_v)
    return g, jnp.zeros([], dtype), jnp.full([], jnp.nan, dtype), g_v

  return jax.lax.cond(full_now, full, in_between, first)


def find_disam_state(opt_state: optax.OptState) -> DisamState:
  """Returns the `DisamState` inside an optimizer state (e.g. of a chain), to read the logged metrics."""
  found = [
      s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, DisamState))
      if isinstance(s, DisamState)
  ]
  if len(found) != 1:
    raise ValueError(f'expected exactly one DisamState in the optimizer state; found {len(found)}.')
  return found[0]
