"""Multi-process training on JAX's own distributed runtime (multi-controller JAX).

Every process runs the same program. `initialize` joins the processes through `jax.distributed.initialize`
(coordinator address, process count and id from arguments or the usual `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` variables; on TPU pods and SLURM/Open MPI clusters JAX detects them itself).
A global `Mesh` spans every device of every process with one axis, `data`; the `[M, b, ...]` batch is sharded
along the per-domain batch axis `b`, so every device holds a slice of every domain. Each process materializes only
its own slice (`local_batch_slice`) and `jax.make_array_from_process_local_data` assembles the global array; under
`jax.jit` the per-domain loss sums and counts, and both DISAM gradients, are reduced over all devices by XLA, so
N processes take exactly the step one device takes on the whole batch.
"""

import dataclasses
import os
import socket
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


class DistributedError(RuntimeError):
  """A multi-process configuration or runtime problem, with a message meant for the user."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process job. All None: a single process (nothing to initialize).

  Attributes:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's id in `[0, num_processes)`.
    initialization_timeout: seconds to wait for every process to join before failing.
    heartbeat_timeout: seconds after which a silent (dead) process is declared failed and every other process is
      stopped with an error naming it, instead of hanging.
    auto: let JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI, ...): `jax.distributed.initialize()`
      with no arguments.
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 60
  heartbeat_timeout: int = 20
  auto: bool = False

  @classmethod
  def from_env(cls, **overrides) -> "DistributedConfig":
    """Fills unset fields from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""

    def env_int(name):
      value = os.environ.get(name)
      if value is None or value == "":
        return None
      try:
        return int(value)
      except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer.") from None

    values = {
      "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
      "num_processes": env_int("JAX_NUM_PROCESSES"),
      "process_id": env_int("JAX_PROCESS_ID"),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  @property
  def is_multi_process(self) -> bool:
    return self.auto or (self.num_processes is not None and self.num_processes > 1)

  def validate(self) -> None:
    if self.auto:
      return
    if self.num_processes is not None and self.num_processes < 1:
      raise DistributedError(f"num_processes must be >= 1; got {self.num_processes}.")
    if not self.is_multi_process:
      if self.process_id not in (None, 0):
        raise DistributedError(
          f"process id {self.process_id} given for a single-process run (num_processes={self.num_processes})."
        )
      return
    if self.coordinator_address is None:
      raise DistributedError(
        f"num_processes={self.num_processes} needs a coordinator address (host:port of process 0): pass "
        "--coordinator-address or set JAX_COORDINATOR_ADDRESS."
      )
    if ":" not in self.coordinator_address:
      raise DistributedError(f"coordinator address {self.coordinator_address!r} must be host:port.")
    if self.process_id is None:
      raise DistributedError("a multi-process run needs --process-id (or JAX_PROCESS_ID) on every process.")
    if not 0 <= self.process_id < self.num_processes:
      raise DistributedError(
        f"process id {self.process_id} is out of range for num_processes={self.num_processes} "
        f"(valid ids: 0..{self.num_processes - 1})."
      )


def initialize(config: DistributedConfig) -> None:
  """Joins the multi-process job described by `config` (no-op for a single process).

  Must run before any other JAX computation. On CPU, cross-process collectives go through gloo.
  """
  config.validate()
  if not config.is_multi_process:
    return
  if not config.auto and config.process_id != 0:
    # jaxlib aborts the whole process (a C++ fatal error, not an exception) when it cannot reach the coordinator;
    # probe the address first so the user gets a message instead of a stack trace.
    _wait_for_coordinator(config)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (
    {}
    if config.auto
    else dict(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes,
      process_id=config.process_id,
    )
  )
  try:
    jax.distributed.initialize(
      **where,
      initialization_timeout=config.initialization_timeout,
      heartbeat_timeout_seconds=config.heartbeat_timeout,
    )
  except Exception as e:  # jaxlib raises XlaRuntimeError / RuntimeError with a gRPC status inside.
    raise DistributedError(
      f"process {config.process_id} of {config.num_processes} could not join the coordinator at "
      f"{config.coordinator_address} within {config.initialization_timeout} s: is process 0 running and is "
      f"the address reachable from here? ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    ) from e


def _wait_for_coordinator(config: DistributedConfig) -> None:
  host, _, port = config.coordinator_address.rpartition(":")
  deadline = time.monotonic() + config.initialization_timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except (OSError, ValueError) as e:
      if time.monotonic() > deadline:
        raise DistributedError(
          f"process {config.process_id} of {config.num_processes} could not join the coordinator at "
          f"{config.coordinator_address} within {config.initialization_timeout} s: is process 0 running and is "
          f"the address reachable from here? ({type(e).__name__}: {e})"
        ) from e
      time.sleep(0.5)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over all devices of all processes (global device order)."""
  return Mesh(np.array(devices if devices is not None else jax.devices()), (DATA_AXIS,))


FSDP_AXIS = "fsdp"
_MESH_AXES = (DATA_AXIS, FSDP_AXIS)


def parse_mesh(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `--mesh data=4,fsdp=2`: axes `data` and (optionally) `fsdp`, sizes multiplying to the device count.

  The batch is split over every axis (each device holds a slice of every domain); the 2-D-or-more weights are also
  split over `fsdp` (`fsdp_sharding`), so each device stores 1/fsdp of them and GSPMD gathers them for the step.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = {}
  for part in text.split(","):
    name, eq, value = part.strip().partition("=")
    if not eq or name not in _MESH_AXES or name in sizes:
      raise DistributedError(
        f"--mesh {text!r}: expected 'data=N' or 'data=N,fsdp=K' (axes {', '.join(_MESH_AXES)}, each once)."
      )
    try:
      sizes[name] = int(value)
    except ValueError:
      raise DistributedError(f"--mesh {text!r}: the size of {name!r} must be an integer; got {value!r}.") from None
    if sizes[name] < 1:
      raise DistributedError(f"--mesh {text!r}: the size of {name!r} must be >= 1.")
  sizes.setdefault(DATA_AXIS, 1)
  shape = tuple(sizes.get(a, 1) for a in _MESH_AXES)
  if int(np.prod(shape)) != len(devices):
    raise DistributedError(
      f"--mesh {text!r} has {int(np.prod(shape))} devices but there are {len(devices)} "
      f"({jax.process_count()} process(es) x {jax.local_device_count()} device(s)): the sizes must multiply to "
      f"{len(devices)}."
    )
  return Mesh(np.array(devices).reshape(shape), _MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards `[M, b, ...]` along the per-domain batch axis `b` over every mesh axis: every device holds a slice of
  every domain."""
  axes = tuple(mesh.axis_names)
  return NamedSharding(mesh, P(None, axes[0] if len(axes) == 1 else axes))


def fsdp_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """FSDP: an array of 2 or more dimensions split over the `fsdp` axis along its largest dimension that it
  divides; vectors, scalars, indivisible arrays (and every array without an `fsdp` axis) are replicated."""
  k = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)
  spec = [None] * len(shape)
  if k > 1 and len(shape) >= 2:
    divisible = [d for d in range(len(shape)) if shape[d] % k == 0]
    if divisible:
      spec[max(divisible, key=lambda d: (shape[d], -d))] = FSDP_AXIS
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_tree, mesh: Mesh):
  """The target sharding of every leaf of a (possibly abstract) state: `fsdp_sharding` of its shape (replicated on
  a mesh without an `fsdp` axis, and for vectors, scalars and PRNG keys)."""
  return jax.tree.map(lambda a: fsdp_sharding(np.shape(a), mesh), abstract_tree)


