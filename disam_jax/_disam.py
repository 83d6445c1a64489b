"""DISAM: Domain-Inspired Sharpness-Aware Minimization as an optax transformation.

Zhang, Fan, Yao, Zhang, Wang, "Domain-Inspired Sharpness-Aware Minimization Under Domain Shifts", ICLR 2024,
arXiv 2405.18861, Algorithm 1 and Eq. 6-8. One call to `update` does the whole step::

    g_p = grad_w [ L(w) - lam * V(w) ]                 # Eq. 7: perturbation direction
    eps = rho * g_p / (||g_p||_2 + 1e-12)              # Eq. 8: one global L2 norm
    g   = grad_w L(w + eps)                            # the plain training loss, no variance term
    updates, base_state = base_tx.update(g, base_state, w)

with per-domain mean losses `L_i`, domain weights `a_i`, `L = sum_i a_i L_i` and `V = sum_i a_i (L_i - L)^2`
(uniform `a_i = 1/M`: the paper's population variance). Since `grad V = sum_i 2 a_i (L_i - L) grad L_i`, ::

    g_p = sum_i c_i grad L_i,    c_i = a_i * (1 - 2 lam (L_i - L))

is ONE vector-Jacobian product of the domain loss function with cotangent `c` (Eq. 7 folded into the backward
pass): two forward and two backward passes per step whatever M is, exactly SAM's cost. `c_i` may be negative for a
domain far above the mean; that is the algorithm ("elastic calibration"), not a bug. The weights `c_i` are kept in
the state (`perturbation_weights`) so the mechanism can be watched.

The SAM family (`rule=`) shares this one step; the rules differ only in the perturbed point and the final gradient,
both from `g_p` (the ascent gradient at `w`) and `g_adv = grad L(w_adv)` (the gradient at the perturbed point)::

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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from disam_jax import _amortization, _checks, _rules, _sharding, _wrappers
from disam_jax._amortization import VarianceTrigger
from disam_jax._domain_losses import DomainLosses, as_domain_losses
from disam_jax._numerics import NORM_EPS, apply_mask, at_step, metric_dtype, resolve_mask, wide


class DisamState(NamedTuple):
  """State of `disam`. Its structure, shapes and dtypes are fixed by `init` and never change.

  The metrics are float32, or float64 when the parameters are float64 (the dtype of the widest floating parameter,
  at least float32). Which fields are kept depends on `disam`'s options, documented there (`num_domains`,
  `has_aux`, `diagnostics`, `per_device_perturbation`, `perturb_every`, `perturb_when`, `reuse_weight`); a field
  an option does not keep is `None` from `init` on.

  Attributes:
    count: int32 scalar, number of `update` calls; drives `rho`/`lam` schedules.
    base_state: the state of the base optimizer.
    domain_losses: `[M]` per-domain mean losses `L_i` at the unperturbed weights of the last step (0 for a domain
      absent from that batch). `None` without `num_domains` (the scalars are always kept).
    domain_counts: `[M]` number of examples of each domain in the last batch (1 per domain and device when
      `domain_loss_fn` returns plain means). `None` without `num_domains`.
    perturbation_weights: `[M]` the weights `c_i` of the perturbation direction `g_p = sum_i c_i grad L_i`,
      `c_i = a_i (1 - 2 lam (L_i - L))` (the cotangent DISAM already computes; 0 for absent domains). `c_i < 0` when
      `2 lam (L_i - L) > 1`: the perturbation then *descends* that domain's loss. `None` without `num_domains`.
    loss: scalar training loss `L(w) = sum_i a_i L_i` of the last step: the weighted mean of the domain means, which
      is the batch mean only when every domain has the same count (or with `domain_weights='count'`).
    variance: scalar variance of the domain losses `V(w) = sum_i a_i (L_i - L)^2` of the last step.
    perturbation_norm: scalar `||g_p||` (adaptive: `|| |w| g_p ||`), the norm that scaled `eps`. With
      `per_device_perturbation`, this, `perturbation_weights` and `sam_cosine` are the mean over the devices of
      each device's own.
    grad_norm: scalar `||g||`, norm of the sharpness-aware gradient handed to `base_tx`.
    sam_cosine: scalar cosine between DISAM's `g_p` and SAM's direction `grad L(w)` with `diagnostics=True`; NaN
      otherwise. 1 at `lam=0`.
    aux: with `has_aux=True`, the auxiliary output of `domain_loss_fn` at the *unperturbed* weights (the
      perturbed evaluation's aux is discarded); `aux_example` until the first update (`None` without it).
    reused_component: with a `reuse_weight` (amortized steps), the params-shaped component `g_v` that the
      one-pass steps add back to their gradient (LookSAM); zeros from `init`.
    ascended: when amortized, scalar 1 if the last step ran the ascent (the full two-pass step), 0 if it was a
      one-pass step; its mean over steps is the ascent rate.
    trigger_reference: with `perturb_when`, the running reference `r_t` of the domain-loss variance (see
      `VarianceTrigger`).
    steps_since_ascent: with `perturb_when`, int32 scalar, steps since the last ascent step (0 right after one;
      `max_gap - 1` at `init`, so the first step ascends).
  """

  count: jax.Array
  base_state: optax.OptState
  domain_losses: jax.Array | None
  domain_counts: jax.Array | None
  loss: jax.Array
  variance: jax.Array
  perturbation_norm: jax.Array
  grad_norm: jax.Array
  aux: Any  # a pytree: whatever domain_loss_fn returned beside its losses
  perturbation_weights: jax.Array | None
  sam_cosine: jax.Array
  reused_component: optax.Updates | None = None
  ascended: jax.Array | None = None
  trigger_reference: jax.Array | None = None
  steps_since_ascent: jax.Array | None = None


def disam(
  base_tx: optax.GradientTransformation,
  rho: optax.ScalarOrSchedule = 0.05,
  lam: optax.ScalarOrSchedule = 0.1,
  *,
  adaptive: bool = False,
  domain_weights: str | jax.typing.ArrayLike = "uniform",
  has_aux: bool = False,
  aux_example: Any = None,
  num_domains: int | None = None,
  batch_axis_name: str | tuple[str, ...] | None = None,
  per_device_perturbation: bool = False,
  param_specs: Any = None,
  perturbation_mask: Any | Callable[[optax.Params], Any] | None = None,
  diagnostics: bool = False,
  rule: str = "sam",
  alpha: optax.ScalarOrSchedule | None = None,
  perturb_every: int | None = None,
  reuse_weight: optax.ScalarOrSchedule | None = None,
  perturb_when: VarianceTrigger | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Domain-Inspired Sharpness-Aware Minimization (arXiv 2405.18861, Algorithm 1).

  Example (3 domains of 2 examples, the loss `(w x - 1)^2`; the per-domain means are 0.625, 0.125 and 1.625, so
  with `L = 0.7917` the weights `c_i = (1 - 2 * 0.1 * (L_i - L)) / 3` give the worst-fit domain the least)::

    >>> import jax.numpy as jnp, numpy as np, optax, disam_jax
    >>> x = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])      # [M, b]: M = 3 domains, b = 2 examples each
    >>> params = {'w': jnp.array(0.5)}
    >>> def domain_losses(p):                                      # params -> [M] per-domain mean losses
    ...   return ((p['w'] * x - 1.0) ** 2).mean(axis=1)
    >>> tx = disam_jax.disam(optax.sgd(0.1), rho=0.05, lam=0.1, num_domains=3)
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=domain_losses)
    >>> params = optax.apply_updates(params, updates)
    >>> print(np.round(opt_state.domain_losses, 4), np.round(opt_state.perturbation_weights, 4))
    [0.625 0.125 1.625] [0.3444 0.3778 0.2778]

  `update(None, state, params, *, domain_loss_fn, **extra_args)` evaluates both gradients through
  `domain_loss_fn`, so it takes no incoming updates: pass `None` (a gradient pytree there is refused, never
  silently discarded). `params` is required. Other `extra_args` are forwarded to `base_tx`. `domain_loss_fn(params)`
  returns the per-domain losses at `params`: a `[M]` vector of means, a `DomainLosses(total, count)` (see
  `grouped_domain_loss_fn`, `domain_losses_from_ids`), or `(either, aux)` with `has_aux=True`.

  Where things go: gradient clipping, weight decay, `optax.apply_if_finite`, masks of the update and anything else
  that should act on the sharpness-aware gradient belong *inside* `base_tx` (e.g. `optax.chain(
  optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), optax.sgd(lr, 0.9))`); `base_tx` is applied at
  the unperturbed weights. `optax.chain(disam(...), b)` works (`b` acts on DISAM's updates); a wrapper that hands
  disam gradients (a chain member before it given gradients, `MultiSteps`, `apply_if_finite` around it) or a
  subset of the params (`masked`, `multi_transform`) is refused at trace time with what to write instead. A chain
  member before disam given `None` is not detected: it acts on nothing (docs/composition.md: every wrapper, what
  happens, what to write instead).
  `optax.inject_hyperparams(disam, static_args=('base_tx',))` works under `jit` (rho and lam traced; list
  `num_domains` in `static_args` too).

  Non-finite losses propagate into the updates (nothing is silently zeroed). A zero gradient gives a zero
  perturbation (the norm has a 1e-12 floor), never NaN. Norms, `L`, `V` and the weights are computed in float32, or
  float64 with float64 parameters; the perturbed point is built in float32 or wider and cast back to the
  parameters' dtype (bfloat16 parameters work).

  Args:
    base_tx: the optimizer applied to the sharpness-aware gradient `g` at the unperturbed weights.
    rho: perturbation radius (>= 0), or an optax schedule of the step count kept in the state, or (under
      `optax.inject_hyperparams`) a traced array. `rho=0` is exactly `base_tx` on the gradient of `L`. Checked
      (>= 0 and finite) when concrete; a traced value is taken as given.
    lam: weight of the domain-loss variance in the perturbation objective (>= 0), or a schedule or a traced
      array, checked as `rho`. `lam=0` is exactly SAM. Paper defaults: rho 0.05, lam 0.1. Its effect scales with
      the loss scale: `V` is quadratic in the losses, so `c_i` depends on `lam * (L_i - L)`; multiplying the
      losses by s multiplies `lam`'s effect by s.
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
      never changes); with it they are `[M]` and every call is checked against M. Either way the state's
      structure, shapes and dtypes are fixed by `init`: one compile, usable as a `lax.scan` carry and under
      `lax.cond`, and orbax / flax serialization restore a checkpoint into `tx.init(params)`.
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
      backward pass, no extra forward pass: +28% compiled FLOPs on the MLP, +33% on the MNIST CNN,
      benchmarks/results/sam_family.md); NaN when off.
    rule: the sharpness-aware rule the domain-inspired perturbation is put under: `'sam'` (the paper's DISAM),
      `'gsam'` (Zhuang et al., ICLR 2022) or `'sagm'` (Wang et al., CVPR 2023); the module docstring (the API
      reference's "The step") gives each update and what `lam > 0` does to GSAM's and SAGM's. All three cost two
      forward and two backward passes (compiled FLOPs equal SAM's within 2%, tested); `lam=0` is plain SAM / GSAM /
      SAGM, checked against NumPy and finite-difference restatements of each paper's update.
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
      NaN and `ascended` 0. Not with `per_device_perturbation` (replicas would keep different state). Checked
      against a NumPy restatement.
    reuse_weight: LookSAM's alpha (>= 0, or a schedule), the weight of the reused component. `None` (default) is
      0: the in-between steps are plain gradient steps ("DISAM every k steps"), and no `g_v` is computed or kept
      (`reused_component` None). LookSAM's published 0.7 lost accuracy in every run we measured
      (docs/results.md). Only when amortized (`perturb_every > 1` or `perturb_when`).
    perturb_when: `None`, or a `VarianceTrigger(min_gap, max_gap, factor, decay)`: instead of every k-th step,
      ascend when this step's domain-loss variance `V_t` (from its unperturbed forward pass, which every step runs)
      exceeds `factor` times a running reference of past variances, at most once per `min_gap` steps and at least
      once per `max_gap` (see `VarianceTrigger`). The step is otherwise that of `perturb_every`: one `lax.cond`,
      one pass when not ascending, `reuse_weight` as above. The state keeps the reference
      (`trigger_reference`) and `steps_since_ascent`. Not with `perturb_every > 1`. The recommendation when
      DISAM's cost matters: `perturb_when=VarianceTrigger()` (`disam-train --perturb-when variance`; gaps 16 and
      32, no `reuse_weight`). Measured (benchmarks/results/amortized.md, docs/results.md): it ascended on 5.8% of
      the steps and cost 1.15x ERM per step on an MLP and 1.08x on the MNIST CNN, against 2.02x and 1.94x for full
      DISAM, at accuracy within seed noise of full DISAM in every paired comparison run (rotated digits, clean and
      with a hard domain, 10 pairs; rotated animals CNN, 5 pairs). The full step runs inside a `lax.cond`, where
      XLA:CPU (jaxlib 0.10.2) runs a convolution's gradients 5-100x slower than in the main computation: on CPU,
      give convnets `disam_jax.harness.fast_conv` convolutions (the harness models' default). GPU, TPU: not
      measured.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `DisamState`.

  References:
    Zhang et al., Domain-Inspired Sharpness-Aware Minimization Under Domain Shifts, ICLR 2024 (Eq. 6-8).
    Foret et al., Sharpness-Aware Minimization, ICLR 2021. Kwon et al., ASAM, ICML 2021.
    Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization, ICLR 2022 (GSAM, Algorithm 1).
    Wang et al., Sharpness-Aware Gradient Matching for Domain Generalization, CVPR 2023 (SAGM, Algorithm 1).
    Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022 (LookSAM, Algorithm 1).
  """
  _checks.check_hyperparameter("rho", rho)
  _checks.check_hyperparameter("lam", lam)
  alpha = _rules.checked_rule(rule, alpha, per_device_perturbation)
  num_domains = _checks.static_num_domains(num_domains)
  perturb_every, reuse_weight, trigger = _amortization.check_amortization(
    perturb_every, reuse_weight, per_device_perturbation, perturb_when
  )
  amortized = perturb_every > 1 or trigger is not None
  weighting = _checks.checked_domain_weights(domain_weights, num_domains)
  if per_device_perturbation and batch_axis_name is None:
    raise ValueError("per_device_perturbation=True needs batch_axis_name (the pmap/shard_map axis).")
  if aux_example is not None and not has_aux:
    raise ValueError("aux_example is only meaningful with has_aux=True.")
  base_tx = optax.with_extra_args_support(base_tx)
  lam_may_be_positive = _checks.may_be_positive(lam)

  def init_fn(params: optax.Params) -> DisamState:
    _wrappers.check_params(params)
    state = init_state(base_tx.init(params), num_domains, aux_example, metric_dtype(params))
    if not amortized:
      return state
    zero = jnp.zeros([], state.loss.dtype)
    return state._replace(  # the amortization's own fields (see DisamState); None where not kept
      reused_component=None if reuse_weight is None else jax.tree.map(jnp.zeros_like, params),
      ascended=zero,
      trigger_reference=None if trigger is None else zero,
      steps_since_ascent=None if trigger is None else jnp.asarray(trigger.max_gap - 1, jnp.int32),
    )

  def update_fn(
    updates: optax.Updates | None,
    state: DisamState,
    params: optax.Params | None = None,
    *,
    domain_loss_fn: Callable[[optax.Params], Any] | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, DisamState]:
    _checks.check_call(updates, params, domain_loss_fn)
    assert params is not None and domain_loss_fn is not None  # check_call refused None with a message
    dtype = state.loss.dtype  # fixed by init: float32, or float64 with float64 params
    rho_t, lam_t = at_step(rho, state.count, dtype), at_step(lam, state.count, dtype)
    alpha_t = None if alpha is None else at_step(alpha, state.count, dtype)
    axis = _sharding.axis_names(batch_axis_name) or None
    layout = _sharding.param_layout(params, axis, param_specs, domain_loss_fn, per_device_perturbation)

    # Pass 1, unperturbed: forward; the statistics of the global sums; backward passes share its VJP.
    total, count, aux, vjp_fn = _unperturbed_pass(domain_loss_fn, has_aux, params, layout)
    _checks.check_domain_count(total.shape[0], num_domains, axis, lam, lam_may_be_positive)
    stats = _domain_statistics(total, count, dtype, axis, weighting, lam_t, per_device_perturbation)
    if per_device_perturbation and lam_may_be_positive is not False:
      _sharding.warn_if_one_local_domain(stats.pert_count)
    reduce_g_p = axis is not None and not per_device_perturbation

    def backward(cot):  # the VJP of the unperturbed pass, summed over devices when the perturbation is global
      (grad,) = vjp_fn(layout.device_local(cot.astype(total.dtype)))
      return layout.sum_gradient(grad) if reduce_g_p else grad

    def sharpness_aware_gradient(g_ascent):  # the two-pass step from g_ascent = g_p: (g for base_tx, ||g_p||, cos)
      mask = None if perturbation_mask is None else resolve_mask(perturbation_mask, params)
      g_p = g_ascent if mask is None else apply_mask(g_ascent, mask)
      perturbed, p_norm = _ascent_point(params, g_p, rho_t, alpha_t if rule == "sagm" else None, adaptive, layout)
      cosine = jnp.full([], jnp.nan)
      if diagnostics:  # SAM's direction grad L(w): the same VJP with cotangent a_i / n_i (no extra forward pass)
        g_sam = backward(stats.pert_weights / jnp.maximum(stats.pert_count, 1.0))
        cosine = _cosine(g_p, g_sam if mask is None else apply_mask(g_sam, mask), layout)
      g = _perturbed_gradient(domain_loss_fn, has_aux, perturbed, stats.grad_weights, layout)
      if alpha_t is not None:  # gsam, sagm (sam has no alpha)
        g = _rules.final_gradient(rule, alpha_t, g_ascent, g, layout)
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
        amortization = _amortization.trigger_decision(trigger, state, stats.variance, dtype)
        full_now = amortization[0]
      # One backward pass of the unperturbed forward outside the cond, with the cotangent of the step's kind:
      # g_p on a full step, grad L in between (the cond's operands are then params-sized, never activations).
      first = backward(jnp.where(full_now, stats.cotangent, stats.grad_weights))
      weight_t = None if reuse_weight is None else at_step(reuse_weight, state.count, dtype)
      g, p_norm, cosine, reused = _amortization.amortized_gradient(
        state, params, full_now, first, sharpness_aware_gradient, weight_t, dtype, layout
      )

    new_updates, base_state = base_tx.update(g, state.base_state, params, **extra_args)
    c = stats.cotangent * stats.pert_count  # the weights c_i of g_p = sum_i c_i grad L_i
    if per_device_perturbation:  # each device's own: logged as their mean, so the state is the same on every device
      p_norm, cosine, c = jax.lax.pmean((p_norm, cosine, c), axis)
    metrics = (p_norm, layout.norm(g), cosine, c)
    return new_updates, _next_state(state, base_state, stats, metrics, aux, reused, dtype, amortization)

  # optax types a state as an ArrayTree, which has no None leaves; DisamState's optional fields are None.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyrefly: ignore[bad-argument-type]


# -- the stages of one step, in the order `update_fn` runs them ----------------------------------------------------


def _unperturbed_pass(domain_loss_fn: Callable, has_aux: bool, params: optax.Params, layout: _sharding.ParamLayout):
  """Pass 1 at `w`: `(total [M], count [M], aux, vjp)` of this device's domain-loss sums; `vjp(cotangent)` is the
  gradient of `sum_i cotangent_i total_i`, so every backward pass of the step reuses this one forward pass."""

  def local_totals(p):
    losses, aux = as_domain_losses(_checks.evaluate(domain_loss_fn, p), has_aux)
    return losses.total, (losses.count, aux)

  total, vjp_fn, (count, aux) = jax.vjp(local_totals, layout.device_local(params), has_aux=True)
  return total, count, aux, vjp_fn


class _Statistics(NamedTuple):
  """The domain statistics of one step (global over devices unless `pert_*`, the perturbation's own)."""

  means: jax.Array  # [M] L_i
  count: jax.Array  # [M] n_i, summed over devices
  loss: jax.Array  # L = sum_i a_i L_i
  variance: jax.Array  # V = sum_i a_i (L_i - L)^2
  grad_weights: jax.Array  # [M] dL/dtotal_i = a_i / n_i: grad L is the VJP with these
  pert_count: jax.Array  # [M] the counts the perturbation is formed from (this device's, per-device)
  pert_weights: jax.Array  # [M] a_i of the perturbation's counts
  cotangent: jax.Array  # [M] dJ/dtotal_i of J = L - lam V: g_p is the VJP with these


def _domain_statistics(
  total: jax.Array, count: jax.Array, dtype: Any, axes: tuple | None, weighting: Any, lam_t: jax.Array, per_device: bool
) -> _Statistics:
  """Eq. 6 on the sums and counts of the whole batch (psummed over `axes`), and Eq. 7's cotangent:
  `c_i / n_i` with `c_i = a_i (1 - 2 lam (L_i - L))`, from the global sums (this device's, per-device)."""
  wide = jnp.promote_types(dtype, total.dtype)
  local_total, local_count = total.astype(wide), count.astype(wide)
  global_total, global_count = local_total, local_count
  if axes is not None:
    global_total, global_count = jax.lax.psum((local_total, local_count), axes)
  means, weights, loss, variance = domain_objective(DomainLosses(global_total, global_count), weighting)
  pert_total, pert_count = (local_total, local_count) if per_device else (global_total, global_count)

  def perturbation_objective(t):
    _, w_i, l, v = domain_objective(DomainLosses(t, pert_count), weighting)
    return l - lam_t * v, w_i

  cotangent, pert_weights = jax.grad(perturbation_objective, has_aux=True)(pert_total)
  grad_weights = weights / jnp.maximum(global_count, 1.0)
  return _Statistics(means, global_count, loss, variance, grad_weights, pert_count, pert_weights, cotangent)


def _ascent_point(
  params: optax.Params,
  g_p: optax.Updates,
  rho_t: jax.Array,
  sagm_alpha: jax.Array | None,
  adaptive: bool,
  layout: _sharding.ParamLayout,
) -> tuple[optax.Params, jax.Array]:
  """Eq. 8: `(w + rho g_p / ||g_p||, ||g_p||)`; ASAM: `w + rho w^2 g_p / || |w| g_p ||`; SAGM (`sagm_alpha`):
  `w + (rho / ||g_p|| - alpha) g_p` (the official code; adaptive: times w^2). In the params' dtypes."""
  if adaptive:
    scaled = jax.tree.map(lambda g, w: jnp.abs(wide(w)) * wide(g), g_p, params)
    p_norm = layout.norm(scaled)
    direction = jax.tree.map(lambda s, w: jnp.abs(wide(w)) * s, scaled, params)
  else:
    p_norm = layout.norm(g_p)
    direction = jax.tree.map(wide, g_p)
  scale = rho_t / (p_norm + NORM_EPS)
  if sagm_alpha is not None:
    scale = scale - sagm_alpha
  return jax.tree.map(lambda w, d: (wide(w) + scale * d).astype(w.dtype), params, direction), p_norm


def _cosine(a: optax.Updates, b: optax.Updates, layout: _sharding.ParamLayout) -> jax.Array:
  """`<a, b> / (||a|| ||b||)`, eps-guarded (diagnostics: DISAM's g_p against SAM's grad L(w))."""
  return layout.vdot(a, b) / (layout.norm(a) * layout.norm(b) + NORM_EPS)


def _perturbed_gradient(
  domain_loss_fn: Callable,
  has_aux: bool,
  perturbed: optax.Params,
  grad_weights: jax.Array,
  layout: _sharding.ParamLayout,
) -> optax.Updates:
  """Pass 2: `g = grad L(w_adv)`, the plain training loss (no variance term) at the perturbed point, summed over
  devices; its aux (e.g. BatchNorm statistics) is dropped."""

  def perturbed_loss(p):
    losses, _ = as_domain_losses(_checks.evaluate(domain_loss_fn, p), has_aux)
    return jnp.sum(grad_weights.astype(losses.total.dtype) * losses.total)

  return layout.sum_gradient(jax.grad(perturbed_loss)(layout.device_local(perturbed)))


def _next_state(
  state: DisamState,
  base_state: optax.OptState,
  stats: _Statistics,
  metrics: tuple,
  aux: Any,
  reused: optax.Updates | None,
  dtype: Any,
  amortization: tuple = (None, None, None),
) -> DisamState:
  """The state after the step: `metrics = (||g_p||, ||g||, cosine, c)`; `[M]` fields None without num_domains;
  `amortization = (ascended, trigger_reference, steps_since_ascent)`, each None where not kept."""
  ascended, reference, since = amortization
  p_norm, grad_norm, cosine, c = metrics
  per_domain = lambda x: None if state.domain_losses is None else x.astype(dtype)
  return DisamState(
    count=jnp.asarray(optax.safe_increment(state.count)),
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


# -- public helpers: the objective, the initial state, the state inside a chain --------------------------------------


def domain_objective(
  losses: DomainLosses, domain_weights: str | jax.Array = "uniform"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """DISAM's objective terms (Eq. 6) from per-domain loss sums and counts: `(means, weights, L, V)`.

  `means_i = total_i / max(count_i, 1)`; `weights` are the `a_i` over the domains present (count > 0), summing to
  1; `L = sum_i a_i means_i` and `V = sum_i a_i (means_i - L)^2`. An absent domain weighs 0 (it neither counts as a
  loss of 0 nor enters the variance). Everything is in `losses.total`'s dtype and differentiable in the totals:
  `disam` takes its perturbation cotangent as the gradient of `L - lam V` here.

  Example (domain means 2 and 1: `L = 1.5`, `V = ((2 - 1.5)^2 + (1 - 1.5)^2) / 2 = 0.25`)::

    >>> import jax.numpy as jnp, disam_jax
    >>> ce = jnp.array([[1.0, 3.0], [0.0, 2.0]])                 # [M, b] per-example losses of 2 domains
    >>> means, weights, loss, variance = disam_jax.domain_objective(disam_jax.domain_losses_from_grouped(ce))
    >>> print(means, weights, loss, variance)
    [2. 1.] [0.5 0.5] 1.5 0.25

  Args:
    losses: `DomainLosses(total [M], count [M])`, e.g. from `domain_losses_from_grouped` / `as_domain_losses`.
    domain_weights: `'uniform'` (`a_i = 1/M'` over the M' present domains), `'count'` (`a_i = n_i / n`) or a `[M]`
      array of weights (renormalized over the present domains), as `disam(..., domain_weights=)`.

  Returns:
    `(means [M], weights [M], L scalar, V scalar)`.
  """
  count = losses.count.astype(losses.total.dtype)
  means = losses.total / jnp.maximum(count, 1.0)
  weights = _domain_weights(domain_weights, count)
  loss = jnp.sum(weights * means)
  variance = jnp.sum(weights * (means - loss) ** 2)
  return means, weights, loss, variance


def _domain_weights(weighting: str | jax.Array, count: jax.Array) -> jax.Array:
  """`[M]` weights a_i over the domains present in the batch (count > 0), summing to 1 (0 if none present)."""
  present = (count > 0).astype(count.dtype)
  if isinstance(weighting, str):
    raw = present if weighting == "uniform" else count
  else:
    if weighting.shape != count.shape:
      raise ValueError(
        f"domain_weights has {weighting.shape[0]} entries but domain_loss_fn returned {count.shape[0]} domain losses."
      )
    raw = weighting.astype(count.dtype) * present
  return raw / jnp.maximum(raw.sum(), jnp.finfo(count.dtype).tiny)


def init_state(
  base_state: optax.OptState, num_domains: int | None = None, aux_example: Any = None, dtype: Any = jnp.float32
) -> DisamState:
  """The `DisamState` before the first step, for a transformation that logs what `disam` logs.

  Metrics are 0 (`sam_cosine` NaN), the `[num_domains]` fields zeros (`None` without `num_domains`), `aux` is
  `aux_example`; the amortization's fields are `None` (`disam` fills them when it amortizes). `disam`'s own `init`
  starts from this; so does an optimizer with `disam`'s interface that wants the same metrics (the harness's ERM).

  Args:
    base_state: the base optimizer's state (`base_tx.init(params)`).
    num_domains: M, the length of the per-domain fields; `None` leaves them `None`.
    aux_example: the initial `aux` (a pytree shaped like what `domain_loss_fn` returns beside its losses).
    dtype: the metrics' dtype (float32; float64 for float64 params).

  Returns:
    A `DisamState` with `count` 0.
  """
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
  )


def find_disam_state(opt_state: optax.OptState) -> DisamState:
  """Returns the `DisamState` inside an optimizer state (e.g. of a chain), to read the logged metrics."""
  found = [
    s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, DisamState)) if isinstance(s, DisamState)
  ]
  if len(found) != 1:
    raise ValueError(f"expected exactly one DisamState in the optimizer state; found {len(found)}.")
  return found[0]
