"""The experiment: every (algorithm, held-out domain, seed) combination of an `ExperimentConfig`, in a run directory.

Owns the checks of a configuration against its data and weights before anything is written (`prepare`,
`prepare_and_fit`: domains, batch size, model options, `--train-only`, a pretrained file), each run's split of the
data (`harden_domain` and the regimes), the run directory's layout (`cell_directory`, `new_run_directory`), resuming
(finished runs loaded, interrupted ones continued: `load_cell_result`, `load_latest_state`) and `run_experiment`,
which trains each run with `loop.run_cell` and collects the results that `report.write_report` turns into tables
and plots.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from disam_jax.harness import data as data_lib
from disam_jax.harness import distributed, regimes
from disam_jax.harness import tensorboard as tensorboard_lib
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.loop import CellResult, _compile, run_cell
from disam_jax.harness.steps import TrainState, _model_initializer, init_model
from disam_jax.harness.tables import write_results

__all__ = [
  "cell_directory",
  "check_data",
  "check_domains",
  "fit_batch_size",
  "harden_domain",
  "load_cell_result",
  "load_data",
  "held_out_parts",
  "held_out_sets",
  "load_latest_state",
  "new_run_directory",
  "planned_runs",
  "prepare",
  "prepare_and_fit",
  "run_experiment",
]


# Notices of a resumed run (an unreadable result.json), under the name `disam-train` prints them from.
_log = logging.getLogger("disam_jax.harness.train")


def harden_domain(
  split: data_lib.DomainSplit,
  domain: str,
  *,
  fraction: float = 1.0,
  label_noise: float = 0.0,
  num_classes: int,
  seed: int,
) -> data_lib.DomainSplit:
  """Makes one training domain harder: fewer training examples and/or noisy training labels.

  Only the training part changes; its validation part and the held-out domains are untouched, so accuracies stay
  comparable. If `domain` is held out in this split, the split is returned unchanged.

  Args:
    split: the split to modify.
    domain: name of the training domain to harden.
    fraction: keep a random `fraction` of its training examples (at least one).
    label_noise: replace a random `label_noise` fraction of its (kept) training labels by a uniformly drawn
      *different* class.
    num_classes: number of classes.
    seed: seeds both random choices.
  """
  if domain not in split.train_domains:
    return split
  i = split.train_domains.index(domain)
  x, y = split.train[i]
  rng = np.random.default_rng((seed, 7919, i))
  if fraction < 1.0:
    keep = np.sort(rng.permutation(len(x))[: max(1, int(round(len(x) * fraction)))])
    x, y = x[keep], y[keep]
  if label_noise > 0.0:
    y = y.copy()
    flip = rng.permutation(len(y))[: int(round(len(y) * label_noise))]
    y[flip] = (y[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
  train = list(split.train)
  train[i] = (x, y)
  return dataclasses.replace(split, train=tuple(train))


# The name of a held-out domain's 20% part (DomainBed's ``env{i}_out`` split of a test environment): test-domain
# validation ("oracle") selects on it. The held-out domain's own name is its other 80% (``env{i}_in``), on which every
# selection method's test accuracy is reported.
OUT_SUFFIX = " (20%)"


def held_out_parts(
  split: data_lib.DomainSplit, ds: data_lib.DomainDataset, holdout_fraction: float, seed: int
) -> data_lib.DomainSplit:
  """Splits each held-out domain as DomainBed splits every environment: the `holdout_fraction` part (named
  ``<domain> (20%)``) and the rest (named ``<domain>``).

  The shuffle is `data.split_dataset`'s for a training domain (a generator seeded with ``(seed, domain index)``), so a
  domain's 80% / 20% are the same examples whether it is held out or trained on (its training / validation parts),
  as in DomainBed, where the in/out split of an environment does not depend on which environments are tested.
  """
  domains, test = [], []
  for name, (x, y) in zip(split.test_domains, split.test):
    order = np.random.default_rng((seed, list(ds.domains).index(name))).permutation(len(x))
    n_out = int(len(x) * holdout_fraction)
    domains += [name, name + OUT_SUFFIX]
    test += [(x[order[n_out:]], y[order[n_out:]]), (x[order[:n_out]], y[order[:n_out]])]
  return dataclasses.replace(split, test_domains=tuple(domains), test=tuple(test))


def _cell_split(config: ExperimentConfig, ds: data_lib.DomainDataset, held_out, seed: int):
  """The split of one run: `held_out` (a domain, or a tuple of them) held out and split by `held_out_parts`."""
  split = data_lib.split_dataset(ds, held_out, holdout_fraction=config.holdout_fraction, seed=seed)
  split = held_out_parts(split, ds, config.holdout_fraction, seed)
  if config.hard_domain is not None:
    split = harden_domain(
      split,
      config.hard_domain,
      fraction=config.hard_domain_fraction,
      label_noise=config.hard_domain_label_noise,
      num_classes=ds.num_classes,
      seed=seed,
    )
  return regimes.apply_regimes(
    split,
    seed=seed,
    imbalance_ratio=config.imbalance,
    domain_label_noise=config.domain_label_noise,
    sub_domains=config.sub_domains,
    inferred_domains=config.infer_domains,
  )


def load_data(config: ExperimentConfig, seed: int) -> data_lib.DomainDataset:
  return data_lib.load_dataset(
    config.dataset, data_dir=config.data_dir, seed=seed, image_size=config.image_size, cache_dir=config.cache_dir
  )


def _seed_changes_domains(dataset: str) -> bool:
  """Image folders have fixed domains (loaded once for all seeds); anything else is reloaded per seed."""
  spec = data_lib.DATASETS.get(dataset)
  return not (spec is not None and (spec.folder is not None or dataset == "image_folder"))


def check_domains(config: ExperimentConfig, name: str, domains: Sequence[str]) -> tuple[str, ...]:
  """Validates the held-out and hard domains against the dataset's domain names; returns the held-out list."""
  held_out = tuple(domains) if config.held_out is None else tuple(config.held_out)
  for d in held_out:
    if d not in domains:
      raise ValueError(f"Held-out domain {d!r} does not exist in {name}; its domains are {list(domains)}.")
  if len(set(held_out)) != len(held_out):
    raise ValueError(f"A held-out domain is named twice: {list(held_out)}.")
  left = len(domains) - 1
  if left < 1 or (any(a.startswith("disam") for a in config.algorithms) and left < 2):
    raise ValueError(
      f"{name} has {len(domains)} domain(s) ({', '.join(domains)}), so holding one out leaves "
      + (
        "no training domain: leave-one-domain-out needs at least 2 domains"
        if left < 1
        else "one training domain: DISAM needs at least two (the variance of a single domain loss is "
        "0; that would be SAM)"
      )
      + "."
    )
  if config.leave_one_out and (left < 2 or (any(a.startswith("disam") for a in config.algorithms) and left < 3)):
    raise ValueError(
      f"{name} has {len(domains)} domain(s): leave-one-domain-out validation holds out two at a time, which leaves "
      f"{left - 1} training domain(s); it needs {'4 domains for DISAM' if left >= 2 else 'at least 3 domains'}. "
      "Drop --leave-one-domain-out."
    )
  if config.hard_domain is not None and config.hard_domain not in domains:
    raise ValueError(f"Hard domain {config.hard_domain!r} does not exist in {name}; its domains are {list(domains)}.")
  return held_out


