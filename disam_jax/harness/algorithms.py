"""Training algorithms for the harness: a registry of optax transformations with one interface.

Every algorithm is built by `make_optimizer(name, hparams, num_domains=M, aux_example=model_state)` and returns an
`optax.GradientTransformationExtraArgs` whose `update(None, state, params, domain_loss_fn=f)` computes its own
gradient(s) through `f(params) -> (DomainLosses, aux)`, and whose state is (or holds) a `disam_jax.DisamState`, so
the training step, the logged metrics (per-domain losses, their variance, norms) and the BatchNorm write-back are
the same code for all of them. An algorithm is a sharpness-aware *rule* and optionally a DomainBed *penalty*:

* rules (`RULES`): ``erm`` (the base optimizer on the gradient of the mean of the per-domain losses: one forward
  and one backward pass; `erm` below), ``sam`` (`disam_jax.disam` with ``lam = 0``; Foret et al. 2021; with
  ``adaptive`` it is ASAM, Kwon et al. 2021), ``disam`` (`disam_jax.disam`, Zhang et al., ICLR 2024);
* penalties (`PENALTIES`, `disam_jax.harness.penalties`): ``coral``, ``vrex``, ``fishr``, DomainBed's definitions,
  which change the *training loss* `L + w_t P` (every pass); `make_penalty(name, hparams)` gives the penalty that
  `steps.make_train_step` adds to every domain's loss, and the rule's base optimizer is re-initialized at the
  penalty's anneal step as DomainBed re-initializes Adam;
* names: a rule (``disam``), a penalty alone (``coral``: ERM on CORAL's loss), or ``RULE+PENALTY`` (``disam+coral``:
  DISAM's perturbation and update on CORAL's loss; DISAM's variance term stays that of the plain cross-entropies,
  in the perturbation only).

`HParams` and `default_hparams` (defined in the JAX-free `disam_jax.harness._choices`, which also holds every name
above and their descriptions; re-exported here) are the one place for hyperparameter defaults, as DomainBed's
``hparams_registry``: for small images (rotated digits/animals, ``tfds:``) Adam, lr 1e-3, weight decay 0 and 64
examples per domain per step; for the DomainBed image folders Adam, lr 5e-5, weight decay 0, 32 per domain.
rho 0.05 and lam 0.1 are the paper's defaults; the penalty defaults are DomainBed's (cited at each field), with
the anneal steps at DomainBed's fraction of the run (`HParams.for_run`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from disam_jax import DomainLosses, VarianceTrigger, as_domain_losses, disam, domain_objective, global_norm, init_state
from disam_jax.harness import _choices, penalties
from disam_jax.harness._choices import HParams, default_hparams  # public here; defined JAX-free for the CLI's parser

__all__ = [
  "ALGORITHMS",
  "BASE_OPTIMIZERS",
  "PENALTIES",
  "RULES",
  "AlgorithmSpec",
  "HParams",
  "base_optimizer",
  "check_algorithm",
  "default_hparams",
  "erm",
  "make_optimizer",
  "make_penalty",
]


# ---------------------------------------------------------------------------------------------------------------------
# Base optimizers
# ---------------------------------------------------------------------------------------------------------------------


def _sgd(lr: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=0.9))


def _adam(lr: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def _adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(lr, weight_decay=weight_decay)


_BASE_OPTIMIZER_BUILDERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


# name -> build(lr, weight_decay); the names are `_choices.BASE_OPTIMIZERS`
BASE_OPTIMIZERS: dict[str, Callable[[float, float], optax.GradientTransformation]] = _choices.ordered_like(
  _BASE_OPTIMIZER_BUILDERS, _choices.BASE_OPTIMIZERS, "BASE_OPTIMIZERS"
)


def base_optimizer(name: str, lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The base optimizer `name` ('sgd' with momentum 0.9, 'adam', 'adamw'), weight decay included."""
  if name not in BASE_OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(BASE_OPTIMIZERS)}.")
  return BASE_OPTIMIZERS[name](lr, weight_decay)


# ---------------------------------------------------------------------------------------------------------------------
# ERM with DISAM's interface
# ---------------------------------------------------------------------------------------------------------------------


