"""What a value's type says about how it is sharded: explicit-mesh specs and shard_map's varying axes.

DISAM's reductions (norms, dot products, the gradient's sum over the batch) must be taken over the whole parameter
and the whole batch however they are laid out. Two layouts are visible in a value's type at trace time:

* an explicit-axes mesh (`jax.make_mesh`'s default, `jax.set_mesh`): the type carries a `NamedSharding` whose spec
  names the Explicit mesh axes each array axis is split over (`float32[16@data,32@model]`);
* inside `shard_map` with `check_vma=True` (the default), the type's varying axes ("vma") name the mesh axes over
  which the local value differs from device to device: for a parameter, the axes it is sharded over.

Under GSPMD's Auto axes (`jax.jit` with `NamedSharding` inputs) neither is visible, and none is needed: XLA
partitions a whole-array reduction itself.
"""

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def explicit_spec(x: Any) -> tuple | None:
  """The spec of x's sharding, one entry per axis, restricted to Explicit mesh axes; None if none is used.

  Each entry is a tuple of mesh axis names (empty for an unsharded axis).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if sharding is None or mesh is None or not getattr(mesh, "axis_names", ()):
    return None
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Explicit}
  if not explicit:
    return None
  spec = tuple(sharding.spec) + (None,) * (len(jax.typeof(x).shape) - len(sharding.spec))

  def axes(entry):
    names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
    return tuple(n for n in names if n in explicit)

  spec = tuple(axes(e) for e in spec)
  return spec if any(spec) else None


def varying_axes(x: Any) -> frozenset:
  """The shard_map mesh axes x varies over (its type's vma), empty outside shard_map or with check_vma=False."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier releases call it `vma`
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", frozenset()))


def axis_names(axis_name: Any) -> tuple:
  """`batch_axis_name` as a tuple of mesh axis names: None -> (), 'data' -> ('data',), a tuple unchanged."""
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _spec_axes(spec: Any) -> frozenset:
  """The mesh axes a PartitionSpec (or None: replicated) splits an array over."""
  if spec is None:
    return frozenset()
  names = set()
  for entry in spec:
    names.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
  return frozenset(names)


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, jax.sharding.PartitionSpec)


def checks_vma(batch_axes: tuple) -> bool:
  """Whether the enclosing map types values with their varying axes (shard_map's check_vma=True), not pmap or
  shard_map(check_vma=False), where every value looks the same whatever it holds."""
  probe = jax.lax.pcast(jax.numpy.zeros([]), batch_axes, to="varying")
  return bool(varying_axes(probe))


