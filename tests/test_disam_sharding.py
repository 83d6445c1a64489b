"""Sharded parameters (FSDP, tensor parallel, both) on a 4x2 ('data', 'model') mesh of 8 host CPU devices.

Every layout takes the step of one device on the whole batch, keeps every parameter-shaped leaf (params, Adam's
moments, the reused component of `perturb_every`) sharded like the params, and adds no all-gather of a
parameter-shaped tensor to what ERM's step already has. Three ways to shard: `jax.jit` with NamedSharding over Auto
axes (GSPMD), an explicit-axes mesh (`jax.make_mesh`'s default), and `shard_map` with each device holding its slice
of every parameter (the loss all-gathers FSDP slices and psums tensor-parallel partial products itself).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import disam_jax
from tests import _reference as ref
from tests._steps import run_steps
from tests.test_disam import assert_tree_close

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS, see conftest.py)")

M, B, D, H, C = 4, 8, 16, 32, 8  # domains, per-domain batch, features, hidden units, classes (all divide 4 and 2)
STEPS = 3
LAYOUTS = {  # the PartitionSpec of every parameter
  "fsdp": {"w1": P("data", None), "b1": P(), "w2": P("data", None), "b2": P()},
  "tp": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()},
  "fsdp_tp": {"w1": P("data", "model"), "b1": P("model"), "w2": P("model", "data"), "b2": P()},
}
BATCH = P(None, "data")  # [M, b, ...]: every device holds a slice of every domain


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(M, B, D)) + np.arange(M)[:, None, None] * 0.3  # domains shifted apart
  y = rng.integers(0, C, size=(M, B))
  params = {
    "w1": rng.normal(size=(D, H)) * 0.3,
    "b1": rng.normal(size=H) * 0.1,
    "w2": rng.normal(size=(H, C)) * 0.3,
    "b2": rng.normal(size=C) * 0.1,
  }
  return (jnp.asarray(x, jnp.float32), jnp.asarray(y), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))


def _explicit_mesh_active():
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and AxisType.Explicit in mesh.axis_types


def _as(x, spec):
  """Under an explicit mesh, the model states the layout it computes in (as explicit-mode models must)."""
  return jax.sharding.reshard(x, spec) if _explicit_mesh_active() else x


def per_example(p, x, y):
  """A 2-layer MLP written for any of the layouts: FSDP weights gathered, hidden units split on 'model'."""
  h = jax.nn.relu(x @ _as(p["w1"], P(None, "model")) + _as(p["b1"], P("model")))
  kw = {"out_sharding": P("data", None)} if _explicit_mesh_active() else {}
  logits = jnp.matmul(h, _as(p["w2"], P("model", None)), **kw) + _as(p["b2"], P())
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


grouped = disam_jax.grouped_domain_loss_fn(per_example)


def _mesh(axis_type):
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def _run(tx, params, x, y, steps=STEPS, jit=jax.jit, state=None):
  return run_steps(tx, params, grouped, steps, x, y, state=state, jit=jit)


def _state_specs(tx, state, specs):
  """The PartitionSpec of every state leaf: params-shaped leaves like the params, the rest replicated."""
  return optax.tree_map_params(
    tx, lambda _, s: s, state, specs, transform_non_params=lambda _: P(), is_leaf=lambda v: isinstance(v, P)
  )


def _sharded_run(tx, layout, axis_type, x, y, params, steps=STEPS):
  """The step under jit on the 4x2 mesh: Auto axes with in/out shardings, or an explicit mesh."""
  mesh = _mesh(axis_type)
  specs = LAYOUTS[layout]
  shard = lambda tree, sp: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, sp)
  with jax.set_mesh(mesh):
    p = shard(params, specs)
    xs, ys = shard(x, BATCH), shard(y, BATCH)
    state = tx.init(p)
    state_specs = _state_specs(tx, state, specs)
    _assert_layout_kept(state, state_specs)  # init itself lays the state out like the params
    state = shard(state, state_specs)
    if axis_type == AxisType.Auto:
      named = lambda sp: jax.tree.map(lambda s: NamedSharding(mesh, s), sp, is_leaf=lambda v: isinstance(v, P))
      jit = functools.partial(
        jax.jit,
        in_shardings=(named(specs), named(state_specs), named(BATCH), named(BATCH)),
        out_shardings=(named(specs), named(state_specs)),
      )
    else:
      jit = jax.jit
    p, state = _run(tx, p, xs, ys, steps, jit, state)
  return p, state, state_specs


def _assert_layout_kept(tree, specs):
  for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))):
    assert leaf.sharding.spec == spec or (leaf.sharding.is_fully_replicated and not any(spec)), (
      leaf.sharding.spec,
      spec,
    )


_SLOW = pytest.mark.slow  # the default tier keeps FSDP x TP in both modes, which covers both kinds of split


@pytest.mark.parametrize(
  "layout,axis_type",
  [
    ("fsdp_tp", AxisType.Auto),
    ("fsdp_tp", AxisType.Explicit),
    pytest.param("fsdp", AxisType.Auto, marks=_SLOW),
    pytest.param("fsdp", AxisType.Explicit, marks=_SLOW),
    pytest.param("tp", AxisType.Auto, marks=_SLOW),
    pytest.param("tp", AxisType.Explicit, marks=_SLOW),
  ],
  ids=["fsdp_tp-auto", "fsdp_tp-explicit", "fsdp-auto", "fsdp-explicit", "tp-auto", "tp-explicit"],
)
def test_sharded_params_equal_one_device_and_keep_their_sharding(layout, axis_type):
  x, y, params = _problem()
  make = lambda: disam_jax.disam(optax.adam(0.02), 0.1, 0.5, num_domains=M)
  expected, expected_state = _run(make(), params, x, y)
  p, state, state_specs = _sharded_run(make(), layout, axis_type, x, y, params)
  assert_tree_close(p, expected, atol=1e-5)
  np.testing.assert_allclose(state.domain_losses, expected_state.domain_losses, rtol=1e-5)
  np.testing.assert_allclose(state.grad_norm, expected_state.grad_norm, rtol=1e-5)
  _assert_layout_kept(p, LAYOUTS[layout])
  _assert_layout_kept(state, state_specs)
  mu = state.base_state[0].mu
  assert mu["w1"].sharding.spec == LAYOUTS[layout]["w1"]  # Adam's moments stay sharded like the params


OPTIONS = {
  "gsam": dict(rule="gsam"),
  "sagm": dict(rule="sagm"),
  "perturb_every": dict(perturb_every=2, reuse_weight=0.7),
  "diagnostics_adaptive": dict(diagnostics=True, adaptive=True),
}


@pytest.mark.parametrize(
  "option,axis_type",
  [pytest.param(o, AxisType.Explicit, marks=() if o == "gsam" else _SLOW) for o in OPTIONS]
  + [("perturb_every", AxisType.Auto)],
  ids=[f"{o}-explicit" for o in OPTIONS] + ["perturb_every-auto"],
)
def test_every_rule_and_option_on_fsdp_x_tp(option, axis_type):
  """Explicit axes for every option (GSPMD Auto for the cond of perturb_every; the compiled-HLO test below covers
  every rule under Auto axes)."""
  x, y, params = _problem(1)
  make = lambda: disam_jax.disam(optax.adam(0.02), 0.1, 0.5, num_domains=M, **OPTIONS[option])
  expected, expected_state = _run(make(), params, x, y)
  p, state, state_specs = _sharded_run(make(), "fsdp_tp", axis_type, x, y, params)
  assert_tree_close(p, expected, atol=1e-5)
  for field in ("loss", "variance", "perturbation_norm", "grad_norm", "sam_cosine"):
    np.testing.assert_allclose(getattr(state, field), getattr(expected_state, field), rtol=1e-5, err_msg=field)
  _assert_layout_kept(state, state_specs)
  if option == "perturb_every":  # the reused buffer is params-shaped and sharded like the params
    assert_tree_close(state.reused_component, expected_state.reused_component, atol=1e-5)
    _assert_layout_kept(state.reused_component, LAYOUTS["fsdp_tp"])


def test_fsdp_x_tp_step_of_a_linear_model_equals_the_numpy_reference():
  """Independent of the one-device code: the sharded DISAM gradient of a softmax regression against NumPy."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(M, B, D)) + np.arange(M)[:, None, None] * 0.5
  y = rng.integers(0, C, size=(M, B))
  params = {"w": rng.normal(size=(D, C)) * 0.3, "b": rng.normal(size=C) * 0.1}
  mesh = _mesh(AxisType.Explicit)
  rho, lam = 0.1, 0.5

  def linear(p, xb, yb):
    logits = jnp.matmul(xb, jax.sharding.reshard(p["w"], P()), out_sharding=P("data", None)) + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb)

  tx = disam_jax.disam(optax.sgd(1.0), rho, lam)
  with jax.set_mesh(mesh):
    p = {
      "w": jax.device_put(jnp.asarray(params["w"], jnp.float32), P("data", "model")),
      "b": jax.device_put(jnp.asarray(params["b"], jnp.float32), P()),
    }
    xs, ys = jax.device_put(jnp.asarray(x, jnp.float32), BATCH), jax.device_put(jnp.asarray(y), BATCH)
    f = disam_jax.grouped_domain_loss_fn(linear)
    u, _ = jax.jit(lambda q, s: tx.update(None, s, q, domain_loss_fn=lambda r: f(r, xs, ys)))(p, tx.init(p))
  expected, _ = ref.disam_gradient(params, x, y, C, rho, lam)
  assert_tree_close({k: -u[k] for k in u}, expected, atol=2e-6)
  assert u["w"].sharding.spec == P("data", "model")


