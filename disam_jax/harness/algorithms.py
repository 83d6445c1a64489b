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
  `train.make_train_step` adds to every domain's loss, and the rule's base optimizer is re-initialized at the
  penalty's anneal step as DomainBed re-initializes Adam;
* names: a rule (``disam``), a penalty alone (``coral``: ERM on CORAL's loss), or ``RULE+PENALTY`` (``disam+coral``:
  DISAM's perturbation and update on CORAL's loss; DISAM's variance term stays that of the plain cross-entropies,
  in the perturbation only).

`HParams` and `default_hparams` are the one place for hyperparameter defaults, as DomainBed's
``hparams_registry``: for small images (rotated digits/animals, ``tfds:``) Adam, lr 1e-3, weight decay 0 and 64
examples per domain per step; for the DomainBed image folders Adam, lr 5e-5, weight decay 0, 32 per domain.
rho 0.05 and lam 0.1 are the paper's defaults; the penalty defaults are DomainBed's (cited at each field), with
the anneal steps at DomainBed's fraction of the run (`HParams.for_run`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from disam_jax._disam import (DisamState, VarianceTrigger, _global_norm, _initial_state, _objective_terms,
                              _split_output, disam)
from disam_jax.harness import penalties

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
# Hyperparameters
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HParams:
  """Hyperparameters of one training run.

  Attributes:
    optimizer: base optimizer, one of `BASE_OPTIMIZERS` ('sgd' has momentum 0.9).
    lr: learning rate of the base optimizer.
    weight_decay: inside the base optimizer: L2 added to the gradient for 'sgd' and 'adam' (PyTorch's
      ``weight_decay``), decoupled for 'adamw'.
    batch_size: examples per training domain per step.
    rho: perturbation radius (SAM, DISAM).
    lam: weight of the domain-loss variance in DISAM's perturbation.
    diagnostics: DISAM rules also compute, every step, the cosine between DISAM's perturbation direction and SAM's
      (`DisamState.sam_cosine`; one extra backward pass per step). SAM's is 1 by definition and is not computed.
    adaptive: ASAM form of the perturbation (every sharpness-aware rule): ``sam`` with it is ASAM (Kwon et al.
      2021), ``disam`` with it the official DISAM code's ``adaptive`` flag.
    alpha: GSAM's / SAGM's alpha; None takes the rule's published default (see `disam_jax.disam`).
    perturb_every: sharpness-aware rules take their full two-pass step every this many steps and reuse its
      gradient component in between, one pass per step (`disam_jax.disam(..., perturb_every=k)`, LookSAM-style;
      SAM with it is LookSAM). 1: every step. ERM is unaffected.
    reuse_weight: with perturb_every > 1 or perturb_when, the weight of the reused gradient component in the steps
      in between (`disam_jax.disam(..., reuse_weight=...)`); None: the core's default 0, plain gradient steps
      ("SAM every k steps"); LookSAM's 0.7 lost accuracy in docs/results.md.
    perturb_when: None, or "variance": sharpness-aware rules ascend when this step's domain-loss variance exceeds
      trigger_factor times its running mean (decay trigger_decay), at most once per trigger_min_gap steps and at
      least once per trigger_max_gap (`disam_jax.disam(..., perturb_when=disam_jax.VarianceTrigger(...))`). Not
      with perturb_every > 1.
    trigger_min_gap, trigger_max_gap, trigger_factor, trigger_decay: the `VarianceTrigger`'s fields.
    coral_gamma: CORAL's penalty weight (DomainBed's ``mmd_gamma``).
    vrex_lambda: V-REx's penalty weight after the anneal (1 before it).
    vrex_anneal_steps: V-REx's anneal step (the base optimizer is re-initialized there); None: `for_run`.
    fishr_lambda: Fishr's penalty weight after the anneal (0 before it).
    fishr_ema: Fishr's moving-average factor of the per-domain gradient variances.
    fishr_anneal_steps: Fishr's anneal step (the base optimizer is re-initialized there if > 0); None: `for_run`.
  """

  optimizer: str = "adam"
  lr: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 64
  rho: float = 0.05
  lam: float = 0.1
  diagnostics: bool = False
  adaptive: bool = False
  alpha: Optional[float] = None
  perturb_every: int = 1
  reuse_weight: Optional[float] = None
  perturb_when: Optional[str] = None
  trigger_min_gap: int = 8
  trigger_max_gap: int = 32
  trigger_factor: float = 1.0
  trigger_decay: float = 0.9
  coral_gamma: float = 1.0  # DomainBed hparams_registry: mmd_gamma 1.0 (MMD, CORAL)
  vrex_lambda: float = 10.0  # DomainBed hparams_registry: vrex_lambda 1e1
  vrex_anneal_steps: Optional[int] = None  # DomainBed: vrex_penalty_anneal_iters 500 (of 5000 steps)
  fishr_lambda: float = 1000.0  # DomainBed hparams_registry (Fishr): lambda 1000
  fishr_ema: float = 0.95  # DomainBed hparams_registry (Fishr): ema 0.95
  fishr_anneal_steps: Optional[int] = None  # DomainBed (Fishr): penalty_anneal_iters 1500 (of 5000 steps)

  def for_run(self, steps: int) -> "HParams":
    """These hyperparameters with the anneal steps left at None set to DomainBed's fraction of a `steps` run.

    DomainBed trains 5000 steps and anneals V-REx at 500 (10%) and Fishr at 1500 (30%); the harness's runs are
    far shorter (300 steps by default), so the default keeps the fraction: `round(0.1 * steps)` and
    `round(0.3 * steps)`. Values already set are kept.
    """
    return dataclasses.replace(
      self,
      vrex_anneal_steps=_fraction(self.vrex_anneal_steps, _VREX_ANNEAL_FRACTION, steps),
      fishr_anneal_steps=_fraction(self.fishr_anneal_steps, _FISHR_ANNEAL_FRACTION, steps),
    )

  def validate(self) -> None:
    """Raises ValueError with a readable message for values no run can use."""
    if self.optimizer not in BASE_OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {self.optimizer!r}; valid: {', '.join(BASE_OPTIMIZERS)}.")
    finite = ("lr", "weight_decay", "rho", "lam", "coral_gamma", "vrex_lambda", "fishr_lambda", "fishr_ema")
    optional = tuple(name for name in ("alpha", "reuse_weight") if getattr(self, name) is not None)
    for name in finite + optional:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    if self.lr <= 0:
      raise ValueError(f"lr must be > 0; got {self.lr}.")
    for name in ("weight_decay", "rho", "lam", "coral_gamma", "vrex_lambda", "fishr_lambda"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}.")
    if isinstance(self.perturb_every, bool) or not isinstance(self.perturb_every, int) or self.perturb_every < 1:
      raise ValueError(f"perturb_every must be an int >= 1; got {self.perturb_every!r}.")
    if self.perturb_when not in (None, "variance"):
      raise ValueError(f"perturb_when must be None or 'variance'; got {self.perturb_when!r}.")
    if self.perturb_when is not None and self.perturb_every != 1:
      raise ValueError("perturb_every and perturb_when both choose which steps ascend: pass one of them "
                       "(--perturb-every K or --perturb-when variance).")
    for name in ("trigger_min_gap", "trigger_max_gap"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    if self.trigger_max_gap < self.trigger_min_gap:
      raise ValueError(f"trigger_min_gap ({self.trigger_min_gap}) must be <= trigger_max_gap "
                       f"({self.trigger_max_gap}).")
    if not (math.isfinite(self.trigger_factor) and self.trigger_factor >= 0):
      raise ValueError(f"trigger_factor must be finite and >= 0; got {self.trigger_factor}.")
    if not 0 <= self.trigger_decay < 1:
      raise ValueError(f"trigger_decay must be in [0, 1); got {self.trigger_decay}.")
    if self.reuse_weight is not None:
      if self.perturb_every == 1 and self.perturb_when is None:
        raise ValueError("reuse_weight weighs the gradient component reused between full steps: it needs "
                         "perturb_every > 1 (--perturb-every K) or perturb_when (--perturb-when variance).")
      if self.reuse_weight < 0:
        raise ValueError(f"reuse_weight must be >= 0; got {self.reuse_weight}.")
    if not 0 <= self.fishr_ema < 1:
      raise ValueError(f"fishr_ema must be in [0, 1); got {self.fishr_ema}.")
    for name in ("vrex_anneal_steps", "fishr_anneal_steps"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer (examples per domain); got {self.batch_size!r}.")


_VREX_ANNEAL_FRACTION = 500 / 5000  # DomainBed: vrex_penalty_anneal_iters 500 of its default 5000 steps
_FISHR_ANNEAL_FRACTION = 1500 / 5000  # DomainBed: penalty_anneal_iters 1500 of its default 5000 steps


def _fraction(value: Optional[int], fraction: float, steps: int) -> int:
  return int(round(fraction * steps)) if value is None else value


# DomainBed's hparams_registry: SMALL_IMAGES get lr 1e-3 and batch 64, the others lr 5e-5 and batch 32; weight
# decay 0 by default everywhere; Adam is ERM's optimizer.
_SMALL_IMAGE_DATASETS = ("rotated_digits", "rotated_animals", "colored_digits")


def default_hparams(dataset: str, **overrides: Any) -> HParams:
  """DomainBed's defaults for `dataset` (see the module docstring), with `overrides` applied (None ignored)."""
  small = dataset in _SMALL_IMAGE_DATASETS or dataset.startswith("tfds:")
  base = HParams(lr=1e-3, batch_size=64) if small else HParams(lr=5e-5, batch_size=32)
  return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------------
# Base optimizers
# ---------------------------------------------------------------------------------------------------------------------


def _sgd(lr: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=0.9))


def _adam(lr: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def _adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(lr, weight_decay=weight_decay)


BASE_OPTIMIZERS: dict[str, Callable[[float, float], optax.GradientTransformation]] = {
  "sgd": _sgd,
  "adam": _adam,
  "adamw": _adamw,
}


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
    num_domains: Optional[int] = None,
    perturbation_mask: Any = None,
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
  """
  del perturbation_mask
  base_tx = optax.with_extra_args_support(base_tx)

  def init_fn(params):
    return _initial_state(base_tx.init(params), num_domains, aux_example)

  def update_fn(updates, state, params=None, *, domain_loss_fn=None, **extra_args):
    del updates  # the gradient comes from domain_loss_fn, as in disam
    if domain_loss_fn is None or params is None:
      raise ValueError("erm needs params and domain_loss_fn: tx.update(None, state, params, domain_loss_fn=f).")

    def objective(p):
      losses, aux = _split_output(domain_loss_fn(p), has_aux)
      means, _, loss, variance = _objective_terms(losses.total.astype(jnp.float32), losses.count, "uniform")
      return loss, (means, losses.count, variance, aux)

    (loss, (means, count, variance, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    if num_domains is not None and means.shape[0] != num_domains:
      raise ValueError(f"domain_loss_fn returned {means.shape[0]} domain losses; num_domains={num_domains}.")
    new_updates, base_state = base_tx.update(grads, state.base_state, params, **extra_args)
    return new_updates, DisamState(
      count=optax.safe_increment(state.count),
      base_state=base_state,
      domain_losses=means,
      domain_counts=count,
      loss=loss,
      variance=jax.lax.stop_gradient(variance),
      perturbation_norm=jnp.zeros([], jnp.float32),
      grad_norm=_global_norm(grads),
      aux=aux,
      perturbation_weights=jax.tree.map(jnp.zeros_like, state.perturbation_weights),  # no perturbation
      sam_cosine=jnp.full_like(state.sam_cosine, jnp.nan),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


# A registered algorithm is a sharpness-aware *rule* (how the gradient handed to the base optimizer is computed) and
# optionally a DomainBed *penalty* (what the training loss is): "rule", "penalty" (ERM's rule) or "rule+penalty".


def _erm_rule(base, hp, **kw):
  return erm(base, **kw)


def _sam_rule(lam_on: bool, rule: Optional[str] = None):
  def build(base, hp, **kw):
    extra = {} if rule is None else {"rule": rule, "alpha": hp.alpha}
    if lam_on and hp.diagnostics:
      extra["diagnostics"] = True
    if hp.perturb_every != 1:
      extra["perturb_every"] = hp.perturb_every
      extra["reuse_weight"] = hp.reuse_weight
    if hp.perturb_when == "variance":
      extra["perturb_when"] = VarianceTrigger(hp.trigger_min_gap, hp.trigger_max_gap, hp.trigger_factor,
                                              hp.trigger_decay)
      extra["reuse_weight"] = hp.reuse_weight
    return disam(base, hp.rho, hp.lam if lam_on else 0.0, adaptive=hp.adaptive, **extra, **kw)

  return build


# name -> (build(base_tx, hparams, **state_kwargs), description)
RULES: dict[str, tuple[Callable[..., optax.GradientTransformationExtraArgs], str]] = {
  "erm": (_erm_rule, "ERM: the base optimizer on the mean of the domain losses"),
  "sam": (_sam_rule(False), "SAM (Foret et al. 2021; ASAM with --adaptive): DISAM with lam = 0"),
  "disam": (_sam_rule(True), "DISAM (Zhang et al. 2024): perturbation along grad(L - lam * Var_i L_i)"),
  # GSAM and SAGM: the core's rule option, disam(..., rule='gsam'|'sagm', alpha=None: the published default)
  "gsam": (_sam_rule(False, "gsam"),
           "GSAM (Zhuang et al. 2022): g_adv - alpha * (part of grad L(w) orthogonal to g_adv)"),
  "sagm": (_sam_rule(False, "sagm"),
           "SAGM (Wang et al. 2023): perturbed at w + (rho/|g| - alpha) g; update (g + g_adv) / 2"),
  "disam_gsam": (_sam_rule(True, "gsam"), "DISAM on GSAM: GSAM with the ascent gradient grad(L - lam * Var_i L_i)"),
  "disam_sagm": (_sam_rule(True, "sagm"), "DISAM on SAGM: SAGM with the ascent gradient grad(L - lam * Var_i L_i)"),
}

# name -> (penalty(hparams) -> penalties.Penalty, description)
PENALTIES: dict[str, tuple[Callable[[HParams], penalties.Penalty], str]] = {
  "coral": (lambda hp: penalties.coral(hp.coral_gamma),
            "CORAL (Sun & Saenko 2016): + coral_gamma * feature mean/covariance differences between domains"),
  "vrex": (lambda hp: penalties.vrex(hp.vrex_lambda, _anneal(hp, "vrex_anneal_steps")),
           "V-REx (Krueger et al. 2021): + vrex_lambda * Var_i L_i (weight 1 before the anneal step)"),
  "fishr": (lambda hp: penalties.fishr(hp.fishr_lambda, hp.fishr_ema, _anneal(hp, "fishr_anneal_steps")),
            "Fishr (Rame et al. 2022): + fishr_lambda * variance across domains of head-gradient variances"),
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
  penalty: Optional[str]
  description: str

  def build(self, base_tx, hparams: HParams, **state_kwargs) -> optax.GradientTransformationExtraArgs:
    """The transformation: the rule on `base_tx` (re-initialized at the penalty's anneal step, as DomainBed)."""
    penalty = self.make_penalty(hparams)
    if penalty is not None and penalty.reset_step is not None:
      base_tx = penalties.reset_at(base_tx, penalty.reset_step)
    return RULES[self.rule][0](base_tx, hparams, **state_kwargs)

  def make_penalty(self, hparams: HParams) -> Optional[penalties.Penalty]:
    return None if self.penalty is None else PENALTIES[self.penalty][0](hparams)


_DISPLAY = {"sam": "SAM", "disam": "DISAM", "gsam": "GSAM", "sagm": "SAGM", "disam_gsam": "DISAM on GSAM",
            "disam_sagm": "DISAM on SAGM", "coral": "CORAL", "vrex": "V-REx", "fishr": "Fishr"}


def _specs():
  for rule, (_, rule_text) in RULES.items():
    yield AlgorithmSpec(rule, rule, None, rule_text)
  for penalty, (_, penalty_text) in PENALTIES.items():
    yield AlgorithmSpec(penalty, "erm", penalty, penalty_text)
  for penalty, (_, penalty_text) in PENALTIES.items():
    for rule in RULES:
      if rule != "erm":
        yield AlgorithmSpec(f"{rule}+{penalty}", rule, penalty,
                            f"{_DISPLAY[rule]} on {_DISPLAY[penalty]}'s training loss")


ALGORITHMS: dict[str, AlgorithmSpec] = {spec.name: spec for spec in _specs()}


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


def make_penalty(algorithm: str, hparams: HParams) -> Optional[penalties.Penalty]:
  """The training-loss penalty of `algorithm` (None for erm and the sharpness-aware rules alone)."""
  return check_algorithm(algorithm).make_penalty(hparams)


def make_optimizer(
    algorithm: str, hparams: HParams, *, num_domains: int, aux_example: Any = None, trainable_mask: Any = None
) -> optax.GradientTransformationExtraArgs:
  """The transformation of `algorithm` (a key of `ALGORITHMS`) with `hparams`' base optimizer inside.

  An algorithm with a penalty also needs `make_penalty(algorithm, hparams)` in the training step (see
  `train.make_train_step`); the transformation alone only carries the penalty's optimizer reset.

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

  tx = spec.build(peft.masked_optimizer(base_tx, trainable_mask), hparams, has_aux=True, aux_example=aux_example,
                  num_domains=num_domains, perturbation_mask=trainable_mask)
  return peft.freeze_gradients(tx, trainable_mask)
