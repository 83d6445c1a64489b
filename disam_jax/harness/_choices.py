"""The harness's names, one-line descriptions and hyperparameter defaults, importable without JAX.

`disam-train`'s parser (its choices, the defaults its --help shows) and `--list` read only this module, so --help,
a usage error and --list answer without importing JAX, Optax or Flax (`import disam_jax` is lazy too). It is the
single source of the names: `algorithms.RULES`, `PENALTIES`, `BASE_OPTIMIZERS` and `ALGORITHMS`, and
`data.DATASETS`, are built from the tables here and checked against them on import; `models.MODELS` is checked
against `MODELS` by tests/test_lazy_import.py. `HParams` and `default_hparams` live here (they need no JAX) and
are re-exported by `disam_jax.harness.algorithms`, where they are documented for users.

Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

__all__ = [
  "ALGORITHMS",
  "BASE_OPTIMIZERS",
  "DATASETS",
  "MODELS",
  "PENALTIES",
  "PERTURB_WHEN",
  "RULES",
  "HParams",
  "default_hparams",
  "ordered_like",
]


# ---------------------------------------------------------------------------------------------------------------------
# Names and descriptions
# ---------------------------------------------------------------------------------------------------------------------

# Base optimizers (`algorithms.base_optimizer`); 'sgd' has momentum 0.9.
BASE_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")

# Sharpness-aware rules: name -> one line (`algorithms.RULES` adds each one's builder).
RULES: dict[str, str] = {
  "erm": "ERM: the base optimizer on the mean of the domain losses",
  "sam": "SAM (Foret et al. 2021; ASAM with --adaptive): DISAM with lam = 0",
  "disam": "DISAM (Zhang et al. 2024): perturbation along grad(L - lam * Var_i L_i)",
  "gsam": "GSAM (Zhuang et al. 2022): g_adv - alpha * (part of grad L(w) orthogonal to g_adv)",
  "sagm": "SAGM (Wang et al. 2023): perturbed at w + (rho/|g| - alpha) g; update (g + g_adv) / 2",
  "disam_gsam": "DISAM on GSAM: GSAM with the ascent gradient grad(L - lam * Var_i L_i)",
  "disam_sagm": "DISAM on SAGM: SAGM with the ascent gradient grad(L - lam * Var_i L_i)",
}

# DomainBed penalties: name -> one line (`algorithms.PENALTIES` adds each one's constructor).
PENALTIES: dict[str, str] = {
  "coral": "CORAL (Sun & Saenko 2016): + coral_gamma * feature mean/covariance differences between domains",
  "vrex": "V-REx (Krueger et al. 2021): + vrex_lambda * Var_i L_i (weight 1 before the anneal step)",
  "fishr": "Fishr (Rame et al. 2022): + fishr_lambda * variance across domains of head-gradient variances",
}

_DISPLAY = {"sam": "SAM", "disam": "DISAM", "gsam": "GSAM", "sagm": "SAGM", "disam_gsam": "DISAM on GSAM",
            "disam_sagm": "DISAM on SAGM", "coral": "CORAL", "vrex": "V-REx", "fishr": "Fishr"}


def ordered_like(items: dict[str, Any], names, what: str) -> dict[str, Any]:
  """`items` keyed and ordered by `names` (one of the tables here): how a registry of builders takes its names from
  this module. AssertionError naming both sets when they differ (a name added to one side only)."""
  if set(items) != set(names):
    raise AssertionError(f"{what}: builders for {sorted(items)}, _choices names {sorted(names)}")
  return {name: items[name] for name in names}


def _algorithms():
  for rule, text in RULES.items():
    yield rule, (rule, None, text)
  for penalty, text in PENALTIES.items():
    yield penalty, ("erm", penalty, text)
  for penalty in PENALTIES:
    for rule in RULES:
      if rule != "erm":
        yield f"{rule}+{penalty}", (rule, penalty, f"{_DISPLAY[rule]} on {_DISPLAY[penalty]}'s training loss")


# Every algorithm name: name -> (rule, penalty or None, one line). A rule alone, a penalty alone (trained with ERM's
# rule) or RULE+PENALTY; `algorithms.ALGORITHMS` holds the same names, in this order, as `AlgorithmSpec`s.
ALGORITHMS: dict[str, tuple[str, Optional[str], str]] = dict(_algorithms())

# Registered datasets: name -> one line (`data.DATASETS` adds each one's loader, domains and classes).
DATASETS: dict[str, str] = {
  "rotated_digits": "scikit-learn's 1,797 8x8 digits in 6 rotation domains",
  "rotated_animals": "animal-mnist's 10,000 28x28 silhouettes in 6 rotation domains",
  "colored_digits": "scikit-learn's digits as DomainBed's ColoredMNIST: digit<5 with 25% label noise, a colour "
                    "agreeing with the label 90%/80%/10% (hold out agree10)",
  "pacs": "PACS (DomainBed layout)",
  "vlcs": "VLCS (DomainBed layout)",
  "office_home": "OfficeHome (DomainBed layout)",
  "terra_incognita": "TerraIncognita (DomainBed layout)",
  "domain_net": "DomainNet (DomainBed layout)",
  "image_folder": "any folder data_dir/<domain>/<class>/*.jpg, domains = subfolders",
}

# The names of `models.MODELS`, in its order.
MODELS: tuple[str, ...] = ("mlp", "mnist_cnn", "resnet18", "resnet50", "mobilenet_v2", "vit_tiny")

# Values of HParams.perturb_when besides None (--perturb-when).
PERTURB_WHEN: tuple[str, ...] = ("variance",)

# Values of HParams.batching (--batching): DomainBed's per-domain batches, or the released DISAM code's one stream.
BATCHINGS: tuple[str, ...] = ("balanced", "merged")


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
    batch_size: examples per training domain per step; with batching "merged", the step's batch is
      ``batch_size * M`` examples in all (M training domains), so both batchings see as many examples per step.
    batching: "balanced" (DomainBed: every training domain gives `batch_size` examples each step,
      `data.DomainBatchSampler`) or "merged" (the released DISAM code: one shuffled stream without replacement over
      all training domains together, `batch_size * M` examples per step, the domains present and their counts
      varying from step to step, `data.MergedBatchSampler`; DISAM's mean and variance are over the domains present).
    domain_weights: the weights `a_i` of the domains present in a batch in the loss `L = sum_i a_i L_i` (every
      rule) and DISAM's variance: "uniform" (`1/M'` over the M' present, the paper's) or "count" (`n_i / n`: `L` is
      the batch's mean cross-entropy, what the released DISAM code computes; `disam_jax.disam(domain_weights=)`).
      The two agree on balanced batches.
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
  batching: str = "balanced"
  domain_weights: str = "uniform"
  rho: float = 0.05
  lam: float = 0.1
  diagnostics: bool = False
  adaptive: bool = False
  alpha: Optional[float] = None
  perturb_every: int = 1
  reuse_weight: Optional[float] = None
  perturb_when: Optional[str] = None
  trigger_min_gap: int = 16
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
    if self.perturb_when is not None and self.perturb_when not in PERTURB_WHEN:
      raise ValueError(f"perturb_when must be None or {' or '.join(map(repr, PERTURB_WHEN))}; "
                       f"got {self.perturb_when!r}.")
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
    if self.batching not in BATCHINGS:
      raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}; got {self.batching!r}.")
    if self.domain_weights not in ("uniform", "count"):
      raise ValueError(f"domain_weights must be uniform or count; got {self.domain_weights!r}.")
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
  """DomainBed's defaults for `dataset` (see `disam_jax.harness.algorithms`), with `overrides` applied (None
  ignored)."""
  small = dataset in _SMALL_IMAGE_DATASETS or dataset.startswith("tfds:")
  base = HParams(lr=1e-3, batch_size=64) if small else HParams(lr=5e-5, batch_size=32)
  return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
