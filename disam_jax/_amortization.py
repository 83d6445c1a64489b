"""Amortized DISAM (LookSAM over DISAM): which steps run the two-pass ascent, and the one-pass steps in between.

`disam(..., perturb_every=k)` ascends every k-th step, `perturb_when=VarianceTrigger(...)` when the domain-loss
variance is high; `reuse_weight` weighs the component of the last full step's gradient that the steps in between add
back (LookSAM, Liu et al., CVPR 2022). `disam`'s docstring says what each option does; this module holds their
checks (`check_amortization`), the trigger's decision (`trigger_decision`) and the `lax.cond` between the full and
the one-pass step (`amortized_gradient`).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from disam_jax import _sharding
from disam_jax._checks import check_hyperparameter, concrete_float, static_positive_int
from disam_jax._numerics import NORM_EPS, at_step, wide

if TYPE_CHECKING:
  from disam_jax import _disam


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
  factor: optax.ScalarOrSchedule = 1.0
  decay: float = 0.9


def check_trigger(trigger: Any) -> VarianceTrigger | None:
  """`perturb_when` validated at construction: None, or a VarianceTrigger with static gaps, factor >= 0 and decay in
  [0, 1) (a traced decay / factor, from inject_hyperparams, is taken as given)."""
  if trigger is None:
    return None
  if not isinstance(trigger, VarianceTrigger):
    raise TypeError(
      "perturb_when must be None (ascend every perturb_every steps) or disam_jax.VarianceTrigger(min_gap=..., "
      f"max_gap=..., factor=..., decay=...); got {trigger!r}."
    )
  min_gap = static_positive_int("VarianceTrigger.min_gap", trigger.min_gap, "chooses the step's structure")
  max_gap = static_positive_int("VarianceTrigger.max_gap", trigger.max_gap, "chooses the step's structure")
  if max_gap < min_gap:
    raise ValueError(
      f"VarianceTrigger needs min_gap <= max_gap (at least one ascent every max_gap steps, at most one every "
      f"min_gap); got min_gap={min_gap}, max_gap={max_gap}."
    )
  check_hyperparameter("VarianceTrigger.factor", trigger.factor)
  if callable(trigger.decay):
    raise TypeError("VarianceTrigger.decay must be a float in [0, 1), not a schedule.")
  decay = concrete_float(trigger.decay)
  if decay is not None and not 0 <= decay < 1:
    raise ValueError(f"VarianceTrigger.decay must be in [0, 1); got {trigger.decay!r}.")
  return trigger._replace(min_gap=min_gap, max_gap=max_gap)


def check_amortization(perturb_every: Any, reuse_weight: Any, per_device_perturbation: bool, perturb_when: Any):
  """`(k, reuse_weight, trigger)` validated: k a static int >= 1 (None: 1); `perturb_when` a VarianceTrigger (then
  k is 1); reuse_weight only when amortized (None: 0). A constant reuse_weight of 0 comes back as None: nothing is
  reused, so no `g_v` is computed or kept."""
  if perturb_every is None:
    perturb_every = 1
  k = static_positive_int("perturb_every", perturb_every, "chooses the step's structure")
  trigger = check_trigger(perturb_when)
  if trigger is not None and k != 1:
    raise ValueError(
      f"perturb_every={k} and perturb_when both choose which steps ascend: pass one of them (perturb_when "
      "bounds the gap between ascents itself, with VarianceTrigger(min_gap, max_gap))."
    )
  if k == 1 and trigger is None:
    if reuse_weight is not None:
      raise ValueError(
        "reuse_weight weighs the component reused between full steps: it needs perturb_every > 1 or perturb_when."
      )
    return k, None, None
  if per_device_perturbation:
    raise ValueError(
      "perturb_every > 1 / perturb_when reuse state between steps, which per_device_perturbation would keep "
      "different on every device (the replicas would drift apart): use the global perturbation."
    )
  reuse_weight = 0.0 if reuse_weight is None else reuse_weight
  check_hyperparameter("reuse_weight", reuse_weight)
  if not callable(reuse_weight) and concrete_float(reuse_weight) == 0.0:
    reuse_weight = None
  return k, reuse_weight, trigger


def trigger_decision(trigger: VarianceTrigger, state: "_disam.DisamState", variance: jax.Array, dtype: Any):
  """`(ascend, r_t, s_t)`: whether this step ascends (see `VarianceTrigger`), the updated reference and the steps
  since the last ascent after this step (0 if it ascends). Scalars only: no pass through the model."""
  reference, since = state.trigger_reference, state.steps_since_ascent
  assert reference is not None and since is not None  # kept by init whenever perturb_when is given
  gap = since + 1
  v = variance.astype(dtype)
  high = v > at_step(trigger.factor, state.count, dtype) * reference
  ascend = (gap >= trigger.max_gap) | ((gap >= trigger.min_gap) & high)
  decay = jnp.asarray(trigger.decay, dtype)
  new_reference = jnp.where(state.count == 0, v, decay * reference + (1 - decay) * v)
  return ascend, new_reference, jnp.where(ascend, 0, gap).astype(jnp.int32)


def amortized_gradient(
  state: "_disam.DisamState",
  params: optax.Params,
  full_now: jax.Array,
  first: optax.Updates,
  full_step: Callable,
  reuse_weight: jax.Array | None,
  dtype: Any,
  layout: _sharding.ParamLayout,
):
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
      along = layout.vdot(g, g_ascent) / (layout.vdot(g_ascent, g_ascent) + NORM_EPS)
      g_v = jax.tree.map(lambda a, b, w: (wide(a) - along * wide(b)).astype(w.dtype), g, g_ascent, params)
    return g, p_norm.astype(dtype), cosine.astype(dtype), g_v

  def in_between(g_w):
    g_v = state.reused_component
    if reuse_weight is None:
      return g_w, jnp.zeros([], dtype), jnp.full([], jnp.nan, dtype), None
    scale = reuse_weight * layout.norm(g_w) / (layout.norm(g_v) + NORM_EPS)
    g = jax.tree.map(lambda a, v: (wide(a) + scale * wide(v)).astype(a.dtype), g_w, g_v)
    return g, jnp.zeros([], dtype), jnp.full([], jnp.nan, dtype), g_v

  return jax.lax.cond(full_now, full, in_between, first)
