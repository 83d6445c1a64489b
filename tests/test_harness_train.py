"""Tests for the harness training step and loop (disam_jax.harness.algorithms, train, checkpoint).

The references are independent of the harness plumbing: a hand-written MLP forward pass and per-domain
cross-entropy on plain dicts of arrays, stepped with `disam_jax.disam(...).update` or `jax.grad` + optax directly;
BatchNorm statistics recomputed with `apply_model` at the unperturbed and at hand-perturbed weights. Models are
tiny (MLP with 16 hidden units, a one-block ResNet of width 2) and runs take a dozen steps.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import disam_jax
from disam_jax.harness import algorithms, data
from disam_jax.harness.algorithms import HParams
from disam_jax.harness.config import ExperimentConfig
from disam_jax.harness.experiment import cell_directory, harden_domain, load_latest_state, run_experiment
from disam_jax.harness.loop import _compile, select_best
from disam_jax.harness.models import apply_model
from disam_jax.harness.steps import init_model, init_train_state, make_train_step
from tests._runs import metrics_lines, run_killed_at
from tests._steps import disam_step

M, B = 3, 4  # domains, examples per domain


def _batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.random((M, B, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, (M, B)).astype(np.int32)
  y[0] = y[0, 0]  # one domain with a single class: its loss moves apart from the others, the variance matters
  return x, y


def _mlp_forward(p, x):
  h = x.reshape(x.shape[0], -1)
  for layer in (p["backbone"]["layers"][0], p["backbone"]["layers"][1]):
    h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
  return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def _per_domain_ce(p, x, y):
  """[M] mean cross-entropy per domain, written out by hand on a plain dict of MLP weights."""
  m, b = y.shape
  logp = jax.nn.log_softmax(_mlp_forward(p, x.reshape((m * b,) + x.shape[2:])))
  nll = -jnp.take_along_axis(logp, y.reshape(-1, 1), axis=1)[:, 0]
  return nll.reshape(m, b).mean(axis=1)


def _pure(state):
  return nnx.to_pure_dict(state)


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for u, v in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def mlp():
  return init_model("mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs={"hidden": 16})


@pytest.mark.parametrize(
  "algorithm, hparams, base_tx, lam",
  [
    ("disam", HParams(rho=0.3, lam=0.5), optax.adam(1e-3), 0.5),
    (
      "sam",
      HParams(optimizer="sgd", lr=0.1, weight_decay=1e-3, rho=0.2, adaptive=True),
      optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9)),
      0.0,
    ),
  ],
)
def test_step_matches_disam_on_hand_written_losses(mlp, algorithm, hparams, base_tx, lam):
  graphdef, params, model_state = mlp
  tx = algorithms.make_optimizer(algorithm, hparams, num_domains=M, aux_example=model_state)
  step = jax.jit(make_train_step(graphdef, tx))
  state = init_train_state(params, model_state, tx)

  ref_tx = disam_jax.disam(base_tx, hparams.rho, lam, adaptive=hparams.adaptive, num_domains=M)

  ref_step = jax.jit(disam_step(ref_tx, _per_domain_ce))
  ref_params = _pure(params)
  ref_state = ref_tx.init(ref_params)
  for k in range(2):
    x, y = _batch(k)
    state, metrics = step(state, (x, y))
    ref_params, ref_state = ref_step(ref_params, ref_state, x, y)
    np.testing.assert_allclose(metrics["domain_losses"], ref_state.domain_losses, rtol=1e-5)
    np.testing.assert_allclose(metrics["variance"], ref_state.variance, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(metrics["perturbation_norm"], ref_state.perturbation_norm, rtol=1e-5)
  assert float(ref_state.variance) > 1e-3  # the variance term is exercised
  assert int(state.step) == 2
  _assert_trees_close(_pure(state.params), ref_params)


def test_erm_step_is_grad_of_mean_loss_plus_adam(mlp):
  graphdef, params, model_state = mlp
  tx = algorithms.make_optimizer("erm", HParams(lr=1e-2), num_domains=M, aux_example=model_state)
  step = jax.jit(make_train_step(graphdef, tx))
  state = init_train_state(params, model_state, tx)
  adam = optax.adam(1e-2)

  @jax.jit
  def ref_step(ref_params, adam_state, x, y):
    grads = jax.grad(lambda p: jnp.mean(_per_domain_ce(p, x, y)))(ref_params)
    updates, adam_state = adam.update(grads, adam_state, ref_params)
    return optax.apply_updates(ref_params, updates), adam_state

  ref_params = _pure(params)
  adam_state = adam.init(ref_params)
  for k in range(2):
    x, y = _batch(k)
    state, metrics = step(state, (x, y))
    ref_params, adam_state = ref_step(ref_params, adam_state, x, y)
  assert metrics["perturbation_norm"] == 0
  assert metrics["domain_losses"].shape == (M,) and float(metrics["variance"]) > 0
  _assert_trees_close(_pure(state.params), ref_params)


def test_batchnorm_statistics_come_from_the_unperturbed_pass():
  graphdef, params, model_state = init_model(
    "resnet18", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs={"width": 2, "stage_sizes": (1,)}
  )
  assert jax.tree.leaves(model_state), "the model must carry BatchNorm statistics"
  rho, lam = 0.5, 0.5
  tx = algorithms.make_optimizer("disam", HParams(rho=rho, lam=lam), num_domains=M, aux_example=model_state)
  x, y = _batch(3)
  state, _ = jax.jit(make_train_step(graphdef, tx))(init_train_state(params, model_state, tx), (x, y))

  flat_x, flat_y = x.reshape((M * B,) + x.shape[2:]), y.reshape(-1)

  @jax.jit
  def reference(params):
    def perturbation_objective(p):  # L - lam * Var of the per-domain losses, by hand
      logits, _ = apply_model(graphdef, p, model_state, flat_x, train=True)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, flat_y).reshape(M, B).mean(axis=1)
      return jnp.mean(losses) - lam * jnp.mean((losses - jnp.mean(losses)) ** 2)

    g = jax.grad(perturbation_objective)(params)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, d: w + rho * d / norm, params, g)
    _, unperturbed_stats = apply_model(graphdef, params, model_state, flat_x, train=True)
    _, perturbed_stats = apply_model(graphdef, perturbed, model_state, flat_x, train=True)
    return unperturbed_stats, perturbed_stats

  unperturbed_stats, perturbed_stats = reference(params)

  _assert_trees_close(_pure(state.model_state), _pure(unperturbed_stats), rtol=1e-5, atol=1e-7)
  gap = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(unperturbed_stats), jax.tree.leaves(perturbed_stats))
  )
  assert gap > 1e-3, "the test must be able to tell the two passes apart"
  moved = max(
    float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state.model_state), jax.tree.leaves(model_state))
  )
  assert moved > 1e-3, "the running statistics were updated"


# ---------------------------------------------------------------------------------------------------------------------
# The loop: checkpoints, exact resume, selection
# ---------------------------------------------------------------------------------------------------------------------


def _config(**overrides):
  base = ExperimentConfig(
    algorithms=("disam",),
    held_out=("75",),
    seeds=(0,),
    steps=12,
    eval_every=4,
    model="mlp",
    # dropout puts an RNG key and counter in the model state: resume must restore them too
    model_kwargs={"hidden": 16, "dropout": 0.1},
    hparams=HParams(batch_size=8),
  )
  return dataclasses.replace(base, **overrides)


def _final_state(run_dir, config):
  graphdef, params, model_state = init_model(
    config.model_name, num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs=config.model_kwargs
  )
  tx = algorithms.make_optimizer("disam", config.hparams, num_domains=5, aux_example=model_state)
  template = init_train_state(params, model_state, tx)
  return load_latest_state(cell_directory(run_dir, "disam", "75", 0), template)


def _metrics_without_time(run_dir):
  return metrics_lines(run_dir, "75")


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
  config = _config()
  full = run_experiment(config, str(tmp_path / "full"), progress=False)

  interrupted = str(tmp_path / "interrupted")
  run_killed_at(config, interrupted, 7)
  cell = cell_directory(interrupted, "disam", "75", 0)
  assert not os.path.exists(os.path.join(cell, "result.json"))
  assert sorted(int(s) for s in os.listdir(os.path.join(cell, "checkpoints"))) == [4]
  resumed = run_experiment(config, interrupted, progress=False, resume=True)

  (state_a, meta_a), (state_b, meta_b) = _final_state(str(tmp_path / "full"), config), _final_state(interrupted, config)
  assert int(state_a.step) == int(state_b.step) == 12
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta_a == meta_b  # sampler state and evaluations
  assert _metrics_without_time(str(tmp_path / "full")) == _metrics_without_time(interrupted)
  assert full[0].selected == resumed[0].selected and full[0].last == resumed[0].last
  assert full[0].evals == resumed[0].evals


def test_cells_share_the_initialization_and_the_step_donates_its_state(tmp_path):
  # The step donates the training state; the cells of one held-out domain start from the same initialization,
  # which must survive the first cell: the second algorithm trains exactly as it does alone.
  config = _config(algorithms=("erm", "disam"), steps=5, eval_every=2)
  both = run_experiment(config, str(tmp_path / "both"), progress=False)
  alone = run_experiment(dataclasses.replace(config, algorithms=("disam",)), str(tmp_path / "alone"), progress=False)
  assert both[1].evals == alone[0].evals
  assert _metrics_without_time(str(tmp_path / "both")) == _metrics_without_time(str(tmp_path / "alone"))
  graphdef, params, model_state = init_model(
    "mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs=config.model_kwargs
  )
  compiled = _compile(config, graphdef, model_state, 5)
  step = compiled.train_steps["disam"]
  state = init_train_state(params, model_state, compiled.txs["disam"])
  batch = (jnp.zeros((5, 8, 8, 8, 1)), jnp.zeros((5, 8), jnp.int32))
  assert "tf.aliasing_output" in step.lower(state, batch).as_text()


def test_the_loop_step_is_the_train_step_over_flat_leaves_with_its_metrics_packed():
  """What run_cell calls (`_LoopStep`: the state's flat leaves in and out, the metrics as one float32 vector) gives
  the jitted train step's state and metrics: every metric by name and shape, bit for bit, for ERM and DISAM with its
  [M] perturbation weights and the non-finite sam_cosine of a run without --diagnostics."""
  config = _config(algorithms=("erm", "disam"), steps=5, eval_every=2)
  graphdef, params, model_state = init_model(
    "mlp", num_classes=10, input_shape=(8, 8, 1), seed=0, model_kwargs=config.model_kwargs
  )
  compiled = _compile(config, graphdef, model_state, 5)
  rng = np.random.default_rng(0)
  batch = (rng.standard_normal((5, 8, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, (5, 8)).astype(np.int32))
  for algorithm in ("erm", "disam"):
    fresh = lambda: init_train_state(params, model_state, compiled.txs[algorithm])
    want_state, want = compiled.train_steps[algorithm](jax.tree.map(jnp.copy, fresh()), batch)
    leaves, treedef = jax.tree.flatten(jax.tree.map(jnp.copy, fresh()))
    loop_step = compiled.loop_steps[algorithm]
    got_leaves, packed = loop_step.for_tree(treedef)(leaves, batch)
    got = loop_step.unpack(treedef, packed)
    assert packed.dtype == jnp.float32 and packed.ndim == 1
    assert sorted(got) == sorted(want), algorithm
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], np.asarray(value, np.float32), err_msg=f"{algorithm} {name}")
      assert got[name].shape == np.shape(value), (algorithm, name)
    assert len(got_leaves) == len(jax.tree.leaves(want_state))
    for a, b in zip(got_leaves, jax.tree.leaves(want_state)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):  # the model state's dropout keys
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert got["perturbation_weights"].shape == (5,) and np.isnan(got["sam_cosine"])


def test_checkpoints_keep_latest_and_best_and_selection_picks_best_validation(tmp_path):
  config = _config(steps=8, eval_every=2)
  (result,) = run_experiment(config, str(tmp_path / "run"), progress=False)
  assert [e["step"] for e in result.evals] == [0, 2, 4, 6, 8]
  best = max(result.evals, key=lambda e: e["val_acc_mean"])  # max() returns the first of equal values
  assert result.selected == {"step": best["step"], "val_acc": best["val_acc_mean"], "test_acc": best["test_acc"]}
  assert result.last["step"] == 8
  kept = sorted(int(s) for s in os.listdir(os.path.join(result.directory, "checkpoints")))
  assert kept == sorted({best["step"], 8})
  assert os.path.exists(os.path.join(str(tmp_path / "run"), "results.md"))


def test_select_best_takes_the_earliest_of_equal_validation_accuracies():
  evals = [
    {"step": s, "val_acc_mean": v, "test_acc": t}
    for s, v, t in [(0, 0.1, 0.1), (10, 0.8, 0.5), (20, 0.9, 0.6), (30, 0.9, 0.7), (40, 0.85, 0.9)]
  ]
  assert select_best(evals)["step"] == 20


def test_harden_domain_subsamples_and_corrupts_only_that_training_domain():
  ds = data.load_dataset("rotated_digits", seed=0)
  split = data.split_dataset(ds, "75", seed=0)
  hard = harden_domain(split, "30", fraction=0.1, label_noise=0.5, num_classes=10, seed=0)
  i = split.train_domains.index("30")
  x, y = hard.train[i]
  assert len(x) == round(0.1 * len(split.train[i][0]))
  # every kept example comes from the original domain; half of the labels changed, each to another class
  originals = {a.tobytes(): b for a, b in zip(*split.train[i])}
  before = np.asarray([originals[a.tobytes()] for a in x])
  assert np.sum(before != y) == round(0.5 * len(y))
  for j, _d in enumerate(split.train_domains):
    if j != i:
      assert hard.train[j][0] is split.train[j][0]
  assert hard.val is split.val and hard.test is split.test
  assert harden_domain(split, "75", fraction=0.1, num_classes=10, seed=0) is split  # held out: unchanged


def test_progress_of_a_resumed_run_says_where_it_resumes_and_does_not_time_the_steps_done(tmp_path, capsys):
  """The bar counts a resumed run's finished steps without timing them (an update by thousands of steps read as
  thousands of steps per second) and says 'resuming ... from step N'."""
  from disam_jax.harness import experiment

  cell = tmp_path / "cell"
  (cell / "checkpoints" / "6").mkdir(parents=True)
  import time

  bar = experiment._Progress(True, 2400)
  time.sleep(0.2)  # past tqdm's mininterval, so that an update would be timed
  bar.update(1200)  # a finished run
  bar.start_run("disam", "75", 0, str(cell))
  assert bar._bar.n == 1206
  assert bar._bar.format_dict["rate"] is None  # nothing timed yet: no made-up rate
  bar.step_hook(None, "disam", "75", 0)(7, {"loss": 1.0})
  assert bar._bar.n == 1207
  bar.close()
  assert "resuming disam held-out 75 seed 0 from step 6" in capsys.readouterr().err
