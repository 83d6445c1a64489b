"""DomainBed's random hyperparameter search: draw `sample` of a trial seed, each hyperparameter from its own stream.

DomainBed (`hparams_registry.random_hparams`) seeds one `RandomState` per hyperparameter with a hash of
``(seed_hash(hparams_seed, trial_seed), name)``, so adding a hyperparameter to the registry does not change any other
one's draws. Here each hyperparameter's value for (sample, trial seed) comes from
``numpy.random.default_rng([_name_key(name), sample, trial_seed])`` — the same property, and a value that depends on
nothing else: not on the algorithm, not on the other hyperparameters, not on how many samples the search has. So
ERM, SAM and DISAM of one sample share their learning rate and batch size (a paired comparison), and growing
``--hparams-samples`` adds draws without changing the earlier ones.

Sample 0 is the defaults (DomainBed's ``hparams_seed 0``). A hyperparameter is drawn for an algorithm only if the
algorithm uses it (its declaration's ``used_by``; `_choices.Hyperparameter.used`), has a search distribution for the
dataset's kind, and was not fixed by the user (``ExperimentConfig.fixed_hparams``: the flags given explicitly).

Imports only NumPy (no JAX).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from disam_jax.harness._choices import HParams, dataset_kind, declarations

__all__ = ["draw", "searched"]


def _name_key(name: str) -> int:
  """A stable 64-bit integer of a hyperparameter's name (Python's `hash` of a str changes between processes)."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def searched(algorithm: str, dataset: str, fixed: Iterable[str] = ()) -> tuple[str, ...]:
  """The hyperparameters a search draws for `algorithm` on `dataset`, in `HParams`' order."""
  kind, fixed = dataset_kind(dataset), set(fixed)
  return tuple(
    name
    for name, d in declarations().items()
    if d.search_for(kind) is not None and d.used(algorithm) and name not in fixed
  )


def draw(
  base: HParams, algorithm: str, dataset: str, sample: int, trial_seed: int, steps: int, fixed: Iterable[str] = ()
) -> HParams:
  """`base` with the searched hyperparameters (`searched`) replaced by draw `sample` of `trial_seed`.

  Args:
    base: the run's hyperparameters (the defaults and the user's fixed values); returned unchanged for sample 0.
    algorithm: a name of `ALGORITHMS`: which hyperparameters are drawn.
    dataset: its kind (`dataset_kind`) chooses the distributions.
    sample: the draw, >= 0 (0: `base`).
    trial_seed: the trial seed (``--seeds``).
    steps: the run's length (anneal steps are drawn as DomainBed's fraction of its 5000 steps).
    fixed: names the user set explicitly: never drawn.
  """
  if sample < 0:
    raise ValueError(f"sample must be >= 0; got {sample}.")
  if sample == 0:
    return base
  kind, decl = dataset_kind(dataset), declarations()
  values: dict[str, Any] = {}
  for name in searched(algorithm, dataset, fixed):
    rng = np.random.default_rng([_name_key(name), sample, trial_seed])
    values[name] = decl[name].search_for(kind).draw(rng, steps)
  return dataclasses.replace(base, **values)