def erm(
  base_tx: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  aux_example: Any = None,
  num_domains: int | None = None,
  perturbation_mask: Any = None,
  domain_weights: str = "uniform",
) -> optax.GradientTransformationExtraArgs:
  """Empirical risk minimization with `disam`'s interface: one pass, `base_tx` on `grad L(w)`.

  `update(None, state, params, domain_loss_fn=f)` differentiates `L = mean_i L_i` (uniform weights over the
  domains present in the batch, as `disam`) once, and fills the same `DisamState` fields as `disam` does
  (`domain_losses`, `loss`, `variance`, `grad_norm`; `perturbation_norm` is 0), so ERM, SAM and DISAM log the same
  metrics. It equals `disam(base_tx, rho=0, lam=0)` at half the cost.

  Args:
    base_tx: the optimizer applied to the gradient.
    has_aux: `domain_loss_fn` returns `(domain_losses, aux)`; aux is kept in `state.aux`.
    aux_example: with `has_aux`, the initial `state.aux` (fixes the state's structure).
    num_domains: M, fixes the shape of `state.domain_losses` from `init`.
    perturbation_mask: accepted so that every rule takes the same arguments; ERM perturbs nothing, so there is
      nothing to restrict (which parameters train is the base optimizer's mask, see `peft`).
    domain_weights: the weights of the domains present in `L`, as `disam`'s: 'uniform' or 'count' (`L` is then
      the batch's mean loss).
  """
  del perturbation_mask
  base_tx = optax.with_extra_args_support(base_tx)

  def init_fn(params):
    return init_state(base_tx.init(params), num_domains, aux_example)

  def update_fn(updates, state, params=None, *, domain_loss_fn=None, **extra_args):
    del updates  # the gradient comes from domain_loss_fn, as in disam
    if domain_loss_fn is None or params is None:
      raise ValueError("erm needs params and domain_loss_fn: tx.update(None, state, params, domain_loss_fn=f).")

    def objective(p):
      losses, aux = as_domain_losses(domain_loss_fn(p), has_aux)
      means, _, loss, variance = domain_objective(
        DomainLosses(losses.total.astype(jnp.float32), losses.count), domain_weights
      )
      return loss, (means, losses.count, variance, aux)

    (loss, (means, count, variance, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    if num_domains is not None and means.shape[0] != num_domains:
      raise ValueError(f"domain_loss_fn returned {means.shape[0]} domain losses; num_domains={num_domains}.")
    new_updates, base_state = base_tx.update(grads, state.base_state, params, **extra_args)
    # The fields a one-pass step measures; the perturbation's (norm 0, weights 0, cosine NaN) keep init's values.
    return new_updates, state._replace(
      count=optax.safe_increment(state.count),
      base_state=base_state,
      domain_losses=means,
      domain_counts=count,
      loss=loss,
      variance=jax.lax.stop_gradient(variance),
      grad_norm=global_norm(grads),
      aux=aux,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


# A registered algorithm is a sharpness-aware *rule* (how the gradient handed to the base optimizer is computed) and
# optionally a DomainBed *penalty* (what the training loss is): "rule", "penalty" (ERM's rule) or "rule+penalty".


def _erm_rule(base, hp, **kw):
  return erm(base, domain_weights=hp.domain_weights, **kw)


def _sam_rule(lam_on: bool, rule: str | None = None):
  def build(base, hp, **kw):
    extra = {} if rule is None else {"rule": rule, "alpha": hp.alpha}
    if lam_on and hp.diagnostics:
      extra["diagnostics"] = True
    if hp.perturb_every != 1:
      extra["perturb_every"] = hp.perturb_every
      extra["reuse_weight"] = hp.reuse_weight
    if hp.perturb_when == "variance":
      extra["perturb_when"] = VarianceTrigger(
        hp.trigger_min_gap, hp.trigger_max_gap, hp.trigger_factor, hp.trigger_decay
      )
      extra["reuse_weight"] = hp.reuse_weight
    return disam(
      base, hp.rho, hp.lam if lam_on else 0.0, adaptive=hp.adaptive, domain_weights=hp.domain_weights, **extra, **kw
    )

  return build


# name -> (build(base_tx, hparams, **state_kwargs), description); names and descriptions are `_choices.RULES`
RULES: dict[str, tuple[Callable[..., optax.GradientTransformationExtraArgs], str]] = {
  name: (build, _choices.RULES[name])
  for name, build in _choices.ordered_like(
    {
      "erm": _erm_rule,
      "sam": _sam_rule(False),
      "disam": _sam_rule(True),
      # GSAM and SAGM: the core's rule option, disam(..., rule='gsam'|'sagm', alpha=None: the published default)
      "gsam": _sam_rule(False, "gsam"),
      "sagm": _sam_rule(False, "sagm"),
      "disam_gsam": _sam_rule(True, "gsam"),
      "disam_sagm": _sam_rule(True, "sagm"),
    },
    _choices.RULES,
    "RULES",
  ).items()
}

# name -> (penalty(hparams) -> penalties.Penalty, description); names and descriptions are `_choices.PENALTIES`
PENALTIES: dict[str, tuple[Callable[[HParams], penalties.Penalty], str]] = {
  name: (make, _choices.PENALTIES[name])
  for name, make in _choices.ordered_like(
    {
      "coral": lambda hp: penalties.coral(hp.coral_gamma),
      "vrex": lambda hp: penalties.vrex(hp.vrex_lambda, _anneal(hp, "vrex_anneal_steps")),
      "fishr": lambda hp: penalties.fishr(hp.fishr_lambda, hp.fishr_ema, _anneal(hp, "fishr_anneal_steps")),
    },
    _choices.PENALTIES,
    "PENALTIES",
  ).items()
}


def _anneal(hp: HParams, name: str) -> int:
  value = getattr(hp, name)
  if value is None:
    raise ValueError(f"{name} is None: set it, or call HParams.for_run(steps) for DomainBed's fraction of the run.")
  return value


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
  """One registry entry: the sharpness-aware `rule` (a key of `RULES`) and an optional `penalty` (of `PENALTIES`)."""

  name: str
  rule: str
  penalty: str | None
  description: str

  def build(self, base_tx, hparams: HParams, **state_kwargs) -> optax.GradientTransformationExtraArgs:
    """The transformation: the rule on `base_tx` (re-initialized at the penalty's anneal step, as DomainBed)."""
    penalty = self.make_penalty(hparams)
    if penalty is not None and penalty.reset_step is not None:
      base_tx = penalties.reset_at(base_tx, penalty.reset_step)
    return RULES[self.rule][0](base_tx, hparams, **state_kwargs)

  def make_penalty(self, hparams: HParams) -> penalties.Penalty | None:
    return None if self.penalty is None else PENALTIES[self.penalty][0](hparams)


# Every rule, penalty and RULE+PENALTY name, in `_choices.ALGORITHMS`' order (with its descriptions).
ALGORITHMS: dict[str, AlgorithmSpec] = {
  name: AlgorithmSpec(name, rule, penalty, text) for name, (rule, penalty, text) in _choices.ALGORITHMS.items()
}


def _unknown(algorithm: str) -> str:
  rule, plus, penalty = algorithm.partition("+")
  hint = ""
  if plus and f"{penalty}+{rule}" in ALGORITHMS:
    hint = f" (did you mean {penalty}+{rule}? the rule comes first, then the penalty)"
  return f"Unknown algorithm {algorithm!r}{hint}; valid: {', '.join(ALGORITHMS)}."


def check_algorithm(algorithm: str) -> AlgorithmSpec:
  """The registry entry of `algorithm`; ValueError naming the valid ones (and the right order of a combination)."""
  if algorithm not in ALGORITHMS:
    raise ValueError(_unknown(algorithm))
  return ALGORITHMS[algorithm]


def make_penalty(algorithm: str, hparams: HParams) -> penalties.Penalty | None:
  """The training-loss penalty of `algorithm` (None for erm and the sharpness-aware rules alone)."""
  return check_algorithm(algorithm).make_penalty(hparams)


def make_optimizer(
  algorithm: str, hparams: HParams, *, num_domains: int, aux_example: Any = None, trainable_mask: Any = None
) -> optax.GradientTransformationExtraArgs:
  """The transformation of `algorithm` (a key of `ALGORITHMS`) with `hparams`' base optimizer inside.

  An algorithm with a penalty also needs `make_penalty(algorithm, hparams)` in the training step (see
  `steps.make_train_step`); the transformation alone only carries the penalty's optimizer reset.

  Args:
    algorithm: a key of `ALGORITHMS`.
    hparams: the run's `HParams`.
    num_domains: M training domains (fixes the state's shape).
    aux_example: the model state (BatchNorm statistics; possibly empty) returned as aux by `domain_loss_fn`.
    trainable_mask: parameter-efficient fine-tuning (`peft.trainable_mask`): a pytree of bools shaped like the
      params; only True leaves train (base optimizer masked), are perturbed (norm over them) and are
      differentiated. None trains everything.

  Returns:
    An `optax.GradientTransformationExtraArgs` built with `has_aux=True`, whose state is a `DisamState`.
  """
  spec = check_algorithm(algorithm)
  hparams.validate()
  base_tx = base_optimizer(hparams.optimizer, hparams.lr, hparams.weight_decay)
  if trainable_mask is None:
    return spec.build(base_tx, hparams, has_aux=True, aux_example=aux_example, num_domains=num_domains)
  from disam_jax.harness import peft

  tx = spec.build(
    peft.masked_optimizer(base_tx, trainable_mask),
    hparams,
    has_aux=True,
    aux_example=aux_example,
    num_domains=num_domains,
    perturbation_mask=trainable_mask,
  )
  return peft.freeze_gradients(tx, trainable_mask)
