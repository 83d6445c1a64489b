"""disam_jax: Domain-Inspired Sharpness-Aware Minimization (DISAM, arXiv 2405.18861) for JAX/Optax.

`disam(base_tx, rho, lam)` is an `optax.GradientTransformationExtraArgs`; its `update` takes
`domain_loss_fn=f` with `f(params) -> [M]` per-domain losses. See README.md.
"""

from disam_jax._accumulation import accumulate_domain_losses
from disam_jax._disam import DisamState
from disam_jax._disam import VarianceTrigger
from disam_jax._disam import disam
from disam_jax._disam import find_disam_state
from disam_jax._domain_losses import DomainLosses
from disam_jax._flax import apply_disam
from disam_jax._flax import nnx_optimizer
from disam_jax._flax import nnx_update
from disam_jax._domain_losses import domain_losses_from_grouped
from disam_jax._domain_losses import domain_losses_from_ids
from disam_jax._domain_losses import grouped_domain_loss_fn
from disam_jax._domain_losses import vmapped_domain_loss_fn

__version__ = '0.1.0'

__all__ = (
    'DisamState',
    'DomainLosses',
    'VarianceTrigger',
    'accumulate_domain_losses',
    'apply_disam',
    'disam',
    'domain_losses_from_grouped',
    'domain_losses_from_ids',
    'find_disam_state',
    'grouped_domain_loss_fn',
    'nnx_optimizer',
    'nnx_update',
    'vmapped_domain_loss_fn',
)