# -- collectives in the compiled step -------------------------------------------------------------------------------


def _float_all_gather_shapes(compiled_text):
  """The result shapes of the floating-point all-gathers (parameters, activations; not integer labels)."""
  shapes = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", compiled_text)
  return sorted(s for s in shapes if s[0] in "fb")  # f32/f16/f64/bf16


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    pytest.param(dict(rule="gsam"), marks=_SLOW),
    pytest.param(dict(rule="sagm"), marks=_SLOW),
    dict(perturb_every=2),
    pytest.param(dict(diagnostics=True), marks=_SLOW),
  ],
  ids=["sam", "gsam", "sagm", "perturb_every", "diag"],
)
def test_no_parameter_shaped_all_gather_beyond_erm(kwargs):
  """GSPMD FSDP x TP: the floating-point all-gathers of DISAM's compiled step are ERM's (flattening a 2-D-sharded leaf
  for a norm added one parameter-shaped gather per leaf and norm). perturb_every's cond gathers the int labels once
  more (its second forward pass is inside the cond); that is batch data, not parameters."""
  _, _, params = _problem()
  mesh = _mesh(AxisType.Auto)
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  x, y, _ = _problem()
  p = jax.tree.map(put, params, LAYOUTS["fsdp_tp"])
  xs, ys = put(x, BATCH), put(y, BATCH)
  base = optax.adam(0.01)

  def erm(p, s, xb, yb):
    g = jax.grad(lambda q: grouped(q, xb, yb).total.sum() / (M * B))(p)
    return base.update(g, s, p)

  tx = disam_jax.disam(base, 0.1, 0.5, num_domains=M, **kwargs)

  def dis(p, s, xb, yb):
    return tx.update(None, s, p, domain_loss_fn=lambda q: grouped(q, xb, yb))

  erm_text = jax.jit(erm).lower(p, base.init(p), xs, ys).compile().as_text()
  disam_text = jax.jit(dis).lower(p, tx.init(p), xs, ys).compile().as_text()
  assert _float_all_gather_shapes(disam_text) == _float_all_gather_shapes(erm_text)


