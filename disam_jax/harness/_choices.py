"""The harness's names, one-line descriptions and hyperparameter defaults, importable without JAX.

`disam-train`'s parser (its choices, the defaults its --help shows) and `--list` read only this module, so --help,
a usage error and --list answer without importing JAX, Optax or Flax (`import disam_jax` is lazy too). It is the
single source of the names: `algorithms.RULES`, `PENALTIES`, `BASE_OPTIMIZERS` and `ALGORITHMS`, and
`data.DATASETS`, are built from the tables here and checked against them on import; `models.MODELS` is checked
against `MODELS` by tests/test_lazy_import.py. `HParams` and `default_hparams` live here (they need no JAX) and
are re-exported by `disam_jax.harness.algorithms`, where they are documented for users. Each hyperparameter is
declared once, as an `HParams` field made by `hparam` (`Hyperparameter`: type, default per dataset kind, random-search
distribution, which algorithms use it, flag, help): the CLI's flags, the defaults, the search (`search.py`) and the
table in docs/harness.md (`hparams_markdown`) are derived from the declarations.

Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
  "ALGORITHMS",
  "BASE_OPTIMIZERS",
  "DATASETS",
  "MODELS",
  "PENALTIES",
  "PERTURB_WHEN",
  "RULES",
  "Choice",
  "HParams",
  "Hyperparameter",
  "LogUniform",
  "Uniform",
  "dataset_kind",
  "declarations",
  "default_hparams",
  "hparams_markdown",
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

_DISPLAY = {
  "sam": "SAM",
  "disam": "DISAM",
  "gsam": "GSAM",
  "sagm": "SAGM",
  "disam_gsam": "DISAM on GSAM",
  "disam_sagm": "DISAM on SAGM",
  "coral": "CORAL",
  "vrex": "V-REx",
  "fishr": "Fishr",
}


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
ALGORITHMS: dict[str, tuple[str, str | None, str]] = dict(_algorithms())

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

# Values of HParams.domain_weights (--domain-weights): the weights a_i of the domains present in a batch.
DOMAIN_WEIGHTS: tuple[str, ...] = ("uniform", "count")


# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------------------------


# One declaration per hyperparameter: `hparam(...)` below, as the metadata of its `HParams` field. The CLI's flags
# (`cli.py`), the defaults per dataset kind (`default_hparams`), config.json (`HParams` is its "hparams"), the
# --resume check, the random search (`search.py`) and the table in docs/harness.md (`hparams_markdown`) are all
# derived from these declarations: adding a hyperparameter is one field here (and its use where it acts).

# DomainBed's hparams_registry: SMALL_IMAGES get other defaults and search ranges than the image folders.
_SMALL_IMAGE_DATASETS = ("rotated_digits", "rotated_animals", "colored_digits")


def dataset_kind(dataset: str) -> str:
  """ "small" for DomainBed's SMALL_IMAGES (our rotated and coloured digits, animals, tfds:), else "large"."""
  return "small" if dataset in _SMALL_IMAGE_DATASETS or dataset.startswith("tfds:") else "large"


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """``base ** U(lo, hi)``, as DomainBed's ``lambda r: 10**r.uniform(lo, hi)``; `integer`: rounded down (DomainBed's
  ``int(...)``); `per_steps`: scaled by ``steps / per_steps`` (anneal steps DomainBed draws for 5000-step runs)."""

  lo: float
  hi: float
  base: float = 10.0
  integer: bool = False
  per_steps: int | None = None

  def draw(self, rng: Any, steps: int) -> Any:
    """One value from `rng` (a `numpy.random.Generator`: one ``uniform`` call)."""
    value = self.base ** float(rng.uniform(self.lo, self.hi))
    return _finish(value, self.integer, self.per_steps, steps)

  def bounds(self, steps: int) -> tuple[float, float]:
    lo, hi = self.base**self.lo, self.base**self.hi
    return _finish(lo, self.integer, self.per_steps, steps), _finish(hi, self.integer, self.per_steps, steps)

  def describe(self) -> str:
    text = f"{self.base:g}^U({self.lo:g}, {self.hi:g})"
    return _described(text, self.integer, self.per_steps)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """``U(lo, hi)``; `integer` and `per_steps` as in `LogUniform`."""

  lo: float
  hi: float
  integer: bool = False
  per_steps: int | None = None

  def draw(self, rng: Any, steps: int) -> Any:
    return _finish(float(rng.uniform(self.lo, self.hi)), self.integer, self.per_steps, steps)

  def bounds(self, steps: int) -> tuple[float, float]:
    return (
      _finish(self.lo, self.integer, self.per_steps, steps),
      _finish(self.hi, self.integer, self.per_steps, steps),
    )

  def describe(self) -> str:
    return _described(f"U({self.lo:g}, {self.hi:g})", self.integer, self.per_steps)


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values`, uniformly (DomainBed's ``r.choice([...])``)."""

  values: tuple

  def draw(self, rng: Any, steps: int) -> Any:
    return self.values[int(rng.integers(len(self.values)))]

  def describe(self) -> str:
    return "one of " + ", ".join(map(str, self.values))


Distribution = Any  # LogUniform | Uniform | Choice


def _finish(value: float, integer: bool, per_steps: int | None, steps: int) -> Any:
  if per_steps is not None:
    value = value * steps / per_steps
  return int(value) if integer else float(value)


def _described(text: str, integer: bool, per_steps: int | None) -> str:
  if per_steps is not None:
    text = f"{text} x steps/{per_steps}"
  return f"int({text})" if integer else text


# "The same as for small images": a declaration's `large` / `search_large` when DomainBed does not distinguish.
_SAME = "same as small images"


# Which algorithms use a hyperparameter (only those are drawn for them; the others keep their values).
_USERS = {
  "all": lambda rule, penalty: True,
  "sharpness": lambda rule, penalty: rule != "erm",
  "disam": lambda rule, penalty: rule.startswith("disam"),
  "gsam_sagm": lambda rule, penalty: rule.endswith(("gsam", "sagm")),
  "coral": lambda rule, penalty: penalty == "coral",
  "vrex": lambda rule, penalty: penalty == "vrex",
  "fishr": lambda rule, penalty: penalty == "fishr",
}


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """The declaration of one `HParams` field.

  Attributes:
    name: the field's name (filled in from the field).
    type: float, int, bool or str: what the flag parses (bool: a switch).
    default: the default (for "large" datasets too unless `large` is given).
    help: one line for --help and the docs (the default is appended).
    large: the default for DomainBed's non-SMALL_IMAGES datasets (image folders); `_SAME` (unset): `default`.
    search: the random-search distribution (None: not searched, keeps its value in every draw).
    search_large: the distribution for "large" datasets; `_SAME` (unset): `search`.
    used_by: which algorithms use it (a key of `_USERS`): only those draw it.
    flag: the command-line spelling (None: set by another flag, `--trigger-gaps`); default ``--name-with-dashes``.
    metavar, choices, nargs: as argparse's.
    default_text: what --help and the docs say for the default instead of its value (e.g. "10% of --steps").
    group: the --help group: "training" or "penalties".
    source: where the default and the distribution come from.
  """

  type: type
  default: Any
  help: str
  large: Any = _SAME
  search: Distribution | None = None
  search_large: Any = _SAME
  used_by: str = "all"
  flag: Any = ""
  metavar: Any | None = None
  choices: tuple = ()
  nargs: int | None = None
  default_text: str | None = None
  group: str = "training"
  source: str = ""
  name: str = ""

  def default_for(self, kind: str) -> Any:
    return self.default if kind == "small" or self.large == _SAME else self.large

  def search_for(self, kind: str) -> Distribution | None:
    return self.search if kind == "small" or self.search_large == _SAME else self.search_large

  def used(self, algorithm: str) -> bool:
    rule, penalty, _ = ALGORITHMS[algorithm]
    return _USERS[self.used_by](rule, penalty)

  @property
  def option(self) -> str | None:
    """The command-line flag (None when another flag sets it)."""
    if self.flag is None:
      return None
    return self.flag or "--" + self.name.replace("_", "-")

  def default_description(self) -> str:
    if self.default_text is not None:
      return self.default_text
    if self.large != _SAME and self.large != self.default:
      return (
        f"{self.default:g} small images, {self.large:g} image folders"
        if self.type in (int, float)
        else f"{self.default} small images, {self.large} image folders"
      )
    return "off" if self.type is bool and not self.default else str(self.default)

  def search_description(self) -> str:
    small, large = self.search_for("small"), self.search_for("large")
    if small is None and large is None:
      return "–"
    if small == large:
      return small.describe()
    return (
      f"{small.describe() if small else 'not searched'} small images, "
      f"{large.describe() if large else 'not searched'} image folders"
    )


def hparam(type: type, default: Any, help: str, **kwargs: Any) -> Any:
  """An `HParams` field declared with `Hyperparameter(type, default, help, **kwargs)` as its metadata."""
  return dataclasses.field(default=default, metadata={"hparam": Hyperparameter(type, default, help, **kwargs)})


@dataclasses.dataclass(frozen=True)
class HParams:
  """Hyperparameters of one training run: one field per hyperparameter, each declared with `hparam` (its type,
  default per dataset kind, random-search distribution, flag and help: `declarations()`; the table of them all is
  `hparams_markdown()`, in docs/harness.md "Hyperparameters").

  A few meanings in full: ``weight_decay`` is inside the base optimizer: L2 added to the gradient for 'sgd' and
  'adam' (PyTorch's ``weight_decay``), decoupled for 'adamw'. ``perturb_every`` / ``perturb_when`` amortize the
  sharpness-aware rules (`disam_jax.disam(..., perturb_every=k)`, LookSAM-style, and
  ``perturb_when=disam_jax.VarianceTrigger(trigger_min_gap, trigger_max_gap, trigger_factor, trigger_decay)``);
  ``reuse_weight`` weighs the gradient component reused in between (None: the core's 0). The anneal steps left None
  are set by `for_run` to DomainBed's fraction of the run.
  """

  optimizer: str = hparam(
    str,
    "adam",
    "base optimizer: " + ", ".join(BASE_OPTIMIZERS) + " (sgd with momentum 0.9; checked by HParams.validate)",
    metavar="NAME",
    source="DomainBed: Adam",
  )
  lr: float = hparam(
    float,
    1e-3,
    "learning rate",
    large=5e-5,
    search=LogUniform(-4.5, -2.5),
    search_large=LogUniform(-5, -3.5),
    metavar="LR",
    source="DomainBed hparams_registry",
  )
  weight_decay: float = hparam(
    float,
    0.0,
    "weight decay inside the base optimizer: L2 for sgd/adam, decoupled for adamw",
    search=None,
    search_large=LogUniform(-6, -2),
    metavar="WD",
    source="DomainBed hparams_registry",
  )
  batch_size: int = hparam(
    int,
    64,
    "examples per training domain per step (a default, or a draw, larger than the "
    "smallest training domain is lowered to its size, with a notice)",
    large=32,
    search=LogUniform(3, 9, base=2, integer=True),
    search_large=LogUniform(3, 5.5, base=2, integer=True),
    metavar="B",
    source="DomainBed hparams_registry",
  )
  batching: str = hparam(
    str,
    "balanced",
    "balanced: every training domain gives --batch-size examples per step "
    "(DomainBed, data.DomainBatchSampler); merged: one shuffled stream without replacement over "
    "all training domains, --batch-size x M examples per step, as the released DISAM code "
    "(data.MergedBatchSampler; in-memory datasets, no penalties)",
    choices=BATCHINGS,
    metavar="MODE",
    source="ours (merged: the released DISAM code)",
  )
  domain_weights: str = hparam(
    str,
    "uniform",
    "weights of the domains present in a batch in the loss (every rule) "
    "and DISAM's variance: uniform (the paper's) or count (the batch mean, as the "
    "released DISAM code); they differ only with --batching merged",
    choices=DOMAIN_WEIGHTS,
    metavar="W",
    source="DISAM paper (uniform)",
  )
  rho: float = hparam(
    float,
    0.05,
    "SAM/DISAM perturbation radius",
    search=LogUniform(-2, -0.5),
    used_by="sharpness",
    metavar="RHO",
    source="DISAM paper (default); search range ours",
  )
  lam: float = hparam(
    float,
    0.1,
    "DISAM's weight of the domain-loss variance",
    search=LogUniform(-2, 0),
    used_by="disam",
    metavar="LAM",
    source="DISAM paper (default); search range ours",
  )
  diagnostics: bool = hparam(
    bool,
    False,
    "for DISAM, also log the cosine between its perturbation direction and "
    "SAM's every step (mechanism.png; one extra backward pass per DISAM step)",
  )
  adaptive: bool = hparam(
    bool, False, "adaptive (ASAM) perturbation for every sharpness-aware rule (sam --adaptive is ASAM)"
  )
  alpha: float | None = hparam(
    float,
    None,
    "GSAM's / SAGM's alpha",
    used_by="gsam_sagm",
    metavar="ALPHA",
    default_text="the rule's published default",
  )
  perturb_every: int = hparam(
    int,
    1,
    "amortized sharpness-aware rules: the full two-pass step every K steps, one "
    "pass reusing its gradient component in between (LookSAM-style; ERM unaffected; 1: "
    "every step)",
    used_by="sharpness",
    metavar="K",
  )
  reuse_weight: float | None = hparam(
    float,
    None,
    "with --perturb-every K > 1 or --perturb-when: weight of the "
    "reused gradient component in the steps in between (0: plain gradient "
    "steps; LookSAM: 0.7)",
    used_by="sharpness",
    metavar="W",
    default_text="0",
  )
  perturb_when: str | None = hparam(
    str,
    None,
    "amortized sharpness-aware rules: the full two-pass step when "
    "this step's domain-loss variance exceeds --trigger-factor x its running "
    "mean, within --trigger-gaps; one pass otherwise",
    used_by="sharpness",
    choices=PERTURB_WHEN,
    default_text="off",
  )
  trigger_min_gap: int = hparam(
    int,
    16,
    "with --perturb-when: at most one ascent per MIN steps, at least one per MAX",
    flag="--trigger-gaps",
    nargs=2,
    metavar=("MIN", "MAX"),
    default_text="16 32",
    used_by="sharpness",
  )
  trigger_max_gap: int = hparam(int, 32, "the MAX of --trigger-gaps", flag=None, used_by="sharpness")
  trigger_factor: float = hparam(
    float,
    1.0,
    "with --perturb-when: how far above its running mean the variance must be",
    metavar="F",
    used_by="sharpness",
  )
  trigger_decay: float = hparam(
    float, 0.9, "with --perturb-when: decay of the variance's running mean per step", metavar="D", used_by="sharpness"
  )
  coral_gamma: float = hparam(
    float,
    1.0,
    "CORAL's penalty weight, DomainBed's mmd_gamma",
    search=LogUniform(-1, 1),
    used_by="coral",
    metavar="G",
    group="penalties",
    source="DomainBed hparams_registry (mmd_gamma)",
  )
  vrex_lambda: float = hparam(
    float,
    10.0,
    "V-REx's penalty weight after the anneal step, 1 before",
    search=LogUniform(-1, 5),
    used_by="vrex",
    metavar="L",
    group="penalties",
    source="DomainBed hparams_registry",
  )
  vrex_anneal_steps: int | None = hparam(
    int,
    None,
    "V-REx's anneal step, where the base optimizer is also re-initialized",
    search=LogUniform(0, 4, integer=True, per_steps=5000),
    used_by="vrex",
    metavar="N",
    default_text="10% of --steps",
    group="penalties",
    source="DomainBed: 500 of 5000 steps; search scaled to --steps",
  )
  fishr_lambda: float = hparam(
    float,
    1000.0,
    "Fishr's penalty weight after the anneal step, 0 before",
    search=LogUniform(1, 4),
    used_by="fishr",
    metavar="L",
    group="penalties",
    source="DomainBed hparams_registry (Fishr)",
  )
  fishr_ema: float = hparam(
    float,
    0.95,
    "Fishr's moving-average factor",
    search=Uniform(0.90, 0.99),
    used_by="fishr",
    metavar="E",
    group="penalties",
    source="DomainBed hparams_registry",
  )
  fishr_anneal_steps: int | None = hparam(
    int,
    None,
    "Fishr's anneal step, where the base optimizer is also re-initialized (if > 0)",
    search=Uniform(0, 5000, integer=True, per_steps=5000),
    used_by="fishr",
    metavar="N",
    default_text="30% of --steps",
    group="penalties",
    source="DomainBed: 1500 of 5000 steps; search scaled to --steps",
  )

  def for_run(self, steps: int) -> HParams:
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
      raise ValueError(
        f"perturb_when must be None or {' or '.join(map(repr, PERTURB_WHEN))}; got {self.perturb_when!r}."
      )
    if self.perturb_when is not None and self.perturb_every != 1:
      raise ValueError(
        "perturb_every and perturb_when both choose which steps ascend: pass one of them "
        "(--perturb-every K or --perturb-when variance)."
      )
    for name in ("trigger_min_gap", "trigger_max_gap"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    if self.trigger_max_gap < self.trigger_min_gap:
      raise ValueError(f"trigger_min_gap ({self.trigger_min_gap}) must be <= trigger_max_gap ({self.trigger_max_gap}).")
    if not (math.isfinite(self.trigger_factor) and self.trigger_factor >= 0):
      raise ValueError(f"trigger_factor must be finite and >= 0; got {self.trigger_factor}.")
    if not 0 <= self.trigger_decay < 1:
      raise ValueError(f"trigger_decay must be in [0, 1); got {self.trigger_decay}.")
    if self.reuse_weight is not None:
      if self.perturb_every == 1 and self.perturb_when is None:
        raise ValueError(
          "reuse_weight weighs the gradient component reused between full steps: it needs "
          "perturb_every > 1 (--perturb-every K) or perturb_when (--perturb-when variance)."
        )
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
    if self.domain_weights not in DOMAIN_WEIGHTS:
      raise ValueError(f"domain_weights must be one of {', '.join(DOMAIN_WEIGHTS)}; got {self.domain_weights!r}.")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer (examples per domain); got {self.batch_size!r}.")


_VREX_ANNEAL_FRACTION = 500 / 5000  # DomainBed: vrex_penalty_anneal_iters 500 of its default 5000 steps
_FISHR_ANNEAL_FRACTION = 1500 / 5000  # DomainBed: penalty_anneal_iters 1500 of its default 5000 steps


def _fraction(value: int | None, fraction: float, steps: int) -> int:
  return int(round(fraction * steps)) if value is None else value


def declarations() -> dict[str, Hyperparameter]:
  """Every hyperparameter's declaration, by name, in `HParams`' order."""
  return {f.name: dataclasses.replace(f.metadata["hparam"], name=f.name) for f in dataclasses.fields(HParams)}


def default_hparams(dataset: str, **overrides: Any) -> HParams:
  """DomainBed's defaults for `dataset`'s kind (`dataset_kind`: each declaration's `default` or `large`), with
  `overrides` applied (None ignored)."""
  kind = dataset_kind(dataset)
  values = {name: d.default_for(kind) for name, d in declarations().items()}
  values.update({k: v for k, v in overrides.items() if v is not None})
  return HParams(**values)


def hparams_markdown() -> str:
  """The table of every hyperparameter (flag, default, random-search distribution, used by, meaning), generated
  from the declarations for docs/harness.md (tests/test_harness_search.py checks the docs hold it verbatim)."""
  from disam_jax.harness.tables import markdown_table

  rows = []
  users = {
    "all": "every algorithm",
    "sharpness": "sharpness-aware rules",
    "disam": "DISAM rules",
    "gsam_sagm": "GSAM, SAGM",
    "coral": "CORAL",
    "vrex": "V-REx",
    "fishr": "Fishr",
  }
  for name, d in declarations().items():
    flag = f"`{d.option}`" if d.option else "(with `--trigger-gaps`)"
    drawn = users[d.used_by] if d.search_description() != "–" else "–"
    rows.append([f"`{name}`", flag, d.default_description(), d.search_description(), drawn, d.help, d.source or "–"])
  return "\n".join(
    markdown_table(["Hyperparameter", "Flag", "Default", "Search distribution", "Drawn for", "Meaning", "Source"], rows)
  )