class ParamLayout:
  """Reductions over a parameter tree that may be split over mesh axes inside `shard_map` / `pmap`.

  `sharded[i]` names the mesh axes params leaf i is split over (its `shard_map` in_spec); `batch_axes` the axes
  holding slices of the batch (`batch_axis_name`). Then, for trees shaped like params (gradients, directions):

  * a dot product or norm is each device's dot of its own slices, psummed over the leaf's `sharded` axes (only
    scalars cross devices; a replicated leaf is counted once, not once per device);
  * a gradient is psummed over `batch_axes - sharded[i]`: a leaf split over a batch axis is all-gathered inside
    the loss (FSDP), and the transpose of that all-gather already sums its gradient over the axis.

  With no axes (jit, GSPMD, explicit meshes) every reduction is the plain whole-array one.
  """

  def __init__(self, params: optax.Params, batch_axes: tuple = (), sharded: list | None = None, typed: bool = False):
    self.treedef = jax.tree.structure(params)
    self.batch_axes = tuple(batch_axes)
    self.sharded = [frozenset()] * self.treedef.num_leaves if sharded is None else list(sharded)
    self.typed = typed  # read from shard_map's varying axes (check_vma=True), not declared or assumed

  @classmethod
  def of(cls, params: optax.Params, batch_axes: tuple, param_specs: Any) -> "ParamLayout":
    """The layout of `params` under the enclosing map: from the types' varying axes when shard_map checks them
    (and `param_specs`, if given, must agree), else from `param_specs` (None: every leaf replicated)."""
    if not batch_axes:
      return cls(params)
    leaves = jax.tree.leaves(params)
    specs = None if param_specs is None else _spec_leaves(param_specs, params)
    if not checks_vma(batch_axes):
      return cls(params, batch_axes, specs)
    sharded = [varying_axes(x) for x in leaves]
    if specs is not None:
      paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
      for path, seen, declared in zip(paths, sharded, specs):
        if seen != declared:
          raise ValueError(
            f"param_specs says params{path} is split over {sorted(declared)}, but inside this shard_map it "
            f"varies over {sorted(seen)}: pass the same PartitionSpecs as the in_specs of the params (or drop "
            "param_specs: with check_vma=True the layout is read from the types)."
          )
    return cls(params, batch_axes, sharded, typed=True)

  @property
  def any_sharded_over_batch(self) -> bool:
    return any(s & set(self.batch_axes) for s in self.sharded)

  def device_local(self, tree: Any) -> Any:
    """Casts each leaf to varying over the batch axes it does not already vary over (shard_map, check_vma=True).

    DISAM differentiates a device-local copy of the replicated leaves and sums their gradients itself (below);
    without the cast, checked shard_map would sum them implicitly in the transpose and reject the cotangent
    computed from the psummed domain losses. A no-op without check_vma and under pmap.
    """
    if not self.batch_axes:
      return tree

    def cast(x):
      missing = tuple(a for a in self.batch_axes if a not in varying_axes(x))
      return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)

  def sum_gradient(self, tree: Any) -> Any:
    """The gradient of the global loss from the per-device ones: psum each leaf over `batch_axes - sharded[i]`."""
    if not self.batch_axes:
      return tree
    leaves = self.treedef.flatten_up_to(tree)
    out = []
    for x, sharded in zip(leaves, self.sharded):
      axes = tuple(a for a in self.batch_axes if a not in sharded)
      out.append(jax.lax.psum(x, axes) if axes else x)
    return self.treedef.unflatten(out)

  def vdot(self, a: Any, b: Any) -> jax.Array:
    """`<a, b>` over whole parameters, accumulated in float32 or wider; one psum per distinct set of axes."""
    groups: dict = {}
    for x, y, sharded in zip(self.treedef.flatten_up_to(a), self.treedef.flatten_up_to(b), self.sharded):
      d = leaf_dot(x, y)
      groups[sharded] = d if sharded not in groups else groups[sharded] + d
    total = None
    for sharded, d in groups.items():
      d = jax.lax.psum(d, tuple(sorted(sharded))) if sharded else d
      total = d if total is None else total + d
    return jax.numpy.zeros([], jax.numpy.float32) if total is None else total

  def norm(self, tree: Any) -> jax.Array:
    """L2 norm over whole parameters, accumulated in float32 or wider."""
    return jax.numpy.sqrt(self.vdot(tree, tree))


def _spec_leaves(param_specs: Any, params: optax.Params) -> list:
  """The mesh axes of every params leaf from a (prefix) tree of PartitionSpecs (None: replicated)."""
  try:
    full = jax.tree.map(
      lambda spec, sub: jax.tree.map(lambda _: _spec_axes(spec), sub), param_specs, params, is_leaf=_is_spec
    )
  except ValueError as e:
    raise ValueError(
      "param_specs must be a pytree of PartitionSpecs with the structure of params, or a prefix of it (the "
      f"in_specs of the params in shard_map): {e}"
    ) from None
  return jax.tree.leaves(full, is_leaf=lambda x: isinstance(x, frozenset))


def leaf_dot(x: Any, y: Any) -> jax.Array:
  """`sum(x * y)` as one dot product over every axis, accumulated in float32 or wider.

  A dot, not `jnp.sum(x * y)`: XLA:CPU rewrote a large sum into a tree of 32x32 reduce-windows that ran at under
  1 GB/s, about 0.35 ms per 200k-parameter leaf; a dot is one GEMV. All axes are contracted in place (no `ravel`):
  flattening a leaf sharded on two axes (FSDP x tensor parallel) made GSPMD all-gather it, one full
  parameter-shaped gather per norm. Contracted in place, each device dots its own shard and only the scalar is
  all-reduced. Under an explicit-axes mesh the scalar is declared replicated (`out_sharding=P()`), which JAX
  requires when contracted axes are sharded.
  """
  jnp = jax.numpy
  wide = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
  axes = tuple(range(jnp.ndim(x)))
  explicit = explicit_spec(x) is not None or explicit_spec(y) is not None
  return jax.lax.dot_general(
    x,
    y,
    ((axes, axes), ((), ())),
    preferred_element_type=wide,
    out_sharding=jax.sharding.PartitionSpec() if explicit else None,
  )