# -- explicit meshes: the domain-loss helpers ------------------------------------------------------------------------


def test_domain_loss_helpers_under_an_explicit_mesh_equal_one_device():
  """domain_losses_from_ids on a flat batch sharded on 'data', vmapped_domain_loss_fn, accumulate_domain_losses."""
  x, y, params = _problem(2)
  ids = jnp.asarray(np.repeat(np.arange(M), B))
  flat_x, flat_y = x.reshape(M * B, D), y.reshape(M * B)

  def from_ids(p, xb, yb, ib):
    return disam_jax.domain_losses_from_ids(per_example(p, xb, yb), ib, M)

  vmapped = disam_jax.vmapped_domain_loss_fn(per_example)
  split = lambda a: jnp.swapaxes(a.reshape((M, 2, B // 2) + a.shape[2:]), 0, 1)  # [2, M, b/2, ...]

  cases = {
    "ids": (lambda q, a: from_ids(q, *a), (flat_x, flat_y, ids), (P("data"), P("data"), P("data"))),
    "vmapped": (lambda q, a: vmapped(q, *a), (x, y), (BATCH, BATCH)),
    "accumulate": (
      lambda q, a: disam_jax.accumulate_domain_losses(grouped, *a)(q),
      (split(x), split(y)),
      (P(None, None, "data"), P(None, None, "data")),
    ),
  }
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M)
  mesh = _mesh(AxisType.Explicit)
  for name, (fn, arrays, arr_specs) in cases.items():
    step = jax.jit(lambda p, s, a: tx.update(None, s, p, domain_loss_fn=lambda q: fn(q, a)))
    u1, s1 = step(params, tx.init(params), arrays)
    with jax.set_mesh(mesh):
      p = jax.tree.map(lambda a, s: jax.device_put(a, s), params, LAYOUTS["fsdp_tp"])
      sharded = tuple(jax.device_put(a, s) for a, s in zip(arrays, arr_specs))
      un, sn = step(p, tx.init(p), sharded)
    assert_tree_close(un, u1, atol=1e-6)
    np.testing.assert_allclose(sn.domain_losses, s1.domain_losses, rtol=1e-5, err_msg=name)


def test_grouped_loss_refuses_a_domain_axis_sharded_under_an_explicit_mesh():
  x, y, params = _problem()
  with jax.set_mesh(_mesh(AxisType.Explicit)):
    xs, ys = jax.device_put(x, P("data")), jax.device_put(y, P("data"))
    with pytest.raises(ValueError, match=r"domain axis \(0\).*PartitionSpec\(None, 'data'\)"):
      jax.jit(lambda p: grouped(p, xs, ys))(params)


# -- shard_map with each device holding a slice of every parameter ----------------------------------------------------


def _gather_fsdp(p, specs):
  """All-gathers every leaf over 'data' along the axes its spec splits on 'data' (FSDP); 'model' slices stay."""

  def gather(leaf, spec):
    for dim, entry in enumerate(spec):
      if entry == "data":
        leaf = jax.lax.all_gather(leaf, "data", axis=dim, tiled=True)
    return leaf

  return jax.tree.map(gather, p, specs, is_leaf=lambda v: isinstance(v, P))


def _local_loss(layout):
  """The shard_map body's per-example loss: FSDP slices gathered; tensor-parallel partial logits psummed."""
  specs, tp = LAYOUTS[layout], layout != "fsdp"

  def loss(p, x, y):
    p = _gather_fsdp(p, specs)
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    partial = h @ p["w2"]
    logits = (jax.lax.psum(partial, "model") if tp else partial) + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  return disam_jax.grouped_domain_loss_fn(loss)


def _shard_map_run(tx, layout, x, y, params, check_vma=True, steps=STEPS):
  mesh = _mesh(AxisType.Auto)
  specs = LAYOUTS[layout]
  state_specs = _state_specs(tx, tx.init(params), specs)
  loss = _local_loss(layout)

  sharded = functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(specs, state_specs, BATCH, BATCH),
    out_specs=(specs, state_specs),
    check_vma=check_vma,
  )
  return run_steps(tx, params, loss, steps, x, y, jit=lambda step: jax.jit(sharded(step)))


@pytest.mark.parametrize(
  "layout,option",
  [
    pytest.param("fsdp", "sam", marks=_SLOW),
    ("fsdp_tp", "sam"),
    pytest.param("fsdp_tp", "gsam", marks=_SLOW),
    ("fsdp_tp", "perturb_every"),
  ],
)
def test_shard_map_with_split_params_equals_one_device(layout, option):
  """check_vma=True: the layout is read from the types; norms over whole parameters, FSDP gradients not re-summed.
  perturb_every=2 over 2 steps: one full step, one in between."""
  x, y, params = _problem(3)
  kwargs = {"sam": {}, "gsam": dict(rule="gsam"), "perturb_every": dict(perturb_every=2)}[option]
  make = lambda **kw: disam_jax.disam(optax.adam(0.02), 0.1, 0.5, num_domains=M, diagnostics=True, **kwargs, **kw)
  steps = 2 if option == "perturb_every" else STEPS
  expected, expected_state = _run(make(), params, x, y, steps=steps)
  p, s = _shard_map_run(make(batch_axis_name="data"), layout, x, y, params, steps=steps)
  assert_tree_close(p, expected, atol=1e-5)
  for field in ("loss", "variance", "perturbation_norm", "grad_norm", "sam_cosine"):
    np.testing.assert_allclose(getattr(s, field), getattr(expected_state, field), rtol=1e-5, err_msg=field)


def test_shard_map_without_vma_needs_param_specs():
  """check_vma=False hides the layout: a loss all-gathering over the batch axis is refused without param_specs, and
  with them the step equals one device. (FSDP only: without check_vma, JAX transposes the tensor-parallel psum of
  the forward into another psum, which doubles those gradients for any optimizer, ERM included.)"""
  x, y, params = _problem(4)
  make = lambda **kw: disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M, **kw)
  with pytest.raises(ValueError, match="param_specs"):
    _shard_map_run(make(batch_axis_name="data"), "fsdp", x, y, params, check_vma=False, steps=1)
  expected, _ = _run(make(), params, x, y)
  p, _ = _shard_map_run(
    make(batch_axis_name="data", param_specs=LAYOUTS["fsdp"]), "fsdp", x, y, params, check_vma=False
  )
  assert_tree_close(p, expected, atol=1e-5)


