"""Parameter-efficient fine-tuning: train a chosen subset of the parameters, with SAM/DISAM perturbing only it.

``--train-only head adapters`` (or any of `SELECTORS`, or a parameter-path prefix such as ``backbone/layer4``)
selects the trainable parameters. `trainable_mask(model, selectors)` turns the selection into a full pytree of
Python bools shaped like the model's ``nnx.Param`` state, and `algorithms.make_optimizer(..., trainable_mask=mask)`
applies it three times:

* the base optimizer is `masked_optimizer`: ``optax.multi_transform`` with ``optax.set_to_zero()`` on the frozen
  leaves, so they never move (weight decay and momentum included; ``optax.masked`` would pass the frozen leaves'
  raw gradients through as updates) and the optimizer keeps no state for them;
* SAM/DISAM get ``perturbation_mask=mask``: the perturbation ``eps = rho g_p / ||g_p||`` has zeros on the frozen
  leaves and its norm is taken over the trainable ones alone (SAM-ON; the DISAM paper's prompt-tuning setting);
* `freeze_gradients` wraps the transformation so that ``domain_loss_fn`` sees the frozen leaves through
  ``lax.stop_gradient``: their gradients are exact zeros that XLA never computes (no weight-gradient convolutions
  for the frozen backbone), which is where the speed of PEFT comes from.

BatchNorm running statistics are a separate choice: a model built with ``freeze_bn=True``
(``--model-option freeze_bn=true``) normalizes with, and never updates, its pretrained statistics; without it they
keep updating from the training batches (unperturbed pass only) even where the affine parameters are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx

__all__ = ["SELECTORS", "freeze_gradients", "masked_optimizer", "trainable_count", "trainable_mask"]

SELECTORS = {
  "all": "every parameter (full fine-tuning)",
  "head": "the classifier",
  "last_block": "the backbone's last block (ResNet: the last residual block; MobileNetV2: the final 1x1 stage)",
  "norm": "the scale and bias of every normalization layer (BatchNorm affine; GroupNorm/LayerNorm)",
  "adapters": "the residual adapters (build the model with --model-option adapter_dim=N)",
}
_NORMS = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm)


def _key(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _param_paths(params) -> list[str]:
  """'/'-joined paths of the leaves of an ``nnx.Param`` state, in `jax.tree` order."""
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [_key(e) for e in path]
    if keys and keys[-1] == "value":  # the Variable's own value node
      keys = keys[:-1]
    paths.append("/".join(keys))
  return paths


def _module_paths(model: nnx.Module, predicate) -> list[str]:
  return [
    "/".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and predicate(node)
  ]


def _selected_prefixes(model: nnx.Module, selector: str, paths: Sequence[str]) -> list[str]:
  name = type(model).__name__
  if selector == "all":
    return [""]
  if selector == "head":
    if not hasattr(model, "classifier"):
      raise ValueError(f"--train-only head: {name} has no classifier")
    return _module_paths(model, lambda node: node is model.classifier)
  if selector == "last_block":
    if not hasattr(model, "last_block"):
      raise ValueError(
        f"--train-only last_block: {name} does not define its last block; name a parameter path "
        "prefix instead (e.g. backbone/layers/1)"
      )
    block = model.last_block()
    return _module_paths(model, lambda node: node is block)
  if selector == "norm":
    # only the affine parameters: a norm module's Params are its scale and bias
    return _module_paths(model, lambda node: isinstance(node, _NORMS))
  if selector == "adapters":
    from disam_jax.harness.models import Adapter

    found = _module_paths(model, lambda node: isinstance(node, Adapter))
    if not found:
      raise ValueError(
        f"--train-only adapters: {name} has no adapters; build it with --model-option adapter_dim=8 "
        "(resnet18, resnet50, mobilenet_v2)"
      )
    return found
  prefix = selector.strip("/")
  if not any(p == prefix or p.startswith(prefix + "/") for p in paths):
    raise ValueError(
      f"--train-only {selector!r} is neither a selector ({', '.join(SELECTORS)}) nor a prefix of a "
      f"parameter path of {name} (e.g. {', '.join(sorted(paths)[:3])})"
    )
  return [prefix]


def trainable_mask(model: nnx.Module, selectors: Sequence[str]) -> Any:
  """The trainable parameters of `model` as a pytree of Python bools shaped like ``nnx.state(model, nnx.Param)``.

  Args:
    model: a model (an abstract one from ``nnx.eval_shape`` works: only paths and types are read).
    selectors: names of `SELECTORS` and/or parameter-path prefixes (``'backbone/layer4'``); the union is
      trainable.

  Raises:
    ValueError: no selector, or one that selects nothing (the message lists the valid ones).
  """
  if not selectors:
    raise ValueError(f"--train-only needs at least one selector: {', '.join(SELECTORS)}, or a parameter path prefix")
  params = nnx.state(model, nnx.Param)
  paths = _param_paths(params)
  prefixes = [p for s in selectors for p in _selected_prefixes(model, s, paths)]
  selected = iter([any(p == q or p.startswith(q + "/") or q == "" for q in prefixes) for p in paths])
  return jax.tree.map(lambda _: next(selected), params)


def trainable_count(mask: Any, params: Any) -> tuple[int, int]:
  """``(trainable, total)`` numbers of parameter values."""
  sizes = [(int(keep), int(getattr(p, "size", 1))) for keep, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params))]
  return sum(k * n for k, n in sizes), sum(n for _, n in sizes)


def masked_optimizer(base_tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """`base_tx` on the `mask`ed leaves, ``optax.set_to_zero()`` on the others (they never change)."""
  labels = jax.tree.map(lambda keep: "trainable" if keep else "frozen", mask)
  return optax.multi_transform({"trainable": base_tx, "frozen": optax.set_to_zero()}, labels)


def freeze_gradients(tx: optax.GradientTransformationExtraArgs, mask: Any) -> optax.GradientTransformationExtraArgs:
  """`tx` with ``domain_loss_fn`` seeing the frozen leaves through ``lax.stop_gradient`` (same state as `tx`)."""

  def stop_frozen(params):
    return jax.tree.map(lambda keep, p: p if keep else jax.lax.stop_gradient(p), mask, params)

  def update_fn(updates, state, params=None, *, domain_loss_fn=None, **extra_args):
    if domain_loss_fn is not None:
      inner = domain_loss_fn
      domain_loss_fn = lambda p: inner(stop_frozen(p))
    return tx.update(updates, state, params, domain_loss_fn=domain_loss_fn, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
