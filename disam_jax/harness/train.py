"""Kept for existing imports (`from disam_jax.harness import train`: tests, examples, benchmarks, docs); the training
code lives in role files and is re-exported here unchanged:

* `steps.py`: the pure train/eval steps, `TrainState`, `init_train_state`, `predict`, `init_model`;
* `config.py`: `ExperimentConfig` and its validation;
* `loop.py`: `run_cell`, one (algorithm, held-out domain, seed) run, and its `CellResult`;
* `experiment.py`: the checks against the data, the run directory, resume and `run_experiment`.
"""

from __future__ import annotations

from disam_jax.harness.config import ExperimentConfig, default_model  # noqa: F401
from disam_jax.harness.experiment import (  # noqa: F401
  _cell_split,
  _check_pretrained,
  _trainable_mask,
  cell_directory,
  check_data,
  check_domains,
  fit_batch_size,
  harden_domain,
  load_cell_result,
  load_data,
  load_latest_state,
  new_run_directory,
  prepare,
  prepare_and_fit,
  run_experiment,
)
from disam_jax.harness.loop import CellResult, TrainingDiverged, _compile, run_cell, select_best  # noqa: F401
from disam_jax.harness.steps import (  # noqa: F401
  PenaltyAux,
  TrainState,
  init_model,
  init_train_state,
  make_eval_step,
  make_train_step,
  predict,
)

__all__ = [
  "CellResult",
  "ExperimentConfig",
  "TrainState",
  "TrainingDiverged",
  "harden_domain",
  "init_model",
  "make_eval_step",
  "make_train_step",
  "run_cell",
  "run_experiment",
  "load_latest_state",
  "select_best",
]