def test_param_specs_that_disagree_with_the_types_are_refused():
  x, y, params = _problem()
  wrong = dict(LAYOUTS["fsdp_tp"], b1=P())
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M, batch_axis_name="data", param_specs=wrong)
  with pytest.raises(ValueError, match=r"params\['b1'\] is split over \[\]"):
    _shard_map_run(tx, "fsdp_tp", x, y, params, steps=1)


def test_per_device_perturbation_with_fsdp_params_is_refused():
  x, y, params = _problem()
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M, batch_axis_name="data", per_device_perturbation=True)
  with pytest.raises(ValueError, match="per_device_perturbation=True with parameters split over the batch axis"):
    _shard_map_run(tx, "fsdp", x, y, params, steps=1)


def test_param_specs_without_batch_axis_name_are_refused():
  with pytest.raises(ValueError, match="needs batch_axis_name"):
    tx = disam_jax.disam(optax.sgd(0.5), param_specs=LAYOUTS["fsdp"])
    x, y, params = _problem()
    tx.update(None, tx.init(params), params, domain_loss_fn=lambda q: grouped(q, x, y))


# -- messages for pod layouts ----------------------------------------------------------------------------------------


def test_a_grouped_loss_on_a_devices_block_of_domains_says_so():
  """The batch split along its domain axis: each device's grouped loss sees 1 of the 4 domains."""
  x, y, params = _problem()
  mesh = _mesh(AxisType.Auto)
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M, batch_axis_name="data")

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
  def step(p, xb, yb):
    return tx.update(None, tx.init(p), p, domain_loss_fn=lambda q: grouped(q, xb, yb))[0]

  with pytest.raises(ValueError, match=r"returned 1 values.*only this device's block.*domain_losses_from_ids"):
    jax.jit(step)(params, x, y)


