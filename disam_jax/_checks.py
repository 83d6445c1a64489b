"""The checks of `disam`'s arguments and of what `domain_loss_fn` returns, each refusal saying what to write instead.

Everything here runs at construction, `init` or trace time (never inside the compiled step), so a mistake is
reported before any compute, and a check costs nothing per step.
"""

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disam_jax import _wrappers

_SCHEDULE_PROBES = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def concrete_float(value: Any) -> float | None:
  """`float(value)`, or None when value is traced (e.g. a hyperparameter of optax.inject_hyperparams under jit)."""
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:
    return None


def check_hyperparameter(name: str, value: optax.ScalarOrSchedule) -> None:
  """Rejects negative or non-finite rho/lam; probes schedules at a spread of step counts; skips traced values."""
  if callable(value):
    for step in _SCHEDULE_PROBES:
      with jax.ensure_compile_time_eval():  # concrete even when disam() is built under jit (inject_hyperparams)
        v = float(jnp.asarray(value(jnp.asarray(step, jnp.int32))))
      if not math.isfinite(v) or v < 0:
        raise ValueError(
          f"{name} schedule must give finite values >= 0; {name}({step}) = {v}. A negative rho flips the "
          "perturbation to descend the loss (a warmup that starts below 0 is the usual cause)."
        )
    return
  if isinstance(value, (jax.Array, np.ndarray)) and jnp.ndim(value):
    raise ValueError(f"{name} must be a scalar; got an array of shape {jnp.shape(value)}.")
  try:
    v = concrete_float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a float or an optax schedule; got {value!r}.") from None
  if v is not None and (not math.isfinite(v) or v < 0):
    raise ValueError(f"{name} must be finite and >= 0; got {name}={value!r}.")


def may_be_positive(value: optax.ScalarOrSchedule) -> bool | None:
  """Whether lam can be > 0: schedules at the probe steps; None when traced (unknown)."""
  if callable(value):
    with jax.ensure_compile_time_eval():
      return any(float(jnp.asarray(value(jnp.asarray(s, jnp.int32)))) > 0 for s in _SCHEDULE_PROBES)
  v = concrete_float(value)
  return None if v is None else v > 0


def static_positive_int(name: str, value: Any, sets: str, must_be: str = "an int >= 1") -> int:
  """`value` as a static Python int >= 1 (an int, numpy integer or concrete integer array), else a clear error."""
  try:
    n = operator.index(value)  # int, numpy integer, or a concrete integer array (inject_hyperparams' init)
  except jax.errors.TracerIntegerConversionError:
    raise ValueError(
      f"{name} must be static (it {sets}). With optax.inject_hyperparams, list it in "
      f"static_args: inject_hyperparams(disam, static_args=('base_tx', '{name}'))."
    ) from None
  except TypeError:
    n = None
  if n is None or isinstance(value, bool) or n < 1:
    raise ValueError(f"{name} must be {must_be}; got {value!r}.")
  return n


def static_num_domains(num_domains: Any) -> int | None:
  if num_domains is None:
    return None
  return static_positive_int("num_domains", num_domains, "sets the state's shape", "a positive int")


def checked_domain_weights(domain_weights: Any, num_domains: int | None) -> Any:
  """'uniform' / 'count', a traced array (inject_hyperparams under jit: checked at init), or a checked [M] array."""
  if isinstance(domain_weights, str):
    if domain_weights not in ("uniform", "count"):
      raise ValueError(f"domain_weights must be 'uniform', 'count' or a [M] array; got {domain_weights!r}.")
    return domain_weights
  if isinstance(domain_weights, jax.core.Tracer):
    return domain_weights
  weighting = np.asarray(domain_weights, np.float32)
  if weighting.ndim != 1 or not np.all(np.isfinite(weighting)) or np.any(weighting < 0):
    raise ValueError(f"domain_weights must be a vector of finite values >= 0; got {domain_weights!r}.")
  if not weighting.sum() > 0:
    raise ValueError("domain_weights must not be all zero.")
  if num_domains is not None and weighting.shape[0] != num_domains:
    raise ValueError(f"domain_weights has {weighting.shape[0]} entries but num_domains={num_domains}.")
  return jnp.asarray(weighting)


