"""The JAX side: the benchmark problem (model, batch) and one jitted, donated training step per case."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.step_cost.config import LAM, LR, MOMENTUM, NUM_CLASSES, RHO


def make_batch(num_domains: int, per_domain: int, shape: Sequence[int], seed: int = 0):
  """`x [M, b, H, W, C]` N(0, 1) float32 and `y [M, b]` labels: domain-major, equal counts."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_domains, per_domain, *shape), dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, size=(num_domains, per_domain)).astype(np.int32)
  return x, y


def build_jax_model(name: str, shape, model_kwargs, *, fast_conv: bool = False, seed: int = 0):
  """`(graphdef, host params, host model_state)`; params kept on the host so every case gets its own copy.

  `fast_conv`: the model's convolutions use disam_jax.harness.fast_conv (the harness's default); off, Flax's.
  """
  import jax
  from flax import nnx

  from disam_jax.harness.models import create_model, functional_model

  model = create_model(
    name, num_classes=NUM_CLASSES, input_shape=tuple(shape), rngs=nnx.Rngs(seed), fast_conv=fast_conv, **model_kwargs
  )
  graphdef, params, model_state = functional_model(model)
  return graphdef, jax.device_get(params), jax.device_get(model_state)


def make_jax_step(kind: str, graphdef, model_state, num_domains: int, disam_kwargs: dict | None = None):
  """`(tx, step)` with `step(params, opt_state, model_state, x [M, b, ...], y [M, b]) -> (params, opt_state,
  model_state, loss)`. All kinds use the same model, loss and base optimizer; BatchNorm statistics come from the
  unperturbed pass in every kind. `disam_kwargs` go to `disam_jax.disam` of the DISAM kinds (e.g. `perturb_when`)."""
  import jax
  import optax

  import disam_jax
  from disam_jax.harness.models import apply_model

  base = optax.sgd(LR, momentum=MOMENTUM)
  has_state = bool(jax.tree.leaves(model_state))
  flat = lambda a: a.reshape((-1,) + a.shape[2:])

  def per_example(p, ms, xf, yf):
    logits, new_ms = apply_model(graphdef, p, ms, xf, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yf), new_ms

  def mean_loss(p, ms, x, y):
    losses, new_ms = per_example(p, ms, flat(x), flat(y))
    return losses.mean(), new_ms

  if kind == "erm":
    tx = base

    def step(params, opt_state, ms, x, y):
      (loss, new_ms), g = jax.value_and_grad(mean_loss, has_aux=True)(params, ms, x, y)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_ms, loss

    return tx, step

  if kind == "sam":
    tx = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True)

    def step(params, opt_state, ms, x, y):
      (loss, new_ms), g = jax.value_and_grad(mean_loss, has_aux=True)(params, ms, x, y)
      grad_fn = lambda p, _: jax.grad(lambda q: mean_loss(q, ms, x, y)[0])(p)
      updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state, new_ms, loss

    return tx, step

  lam = {"disam_lam0": 0.0}.get(kind, LAM)
  adaptive = kind == "disam_adaptive"
  every = perturb_every(kind)
  if kind not in ("disam", "disam_lam0", "disam_adaptive") and every == 1:
    raise ValueError(f"unknown case {kind!r}")
  tx = disam_jax.disam(
    base,
    RHO,
    lam,
    adaptive=adaptive,
    num_domains=num_domains,
    has_aux=has_state,
    aux_example=model_state if has_state else None,
    **({"perturb_every": every} if every > 1 else {}),
    **(disam_kwargs or {}),
  )

  def step(params, opt_state, ms, x, y):
    if has_state:  # (losses, new model state): the state travels as DISAM's aux, from the unperturbed pass
      per_example_loss = lambda p, xf, yf: per_example(p, ms, xf, yf)
    else:
      per_example_loss = lambda p, xf, yf: per_example(p, ms, xf, yf)[0]
    grouped = disam_jax.grouped_domain_loss_fn(per_example_loss, has_aux=has_state)
    updates, opt_state = tx.update(None, opt_state, params, domain_loss_fn=lambda p: grouped(p, x, y))
    new_ms = opt_state.aux if has_state else ms
    return optax.apply_updates(params, updates), opt_state, new_ms, opt_state.loss

  return tx, step


def perturb_every(kind: str) -> int:
  """k of an amortized DISAM kind 'disam_k<k>' (disam(..., perturb_every=k)); 1 for every other kind."""
  return int(kind[len("disam_k") :]) if kind.startswith("disam_k") and kind[len("disam_k") :].isdigit() else 1


def label(kind: str, config: str) -> str:
  return f"{kind}/{config}" if config else kind


def nbytes(tree) -> int:
  import jax

  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


class JaxCase:
  """One jitted, donated training step with its own params / optimizer state copies."""

  framework = "jax"

  def __init__(self, label: str, kind: str, graphdef, params, model_state, x, y, compiler_options: dict | None = None):
    import jax
    import jax.numpy as jnp

    self.label, self.kind = label, kind
    self.step_multiple = perturb_every(kind)  # samples time whole cycles of k steps: their mean is the average
    num_domains = x.shape[0]
    tx, step = make_jax_step(kind, graphdef, model_state, num_domains)
    fresh = lambda t: jax.tree.map(jnp.array, t)
    self.state = (fresh(params), tx.init(fresh(params)), fresh(model_state))
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    self.params_bytes = nbytes(params)
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    t0 = time.perf_counter()
    lowered = jitted.lower(*self.state, self.x, self.y)
    t1 = time.perf_counter()
    self.compiled = lowered.compile(compiler_options=compiler_options)
    t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1
    self.loss = None
    self.times: list[float] = []

  def run(self, steps: int) -> None:
    import jax

    state = self.state
    for _ in range(steps):
      *state, self.loss = self.compiled(*state, self.x, self.y)
    jax.block_until_ready((state, self.loss))
    self.state = tuple(state)

  def final_loss(self) -> float:
    return float(self.loss)

  def analysis(self) -> dict[str, Any]:
    out: dict[str, Any] = {"lower_s": round(self.lower_s, 3), "compile_s": round(self.compile_s, 3)}
    mem = self.compiled.memory_analysis()
    if mem is not None:
      m = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
      m["peak"] = m["temp"] + m["argument"] + m["output"]  # the brief's figure: temp + argument + output
      m["peak_minus_alias"] = m["peak"] - m["alias"]  # outputs written into donated arguments
      out["memory"] = m
    hlo = self.compiled.as_text()
    out["hlo_ops"] = {op: hlo.count(f" {op}(") for op in ("convolution", "dot", "fusion", "all-reduce")}
    cost = self.compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per computation
      cost = cost[0] if cost else None
    if cost:
      out["gflops"] = round(float(cost.get("flops", float("nan"))) / 1e9, 4)
    return out