def test_per_example_losses_by_mistake_are_named():
  x, y, params = _problem()
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M)
  per_examples = lambda q: per_example(q, x.reshape(M * B, D), y.reshape(M * B))
  with pytest.raises(ValueError, match=r"returned 32 values.*not per-example losses.*domain_losses_from_grouped"):
    tx.update(None, tx.init(params), params, domain_loss_fn=per_examples)


@pytest.mark.parametrize("one_domain_per_device", [True, False])
def test_per_device_perturbation_warns_when_a_device_holds_one_domain(one_domain_per_device):
  """m-sharpness with one domain per device: the local variance is 0, lam does nothing there; warned at run time."""
  import warnings

  rng = np.random.default_rng(7)
  n = M * B
  ids = np.repeat(np.arange(M), B) if one_domain_per_device else np.tile(np.arange(M), B)
  x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=n))
  _, _, params = _problem()
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M, batch_axis_name="d", per_device_perturbation=True)
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d")), out_specs=P())
  def step(p, xb, yb, ib):
    f = lambda q: disam_jax.domain_losses_from_ids(per_example(q, xb, yb), ib, M)
    return tx.update(None, tx.init(p), p, domain_loss_fn=f)[1].loss

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.block_until_ready(jax.jit(step)(params, x, y, jnp.asarray(ids)))
    jax.effects_barrier()
  said = [w for w in caught if "lam has no effect" in str(w.message)]
  assert bool(said) == one_domain_per_device


