"""disam_jax: Domain-Inspired Sharpness-Aware Minimization (DISAM, arXiv 2405.18861) for JAX/Optax.

`disam(base_tx, rho, lam)` is an `optax.GradientTransformationExtraArgs`; its `update` takes
`domain_loss_fn=f` with `f(params) -> [M]` per-domain losses. See README.md and the API reference (docs/api.md).

The public names are imported on first use (PEP 562): `import disam_jax` alone does not import JAX, Optax or Flax,
so `disam-train --help` and its usage errors answer at once; `disam_jax.disam` (or `from disam_jax import disam`)
imports them.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the private module defining it
_LAZY = {
  "DisamState": "disam_jax._disam",
  "DomainLosses": "disam_jax._domain_losses",
  "VarianceTrigger": "disam_jax._amortization",
  "accumulate_domain_losses": "disam_jax._accumulation",
  "apply_disam": "disam_jax._flax",
  "as_domain_losses": "disam_jax._domain_losses",
  "disam": "disam_jax._disam",
  "domain_losses_from_grouped": "disam_jax._domain_losses",
  "domain_losses_from_ids": "disam_jax._domain_losses",
  "domain_objective": "disam_jax._disam",
  "find_disam_state": "disam_jax._disam",
  "global_norm": "disam_jax._numerics",
  "grouped_domain_loss_fn": "disam_jax._domain_losses",
  "init_state": "disam_jax._disam",
  "nnx_optimizer": "disam_jax._flax",
  "nnx_update": "disam_jax._flax",
  "vmapped_domain_loss_fn": "disam_jax._domain_losses",
}

__all__ = (
  "DisamState",
  "DomainLosses",
  "VarianceTrigger",
  "accumulate_domain_losses",
  "apply_disam",
  "as_domain_losses",
  "disam",
  "domain_losses_from_grouped",
  "domain_losses_from_ids",
  "domain_objective",
  "find_disam_state",
  "global_norm",
  "grouped_domain_loss_fn",
  "init_state",
  "nnx_optimizer",
  "nnx_update",
  "vmapped_domain_loss_fn",
)

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time `__getattr__` imports these on first use
  from disam_jax._accumulation import accumulate_domain_losses
  from disam_jax._amortization import VarianceTrigger
  from disam_jax._disam import DisamState, disam, domain_objective, find_disam_state, init_state
  from disam_jax._domain_losses import (
    DomainLosses,
    as_domain_losses,
    domain_losses_from_grouped,
    domain_losses_from_ids,
    grouped_domain_loss_fn,
    vmapped_domain_loss_fn,
  )
  from disam_jax._flax import apply_disam, nnx_optimizer, nnx_update
  from disam_jax._numerics import global_norm


def __getattr__(name: str) -> object:
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(_importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