def _smallest_training_domain(config: ExperimentConfig, ds: data_lib.DomainDataset, held_out: Sequence[str]):
  """`(examples, training domain, held-out domain)` of the smallest training part over every held-out choice."""
  sizes = []
  for d in held_out:
    split = _cell_split(config, ds, d, config.seeds[0])
    sizes += [(len(x), name, d) for name, (x, _) in zip(split.train_domains, split.train)]
  return min(sizes, key=lambda t: t[0])


def fit_batch_size(config: ExperimentConfig, ds: data_lib.DomainDataset) -> tuple[ExperimentConfig, str | None]:
  """Caps the per-domain batch size at the smallest training domain (for a default batch size, which must work
  for every documented setting, e.g. --hard-domain); returns the config and a notice saying so, or None."""
  size, name, held_out = _smallest_training_domain(config, ds, check_domains(config, ds.name, ds.domains))
  if config.hparams.batch_size <= size:
    return config, None
  notice = (
    f"batch size {size} per domain instead of the default {config.hparams.batch_size}: training domain "
    f"{name!r} has only {size} training examples (held-out domain {held_out!r}"
    + (", after --hard-domain-fraction" if name == config.hard_domain else "")
    + "). Pass --batch-size to choose it."
  )
  return dataclasses.replace(config, hparams=dataclasses.replace(config.hparams, batch_size=size)), notice


