"""Training algorithms for the harness: a registry of optax transformations with one interface.

Every algorithm is built by `make_optimizer(name, hparams, num_domains=M, aux_example=model_state)` and returns an
`optax.GradientTransformationExtraArgs` whose `update(None, state, params, domain_loss_fn=f)` computes its own
gradient(s) through `f(params) -> (DomainLosses, new_model_state)`, and whose state is (or holds) a
`disam_jax.DisamState`, so the training step, the logged metrics (per-domain losses, their variance, norms) and
the BatchNorm write-back are the same code for all of them:

* ``erm``: the base optimizer on the gradient of the mean of the per-domain losses (one forward and one backward
  pass; `erm` below);
* ``sam``: `disam_jax.disam` with ``lam = 0`` (SAM, Foret et al. 2021; ``adaptive`` gives ASAM);
* ``disam``: `disam_jax.disam` (Zhang et al., ICLR 2024).

`HParams` and `default_hparams` are the one place for hyperparameter defaults, as DomainBed's
``hparams_registry``: for small images (rotated digits/animals, ``tfds:``) Adam, lr 1e-3, weight decay 0 and 64
examples per domain per step; for the DomainBed image folders Adam, lr 5e-5, weight decay 0, 32 per domain.
rho 0.05 and lam 0.1 are the paper's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from disam_jax._disam import DisamState, _global_norm, _initial_state, _objective_terms, _split_output, disam

__all__ = [
  "ALGORITHMS",
  "BASE_OPTIMIZERS",
  "AlgorithmSpec",
  "HParams",
  "base_optimizer",
  "default_hparams",
  "erm",
  "make_optimizer",
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
    adaptive: ASAM form of the perturbation (SAM, DISAM).
  """

  optimizer: str = "adam"
  lr: float = 1e-3
  weight_decay: float = 0.0
  batch_size: int = 64
  rho: float = 0.05
  lam: float = 0.1
  adaptive: bool = False

  def validate(self) -> None:
    """Raises ValueError with a readable message for values no run can use."""
    if self.optimizer not in BASE_OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {self.optimizer!r}; valid: {', '.join(BASE_OPTIMIZERS)}.")
    for name in ("lr", "weight_decay", "rho", "lam"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    if self.lr <= 0:
      raise ValueError(f"lr must be > 0; got {self.lr}.")
    for name in ("weight_decay", "rho", "lam"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}.")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer (examples per domain); got {self.batch_size!r}.")


# DomainBed's hparams_registry: SMALL_IMAGES get lr 1e-3 and batch 64, the others lr 5e-5 and batch 32; weight
# decay 0 by default everywhere; Adam is ERM's optimizer.
_SMALL_IMAGE_DATASETS = ("rotated_digits", "rotated_animals")


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
  """
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
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
  """One registry entry: `build(base_tx, hparams, **state_kwargs)` returns the transformation."""

  name: str
  build: Callable[..., optax.GradientTransformationExtraArgs]
  description: str


ALGORITHMS: dict[str, AlgorithmSpec] = {
  spec.name: spec
  for spec in (
    AlgorithmSpec(
      "erm", lambda base, hp, **kw: erm(base, **kw), "ERM: the base optimizer on the mean of the domain losses"
    ),
    AlgorithmSpec(
      "sam",
      lambda base, hp, **kw: disam(base, hp.rho, 0.0, adaptive=hp.adaptive, **kw),
      "SAM (ASAM with --adaptive): DISAM with lam = 0",
    ),
    AlgorithmSpec(
      "disam",
      lambda base, hp, **kw: disam(base, hp.rho, hp.lam, adaptive=hp.adaptive, **kw),
      "DISAM: perturbation along grad(L - lam * Var_i L_i)",
    ),
  )
}


def make_optimizer(
    algorithm: str, hparams: HParams, *, num_domains: int, aux_example: Any = None
) -> optax.GradientTransformationExtraArgs:
  """The transformation of `algorithm` ('erm', 'sam', 'disam') with `hparams`' base optimizer inside.

  Args:
    algorithm: a key of `ALGORITHMS`.
    hparams: the run's `HParams`.
    num_domains: M training domains (fixes the state's shape).
    aux_example: the model state (BatchNorm statistics; possibly empty) returned as aux by `domain_loss_fn`.

  Returns:
    An `optax.GradientTransformationExtraArgs` built with `has_aux=True`, whose state is a `DisamState`.
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}.")
  hparams.validate()
  base_tx = base_optimizer(hparams.optimizer, hparams.lr, hparams.weight_decay)
  return ALGORITHMS[algorithm].build(
    base_tx, hparams, has_aux=True, aux_example=aux_example, num_domains=num_domains
  )