# -- disam's options checked against the layout --------------------------------------------------------------------


def param_layout(
  params: optax.Params, axes: tuple | None, param_specs: Any, domain_loss_fn: Callable, per_device_perturbation: bool
) -> ParamLayout:
  """How `params` are split over the mapped axes, checked against what the loss and the options need.

  Refuses, at trace time: a loss that all-gathers over a batch axis where the layout cannot be seen (pmap, or
  shard_map with check_vma=False) and `param_specs` is not given (FSDP parameters would be taken as replicated:
  norms over one slice, gradients summed across different slices); `per_device_perturbation` with parameters
  split over a batch axis (their gradient is already summed over the devices, so there is no per-device `g_p`).
  """
  if axes is None:
    if param_specs is not None:
      raise ValueError(
        "param_specs describes parameters split inside shard_map/pmap; it needs batch_axis_name. Under jax.jit "
        "with sharded arrays (GSPMD or an explicit mesh) the layout is in the arrays: drop param_specs."
      )
    return ParamLayout(params)
  layout = ParamLayout.of(params, axes, param_specs)
  if param_specs is None and not layout.typed and _gathers_over(domain_loss_fn, params, axes):
    raise ValueError(
      f"domain_loss_fn all-gathers over the batch axis {axes if len(axes) > 1 else axes[0]!r}, which is how "
      "FSDP parameters are used, but this map does not type values with their layout (pmap, or shard_map with "
      "check_vma=False), so disam cannot tell split parameters from replicated ones. Use shard_map with "
      "check_vma=True (the default), or pass disam(..., param_specs=specs) with the in_specs of the params "
      "(PartitionSpec() for a replicated leaf; param_specs=PartitionSpec() if all are replicated and the "
      "all-gather is of something else)."
    )
  if per_device_perturbation and layout.any_sharded_over_batch:
    raise ValueError(
      "per_device_perturbation=True with parameters split over the batch axis (FSDP): their gradient is summed "
      "over the devices by the all-gather in the loss, so no device has a gradient of its own to perturb with. "
      "Use the global perturbation (per_device_perturbation=False)."
    )
  return layout


_GATHERS = ("all_gather", "all_gather_invariant")


def _gathers_over(domain_loss_fn: Callable, params: optax.Params, axes: tuple) -> bool:
  """Whether tracing `domain_loss_fn(params)` meets an all-gather over any of `axes` (sub-jaxprs included)."""
  jaxpr = jax.make_jaxpr(domain_loss_fn)(params).jaxpr

  def walk(j) -> bool:
    for eqn in j.eqns:
      if eqn.primitive.name in _GATHERS:
        names = eqn.params.get("axis_name", ())
        names = names if isinstance(names, tuple) else (names,)
        if set(names) & set(axes):
          return True
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns") and walk(inner):
            return True
    return False

  return walk(jaxpr)


def warn_if_one_local_domain(local_count: jax.Array) -> None:
  """Warns (once per call site, at run time) when a device's batch holds at most one domain under
  per_device_perturbation: its local variance is then 0 and lam has no effect on its perturbation."""

  def warn():
    warnings.warn(
      "per_device_perturbation=True: a device holds the examples of at most one domain, so its local domain-loss "
      "variance is 0 and lam has no effect on its perturbation (it is SAM there). Give every device a slice of "
      "every domain (split the per-domain batch axis), or use the global perturbation "
      "(per_device_perturbation=False).",
      stacklevel=1,
    )

  jax.lax.cond(jnp.sum(local_count > 0) <= 1, lambda: jax.debug.callback(warn), lambda: None)