def init_sharded(fn, mesh: Mesh, *args):
  """`fn(*args)` computed straight into its target shardings (`state_shardings`): jitted with those output
  shardings, so each device computes and holds only its shards and no leaf is ever whole on one device when the mesh
  has an `fsdp` axis (XLA partitions the initializer). `args` are global arrays on `mesh` (or nothing: seeds and
  keys are best made inside `fn`); every process calls it alike.

  Returns:
    `fn(*args)`'s pytree, every leaf a global `jax.Array` on `mesh`.
  """
  return sharded_initializer(fn, mesh, *args)(*args)


def sharded_initializer(fn, mesh: Mesh, *args):
  """`fn` jitted with the output shardings `state_shardings` gives its result for `args` (what `init_sharded`
  runs; `.lower(*args).compile().memory_analysis()` shows each device's bytes)."""
  return jax.jit(fn, out_shardings=state_shardings(jax.eval_shape(fn, *args), mesh))


def place_state(tree, mesh: Mesh):
  """Places the train state on `mesh`: replicated (`replicate`) on a data-only mesh; with an `fsdp` axis, every
  leaf of 2 or more dimensions (weights, and the optimizer's moments and DISAM's buffers shaped like them) split by
  `fsdp_sharding`, the rest replicated. Every process holds the same full values; each keeps its shards."""
  if FSDP_AXIS not in mesh.axis_names:
    return replicate(tree, mesh)
  return _place_leaves(
    tree,
    mesh,
    lambda host: jax.make_array_from_callback(host.shape, fsdp_sharding(host.shape, mesh), lambda index: host[index]),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places a pytree that every process holds identically (e.g. the train state) replicated on `mesh`.

  `jax.device_put` would also do it, but in a multi-process run it first checks that every process passes the same
  values, and NaN never equals NaN: a state holding a NaN metric (DISAM's `sam_cosine` when diagnostics are off)
  would be refused. Numeric leaves are therefore assembled from each process's copy without that check; leaves
  already placed on the global mesh are kept, and the rest (typed PRNG keys) go through `device_put`.
  """
  sharding = replicated(mesh)
  return _place_leaves(tree, mesh, lambda host: jax.make_array_from_process_local_data(sharding, host, host.shape))


def _place_leaves(tree, mesh: Mesh, place_numeric):
  """Every leaf of `tree` (which every process holds identically) on `mesh`: kept if already placed on the global
  mesh, `place_numeric(host array)` if numeric, and otherwise (typed PRNG keys) replicated by `device_put`."""

  def put(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return a
    if isinstance(a, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(a.dtype, jnp.number):
      return place_numeric(np.asarray(a))
    return jax.device_put(a, replicated(mesh))

  return jax.tree.map(put, tree)


def check_batch_divisible(per_domain_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if per_domain_batch % n:
    raise DistributedError(
      f"the per-domain batch size {per_domain_batch} is not divisible by the number of devices {n} "
      f"({jax.process_count()} process(es) x {jax.local_device_count()} device(s)): every device must hold "
      f"the same slice of every domain. Use a multiple of {n}."
    )


def local_batch_slice(per_domain_batch: int, mesh: Mesh) -> slice:
  """The slice of the per-domain batch axis that this process's devices hold."""
  check_batch_divisible(per_domain_batch, mesh)
  return _process_slice(batch_sharding(mesh), (1, per_domain_batch), axis=1)


def _process_slice(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> slice:
  """The slice along `axis` of an array of `shape` that this process's devices hold under `sharding` (split over
  every device of its mesh along `axis`); an error if it is not contiguous."""
  index_map = sharding.addressable_devices_indices_map(shape)
  starts = sorted({idx[axis].start or 0 for idx in index_map.values()})
  per_device = shape[axis] // sharding.mesh.devices.size
  start, stop = starts[0], starts[-1] + per_device
  if stop - start != per_device * len(starts):
    raise DistributedError("this process's devices do not hold a contiguous slice of the batch.")
  return slice(start, stop)


def _assemble(sharding: NamedSharding, local_arrays, axis: int, size: int):
  """Global arrays of `sharding` from each process's slices of every leaf along `axis`, which is `size` long
  globally (`jax.make_array_from_process_local_data`)."""

  def one(local):
    return jax.make_array_from_process_local_data(
      sharding, local, local.shape[:axis] + (size,) + local.shape[axis + 1 :]
    )

  return jax.tree.map(one, local_arrays)


def global_batch(mesh: Mesh, local_arrays, per_domain_batch: int):
  """Assembles global `[M, b, ...]` arrays from each process's `[M, b_local, ...]` slices."""
  return _assemble(batch_sharding(mesh), local_arrays, 1, per_domain_batch)


def flat_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards a merged batch `[B, ...]` along its only batch axis over every mesh axis."""
  axes = tuple(mesh.axis_names)
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def local_flat_slice(batch: int, mesh: Mesh) -> slice:
  """The slice of a merged batch `[B]` that this process's devices hold; refuses a B the devices do not divide."""
  n = mesh.devices.size
  if batch % n:
    raise DistributedError(
      f"the merged batch of {batch} examples (--batch-size x the training domains) is not "
      f"divisible by the number of devices {n}: use a --batch-size that makes it a multiple "
      f"of {n}."
    )
  return _process_slice(flat_batch_sharding(mesh), (batch,), axis=0)


def global_flat_batch(mesh: Mesh, local_arrays, batch: int):
  """Assembles global merged `[B, ...]` arrays from each process's `[B_local, ...]` slices."""
  return _assemble(flat_batch_sharding(mesh), local_arrays, 0, batch)


def local_replica(tree):
  """This process's full copy of a placed pytree, as single-device arrays (host-side work; the harness's evaluation
  no longer uses it: it evaluates the placed state, `loop._evaluator`).

  A replicated leaf is read from this process's first device; a leaf split over devices (FSDP) is gathered: within
  the process when it holds every shard, else from every process (a collective: every process must call this).
  """

  def local(a):
    if not isinstance(a, jax.Array):
      return a
    if a.is_fully_replicated:
      return a if a.is_fully_addressable else a.addressable_data(0)
    if a.is_fully_addressable:
      return jnp.asarray(np.asarray(a))
    from jax.experimental import multihost_utils

    return jnp.asarray(multihost_utils.process_allgather(a, tiled=True))

  return jax.tree.map(local, tree)


def is_main_process() -> bool:
  return jax.process_index() == 0