def check_data(config: ExperimentConfig, ds: data_lib.DomainDataset) -> tuple[str, ...]:
  """Validates the held-out domains, the hard domain and the batch size against `ds`; returns the held-out list."""
  held_out = check_domains(config, ds.name, ds.domains)
  if config.hparams.batching == "merged" and ds.streamed:
    raise ValueError(
      f"{ds.name} is streamed from an image folder: --batching merged needs an in-memory dataset; "
      "drop --batching merged (the default --batching balanced) for it."
    )
  size, name, d = _smallest_training_domain(config, ds, held_out)
  if config.hparams.batch_size > size:
    raise ValueError(
      f"batch size {config.hparams.batch_size} per domain is larger than training domain {name!r}, which has "
      f"{size} training examples (held-out domain {d!r}, {1 - config.holdout_fraction:.0%} of the domain"
      + (", after --hard-domain-fraction" if name == config.hard_domain else "")
      + f"). Use --batch-size {size} or less."
    )
  return held_out


def _safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def cell_directory(
  run_dir: str, algorithm: str, held_out: str, seed: int, sample: int = 0, val_domain: str | None = None
) -> str:
  """``cells/<algorithm>_heldout-<domain>[+<val domain>]_seed-<seed>[_hparams-<sample>]``: draw 0 of a run with one
  held-out domain keeps the name it had before the search existed."""
  held = _safe_name(held_out) + ("" if val_domain is None else "+" + _safe_name(val_domain))
  name = f"{_safe_name(algorithm)}_heldout-{held}_seed-{seed}" + (f"_hparams-{sample}" if sample else "")
  return os.path.join(run_dir, "cells", name)


def held_out_sets(config: ExperimentConfig, held_out: Sequence[str], domains: Sequence[str]) -> list[tuple[str, ...]]:
  """What each run holds out: every held-out domain alone, then (with `config.leave_one_out`) every pair of domains
  that contains a held-out domain, in the dataset's domain order (one run per pair serves both of its domains)."""
  sets = [(d,) for d in held_out]
  if config.leave_one_out:
    order = list(domains)
    pairs = {tuple(sorted((t, v), key=order.index)) for t in held_out for v in domains if v != t}
    sets += sorted(pairs, key=lambda p: (order.index(p[0]), order.index(p[1])))
  return sets


def planned_runs(config: ExperimentConfig, held_out: Sequence[str], domains: Sequence[str]) -> list[tuple]:
  """Every run of `config`, in training order: ``(seed, held-out set, sample, algorithm)``."""
  return [
    (seed, held, k, a)
    for seed in config.seeds
    for held in held_out_sets(config, held_out, domains)
    for k in range(config.hparams_samples)
    for a in config.algorithms
  ]