def check_call(
  updates: optax.Updates | None, params: optax.Params | None, domain_loss_fn: Callable[[optax.Params], Any] | None
) -> None:
  """What `update` was given: `domain_loss_fn` and all the params, no incoming updates (see `_wrappers`)."""
  if domain_loss_fn is None:
    raise ValueError(
      "disam needs the per-domain losses: call tx.update(None, state, params, domain_loss_fn=f) with "
      "f(params) -> [M] losses. (In optax.chain, pass domain_loss_fn to the chain's update.)"
    )
  if params is None:
    raise ValueError("disam needs params: call tx.update(None, state, params, domain_loss_fn=f).")
  _wrappers.check_params(params)
  _wrappers.check_updates(updates)


def evaluate(domain_loss_fn: Callable, params: optax.Params) -> Any:
  """`domain_loss_fn(params)`, turning Flax NNX's TraceContextError (a module's BatchNorm statistics mutated from
  inside DISAM's trace, e.g. `nnx.Optimizer(model, disam(...))`) into what to write instead."""
  try:
    return domain_loss_fn(params)
  except Exception as e:
    if type(e).__name__ == "TraceContextError" and type(e).__module__.startswith("flax"):
      raise ValueError(
        "domain_loss_fn mutated a Flax NNX variable (e.g. BatchNorm statistics) of a module that lives outside "
        "DISAM's trace, which Flax forbids (TraceContextError). With NNX, build the optimizer with "
        "disam_jax.nnx_optimizer(model, base_tx, rho, lam) and step with disam_jax.nnx_update(optimizer, model, "
        "loss_fn): each pass then runs on a fresh copy of the model, and the statistics of the unperturbed pass "
        "are written back."
      ) from e
    raise


def check_domain_count(
  m: int, num_domains: int | None, axes: tuple | None, lam: Any, lam_may_be_positive: bool | None
) -> None:
  if num_domains is not None and m != num_domains:
    raise ValueError(_wrong_domain_count(m, num_domains, axes))
  if m == 1 and lam_may_be_positive:
    raise ValueError(
      f"domain_loss_fn returned a single domain loss with lam={lam!r}: the variance of one domain is "
      "identically 0, so DISAM would silently be SAM. Use lam=0 for SAM, or return one loss per domain."
    )


def _wrong_domain_count(m: int, num_domains: int, axes: tuple | None) -> str:
  """Why `domain_loss_fn` returned m losses where num_domains were expected, and what to write instead."""
  said = f"domain_loss_fn returned {m} values, but this optimizer was built with num_domains={num_domains}: "
  if m > num_domains:
    return said + (
      "it must return one loss per domain (or DomainLosses of [M] sums and counts), not per-example losses. "
      "Group them: disam_jax.domain_losses_from_grouped(losses.reshape(M, b)), "
      "disam_jax.domain_losses_from_ids(losses, domain_ids, M), or wrap the per-example loss in "
      "disam_jax.grouped_domain_loss_fn. (If these are domain losses, the number of domains must not change "
      "between steps: build the optimizer with the right num_domains.)"
    )
  if axes is not None:
    return said + (
      "under pmap/shard_map the loss sees only this device's block of the batch, and this block holds only "
      f"{m} of the domains (the batch is split along its domain axis). Split the per-domain axis instead "
      "(in_specs PartitionSpec(None, 'data') for an [M, b, ...] batch), or return "
      "disam_jax.domain_losses_from_ids(losses, domain_ids, M) with the global domain ids: every device then "
      "returns all M domains (count 0 for those it does not hold)."
    )
  return said + "the number of domains must not change between steps (pass the same M every step)."
