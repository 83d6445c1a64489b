"""Tests for disam_jax.harness.peft: selectors, frozen parameters that truly never change, the restricted DISAM
perturbation against a NumPy reference, and --train-only through the harness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disam_jax.harness import algorithms, models, peft
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import _trainable_mask
from disam_jax.harness.steps import init_model, init_train_state, make_train_step
from tests import _reference


@functools.cache
def _abstract(name, **kwargs):
  return nnx.eval_shape(
    lambda: models.create_model(name, num_classes=3, input_shape=(16, 16, 3), rngs=nnx.Rngs(0), width=4, **kwargs)
  )


def _selected(model, selectors):
  mask = peft.trainable_mask(model, selectors)
  params = nnx.state(model, nnx.Param)
  return {p for p, keep in zip(peft._param_paths(params), jax.tree.leaves(mask)) if keep}


def _all_paths(model):
  return set(peft._param_paths(nnx.state(model, nnx.Param)))


def test_selectors_pick_the_named_parts():
  model = _abstract("resnet18", adapter_dim=2)
  paths = _all_paths(model)
  assert _selected(model, ["head"]) == {"classifier/kernel", "classifier/bias"}
  assert _selected(model, ["last_block"]) == {p for p in paths if p.startswith("backbone/layer4/1/")}
  norm = _selected(model, ["norm"])
  assert norm and all(p.rsplit("/", 1)[1] in ("scale", "bias") and "/bn" in p or "downsample/1" in p for p in norm)
  assert norm == {p for p in paths if p.endswith("/scale")} | {
    p[: -len("scale")] + "bias" for p in paths if p.endswith("/scale")
  }
  adapters = _selected(model, ["adapters"])
  assert adapters == {p for p in paths if "/adapter/" in p} and len(adapters) == 8 * 4
  assert _selected(model, ["backbone/layer3"]) == {p for p in paths if p.startswith("backbone/layer3/")}
  assert _selected(model, ["head", "adapters"]) == adapters | {"classifier/kernel", "classifier/bias"}
  assert _selected(model, ["all"]) == paths
  # the mask is a full pytree of Python bools with the params' structure
  mask = peft.trainable_mask(model, ["head"])
  assert jax.tree.structure(mask) == jax.tree.structure(nnx.state(model, nnx.Param))
  assert all(type(leaf) is bool for leaf in jax.tree.leaves(mask))


def test_mobilenet_selectors():
  model = nnx.eval_shape(
    lambda: models.create_model("mobilenet_v2", num_classes=3, input_shape=(32, 32, 3), rngs=nnx.Rngs(0), adapter_dim=4)
  )
  assert _selected(model, ["last_block"]) == {
    "backbone/features/18/0/kernel",
    "backbone/features/18/1/scale",
    "backbone/features/18/1/bias",
  }
  assert len(_selected(model, ["adapters"])) == 17 * 4


def test_bad_selectors_are_refused_with_the_valid_ones():
  with pytest.raises(ValueError, match="neither a selector.*head.*prefix"):
    peft.trainable_mask(_abstract("resnet18"), ["heads"])
  with pytest.raises(ValueError, match="adapter_dim=8"):
    peft.trainable_mask(_abstract("resnet18"), ["adapters"])
  with pytest.raises(ValueError, match="at least one"):
    peft.trainable_mask(_abstract("resnet18"), [])
  mlp = nnx.eval_shape(lambda: models.create_model("mlp", num_classes=3, input_shape=(4, 4, 1), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="last_block.*prefix"):
    peft.trainable_mask(mlp, ["last_block"])


# ---------------------------------------------------------------------------------------------------------------------
# The step against NumPy: base optimizer masked, perturbation restricted, norm over the subset
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, lam", [("disam", 0.5), ("sam", 0.0), ("erm", None)])
def test_masked_step_matches_numpy_reference(algorithm, lam):
  """Softmax regression {w, b}; only w trains. Frozen b has weight decay and a non-zero gradient, yet never moves."""
  rng = np.random.default_rng(0)
  m, n, d, k = 3, 8, 5, 4
  x = rng.normal(size=(m, n, d)) * np.array([0.5, 1.0, 2.0])[:, None, None]
  y = rng.integers(0, k, size=(m, n))
  params = {"w": rng.normal(size=(d, k)) * 0.3, "b": rng.normal(size=k) * 0.3}
  rho, lr, wd = 0.2, 0.1, 0.01
  hp = HParams(optimizer="sgd", lr=lr, weight_decay=wd, rho=rho, lam=lam or 0.0)
  mask = {"w": True, "b": False}
  tx = algorithms.make_optimizer(algorithm, hp, num_domains=m, aux_example=(), trainable_mask=mask)

  def domain_loss_fn(p):
    logits = jnp.einsum("mnd,dk->mnk", x.astype(jnp.float32), p["w"]) + p["b"]
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
    return losses.mean(axis=1), ()

  jparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  state = tx.init(jparams)
  step = jax.jit(lambda p, s: tx.update(None, s, p, domain_loss_fn=domain_loss_fn))
  ref = {key: v.copy() for key, v in params.items()}
  sgd = _reference.SGDMomentumWithDecay(lr, 0.9, wd)
  for _ in range(3):
    updates, state = step(jparams, state)
    jparams = jax.tree.map(lambda a, u: a + u, jparams, updates)
    # NumPy: the perturbation only on w, normalized over w alone; the update only on w
    losses, grads = _reference.domain_losses_and_grads(ref, x, y, k)
    if algorithm == "erm":
      g = _reference.combine(grads, [1.0 / m] * m)
    else:
      coeffs = [1.0 / m - lam * (2.0 / m) * (li - losses.mean()) for li in losses]
      g_p = _reference.combine(grads, coeffs)
      eps_w = rho * g_p["w"] / (np.linalg.norm(g_p["w"]) + 1e-12)
      _, pgrads = _reference.domain_losses_and_grads({"w": ref["w"] + eps_w, "b": ref["b"]}, x, y, k)
      g = _reference.combine(pgrads, [1.0 / m] * m)
    ref["w"] = sgd.step({"w": ref["w"]}, {"w": g["w"]})["w"]
    np.testing.assert_allclose(np.asarray(jparams["w"]), ref["w"], rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(jparams["b"]), params["b"].astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Through the harness's train step: a BatchNorm model, frozen parameters and statistics
# ---------------------------------------------------------------------------------------------------------------------


def _run_steps(selectors, model_kwargs, algorithm="disam", steps=2):
  graphdef, params, model_state = init_model(
    "resnet18",
    num_classes=3,
    input_shape=(8, 8, 3),
    seed=0,
    model_kwargs={"width": 4, "stage_sizes": [1, 1], **model_kwargs},
  )
  config = ExperimentConfig(train_only=tuple(selectors) if selectors else None)
  mask = _trainable_mask(config, graphdef, params, model_state)
  hp = HParams(optimizer="adamw", lr=1e-2, weight_decay=0.1, rho=0.1, lam=0.5)
  tx = algorithms.make_optimizer(algorithm, hp, num_domains=2, aux_example=model_state, trainable_mask=mask)
  step = jax.jit(make_train_step(graphdef, tx))
  state = init_train_state(params, model_state, tx)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    batch = (rng.uniform(size=(2, 4, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, (2, 4)).astype(np.int32))
    state, metrics = step(state, batch)
  return params, model_state, state, mask, metrics


def _changed(before, after):
  return [
    not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  ]


def test_frozen_parameters_and_statistics_never_change():
  params, model_state, state, mask, metrics = _run_steps(["head", "adapters"], {"adapter_dim": 2, "freeze_bn": True})
  keep = jax.tree.leaves(mask)
  changed = _changed(params, state.params)
  assert not any(c for c, k in zip(changed, keep) if not k)  # frozen: bit-identical despite weight decay
  trained = [c for c, k in zip(changed, keep) if k]
  assert sum(trained) >= len(trained) - 8  # adapters' `down` may not move in 2 steps (up starts at 0)
  assert not any(_changed(model_state, state.model_state))  # freeze_bn: statistics frozen
  assert np.isfinite(float(metrics["loss"]))


def test_batchnorm_statistics_update_when_not_frozen():
  params, model_state, state, mask, _ = _run_steps(["head"], {})
  assert not any(c for c, k in zip(_changed(params, state.params), jax.tree.leaves(mask)) if not k)
  assert any(_changed(model_state, state.model_state))


def test_peft_step_skips_the_frozen_gradients():
  """The compiled PEFT step does less work than the full one (no weight gradients of the frozen backbone)."""
  graphdef, params, model_state = init_model(
    "resnet18", num_classes=3, input_shape=(8, 8, 3), seed=0, model_kwargs={"width": 4, "stage_sizes": [1, 1]}
  )
  flops = {}
  for selectors in (None, ("head",)):
    mask = _trainable_mask(ExperimentConfig(train_only=selectors), graphdef, params, model_state)
    tx = algorithms.make_optimizer("disam", HParams(), num_domains=2, aux_example=model_state, trainable_mask=mask)
    state = init_train_state(params, model_state, tx)
    batch = (np.zeros((2, 4, 8, 8, 3), np.float32), np.zeros((2, 4), np.int32))
    compiled = jax.jit(make_train_step(graphdef, tx)).lower(state, batch).compile()
    flops[selectors] = compiled.cost_analysis()["flops"]
  assert flops[("head",)] < 0.6 * flops[None]


def test_cli_train_only_end_to_end(tmp_path):
  from disam_jax.harness import cli

  out = tmp_path / "run"
  code = cli.main(
    [
      "--dataset",
      "rotated_digits",
      "--model",
      "mlp",
      "--algorithm",
      "disam",
      "--held-out",
      "0",
      "--steps",
      "3",
      "--eval-every",
      "3",
      "--train-only",
      "head",
      "--quiet",
      "--no-plots",
      "--output-dir",
      str(out),
    ]
  )
  assert code == 0
  import json

  assert json.load(open(out / "config.json"))["train_only"] == ["head"]
  bad = cli.main(
    [
      "--dataset",
      "rotated_digits",
      "--model",
      "mlp",
      "--train-only",
      "adapters",
      "--quiet",
      "--output-dir",
      str(tmp_path / "bad"),
    ]
  )
  assert bad == cli.EXIT_BAD_INPUT


def test_masked_optimizer_freezes_leaves_whatever_their_gradient():
  """Frozen leaves with non-zero gradients, weight decay and momentum stay put; the others follow the base."""
  import optax

  params = {"a": jnp.ones(3), "b": jnp.full(2, 2.0)}
  grads = {"a": jnp.full(3, 0.5), "b": jnp.full(2, -1.0)}
  base = optax.adamw(0.1, weight_decay=0.5)
  tx = peft.masked_optimizer(base, {"a": True, "b": False})
  state, base_state = tx.init(params), base.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, base_state = base.update(grads, base_state, params)
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)
    np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(expected["a"]), rtol=1e-6)
