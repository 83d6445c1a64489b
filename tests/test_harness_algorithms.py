"""Tests for the algorithm registry (disam_jax.harness.algorithms) and the penalized training step.

The references step a hand-written MLP (plain dicts of arrays) with `jax.grad` + optax (ERM) or with
`disam_jax.disam(...).update` (SAM, DISAM) on per-domain losses `L_i + w_t P` written out here, re-initializing
Adam by hand at the anneal step and advancing Fishr's moving average by hand from the unperturbed weights. The
penalties `P` themselves are checked against NumPy restatements of DomainBed in tests/test_harness_penalties.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import disam_jax
from disam_jax.harness import algorithms, penalties
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.experiment import cell_directory
from disam_jax.harness.steps import init_model, init_train_state, make_train_step
from tests._steps import disam_step

M, B = 3, 6


def _batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.random((M, B, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, (M, B)).astype(np.int32)
  y[0] = y[0, 0]  # a domain with a single class: domain losses apart, the variance matters
  return x, y


def _features_and_logits(p, x):
  h = x.reshape(x.shape[0], -1)
  for layer in (p["backbone"]["layers"][0], p["backbone"]["layers"][1]):
    h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
  return h, h @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def _head(hp, z):
  return z @ hp["kernel"] + hp["bias"]


def _per_domain(p, x, y):
  """([M] mean cross-entropies, DomainOutputs) of the hand-written MLP."""
  z, logits = _features_and_logits(p, x.reshape((M * B,) + x.shape[2:]))
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(logp, y.reshape(-1, 1), axis=1)[:, 0]
  means = ce.reshape(M, B).mean(axis=1)
  return means, penalties.DomainOutputs(z.reshape(M, B, -1), jnp.asarray(y), means, _head, p["classifier"])


@pytest.fixture(scope="module")
def mlp():
  return init_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 16})


def _close(a, b, rtol=5e-5, atol=2e-6):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for u, v in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _harness_steps(mlp, algorithm, hparams, steps):
  graphdef, params, model_state = mlp
  tx = algorithms.make_optimizer(algorithm, hparams, num_domains=M, aux_example=model_state)
  penalty = algorithms.make_penalty(algorithm, hparams)
  state = init_train_state(params, model_state, tx, penalty)
  step = jax.jit(make_train_step(graphdef, tx, penalty))
  history = []
  for k in range(steps):
    state, metrics = step(state, _batch(k))
    history.append(jax.device_get(metrics))
  return state, history


@pytest.mark.parametrize("algorithm, lam, rho", [("coral", None, 0.0), ("disam+coral", 0.5, 0.3)])
def test_coral_steps_equal_the_hand_written_penalized_loss(mlp, algorithm, lam, rho):
  hp = HParams(lr=1e-2, rho=rho, lam=lam or 0.0, coral_gamma=3.0)
  state, history = _harness_steps(mlp, algorithm, hp, 2)

  def domain_losses(p, x, y):  # L_i + gamma * CORAL on every domain
    means, out = _per_domain(p, x, y)
    return means + 3.0 * penalties.coral_penalty(out.features)

  params = nnx.to_pure_dict(mlp[1])
  if lam is None:  # ERM: Adam on grad mean_i (L_i + gamma P)
    adam = optax.adam(1e-2)
    opt = adam.init(params)
    for k in range(2):
      g = jax.grad(lambda p: jnp.mean(domain_losses(p, *_batch(k))))(params)
      u, opt = adam.update(g, opt, params)
      params = optax.apply_updates(params, u)
  else:
    tx = disam_jax.disam(optax.adam(1e-2), rho, lam)
    opt, step = tx.init(params), disam_step(tx, domain_losses)
    for k in range(2):
      params, opt = step(params, opt, *_batch(k))
    # DISAM's variance is that of the plain cross-entropies; the logged losses are the plain ones
    plain = _per_domain(nnx.to_pure_dict(mlp[1]), *_batch(0))[0]
    np.testing.assert_allclose(history[0]["variance"], np.var(np.asarray(plain)), rtol=1e-4)
    np.testing.assert_allclose(history[0]["domain_losses"], plain, rtol=1e-5)
  _close(nnx.to_pure_dict(state.params), params)
  assert history[-1]["objective"] > history[-1]["loss"] and history[-1]["penalty"] > 0


@pytest.mark.parametrize(
  "algorithm, rule, lam, alpha",
  [("disam_sagm+coral", "sagm", 0.5, None), ("gsam+coral", "gsam", 0.0, 0.3), ("disam_gsam+coral", "gsam", 0.5, None)],
)
def test_gsam_and_sagm_rules_get_alpha_and_the_penalized_loss(mlp, algorithm, rule, lam, alpha):
  """The registry hands the core disam(..., rule, alpha) the penalized per-domain losses (the rules themselves are
  checked against NumPy restatements of GSAM and SAGM in tests/test_disam.py)."""
  rho = 0.3
  hp = HParams(lr=1e-2, rho=rho, lam=lam, alpha=alpha, coral_gamma=2.0)
  state, _ = _harness_steps(mlp, algorithm, hp, 2)
  tx = disam_jax.disam(optax.adam(1e-2), rho, lam, rule=rule, alpha=alpha)
  params = nnx.to_pure_dict(mlp[1])

  def domain_losses(p, x, y):
    means, out = _per_domain(p, x, y)
    return means + 2.0 * penalties.coral_penalty(out.features)

  opt, step = tx.init(params), disam_step(tx, domain_losses)
  for k in range(2):
    params, opt = step(params, opt, *_batch(k))
  _close(nnx.to_pure_dict(state.params), params)


@pytest.mark.parametrize("algorithm", ["vrex", "disam+vrex"])
def test_vrex_weight_anneal_and_optimizer_reset_equal_domainbed(mlp, algorithm):
  """Weight 1 before the anneal step, vrex_lambda from it on, Adam re-initialized right before it."""
  anneal, lam, rho = 2, 0.5, 0.3
  sharp = algorithm != "vrex"
  hp = HParams(lr=1e-2, rho=rho, lam=lam if sharp else 0.0, vrex_lambda=7.0, vrex_anneal_steps=anneal)
  state, history = _harness_steps(mlp, algorithm, hp, 4)

  params = nnx.to_pure_dict(mlp[1])
  adam = optax.adam(1e-2)
  tx = disam_jax.disam(adam, rho, lam) if sharp else None
  opt = tx.init(params) if sharp else adam.init(params)
  for k in range(4):
    w = 7.0 if k >= anneal else 1.0

    def domain_losses(p):
      means, _ = _per_domain(p, *_batch(k))
      return means + w * jnp.mean((means - means.mean()) ** 2)

    if k == anneal:
      opt = opt._replace(base_state=adam.init(params)) if sharp else adam.init(params)
    if sharp:
      u, opt = tx.update(None, opt, params, domain_loss_fn=domain_losses)
    else:
      u, opt = adam.update(jax.grad(lambda p: jnp.mean(domain_losses(p)))(params), opt, params)
    params = optax.apply_updates(params, u)
  _close(nnx.to_pure_dict(state.params), params)
  np.testing.assert_allclose(history[3]["objective"], history[3]["loss"] + 7.0 * history[3]["penalty"], rtol=1e-5)
  np.testing.assert_allclose(history[0]["penalty"], history[0]["variance"], rtol=1e-4)


@pytest.mark.parametrize("algorithm", ["fishr", "sam+fishr"])
def test_fishr_moving_average_advances_once_per_step_from_the_unperturbed_pass(mlp, algorithm):
  anneal, rho, ema, weight = 1, 0.2, 0.8, 30.0
  sharp = algorithm != "fishr"
  hp = HParams(lr=1e-2, rho=rho, fishr_lambda=weight, fishr_ema=ema, fishr_anneal_steps=anneal)
  state, history = _harness_steps(mlp, algorithm, hp, 3)

  params = nnx.to_pure_dict(mlp[1])
  adam = optax.adam(1e-2)
  tx = disam_jax.disam(adam, rho, 0.0) if sharp else None
  opt = tx.init(params) if sharp else adam.init(params)
  moving = jnp.zeros((M, 16 * 10 + 10))
  for k in range(3):
    w = weight if k >= anneal else 0.0

    def domain_losses(p, moving=moving):
      means, out = _per_domain(p, *_batch(k))
      v = penalties.fishr_domain_gradient_variance(_head, p["classifier"], out.features, out.labels)
      return means + w * penalties.fishr_penalty(v, moving, ema)[0]

    _, out = _per_domain(params, *_batch(k))  # the moving average advances from the unperturbed weights
    v = penalties.fishr_domain_gradient_variance(_head, params["classifier"], out.features, out.labels)
    next_moving = penalties.fishr_penalty(v, moving, ema)[1]
    if k == anneal:
      opt = opt._replace(base_state=adam.init(params)) if sharp else adam.init(params)
    if sharp:
      u, opt = tx.update(None, opt, params, domain_loss_fn=domain_losses)
    else:
      u, opt = adam.update(jax.grad(lambda p: jnp.mean(domain_losses(p)))(params), opt, params)
    params = optax.apply_updates(params, u)
    moving = next_moving
  _close(nnx.to_pure_dict(state.params), params)
  _close(disam_jax.find_disam_state(state.opt_state).aux.penalty_state, moving)
  assert history[0]["objective"] == history[0]["loss"]  # weight 0 before the anneal step


def test_registry_names_rules_penalties_and_their_combinations():
  for name in (
    "erm",
    "sam",
    "disam",
    "gsam",
    "sagm",
    "disam_gsam",
    "disam_sagm",
    "coral",
    "vrex",
    "fishr",
    "disam+coral",
    "disam+vrex",
    "disam+fishr",
    "disam_sagm+coral",
    "sam+coral",
  ):
    assert name in algorithms.ALGORITHMS
  spec = algorithms.ALGORITHMS["disam+fishr"]
  assert (spec.rule, spec.penalty) == ("disam", "fishr")
  assert algorithms.ALGORITHMS["coral"].rule == "erm"
  with pytest.raises(ValueError, match=r"did you mean disam\+vrex\? the rule comes first"):
    algorithms.check_algorithm("vrex+disam")
  with pytest.raises(ValueError, match="vrex_anneal_steps is None"):
    algorithms.make_penalty("vrex", HParams())


def test_for_run_keeps_domainbeds_anneal_fraction():
  hp = HParams().for_run(300)
  assert (hp.vrex_anneal_steps, hp.fishr_anneal_steps) == (30, 90)  # DomainBed: 500 and 1500 of 5000 steps
  assert HParams().for_run(5000).vrex_anneal_steps == 500
  assert HParams(vrex_anneal_steps=7).for_run(300).vrex_anneal_steps == 7


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("coral_gamma", -1.0, "coral_gamma must be >= 0"),
    ("fishr_ema", 1.0, "fishr_ema must be in [0, 1)"),
    ("vrex_anneal_steps", -3, "vrex_anneal_steps must be an integer >= 0"),
    ("alpha", float("nan"), "alpha must be a finite number"),
  ],
)
def test_bad_hyperparameters_are_refused(field, value, message):
  with pytest.raises(ValueError) as e:
    HParams(**{field: value}).validate()
  assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# End to end in disam-train: one tiny run with every algorithm, one test per algorithm
# ---------------------------------------------------------------------------------------------------------------------

END_TO_END = (
  "coral",
  "vrex",
  "fishr",
  "disam+coral",
  "disam+vrex",
  "disam+fishr",
  "gsam",
  "sagm",
  "disam_gsam",
  "disam_sagm",
  "disam_sagm+coral",
  "sam+coral",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from disam_jax.harness import cli

  run = tmp_path_factory.mktemp("algorithms") / "run"
  argv = [
    "--algorithm",
    *END_TO_END,
    "--held-out",
    "75",
    "--model-option",
    "hidden=16",
    "--batch-size",
    "8",
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--vrex-anneal-steps",
    "2",
    "--fishr-anneal-steps",
    "2",
    "--output-dir",
    str(run),
    "--no-plots",
    "--quiet",
  ]
  assert cli.main(argv) == 0
  return run


@pytest.mark.slow  # 12 algorithms in one run; default tier: test_fishr_resumes_exactly_with_its_moving_average
@pytest.mark.parametrize("algorithm", END_TO_END)
def test_algorithm_trains_end_to_end_in_disam_train(tiny_run, algorithm):
  results = json.loads((tiny_run / "results.json").read_text())
  assert algorithm in {c["algorithm"] for c in results["cells"]}
  assert f"| {algorithm.upper()} |" in (tiny_run / "results.md").read_text()
  path = os.path.join(cell_directory(str(tiny_run), algorithm, "75", 0), "metrics.jsonl")
  with open(path) as f:
    lines = [json.loads(s) for s in f]
  steps = [line for line in lines if "loss" in line]
  assert len(steps) == 4 and all(np.isfinite(line["loss"]) for line in steps)
  if "+" in algorithm or algorithm in algorithms.PENALTIES:
    assert all(np.isfinite(line["objective"]) and line["penalty"] >= 0 for line in steps)
  config = json.loads((tiny_run / "config.json").read_text())
  assert config["hparams"]["vrex_anneal_steps"] == 2 and config["hparams"]["fishr_lambda"] == 1000.0


@pytest.mark.slow  # needs tiny_run; default tier: test_harness_report's merge tests
def test_report_merge_keeps_every_algorithm_apart(tiny_run, tmp_path):
  import shutil

  from disam_jax.harness import report

  other = tmp_path / "other"
  shutil.copytree(tiny_run, other)
  cells, config, data = report.merge_runs([str(tiny_run), f"{other}=_b"])
  names = {c["algorithm"] for c in cells}
  assert names == set(END_TO_END) | {f"{a}_b" for a in END_TO_END}
  out = tmp_path / "merged"
  out.mkdir()
  report.write_report(str(out), cells, config, plots=False, data=data)
  text = (out / "results.md").read_text()
  for name in names:
    assert f"| {name.upper()} |" in text, name


def test_fishr_resumes_exactly_with_its_moving_average(tmp_path):
  """Fishr's moving average and the anneal-step reset live in the optimizer state, which the checkpoint holds."""
  from disam_jax.harness import cli

  base = [
    "--algorithm",
    "disam+fishr",
    "--held-out",
    "75",
    "--model-option",
    "hidden=16",
    "--batch-size",
    "8",
    "--eval-every",
    "2",
    "--fishr-anneal-steps",
    "3",
    "--fishr-lambda",
    "10",
    "--no-plots",
    "--quiet",
  ]
  full, part = tmp_path / "full", tmp_path / "part"
  assert cli.main(base + ["--steps", "5", "--output-dir", str(full)]) == 0
  assert cli.main(base + ["--steps", "2", "--output-dir", str(part)]) == 0
  assert cli.main(["--resume", "--output-dir", str(part), "--steps", "5", "--quiet", "--no-plots"]) == 0
  read = lambda run: [
    json.loads(s) for s in open(os.path.join(cell_directory(str(run), "disam+fishr", "75", 0), "metrics.jsonl"))
  ]
  a, b = read(full), read(part)
  assert len(a) == len(b) == 6
  for x, y in zip(a[1:], b[1:]):
    np.testing.assert_allclose(
      [x["loss"], x["penalty"], x["objective"]], [y["loss"], y["penalty"], y["objective"]], rtol=1e-6
    )