# -- NNX: nnx.Optimizer over variables sharded by their partitioning metadata ----------------------------------------


def test_nnx_optimizer_with_sharded_variables_equals_one_device():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs, sharded):
      init, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
      part = (lambda f, names: nnx.with_partitioning(f, names)) if sharded else (lambda f, names: f)
      self.l1 = nnx.Linear(
        D, H, kernel_init=part(init, ("data", "model")), bias_init=part(zeros, ("model",)), rngs=rngs
      )
      self.l2 = nnx.Linear(H, C, kernel_init=part(init, ("model", "data")), rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  def run(model, x, y):
    optimizer = disam_jax.nnx_optimizer(model, optax.adam(0.02), 0.1, 0.5, num_domains=M)

    @nnx.jit
    def step(model, optimizer, x, y):
      def loss_fn(m):
        losses = optax.softmax_cross_entropy_with_integer_labels(m(x.reshape(M * B, D)), y.reshape(M * B))
        return disam_jax.domain_losses_from_grouped(losses.reshape(M, B))

      return disam_jax.nnx_update(optimizer, model, loss_fn)

    for _ in range(STEPS):
      step(model, optimizer, x, y)
    return model, optimizer

  x, y, _ = _problem(6)
  expected, _ = run(MLP(nnx.Rngs(0), sharded=False), x, y)
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0), sharded=True)  # flax places each variable by its partitioning metadata
    put = lambda a: jax.device_put(a, NamedSharding(mesh, BATCH))
    model, optimizer = run(model, put(x), put(y))
  for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(expected)), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert model.l1.kernel[...].sharding.spec == P("data", "model")
  assert model.l2.kernel[...].sharding.spec == P("model", "data")
  moments = [a for a in jax.tree.leaves(nnx.state(optimizer)) if getattr(a, "ndim", 0) == 2]
  assert len(moments) == 4 and {a.sharding.spec for a in moments} == {P("data", "model"), P("model", "data")}


def test_per_device_perturbation_logs_the_mean_over_devices_and_keeps_the_state_replicated():
  """m-sharpness under shard_map(check_vma=True) with the state's out_specs P(): accepted (each device's own norm
  and weights are logged as their mean), and the logged norm is the mean of the one-device norms of the slices."""
  x, y, params = _problem(8)
  n = 2
  mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,))
  tx = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M, batch_axis_name="d", per_device_perturbation=True)
  state = tx.init(params)
  specs = jax.tree.map(lambda _: P(), state)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs, P(None, "d"), P(None, "d")), out_specs=specs)
  def step(p, s, xb, yb):
    return tx.update(None, s, p, domain_loss_fn=lambda q: grouped(q, xb, yb))[1]

  logged = jax.jit(step)(params, state, x, y)
  one = disam_jax.disam(optax.sgd(0.5), 0.1, 0.5, num_domains=M)
  per_slice = [
    one.update(
      None,
      one.init(params),
      params,
      domain_loss_fn=lambda q, i=i: grouped(
        q, x[:, i * B // n : (i + 1) * B // n], y[:, i * B // n : (i + 1) * B // n]
      ),
    )[1]
    for i in range(n)
  ]
  np.testing.assert_allclose(logged.perturbation_norm, np.mean([s.perturbation_norm for s in per_slice]), rtol=1e-5)
  np.testing.assert_allclose(
    logged.perturbation_weights, np.mean([s.perturbation_weights for s in per_slice], axis=0), rtol=1e-5
  )
  assert not np.allclose(per_slice[0].perturbation_norm, per_slice[1].perturbation_norm)