def load_cell_result(directory: str) -> CellResult | None:
  """The `result.json` of a finished run; None if there is none, or if it is unreadable (said on the log: a resumed
  experiment then rebuilds it from the run's latest checkpoint)."""
  path = os.path.join(directory, "result.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, errors="replace") as f:
      return CellResult(**json.load(f))
  except (OSError, ValueError, TypeError) as e:
    _log.warning(
      f"{path} is unreadable ({' '.join(str(e).split())[:120]}): rebuilding it from the run's latest checkpoint"
    )
    return None


def load_latest_state(directory: str, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
  """`(state, meta)` of a run's latest checkpoint; `template` is a fresh `TrainState` of the same configuration."""
  from disam_jax.harness.checkpoint import CheckpointStore

  with CheckpointStore(os.path.join(directory, "checkpoints")) as store:
    step = store.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {store.directory}.")
    return store.restore(step, template)


def new_run_directory(root: str = "runs") -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path, k = os.path.join(root, stamp), 1
  while os.path.exists(path):
    k += 1
    path = os.path.join(root, f"{stamp}-{k}")
  return path


def prepare(config: ExperimentConfig) -> tuple[data_lib.DomainDataset, tuple[str, ...]]:
  """Validates `config` and the data; returns the first seed's dataset and the held-out domains.

  Every problem a user can fix (unknown names, missing data, a held-out domain that does not exist, a batch larger
  than a domain, bad hyperparameters) is raised here as ValueError / FileNotFoundError / ImportError, before any
  training starts; everything that can be checked without the data (including the domain names, and an image
  folder's layout) before the data is loaded or converted.
  """
  return prepare_and_fit(config)[1]


def prepare_and_fit(config: ExperimentConfig, *, fit_batch: bool = False):
  """`prepare`, optionally fitting a default batch size to the data (`fit_batch_size`).

  Returns:
    `(config, (dataset, held_out), notice)`: the config (with the batch size used), `prepare`'s result, and the
    notice of `fit_batch_size` (None when nothing changed).
  """
  config.validate()
  if config.pretrained is not None and not os.path.isfile(config.pretrained):
    raise FileNotFoundError(
      f"No pretrained weights file at {config.pretrained!r} (.pth, .safetensors or .npz; see docs/harness.md)."
    )
  check_domains(config, config.dataset, data_lib.dataset_domains(config.dataset, config.data_dir))
  ds = load_data(config, config.seeds[0])
  notice = None
  if fit_batch:
    config, notice = fit_batch_size(config, ds)
  held_out = check_data(config, ds)
  try:  # builds the model abstractly (shapes only): catches unknown or invalid --model-option values now
    graphdef, initialize = _model_initializer(
      config.model_name, ds.num_classes, tuple(ds.input_shape), config.model_options
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"Model {config.model_name!r} with options {config.model_kwargs}: {e}") from None
  key = jax.random.key(0)
  abstract = jax.eval_shape(initialize, key, key)
  _trainable_mask(config, graphdef, *abstract)  # checks --train-only now
  _check_pretrained(config, graphdef, *abstract)
  return config, (ds, held_out), notice


# Keys whose shapes may differ from a pretrained file's: the classifier (another number of classes) and the stem of a
# ResNet for small inputs, which cannot take torchvision's 7x7 ImageNet stem. They keep their initialization.
_MAY_DIFFER = ("classifier/", "backbone/conv1/kernel")


def _check_pretrained(config: ExperimentConfig, graphdef: Any, params: Any, model_state: Any) -> None:
  """Reads `config.pretrained` and matches it against the model's shapes (abstractly: nothing is computed), so a
  bad file stops the run before anything is written.

  Raises:
    ValueError: one line starting with the file's path: an unreadable, unsafe or crafted file
      (`weight_files.WeightFileError`), a torchvision file for a model without torchvision's layout, a file of
      which no weight fits the model, or one whose weights have other shapes than the model's anywhere but
      `_MAY_DIFFER` (a checkpoint of another model or other --model-option values).
  """
  if config.pretrained is None:
    return
  from flax import nnx

  from disam_jax.harness import models, weight_files

  path, module = config.pretrained, nnx.merge(graphdef, params, model_state)
  arrays = weight_files.read_weights(path)
  if models._is_torchvision_layout(arrays.keys()):
    head = getattr(module, "torchvision_head", None)
    if head is None:
      raise ValueError(
        f"{path}: a torchvision state dict, but model {config.model_name!r} has no torchvision "
        "counterpart (resnet18, resnet50 and mobilenet_v2 do)"
      )
    try:
      arrays = models.convert_torchvision(arrays, head=head)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
  shapes = {
    "/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))
  }
  common = sorted(arrays.keys() & shapes.keys())
  differ = [k for k in common if tuple(arrays[k].shape) != shapes[k]]
  wrong = [k for k in differ if not k.startswith(_MAY_DIFFER)]
  if wrong:
    k = wrong[0]
    raise ValueError(
      f"{path}: does not fit model {config.model_name!r} with options {config.model_kwargs}: {k} is "
      f"{tuple(arrays[k].shape)} in the file and {shapes[k]} in the model ({len(wrong)} weight(s) "
      "differ; only the classifier may). A checkpoint of another model or other --model-option values?"
    )
  if arrays and len(differ) == len(common):
    raise ValueError(
      f"{path}: none of its {len(arrays)} weights fits model {config.model_name!r} (file keys e.g. "
      f"{sorted(arrays)[:2]}, model keys e.g. {sorted(shapes)[:2]})"
    )


def _trainable_mask(config: ExperimentConfig, graphdef: Any, params: Any, model_state: Any) -> Any:
  """`peft.trainable_mask` of `config.train_only` (None: everything trains)."""
  if config.train_only is None:
    return None
  from flax import nnx

  from disam_jax.harness import peft

  return peft.trainable_mask(nnx.merge(graphdef, params, model_state), config.train_only)


def run_experiment(
  config: ExperimentConfig,
  run_dir: str,
  *,
  resume: bool = False,
  progress: bool = True,
  on_step: Callable[[str, str, int, int, dict[str, Any]], None] | None = None,
  prepared: tuple[data_lib.DomainDataset, tuple[str, ...]] | None = None,
  mesh: Any | None = None,
  tensorboard: bool = False,
) -> list[CellResult]:
  """Trains every (seed, held-out domain, algorithm) of `config` under `run_dir`; returns the results.

  Writes `run_dir/config.json` and, per run, `run_dir/cells/<algorithm>_heldout-<domain>_seed-<seed>/`. With
  `resume`, finished runs (a `result.json` for the same number of steps) are loaded instead of trained, and
  interrupted ones continue from their latest checkpoint. Results of finished runs are also written to
  `run_dir/results.json` after each run, so an interrupted experiment still reports what it finished.

  Args:
    config: what to train.
    run_dir: the run directory.
    resume: continue a previous call on the same `run_dir`.
    progress: show a tqdm progress bar over all steps of all runs (on stderr).
    on_step: called after every step as `on_step(algorithm, held_out, seed, step, metrics)`.
    prepared: `prepare(config)`'s result, if already computed.
    mesh: train data-parallel over this mesh (see `run_cell`); only process 0 writes files and shows progress.
    tensorboard: also write each run's metrics lines as TensorBoard scalars into its directory (`tensorboard.py`;
      needs `disam_jax[tensorboard]`, ImportError naming it before anything is written).
  """
  first_ds, held_out = prepared if prepared is not None else prepare(config)
  main_process = distributed.is_main_process()
  events = tensorboard and main_process
  if events:
    tensorboard_lib.require()
  _start_run_directory(run_dir, config, first_ds, main_process)
  results: list[CellResult] = []
  plan = planned_runs(config, held_out, first_ds.domains)
  bar = _Progress(progress and main_process, len(plan) * config.steps)
  try:
    for seed in config.seeds:
      if seed != config.seeds[0] and _seed_changes_domains(config.dataset):
        ds = load_data(config, seed)
      else:
        ds = first_ds
      init = None
      for held in held_out_sets(config, held_out, first_ds.domains):
        split = _cell_split(config, ds, held, seed)
        d, v = held[0], (held[1] if len(held) > 1 else None)
        for sample in range(config.hparams_samples):
          for algorithm in config.algorithms:
            cell_config, searched = _draw(config, algorithm, sample, seed, split)
            directory = cell_directory(run_dir, algorithm, d, seed, sample, v)
            identity = {"sample": sample, "val_domain": v, "hparams": searched}
            done = load_cell_result(directory) if resume else None
            if done is not None and done.steps == config.steps:
              results.append(dataclasses.replace(done, **identity))
              if events:
                tensorboard_lib.write_cell(directory)
              bar.update(config.steps)
              continue
            if init is None:
              init = _initialize(config, ds, seed, mesh)
            graphdef, state0, mask = init
            compiled = _compile(cell_config, graphdef, state0[1], len(split.train), mask)
            bar.start_run(algorithm, _label(held, sample), seed, directory if resume else None)
            with tensorboard_lib.cell_events(directory, events) as written:
              result = run_cell(
                cell_config,
                algorithm,
                split,
                seed,
                state0,
                compiled,
                directory,
                resume=resume,
                on_step=written(bar.step_hook(on_step, algorithm, d, seed)),
                mesh=mesh,
              )
            result = dataclasses.replace(result, **identity)
            results.append(result)
            if main_process:
              from disam_jax.harness.checkpoint import write_json

              write_json(os.path.join(directory, "result.json"), result.to_json())  # with the draw it ran
              write_results(run_dir, results, config)
  finally:
    bar.close()
  return results


def _label(held: Sequence[str], sample: int) -> str:
  """The progress bar's name of a run's held-out domains and draw."""
  return "+".join(held) + (f" draw {sample}" if sample else "")


def _draw(
  config: ExperimentConfig, algorithm: str, sample: int, seed: int, split: data_lib.DomainSplit
) -> tuple[ExperimentConfig, dict[str, Any] | None]:
  """`(config of one run, its searched values)`: `config` with draw `sample` of `seed`'s hyperparameters for
  `algorithm` (`ExperimentConfig.hparams_for`) and only that algorithm; None for the values without a search.

  A drawn batch size larger than the smallest training domain of `split` is lowered to its size (DomainBed draws up
  to 512 per domain for small images; our digits domains have 240 training examples); the recorded value is the one
  used."""
  from disam_jax.harness import search

  hparams = config.hparams_for(algorithm, sample, seed)
  if sample and "batch_size" not in config.fixed_hparams:
    hparams = dataclasses.replace(hparams, batch_size=min(hparams.batch_size, min(len(y) for _, y in split.train)))
  values = None
  if config.hparams_samples > 1:
    values = {name: getattr(hparams, name) for name in search.searched(algorithm, config.dataset, config.fixed_hparams)}
  return dataclasses.replace(config, hparams=hparams, algorithms=(algorithm,)), values


def _start_run_directory(
  run_dir: str, config: ExperimentConfig, ds: data_lib.DomainDataset, main_process: bool
) -> None:
  """Creates `run_dir`; on process 0 writes its config.json, data.json and (unless there is one) an empty
  results.json."""
  os.makedirs(run_dir, exist_ok=True)
  if main_process:
    from disam_jax.harness.checkpoint import write_json

    write_json(os.path.join(run_dir, "config.json"), config.to_json())
    write_json(os.path.join(run_dir, "data.json"), data_lib.describe(ds))  # the data warnings, for the report
    if not os.path.exists(os.path.join(run_dir, "results.json")):  # a report works (all runs missing) from now on
      write_results(run_dir, [], config)


def _initialize(
  config: ExperimentConfig, ds: data_lib.DomainDataset, seed: int, mesh: Any | None = None
) -> tuple[Any, tuple[Any, Any], Any]:
  """`(graphdef, (params, model_state), trainable mask)`: a seed's initial model, shared by its runs. With a `mesh`,
  the model is created in its target shardings (`init_model`'s `mesh`)."""
  graphdef, params, model_state = init_model(
    config.model_name,
    num_classes=ds.num_classes,
    input_shape=ds.input_shape,
    seed=seed,
    model_kwargs=config.model_options,
    pretrained=config.pretrained,
    mesh=mesh,
  )
  return graphdef, (params, model_state), _trainable_mask(config, graphdef, params, model_state)


class _Progress:
  """The tqdm progress bar over every step of every run (on stderr), or nothing when not `shown`."""

  def __init__(self, shown: bool, total: int):
    self._bar = None
    if shown:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, smoothing=0.05)

  def update(self, steps: int) -> None:
    """Counts `steps` done earlier (a finished or resumed run) without timing them: tqdm's rate is a moving
    average of its `update` calls, so an update by thousands of steps showed thousands of steps per second."""
    if self._bar is not None and steps:
      self._bar.n += steps
      self._bar.last_print_n = self._bar.n
      self._bar.refresh()

  def start_run(self, algorithm: str, held_out: str, seed: int, resumed: str | None) -> None:
    """A run starts; `resumed`: its directory when resuming (the steps it has done already count, and are said)."""
    if self._bar is not None:
      self._bar.set_description(f"{algorithm} held-out {held_out} seed {seed}")
      self._bar.set_postfix(refresh=False)
      done = _resumed_steps(resumed) if resumed is not None else 0
      if done:
        self._bar.write(f"resuming {algorithm} held-out {held_out} seed {seed} from step {done}", file=sys.stderr)
      self.update(done)

  def step_hook(self, on_step, algorithm: str, held_out: str, seed: int) -> Callable[[int, dict[str, Any]], None]:
    """`run_cell`'s `on_step`: advances the bar (the loss every 10 steps), then calls the caller's `on_step`."""

    def step_hook(step, line):
      if self._bar is not None:
        self._bar.update(1)
        if "loss" in line and step % 10 == 0:
          self._bar.set_postfix(loss=f"{line['loss']:.3f}", refresh=False)
      if on_step is not None:
        on_step(algorithm, held_out, seed, step, line)

    return step_hook

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _resumed_steps(directory: str) -> int:
  """Steps already done by an interrupted run (its latest checkpoint), for the progress bar."""
  root = os.path.join(directory, "checkpoints")
  if not os.path.isdir(root):
    return 0
  steps = [int(n) for n in os.listdir(root) if n.isdigit()]
  return max(steps, default=0)
