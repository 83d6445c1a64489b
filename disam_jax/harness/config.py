"""What an experiment trains: `ExperimentConfig` (the `config.json` of a run directory) and its validation.

Owns the configuration's fields, their JSON form, the checks that need no data (`ExperimentConfig.validate`) and the
default model of a dataset (`default_model`). The checks against the data are `experiment.prepare`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from disam_jax.harness._choices import HParams  # algorithms.HParams; this module imports no JAX until validate()

__all__ = ["ExperimentConfig", "default_model"]


# DomainBed uses ResNet-50 for the image folders; for the small rotated datasets it uses MNIST_CNN, which is about
# 60x slower per step than the MLP on a CPU (0.5 s vs 8 ms on 8x8 digits, 2 cores), so the CPU default is the MLP.
_DEFAULT_MODELS = {"rotated_digits": "mlp", "rotated_animals": "mlp", "colored_digits": "mlp"}


def default_model(dataset: str) -> str:
  return _DEFAULT_MODELS.get(dataset, "mlp" if dataset.startswith("tfds:") else "resnet50")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What `run_experiment` trains: every (algorithm, held-out domain, seed) combination.

  Attributes:
    dataset: a name of `data.DATASETS` or ``tfds:<name>``.
    data_dir: where image-folder / TFDS datasets live (None for the bundled ones).
    image_size: resize images to this side length (None: the dataset's default).
    cache_dir: where image folders are converted to TFDS (None: `data.default_cache_dir()`).
    model: a name of `models.MODELS`, or ``'package.module:factory'`` (the user's own model, `models.DomainModel`);
      None picks `default_model(dataset)`.
    model_kwargs: extra model options (e.g. ``{"width": 16}``, ``{"hidden": 128}``).
    precision: ``'float32'``, or ``'bf16'``: bfloat16 compute with float32 parameters, optimizer state, losses and
      statistics (`models.create_model`).
    pretrained: optional initial weights: a `.pth`/`.safetensors`/`.npz` path (see `models.load_pretrained`), or a
      bundled name (`weight_files.BUNDLED_WEIGHTS`: ``mobilenet_v2``), which construction replaces by its file's
      path (`weight_files.resolve_pretrained`, as ``disam-train --pretrained mobilenet_v2``; FileNotFoundError
      naming the install command when its package is missing), so config.json records the path.
    train_only: parameter-efficient fine-tuning: `peft` selectors (``head``, ``last_block``, ``norm``,
      ``adapters``, ``all``) or parameter-path prefixes; only those parameters train and are perturbed. None: all.
    algorithms: names from `algorithms.ALGORITHMS`.
    held_out: domains to hold out, one at a time (None: every domain).
    seeds: trial seeds; a seed fixes the rotation-domain assignment, the train/validation split, the model
      initialization and the batch stream, so all algorithms of one seed see the same data in the same order.
    steps: training steps per run.
    eval_every: evaluate (validation and held-out accuracy) and checkpoint every this many steps (and at the end).
    hparams: optimizer and algorithm hyperparameters (draw 0 of a search).
    hparams_samples: DomainBed's random search: this many hyperparameter draws per (algorithm, held-out domain,
      trial seed); draw 0 is `hparams`, draw k > 0 replaces the hyperparameters the algorithm uses that have a search
      distribution, except `fixed_hparams`, by their k-th draw (`search.draw`; `hparams_for`). 1: no search.
    fixed_hparams: names of `HParams` fields the search keeps at their value in `hparams` (the CLI: the
      hyperparameter flags given explicitly).
    leave_one_out: also train, per draw and trial seed, one run per pair of domains holding out both (for
      leave-one-domain-out validation, `tables.select`): the pairs that contain a held-out domain.
    holdout_fraction: fraction of each training domain kept for validation.
    hard_domain: optionally make one training domain harder (see `experiment.harden_domain`).
    hard_domain_fraction: keep this fraction of the hard domain's training examples.
    hard_domain_label_noise: replace this fraction of the hard domain's training labels by a random other class.
    imbalance: subsample the training domains to a largest/smallest size ratio (`regimes.imbalance`; 1: off).
    domain_label_noise: move this fraction of every training domain's examples to a random other training domain
      (`regimes.shuffle_domain_labels`).
    sub_domains: split every training domain into this many sub-domains (`regimes.split_domains`; 1: off).
    infer_domains: train on this many k-means pseudo-domains instead of the domain labels (`regimes.infer_domains`;
      0: off).
    eval_batch_size: examples per evaluation forward pass.
    augment: DomainBed's training augmentation on streamed image folders (`streaming.train_transform`: random
      resized crop, flip, colour jitter, grayscale); False trains on the evaluation transform (a resize). In-memory
      datasets (digits, animals) are never augmented, as in DomainBed.
    data_workers: grain worker processes that decode and augment streamed images (None: `streaming.default_workers`,
      the cores less one; 0: a prefetch thread of the training process). Does not change the batches.
  """

  dataset: str = "rotated_digits"
  data_dir: str | None = None
  image_size: int | None = None
  cache_dir: str | None = None
  model: str | None = None
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  precision: str = "float32"
  pretrained: str | None = None
  train_only: tuple[str, ...] | None = None
  algorithms: tuple[str, ...] = ("erm", "sam", "disam")
  held_out: tuple[str, ...] | None = None
  seeds: tuple[int, ...] = (0,)
  steps: int = 300
  eval_every: int = 50
  hparams: HParams = dataclasses.field(default_factory=HParams)
  hparams_samples: int = 1
  fixed_hparams: tuple[str, ...] = ()
  leave_one_out: bool = False
  holdout_fraction: float = 0.2
  hard_domain: str | None = None
  hard_domain_fraction: float = 1.0
  hard_domain_label_noise: float = 0.0
  imbalance: float = 1.0
  domain_label_noise: float = 0.0
  sub_domains: int = 1
  infer_domains: int = 0
  eval_batch_size: int = 512
  augment: bool = True
  data_workers: int | None = None

  def __post_init__(self):
    if self.pretrained is not None:
      from disam_jax.harness.weight_files import resolve_pretrained

      object.__setattr__(self, "pretrained", resolve_pretrained(self.pretrained))  # a bundled name -> its file

  @property
  def model_name(self) -> str:
    return self.model or default_model(self.dataset)

  def hparams_for(self, algorithm: str, sample: int, seed: int) -> HParams:
    """The hyperparameters of draw `sample` of trial seed `seed` for `algorithm` (`search.draw`; 0: `hparams`)."""
    from disam_jax.harness import search

    return search.draw(self.hparams, algorithm, self.dataset, sample, seed, self.steps, self.fixed_hparams)

  @property
  def model_options(self) -> dict[str, Any]:
    """The keyword arguments of `models.create_model`: `model_kwargs`, and `precision` unless float32."""
    return {**self.model_kwargs, **({} if self.precision == "float32" else {"precision": self.precision})}

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["model"] = self.model_name
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> ExperimentConfig:
    d = dict(d)
    d["hparams"] = HParams(**d.get("hparams", {}))
    for key in ("algorithms", "seeds", "fixed_hparams"):
      if key in d:
        d[key] = tuple(d[key])
    for key in ("held_out", "train_only"):
      if d.get(key) is not None:
        d[key] = tuple(d[key])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})

  def validate(self) -> None:
    """Checks what can be checked without data; raises ValueError with a message for the user."""
    from disam_jax.harness import algorithms as algorithms_lib
    from disam_jax.harness import data as data_lib
    from disam_jax.harness import models

    for name in self.algorithms:
      algorithms_lib.check_algorithm(name)
    if not self.algorithms:
      raise ValueError("No algorithm given; valid: " + ", ".join(algorithms_lib.ALGORITHMS) + ".")
    if len(set(self.algorithms)) != len(self.algorithms):
      raise ValueError(f"An algorithm is named twice: {list(self.algorithms)}.")
    models.resolve_model(self.model_name)  # a registry name or an importable package.module:factory
    if self.precision not in models.PRECISIONS or "precision" in self.model_kwargs:
      raise ValueError(
        f"precision must be one of {', '.join(models.PRECISIONS)} (--precision, not a model option); "
        f"got {self.model_kwargs.get('precision', self.precision)!r}."
      )
    if not self.dataset.startswith("tfds:") and self.dataset not in data_lib.DATASETS:
      raise ValueError(f"Unknown dataset {self.dataset!r}; valid: {', '.join(data_lib.DATASETS)}, or tfds:<name>.")
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"steps must be a positive integer; got {self.steps!r}.")
    if not isinstance(self.eval_every, int) or self.eval_every < 1:
      raise ValueError(f"eval_every must be a positive integer; got {self.eval_every!r}.")
    if not self.seeds:
      raise ValueError("No seed given.")
    if isinstance(self.hparams_samples, bool) or not isinstance(self.hparams_samples, int) or self.hparams_samples < 1:
      raise ValueError(f"hparams_samples must be an integer >= 1 (1: the defaults only); got {self.hparams_samples!r}.")
    unknown = sorted(set(self.fixed_hparams) - {f.name for f in dataclasses.fields(HParams)})
    if unknown:
      raise ValueError(f"fixed_hparams names no hyperparameter: {unknown}; valid: the fields of HParams.")
    if any(not isinstance(s, int) or s < 0 for s in self.seeds):
      raise ValueError(f"seeds must be integers >= 0; got {list(self.seeds)}.")
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"A seed is given twice: {list(self.seeds)}.")
    if not 0.0 < self.holdout_fraction < 1.0:
      raise ValueError(f"holdout_fraction must be in (0, 1); got {self.holdout_fraction}.")
    if not (0.0 < self.hard_domain_fraction <= 1.0):
      raise ValueError(f"hard_domain_fraction must be in (0, 1]; got {self.hard_domain_fraction}.")
    if not (0.0 <= self.hard_domain_label_noise <= 1.0):
      raise ValueError(f"hard_domain_label_noise must be in [0, 1]; got {self.hard_domain_label_noise}.")
    if self.hard_domain is None and (self.hard_domain_fraction != 1.0 or self.hard_domain_label_noise != 0.0):
      raise ValueError("hard_domain_fraction / hard_domain_label_noise need hard_domain (which domain to harden).")
    if not self.imbalance >= 1.0:
      raise ValueError(f"imbalance must be >= 1 (largest / smallest training domain); got {self.imbalance}.")
    if not 0.0 <= self.domain_label_noise <= 1.0:
      raise ValueError(f"domain_label_noise must be in [0, 1]; got {self.domain_label_noise}.")
    if not isinstance(self.sub_domains, int) or self.sub_domains < 1:
      raise ValueError(f"sub_domains must be a positive integer; got {self.sub_domains!r}.")
    if not isinstance(self.infer_domains, int) or self.infer_domains < 0 or self.infer_domains == 1:
      raise ValueError(f"infer_domains must be 0 (off) or >= 2; got {self.infer_domains!r}.")
    if self.infer_domains and (self.domain_label_noise or self.sub_domains != 1):
      raise ValueError(
        "infer_domains replaces the domain labels; it cannot be combined with domain_label_noise or sub_domains."
      )
    if self.eval_batch_size < 1:
      raise ValueError(f"eval_batch_size must be >= 1; got {self.eval_batch_size}.")
    if self.hparams.batching == "merged":
      grouped = [name for name in self.algorithms if algorithms_lib.make_penalty(name, self.hparams) is not None]
      if grouped:
        raise ValueError(
          f"{', '.join(grouped)}: a penalty needs per-domain batches [M, b]; drop --batching merged "
          "(the default --batching balanced) or train a rule alone (erm, sam, disam, ...)."
        )
    if self.data_workers is not None and self.data_workers < 0:
      raise ValueError(f"data_workers must be >= 0 (0: a prefetch thread, no worker process); got {self.data_workers}.")
    self.hparams.validate()
